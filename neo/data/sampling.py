"""One dataset's training examples: file order, shuffling, and sampling modes, by global index.

Every example of a dataset has a global index c = 0, 1, 2, ... and is a pure function of
(seed, c), the same whichever process asks and however many there are (as Megatron's and
levanter's samples are indexed): the stream can be entered at any c by arithmetic over the
files' record counts plus reading one shuffle block, which is what makes resuming exact and
cheap, and what lets each process read only the examples of its own rows of a batch.

- Epoch e visits every record once: the files in natural order or shuffled by (seed, e),
  concatenated. Record i of the dataset's stream is record i mod N of epoch i div N (N records
  in all). Epochs follow each other forever.
- Within an epoch, records are shuffled in blocks of SHUFFLE_BLOCK consecutive records, each by
  its own generator seeded with (seed, epoch, block) (not for GPT-Neo's sequential_input, which
  reads them in order).
- Sampling modes turn records into [n_ctx + 1]-token examples:
  `chunks`: records of equal length R give (R - 1) // n_ctx windows each, consecutive windows
  sharing one token (the last target of one is the first input of the next), so a record of
  n_ctx + 1 tokens is one example and none is wasted; example c is window c mod W of record
  c div W;
  `documents_fixed`: example c is records c x stitch ... (c + 1) x stitch - 1 joined by eos_id,
  first n_ctx + 1 tokens;
  `documents_random`: the same, then a window of n_ctx + 1 tokens at an offset drawn with the
  shuffle of the group's first record (a pure function of its position in the stream).
  Short stitched documents are padded with PAD (neo/data/__init__.py), never a target
  (documents_random warns: raise stitch).

Which records an example needs is arithmetic (the shuffles are drawn, never read), so a process
reads exactly the records of its own rows, by number (tfrecords.py `RecordFiles`: one seek and
read per run of consecutive records), and the bytes each host reads per step fall with the
number of hosts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from neo.data import PAD
from neo.data.tfrecords import RecordFiles
from neo.errors import NeoError

SHUFFLE_BLOCK = 1024  # records shuffled together


@dataclass(frozen=True)
class DatasetSpec:
    """What one dataset stream needs: its files and how to turn them into examples."""

    name: str
    files: tuple[str, ...]
    counts: tuple[int, ...]
    mode: str
    stitch: int
    n_ctx: int
    eos_id: int
    n_vocab: int
    seed: tuple[int, ...]
    shuffle_files: bool = True
    shuffle_records: bool = True


@dataclass
class Record:
    tokens: np.ndarray
    file: str
    u: float  # a uniform draw tied to this record's position: documents_random's window offset


class DatasetStream:
    """One dataset's examples, by global example index."""

    def __init__(self, spec: DatasetSpec, record_length: Optional[int] = None):
        if not any(spec.counts):
            raise NeoError(f"dataset '{spec.name}': its {len(spec.files)} file(s) hold no records.")
        self.spec = spec
        self.records_per_epoch = sum(spec.counts)
        self.files = RecordFiles(spec.n_vocab)
        self._loaded: dict[int, Record] = {}  # records of the examples being assembled, by stream index
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._shuffles: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.windows = 1
        if spec.mode == "chunks":
            first = next(i for i, c in enumerate(spec.counts) if c)
            self.record_length = record_length or len(self._read(first, [0])[0])
            if self.record_length < spec.n_ctx + 1:
                raise NeoError(
                    f"dataset '{spec.name}': its records hold {self.record_length} tokens, fewer than "
                    f"n_ctx + 1 = {spec.n_ctx + 1}, so 'chunks' sampling cannot fill a context. Make chunks "
                    f"with create_tfrecords.py --chunk_size {spec.n_ctx}, or sample with documents_random "
                    f"and a stitch.")
            self.windows = (self.record_length - 1) // spec.n_ctx
        self._warned_short = False

    # --- which records an epoch holds, in which order

    def epoch_files(self, epoch: int) -> list[int]:
        """Indices of the files epoch `epoch` reads, in reading order."""
        order = np.arange(len(self.spec.files))
        if self.spec.shuffle_files:
            order = np.random.default_rng([*self.spec.seed, 0, epoch]).permutation(order)
        return [int(i) for i in order if self.spec.counts[i]]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's files in reading order, the epoch index of each one's first record)."""
        if epoch not in self._epochs:
            files = np.array(self.epoch_files(epoch), np.int64)
            firsts = np.concatenate([[0], np.cumsum([self.spec.counts[i] for i in files])[:-1]]).astype(np.int64)
            self._epochs = {e: v for e, v in self._epochs.items() if e > epoch - 2}
            self._epochs[epoch] = (files, firsts)
        return self._epochs[epoch]

    def _shuffle(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Shuffle block `block` of `epoch`: (its permutation, a uniform draw per position)."""
        if (epoch, block) not in self._shuffles:
            size = min(SHUFFLE_BLOCK, self.records_per_epoch - block * SHUFFLE_BLOCK)
            rng = np.random.default_rng([*self.spec.seed, 1, epoch, block])
            perm = rng.permutation(size) if self.spec.shuffle_records else np.arange(size)
            u = rng.random(size)
            if len(self._shuffles) >= 8:  # batches move forward through a few blocks at a time
                self._shuffles.pop(next(iter(self._shuffles)))
            self._shuffles[(epoch, block)] = (perm, u)
        return self._shuffles[(epoch, block)]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Records `indices` of the dataset's stream (shuffled order, epochs one after another)
        are records `numbers` of files `files`: (files, numbers, each one's uniform draw)."""
        epoch, j = np.divmod(np.asarray(indices, np.int64), self.records_per_epoch)
        block, q = np.divmod(j, SHUFFLE_BLOCK)
        position, u = np.empty_like(j), np.empty(len(j))  # position: in the epoch's files, concatenated
        files, numbers = np.empty_like(j), np.empty_like(j)
        for e in np.unique(epoch).tolist():
            in_epoch = epoch == e
            for b in np.unique(block[in_epoch]).tolist():
                at = in_epoch & (block == b)
                perm, draws = self._shuffle(e, b)
                position[at], u[at] = b * SHUFFLE_BLOCK + perm[q[at]], draws[q[at]]
            order, firsts = self._epoch(e)
            k = np.searchsorted(firsts, position[in_epoch], side="right") - 1
            files[in_epoch], numbers[in_epoch] = order[k], position[in_epoch] - firsts[k]
        return files, numbers, u

    def load(self, indices: Sequence[int]) -> None:
        """Read records `indices` of the stream (and only those), for `record` to return."""
        indices = np.unique(np.asarray(indices, np.int64))
        files, numbers, u = self.locate(indices)
        self._loaded = {}
        for file in np.unique(files).tolist():
            mine = np.flatnonzero(files == file)
            path = self.spec.files[file]
            for i, tokens, draw in zip(indices[mine].tolist(), self._read(file, numbers[mine]), u[mine].tolist()):
                self._loaded[i] = Record(tokens, path, draw)

    def _read(self, file: int, numbers: Sequence[int]) -> list[np.ndarray]:
        """Records `numbers` of file `file`, after checking its count against its name."""
        path, named = self.spec.files[file], self.spec.counts[file]
        held = self.files.count(path)
        if held > named:
            raise NeoError(f"{path}: holds more records than its name says ({named}): {held}; rename it to "
                           f"end in _{held}.tfrecords (neo relies on the count to resume exactly).")
        if held < named:
            raise NeoError(f"{path}: holds {held} records but its name says {named}; rename it to "
                           f"end in _{held}.tfrecords (neo relies on the count to resume exactly).")
        return self.files.read(path, numbers)

    def record(self, i: int) -> Record:
        """Record i of the dataset's stream, as the last `load` read it."""
        return self._loaded[i]

    # --- examples

    def examples(self, indices: Sequence[int]) -> np.ndarray:
        """Examples `indices` (ascending, as a process's rows of successive batches are) as
        [len(indices), n_ctx + 1] int32, reading just their records."""
        self.load(self.records_of(indices))
        out = np.empty((len(indices), self.spec.n_ctx + 1), np.int32)
        for row, c in enumerate(indices):
            out[row] = self.example(int(c))
        return out

    def records_of(self, indices: Sequence[int]) -> np.ndarray:
        """The stream's records that examples `indices` are made of (as `example` reads them)."""
        c = np.asarray(indices, np.int64)
        if self.spec.mode == "chunks":
            return c // self.windows
        return (c[:, None] * self.spec.stitch + np.arange(self.spec.stitch)).ravel()

    def example(self, c: int) -> np.ndarray:
        s, n = self.spec, self.spec.n_ctx
        if s.mode == "chunks":
            i, w = divmod(c, self.windows)
            rec = self.record(i)
            if len(rec.tokens) != self.record_length:
                raise NeoError(
                    f"{rec.file}: a record of {len(rec.tokens)} tokens among records of "
                    f"{self.record_length}: 'chunks' sampling needs equal-length records (chunk files). "
                    f"Use documents_fixed or documents_random for one-document-per-record files.")
            return rec.tokens[w * n:w * n + n + 1]
        group = [self.record(c * s.stitch + k) for k in range(s.stitch)]
        seq = self._stitch([r.tokens for r in group])
        if s.mode == "documents_random" and len(seq) > n + 1:
            r = int(group[0].u * (len(seq) - n))
            seq = seq[r:r + n + 1]
        elif len(seq) < n + 1:
            if s.mode == "documents_random" and not self._warned_short:
                logging.warning("dataset '%s': %d stitched document(s) hold only %d tokens, fewer than "
                                "n_ctx + 1 = %d; the rest is padding (no target). Raise 'stitch' (%s).",
                                s.name, s.stitch, len(seq), n + 1, group[0].file)
                self._warned_short = True
            seq = np.concatenate([seq, np.full(n + 1 - len(seq), PAD, np.int32)])
        return seq[:n + 1]

    def _stitch(self, docs: list[np.ndarray]) -> np.ndarray:
        """doc1 eos doc2 eos ... doc_k (no eos added after a document that already ends in one)."""
        if len(docs) == 1:
            return docs[0]
        eos = np.array([self.spec.eos_id], np.int32)
        parts = []
        for i, d in enumerate(docs):
            parts.append(d)
            if i < len(docs) - 1 and d[-1] != self.spec.eos_id:
                parts.append(eos)
        return np.concatenate(parts)
