"""One dataset's training examples: file order, host sharding, shuffling, and sampling modes.

Every example of a dataset, on one host, has an index c = 0, 1, 2, ... and is a pure function of
(seed, c): the stream can be restarted at any c by arithmetic over the files' record counts plus
reading at most one shuffle block, which is what makes resuming exact and cheap.

- Epoch e visits every file once, in natural order or shuffled by (seed, e). With at least as
  many files as hosts, host p reads files p, p+P, ... of that order; with fewer, every host
  reads all files and keeps records p, p+P, ... . Epochs follow each other forever.
- Within an epoch, records are shuffled in blocks of SHUFFLE_BLOCK consecutive records, each by
  its own generator seeded with (seed, host, epoch, block) (not for GPT-Neo's sequential_input,
  which reads them in order).
- Sampling modes turn records into [n_ctx + 1]-token examples:
  `chunks`: records of equal length R give (R - 1) // n_ctx windows each, consecutive windows
  sharing one token (the last target of one is the first input of the next), so a record of
  n_ctx + 1 tokens is one example and none is wasted;
  `documents_fixed`: `stitch` consecutive documents joined by eos_id, first n_ctx + 1 tokens;
  `documents_random`: the same, then a random window of n_ctx + 1 tokens.
  Short stitched documents are padded with PAD (neo/data/__init__.py), never a target
  (documents_random warns: raise stitch).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from neo.data import PAD
from neo.data.tfrecords import read_records
from neo.errors import NeoError

SHUFFLE_BLOCK = 1024  # records shuffled together; also the most re-read when resuming


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
    """This host's examples of one dataset, from any example index on."""

    def __init__(self, spec: DatasetSpec, process_index: int = 0, process_count: int = 1,
                 record_length: Optional[int] = None):
        if not any(spec.counts):
            raise NeoError(f"dataset '{spec.name}': its {len(spec.files)} file(s) hold no records.")
        self.spec, self.p, self.P = spec, process_index, process_count
        self._epoch_lengths: list[int] = []
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

    # --- which records an epoch holds on this host

    def epoch_plan(self, epoch: int) -> tuple[list[int], int, int]:
        """(file indices in reading order, stride, offset): this host reads records
        offset, offset+stride, ... of the concatenation of those files."""
        order = np.arange(len(self.spec.files))
        if self.spec.shuffle_files:
            order = np.random.default_rng([*self.spec.seed, 0, epoch]).permutation(order)
        order = [int(i) for i in order if self.spec.counts[i]]
        if len(order) >= self.P:
            return order[self.p::self.P], 1, 0
        return order, self.P, self.p

    def epoch_length(self, epoch: int) -> int:
        while len(self._epoch_lengths) <= epoch:
            files, stride, offset = self.epoch_plan(len(self._epoch_lengths))
            total = sum(self.spec.counts[i] for i in files)
            n = (total - offset + stride - 1) // stride
            if n <= 0:
                raise NeoError(f"dataset '{self.spec.name}' has too few records to give each of "
                               f"{self.P} hosts one; add data.")
            self._epoch_lengths.append(n)
        return self._epoch_lengths[epoch]

    def locate(self, record: int) -> tuple[int, int]:
        """Host-stream record index -> (epoch, index within the epoch)."""
        epoch = 0
        while record >= self.epoch_length(epoch):
            record -= self.epoch_length(epoch)
            epoch += 1
        return epoch, record

    def _epoch_records(self, epoch: int, start: int) -> Iterator[tuple[np.ndarray, str]]:
        """Records start, start+1, ... of an epoch on this host, in file order (not shuffled)."""
        files, stride, offset = self.epoch_plan(epoch)
        g = offset + start * stride  # index into the concatenation of `files`
        for i in files:
            count = self.spec.counts[i]
            if g >= count:
                g -= count
                continue
            path, seen = self.spec.files[i], g
            for tokens in read_records(path, g, self.spec.n_vocab):
                if seen == count:
                    raise NeoError(f"{path}: holds more records than its name says ({count}); rename it to "
                                   f"end in its true count (neo relies on the count to resume exactly).")
                if (seen - g) % stride == 0:
                    yield tokens, path
                seen += 1
            if seen != count:
                raise NeoError(f"{path}: holds {seen} records but its name says {count}; rename it to "
                               f"end in _{seen}.tfrecords (neo relies on the count to resume exactly).")
            g = (stride - (seen - g) % stride) % stride

    # --- records in shuffled order, and examples

    def records(self, start: int) -> Iterator[Record]:
        """Host-stream records from index `start`, shuffled in blocks, across epochs forever."""
        epoch, i = self.locate(start)
        while True:
            n = self.epoch_length(epoch)
            block = i // SHUFFLE_BLOCK
            source = self._epoch_records(epoch, block * SHUFFLE_BLOCK)
            while block * SHUFFLE_BLOCK < n:
                lo = block * SHUFFLE_BLOCK
                size = min(SHUFFLE_BLOCK, n - lo)
                items = list(itertools.islice(source, size))
                if len(items) != size:
                    raise NeoError(f"dataset '{self.spec.name}': epoch {epoch} ended after {lo + len(items)} "
                                   f"records on host {self.p}, expected {n}: do the files' names give "
                                   f"their true record counts?")
                rng = np.random.default_rng([*self.spec.seed, 1, self.p, epoch, block])
                perm = rng.permutation(size) if self.spec.shuffle_records else np.arange(size)
                u = rng.random(size)
                for q in range(i - lo, size):
                    tokens, path = items[perm[q]]
                    yield Record(tokens, path, float(u[q]))
                block += 1
                i = block * SHUFFLE_BLOCK
            for _ in source:  # nothing is left, unless a file holds more records than its name says
                pass
            epoch, i = epoch + 1, 0

    def examples(self, start: int = 0) -> Iterator[tuple[np.ndarray, str]]:
        """(example [n_ctx + 1] int32, file it came from) for example indices start, start+1, ..."""
        s = self.spec
        n = s.n_ctx
        if s.mode == "chunks":
            first, skip = divmod(start, self.windows)
            for rec in self.records(first):
                if len(rec.tokens) != self.record_length:
                    raise NeoError(
                        f"{rec.file}: a record of {len(rec.tokens)} tokens among records of "
                        f"{self.record_length}: 'chunks' sampling needs equal-length records (chunk files). "
                        f"Use documents_fixed or documents_random for one-document-per-record files.")
                for w in range(skip, self.windows):
                    yield rec.tokens[w * n:w * n + n + 1], rec.file
                skip = 0
            return
        source = self.records(start * s.stitch)
        while True:
            group = [next(source) for _ in range(s.stitch)]
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
            yield seq[:n + 1], group[0].file

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
