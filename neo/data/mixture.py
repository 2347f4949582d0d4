"""Several datasets mixed by weight into batches: the tfrecord token source.

Which dataset each example comes from is decided in periods of PERIOD examples: every period
holds each dataset exactly its share of slots (largest remainder, at least one slot each), in
an order shuffled by (seed, host, period). So the mix is random within a period, exact over
each period, and how many examples each dataset has given after any number of batches is
arithmetic. The source's whole position is therefore the number of batches drawn: `state()`
is `{"step": ...}` plus what it was computed for, identical on every host, and `restore()`
recomputes each dataset's example index from it.
"""

from __future__ import annotations

import logging

import numpy as np

from neo.data.sampling import DatasetStream
from neo.errors import NeoError

PERIOD = 1 << 14


class MixSchedule:
    """The dataset index of each of this host's examples."""

    def __init__(self, weights: list[float], seed: tuple[int, ...], process_index: int = 0):
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        quotas = np.maximum(np.floor(w * PERIOD).astype(np.int64), 1)
        by_remainder = np.argsort(-(w * PERIOD - np.floor(w * PERIOD)), kind="stable")
        for i in range(max(0, PERIOD - int(quotas.sum()))):
            quotas[by_remainder[i % len(w)]] += 1
        while quotas.sum() > PERIOD:  # only when many tiny weights were lifted to one slot
            quotas[int(np.argmax(quotas))] -= 1
        self.quotas = quotas
        self.labels = np.repeat(np.arange(len(w)), quotas)
        self.seed, self.p = seed, process_index
        self._cached: tuple[int, np.ndarray] = (-1, self.labels)

    def period(self, k: int) -> np.ndarray:
        if self._cached[0] != k:
            order = self.labels
            if len(self.quotas) > 1:
                order = np.random.default_rng([*self.seed, 2, self.p, k]).permutation(self.labels)
            self._cached = (k, order)
        return self._cached[1]

    def counts(self, j: int) -> list[int]:
        """Examples each dataset has given among this host's first j."""
        full, rest = divmod(j, PERIOD)
        partial = np.bincount(self.period(full)[:rest], minlength=len(self.quotas))
        return [int(c) for c in full * self.quotas + partial]

    def take(self, j: int, n: int) -> np.ndarray:
        """Dataset indices of examples j .. j+n-1."""
        out = []
        while n:
            k, r = divmod(j, PERIOD)
            part = self.period(k)[r:r + n]
            out.append(part)
            j, n = j + len(part), n - len(part)
        return np.concatenate(out) if out else np.zeros(0, np.int64)


class TFRecordSource:
    """This host's rows of each global batch, [batch_size // process_count, n_ctx + 1] int32."""

    def __init__(self, streams: list[DatasetStream], weights: list[float], batch_size: int, n_ctx: int,
                 seed: int, process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise NeoError(f"batch size {batch_size} does not split over {process_count} hosts.")
        self.streams, self.batch_size, self.n_ctx = streams, batch_size, n_ctx
        self.process_count = process_count
        self.rows = batch_size // process_count
        self.schedule = MixSchedule(weights, (seed,), process_index)
        self._seek(0)

    def _seek(self, step: int) -> None:
        self.step = step
        self._j = step * self.rows
        counts = self.schedule.counts(self._j)
        self._examples = [s.examples(c) for s, c in zip(self.streams, counts)]

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        out = np.empty((self.rows, self.n_ctx + 1), np.int32)
        for row, d in enumerate(self.schedule.take(self._j, self.rows)):
            out[row] = next(self._examples[d])[0]
        self._j += self.rows
        self.step += 1
        return out

    def state(self) -> dict:
        return {"step": self.step, "batch_size": self.batch_size, "process_count": self.process_count}

    def restore(self, state: dict) -> None:
        step = int(state["step"])
        batch = int(state.get("batch_size", self.batch_size))
        hosts = int(state.get("process_count", self.process_count))
        if hosts != self.process_count:
            logging.warning("data: the checkpoint was written with %d host(s), this run has %d: files are "
                            "split differently, so the data order will not match an uninterrupted run.",
                            hosts, self.process_count)
        if batch != self.batch_size:
            seen = step * batch
            logging.warning("data: train_batch_size changed from %d to %d; resuming after %d examples%s.",
                            batch, self.batch_size, seen,
                            "" if seen % self.batch_size == 0 else " (rounded down to whole batches)")
            step = seen // self.batch_size
        self._seek(step)

