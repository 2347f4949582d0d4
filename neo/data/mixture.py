"""Several datasets mixed by weight into batches: the tfrecord token source.

Batches are cut from one global sequence of examples: the batch drawn after n examples holds
global examples n, n+1, ..., n + batch_size - 1, row r being example n + r, so the global
batch at every step is a function of the config, the seed and the step alone, and each process
reads just the rows its devices hold (neo/mesh.py `process_rows`), whatever their number.

Which dataset global example g comes from is decided in periods of PERIOD examples: every
period holds each dataset exactly its share of slots (largest remainder, at least one slot
each), in an order shuffled by (seed, period). So the mix is random within a period and exact
over each period, and which example of its dataset g is (how many earlier examples that
dataset gave) is arithmetic. The source's whole position is therefore the number of examples
drawn: `state()` holds it, and `restore()` recomputes everything else from it, on any number
of processes and with any batch size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from neo.data.sampling import DatasetStream

PERIOD = 1 << 14
# Rows of this process read at once, over as many batches as that takes: one parse and one read
# per run of records then serve several small batches (each has a fixed cost of ~1 ms). A source
# reads 1 batch, then 2, 4, ... up to this, so a short evaluation reads little more than it uses.
READ_AHEAD = 1024


class MixSchedule:
    """The dataset of each global example, and its index within that dataset."""

    def __init__(self, weights: list[float], seed: tuple[int, ...]):
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
        self.seed = seed
        self._cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def period(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot of period k, the slot's rank among its dataset's slots)."""
        if k not in self._cached:
            order = self.labels
            if len(self.quotas) > 1:
                order = np.random.default_rng([*self.seed, 2, k]).permutation(self.labels)
            rank = np.empty(PERIOD, np.int64)
            for d in range(len(self.quotas)):
                slots = np.flatnonzero(order == d)
                rank[slots] = np.arange(len(slots))
            if len(self._cached) >= 2:  # batches move forward: two periods cover any batch
                self._cached.pop(min(self._cached))
            self._cached[k] = (order, rank)
        return self._cached[k]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global examples g -> (their datasets, their indices within those datasets)."""
        g = np.asarray(g, np.int64)
        k, r = np.divmod(g, PERIOD)
        dataset, index = np.empty_like(g), np.empty_like(g)
        for period in np.unique(k):
            at = k == period
            order, rank = self.period(int(period))
            dataset[at] = order[r[at]]
            index[at] = period * self.quotas[dataset[at]] + rank[r[at]]
        return dataset, index

    def take(self, j: int, n: int) -> np.ndarray:
        """Datasets of global examples j .. j+n-1."""
        return self.locate(np.arange(j, j + n))[0]


class TFRecordSource:
    """Rows `rows` of each global batch, [len(rows), n_ctx + 1] int32 (all rows by default)."""

    def __init__(self, streams: list[DatasetStream], weights: list[float], batch_size: int, n_ctx: int,
                 seed: int, rows: Optional[Sequence[int]] = None):
        self.streams, self.batch_size, self.n_ctx = streams, batch_size, n_ctx
        self.rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        self.schedule = MixSchedule(weights, (seed,))
        # what the examples are drawn from: a resume from other data is no longer the same run
        self.datasets = [[st.spec.name, len(st.spec.files), int(sum(st.spec.counts)), st.spec.mode, st.spec.stitch,
                          float(w)] for st, w in zip(streams, weights)]
        self.step = 0
        self.drawn = 0  # global examples in the batches drawn so far
        self._ahead: list[np.ndarray] = []  # this process's rows of the next batches, already read
        self._span = 1  # batches the next read covers

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if not self._ahead:
            self._ahead = self._read_ahead(self._span)
            self._span = max(1, min(2 * self._span, READ_AHEAD // max(1, len(self.rows))))
        self.drawn += self.batch_size
        self.step += 1
        return self._ahead.pop(0)

    def _read_ahead(self, batches: int) -> list[np.ndarray]:
        """This process's rows of the next `batches` batches."""
        g = (self.drawn + self.batch_size * np.arange(batches)[:, None] + self.rows).ravel()
        out = np.empty((len(g), self.n_ctx + 1), np.int32)
        dataset, index = self.schedule.locate(g)
        for d, stream in enumerate(self.streams):
            mine = np.flatnonzero(dataset == d)
            if len(mine):
                out[mine] = stream.examples(index[mine])
        return list(out.reshape(batches, len(self.rows), self.n_ctx + 1))

    def state(self) -> dict:
        return {"step": self.step, "examples": self.drawn, "batch_size": self.batch_size, "datasets": self.datasets}

    def restore(self, state: dict) -> list[str]:
        """Continue after state["examples"] global examples (exactly, whatever the batch size
        and the number of processes were when the state was saved). Returns what the caller
        should tell the user: a changed batch size, or other data under the same position."""
        self.step, self.drawn = int(state["step"]), int(state["examples"])
        self._ahead = []
        notes = []
        if int(state["batch_size"]) != self.batch_size:
            notes.append(f"train_batch_size changed from {state['batch_size']} to {self.batch_size}; the data "
                         f"continues after the {self.drawn} examples already trained on.")
        before = [list(d) for d in state.get("datasets", self.datasets)]  # (older checkpoints: not recorded)
        if before != self.datasets:
            notes.append(f"the datasets differ from those the checkpoint was trained on (name, files, records, "
                         f"sampling mode, stitch, weight: {before} then, {self.datasets} now): examples are drawn in "
                         f"another order from here on, so some already trained on may come again and others never; "
                         f"the resumed run is not the original's.")
        return notes
