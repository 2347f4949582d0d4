"""A token source over one plain-text file, for the quickstart and tests.

The file is tokenized once into memory; the batch for step s is a set of random
(n_ctx+1)-token windows drawn from a generator seeded by (seed, s), all batch_size offsets drawn
by every process, which then cuts only its own rows. Batches are therefore a pure function of
the step, so resuming at step s reproduces exactly what an uninterrupted run sees, on any
number of processes. The last `holdout` fraction of the tokens is the eval split.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from neo.errors import NeoError, read_user_text


class TextSource:
    """Random windows from a tokenized text: rows `rows` of each global batch (default all)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, n_ctx: int, seed: int,
                 rows: Optional[Sequence[int]] = None, name: str = "text"):
        if len(tokens) < n_ctx + 2:
            raise NeoError(f"{name}: only {len(tokens)} tokens, fewer than n_ctx+2 = {n_ctx + 2}; "
                           f"use a longer text or a smaller n_ctx.")
        self.tokens = tokens
        self.batch_size, self.n_ctx, self.seed = batch_size, n_ctx, seed
        self.rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
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

    def restore(self, state: dict) -> list[str]:
        self.step = int(state["step"])
        return []  # the batches are a function of the step: nothing about them to tell


def read_text_tokens(path: str, tokenizer) -> np.ndarray:
    return np.asarray(tokenizer.encode(read_user_text(path, f"text file {path}")), dtype=np.int32)


def split_holdout(tokens: np.ndarray, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): the last `holdout` fraction is eval, as nanoGPT splits tinyshakespeare."""
    cut = int(len(tokens) * (1 - holdout))
    return tokens[:cut], tokens[cut:]
