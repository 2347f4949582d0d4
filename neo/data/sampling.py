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
  its own generator seeded with (seed, epoch, block).
- Sampling modes turn records into [n_ctx + 1]-token examples:
  `chunks`: records of equal length R give (R - 1) // n_ctx windows each, consecutive windows
  sharing one token (the last target of one is the first input of the next), so a record of
  n_ctx + 1 tokens is one example and none is wasted; example c is window c mod W of record
  c div W;
  `documents_fixed`: example c is records c x stitch ... (c + 1) x stitch - 1 joined by eos_id,
  first n_ctx + 1 tokens;
  `documents_random`: the same, then a window of n_ctx + 1 tokens at an offset drawn with the
  shuffle of the group's first record (a pure function of its position in the stream).
  Short stitched documents are padded with padding_id (documents_random warns: raise stitch).

A batch's examples lie in a few consecutive shuffle blocks, and the rows one process holds
are spread over all of them; so every process reads those blocks (sequentially, as tf.data is
fast at) and turns only its own records into examples.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from neo.data.tfrecords import read_records
from neo.errors import NeoError

SHUFFLE_BLOCK = 1024  # records shuffled together; also what is read to reach any one of them
# A reader this many records or fewer behind the block it must read reads on to it; further
# behind, a new reader is opened there (opening costs ~10 ms; tf.data skips records cheaply).
READ_ON = 1024


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
    padding_id: int
    n_vocab: int
    seed: tuple[int, ...]
    shuffle_files: bool = True


@dataclass
class Record:
    tokens: np.ndarray
    file: str
    u: float  # a uniform draw tied to this record's position: documents_random's window offset


@dataclass
class _Block:
    """One shuffle block, read: its records in epoch (file) order and its shuffle."""

    key: tuple[int, int]  # (epoch, block)
    items: list[tuple[np.ndarray, str]]
    perm: np.ndarray
    u: np.ndarray


class DatasetStream:
    """One dataset's examples, by global example index."""

    def __init__(self, spec: DatasetSpec, record_length: Optional[int] = None):
        if not any(spec.counts):
            raise NeoError(f"dataset '{spec.name}': its {len(spec.files)} file(s) hold no records.")
        self.spec = spec
        self.records_per_epoch = sum(spec.counts)
        self._block: Optional[_Block] = None
        self._reader: Optional[tuple[int, int, Iterator[tuple[np.ndarray, str]]]] = None  # epoch, next, records
        self.windows = 1
        if spec.mode == "chunks":
            first = next(f for f, c in zip(spec.files, spec.counts) if c)
            self.record_length = record_length or len(next(read_records(first, 0)))
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

    def _epoch_records(self, epoch: int, start: int) -> Iterator[tuple[np.ndarray, str]]:
        """Records start, start+1, ... of an epoch, in file order (not shuffled)."""
        g = start  # index into the concatenation of the epoch's files
        for i in self.epoch_files(epoch):
            count = self.spec.counts[i]
            if g >= count:
                g -= count
                continue
            path, seen = self.spec.files[i], g
            for tokens in read_records(path, g, self.spec.n_vocab):
                if seen == count:
                    raise NeoError(f"{path}: holds more records than its name says ({count}); rename it to "
                                   f"end in its true count (neo relies on the count to resume exactly).")
                yield tokens, path
                seen += 1
            if seen != count:
                raise NeoError(f"{path}: holds {seen} records but its name says {count}; rename it to "
                               f"end in _{seen}.tfrecords (neo relies on the count to resume exactly).")
            g = 0

    def _read_block(self, epoch: int, block: int) -> _Block:
        """Shuffle block `block` of `epoch`, read sequentially: on from where the last read ended
        when that is at or a little before it, else from a reader opened there (whole files are
        skipped by their counts)."""
        n = self.records_per_epoch
        lo = block * SHUFFLE_BLOCK
        size = min(SHUFFLE_BLOCK, n - lo)
        if self._reader is None or self._reader[0] != epoch or not 0 <= lo - self._reader[1] <= READ_ON:
            self._reader = (epoch, lo, self._epoch_records(epoch, lo))
        _, at, source = self._reader
        for _ in itertools.islice(source, lo - at):  # records of a block no row of ours needs
            pass
        items = list(itertools.islice(source, size))
        if len(items) != size:
            raise NeoError(f"dataset '{self.spec.name}': epoch {epoch} ended after {lo + len(items)} records, "
                           f"expected {n}: do the files' names give their true record counts?")
        self._reader = (epoch, lo + size, source)
        if lo + size == n:
            for _ in source:  # nothing is left, unless a file holds more records than its name says
                pass
            self._reader = None
        rng = np.random.default_rng([*self.spec.seed, 1, epoch, block])
        return _Block((epoch, block), items, rng.permutation(size), rng.random(size))

    def record(self, i: int) -> Record:
        """Record i of the dataset's stream (shuffled order, epochs one after another)."""
        epoch, j = divmod(i, self.records_per_epoch)
        block, q = divmod(j, SHUFFLE_BLOCK)
        if self._block is None or self._block.key != (epoch, block):
            self._block = self._read_block(epoch, block)
        tokens, path = self._block.items[self._block.perm[q]]
        return Record(tokens, path, float(self._block.u[q]))

    # --- examples

    def examples(self, indices: Sequence[int]) -> np.ndarray:
        """Examples `indices` (ascending, as a process's rows of successive batches are) as
        [len(indices), n_ctx + 1] int32."""
        out = np.empty((len(indices), self.spec.n_ctx + 1), np.int32)
        for row, c in enumerate(indices):
            out[row] = self.example(int(c))
        return out

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
                                "n_ctx + 1 = %d; padding with padding_id. Raise 'stitch' (%s).",
                                s.name, s.stitch, len(seq), n + 1, group[0].file)
                self._warned_short = True
            seq = np.concatenate([seq, np.full(n + 1 - len(seq), s.padding_id, np.int32)])
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
