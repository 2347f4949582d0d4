"""A token source over one plain-text file, for the quickstart and tests.

The file is tokenized once into memory; the batch for step s is a set of random
(n_ctx+1)-token windows drawn from a generator seeded by (seed, s). Batches are therefore a
pure function of the step, so resuming at step s reproduces exactly what an uninterrupted run
sees, on any number of hosts. The last `holdout` fraction of the tokens is the eval split.
"""

from __future__ import annotations

import numpy as np

from neo.errors import NeoError, read_user_text


class TextSource:
    """Random windows from a tokenized text; each process yields its rows of the global batch."""

    def __init__(self, tokens: np.ndarray, batch_size: int, n_ctx: int, seed: int,
                 process_index: int = 0, process_count: int = 1, name: str = "text"):
        if len(tokens) < n_ctx + 2:
            raise NeoError(f"{name}: only {len(tokens)} tokens, fewer than n_ctx+2 = {n_ctx + 2}; "
                           f"use a longer text or a smaller n_ctx.")
        if batch_size % process_count:
            raise NeoError(f"batch size {batch_size} does not split over {process_count} hosts.")
        self.tokens = tokens
        self.batch_size, self.n_ctx, self.seed = batch_size, n_ctx, seed
        self.rows = slice(process_index * batch_size // process_count,
                          (process_index + 1) * batch_size // process_count)
        self.step = 0

    def batch_at(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.n_ctx - 1, size=self.batch_size)[self.rows]
        return np.stack([self.tokens[s:s + self.n_ctx + 1] for s in starts]).astype(np.int32)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])


def read_text_tokens(path: str, tokenizer) -> np.ndarray:
    return np.asarray(tokenizer.encode(read_user_text(path, f"text file {path}")), dtype=np.int32)


def split_holdout(tokens: np.ndarray, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): the last `holdout` fraction is eval, as nanoGPT splits tinyshakespeare."""
    cut = int(len(tokens) * (1 - holdout))
    return tokens[:cut], tokens[cut:]
