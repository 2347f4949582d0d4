"""TFRecord files in GPT-Neo's format, read and written.

Each record is a `tf.train.Example` with one feature, "text": an int64 list of token ids.
File names end in `_<records>.tfrecords`, so a reader knows a file's length without reading it
(and can skip whole files when resuming). Files made by the original GPT-Neo tools and by neo
are interchangeable.

Training reads records by number (`RecordFiles`): a file's index of record offsets comes from
walking its length headers (12 bytes per record, the payloads skipped), then each record is one
seek and read, its checksum verified. So a process reads the bytes of its own rows of a batch,
not the batch. `--check_dataset` and the tools read files whole and in order (`read_records`,
tf.data). Files are uncompressed, as GPT-Neo's tools write them (a GZIP/ZLIB file cannot be
seeked into; it is refused with the fix).

Local files are listed, read and written without TensorFlow (example_proto.py parses and makes
the Examples): a training process never imports it. tf.data reads files whole for
--check_dataset, and gs:// paths go through tf.io.gfile; there TensorFlow is imported on first
use (3-4 s per process, without Keras) and never sees a GPU.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import google_crc32c
import numpy as np

from neo.data import example_proto
from neo.errors import NeoError

_COUNT = re.compile(r"_(\d+)\.tfrecords?$")
_READ_BATCH = 256  # records parsed per tf.data call
# TFRecord framing (TensorFlow's record_writer.cc), little-endian: uint64 length, uint32 masked
# crc32c of the length, the data, uint32 masked crc32c of the data.
_HEADER, _FOOTER = 12, 4
KEEP_INDEXES = 16  # files whose record offsets a RecordFiles keeps (an epoch reads files in turn)


def tensorflow():
    """The `tensorflow` module, imported on first use with its GPUs hidden (tf.data only).

    neo asks TensorFlow only to read and parse records, so its oneDNN math kernels are switched
    off: TensorFlow 2.21 otherwise prints its "oneDNN custom operations are on" notice (through
    absl, which ignores TF_CPP_MIN_LOG_LEVEL) into every run's output, twice.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from neo.imports import import_without

    tf = import_without("tensorflow", "keras")  # Keras: 3 of the 6.5 s (neo/imports.py); tf.keras still works

    if not getattr(tensorflow, "hidden", False):
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised its devices; tensorflow-cpu has none anyway
            pass
        tensorflow.hidden = True
    return tf


def natural_key(path: str) -> list:
    """Sort key comparing digit runs as numbers ("x_2" < "x_10"), case-insensitively."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


def count_from_name(path: str) -> Optional[int]:
    m = _COUNT.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def _local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def list_files(pattern: str, what: str) -> list[str]:
    """Files matching a glob (local, or gs:// through TensorFlow), naturally sorted; a folder
    means its *.tfrecords. An empty match is an error naming `what` (e.g. the dataset config)
    and the glob."""
    if _local(pattern):
        scheme = "file://" if pattern.startswith("file://") else ""
        if os.path.isdir(pattern.removeprefix(scheme)):
            pattern = pattern.rstrip("/") + "/*.tfrecords"
        files = sorted((scheme + f for f in glob.glob(pattern.removeprefix(scheme)) if not os.path.isdir(f)),
                       key=natural_key)
    else:
        tf = tensorflow()
        if tf.io.gfile.isdir(pattern):
            pattern = pattern.rstrip("/") + "/*.tfrecords"
        try:
            files = tf.io.gfile.glob(pattern)
        except tf.errors.OpError as e:
            raise NeoError(f"{what}: cannot list {pattern}: {e.message}") from None
        files = sorted((f for f in files if not tf.io.gfile.isdir(f)), key=natural_key)
    if not files:
        hint = " (no glob characters: is the file name right?)" if not any(c in pattern for c in "*?[") else ""
        raise NeoError(f"{what}: no files match {pattern}{hint}. Make tfrecords with "
                       f"data/create_tfrecords.py and point 'path' at them.")
    return files


def count_records(path: str) -> int:
    """Records in a file, by walking its length headers (for files whose names carry no count)."""
    return len(record_offsets(path)) - 1


def record_counts(files: list[str]) -> list[int]:
    """Per-file record counts: from the `_<count>.tfrecords` suffix, else by reading the file."""
    return [count_from_name(f) if count_from_name(f) is not None else count_records(f) for f in files]


def read_records(path: str, n_vocab: Optional[int] = None) -> Iterator[np.ndarray]:
    """A file's records in order, as int32 arrays, read sequentially by tf.data (which checks
    every checksum): for reading files whole. Ids outside [0, n_vocab) and unreadable records
    are errors naming the file and the record."""
    tf = tensorflow()
    ds = tf.data.TFRecordDataset(path, buffer_size=8 << 20).batch(_READ_BATCH).prefetch(4)
    index = 0
    it = iter(ds)
    while True:
        try:
            serialized = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:  # somewhere in the next batch: count its good records, for the message
            good = 0
            try:
                for _ in tf.data.TFRecordDataset(path).skip(index).take(_READ_BATCH).as_numpy_iterator():
                    good += 1
            except tf.errors.OpError:
                pass
            raise _read_error(path, index + good, e) from None
        yield from _decode(path, serialized, np.arange(index, index + len(serialized)), n_vocab)
        index += len(serialized)


@dataclass
class ReadStats:
    """Bytes asked of tfrecord files by this process: walking length headers (`index_bytes`)
    and reading records (`record_bytes`, in `reads` reads). What a host reads per step."""

    index_bytes: int = 0
    record_bytes: int = 0
    reads: int = 0


READS = ReadStats()


class _File:
    """A file open for reads at offsets: a local file by pread, anything else (gs://...) through
    tf.io.gfile, whose reader buffers 512 KB (so on object stores every read moves at least that)."""

    def __init__(self, path: str):
        self.local = _local(path)
        if self.local:
            try:
                self._fd = os.open(path.removeprefix("file://"), os.O_RDONLY)
            except OSError as e:
                raise NeoError(f"tfrecord file {path} does not exist or cannot be opened ({e.strerror}).") from None
            self.size = os.fstat(self._fd).st_size
        else:
            tf = tensorflow()
            try:
                self.size = tf.io.gfile.stat(path).length
                self._f = tf.io.gfile.GFile(path, "rb")
            except tf.errors.OpError as e:
                raise NeoError(f"tfrecord file {path} does not exist or cannot be opened ({e.message}).") from None

    def read(self, offset: int, n: int) -> bytes:
        if self.local:
            return os.pread(self._fd, n, offset)
        self._f.seek(offset)
        return self._f.read(n)

    def close(self) -> None:
        os.close(self._fd) if self.local else self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _masked_crc(data: bytes) -> int:
    """TFRecord's checksum: crc32c rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record_offsets(path: str) -> np.ndarray:
    """The byte offset of every record of a file, then the file's size: [records + 1] int64.
    Built by walking the length headers (each length's checksum verified) and seeking past the
    payloads, so it reads 12 bytes per record."""
    offsets, pos = [], 0
    with _File(path) as f:
        while pos < f.size:
            head = f.read(pos, _HEADER)
            READS.index_bytes += len(head)
            if len(head) < _HEADER:
                raise _truncated(path, len(offsets), "a record header is cut off")
            length, crc = struct.unpack("<QI", head)
            if _masked_crc(head[:8]) != crc:
                if pos == 0 and head[:2] in (b"\x1f\x8b", b"\x78\x01", b"\x78\x9c", b"\x78\xda"):
                    raise NeoError(f"tfrecord file {path} is compressed (GZIP or ZLIB); neo reads uncompressed "
                                   f"tfrecords, as GPT-Neo's tools write them, so that records can be read by "
                                   f"position: decompress it (e.g. gunzip).")
                raise _truncated(path, len(offsets), "a record's length fails its checksum")
            if pos + _HEADER + length + _FOOTER > f.size:
                raise _truncated(path, len(offsets), f"a record of {length} bytes runs past the end")
            offsets.append(pos)
            pos += _HEADER + length + _FOOTER
        offsets.append(pos)
    return np.array(offsets, np.int64)


def _truncated(path: str, records: int, why: str) -> NeoError:
    return NeoError(f"tfrecord file {path} is corrupt or truncated after record {records} ({why}); "
                    f"re-create or re-download it.")


class RecordFiles:
    """Records of tfrecord files by number, reading only those asked for: per file, the offsets
    of its records (`record_offsets`, kept for the KEEP_INDEXES files used last), then one read
    per run of consecutive records. Ids outside [0, n_vocab) are errors naming file and record."""

    def __init__(self, n_vocab: Optional[int] = None):
        self.n_vocab = n_vocab
        self._offsets: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def offsets(self, path: str) -> np.ndarray:
        if path in self._offsets:
            self._offsets.move_to_end(path)
        else:
            self._offsets[path] = record_offsets(path)
            if len(self._offsets) > KEEP_INDEXES:
                self._offsets.popitem(last=False)
        return self._offsets[path]

    def count(self, path: str) -> int:
        return len(self.offsets(path)) - 1

    def read(self, path: str, records: Sequence[int]) -> list[np.ndarray]:
        """Records `records` (any order, repeats allowed) of one file as int32 arrays."""
        offsets = self.offsets(path)
        want = np.unique(np.asarray(records, np.int64))
        if len(want) and not 0 <= want[0] <= want[-1] < len(offsets) - 1:
            raise NeoError(f"tfrecord file {path}: record {int(want[-1])} asked for, but it holds "
                           f"{len(offsets) - 1} records.")
        starts, ends = offsets[want], offsets[want + 1]
        runs = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # where a run of adjacent records ends
        payloads = []
        with _File(path) as f:
            for a, b in zip([0, *runs.tolist()], [*runs.tolist(), len(want)]):  # one read per run
                lo, hi = int(starts[a]), int(ends[b - 1])
                buf = f.read(lo, hi - lo)
                READS.record_bytes += len(buf)
                READS.reads += 1
                if len(buf) != hi - lo:
                    raise _truncated(path, int(want[a]), "the file is shorter than when it was indexed")
                for k, start, end in zip(range(a, b), (starts[a:b] - lo).tolist(), (ends[a:b] - lo).tolist()):
                    data = buf[start + _HEADER:end - _FOOTER]
                    if _masked_crc(data) != int.from_bytes(buf[end - _FOOTER:end], "little"):
                        raise NeoError(f"tfrecord file {path} is corrupt: record {int(want[k])} fails its "
                                       f"checksum; re-create or re-download it.")
                    payloads.append(data)
        tokens = dict(zip(want.tolist(), _decode(path, payloads, want, self.n_vocab)))
        return [tokens[r] for r in np.asarray(records).tolist()]


def _decode(path: str, serialized, numbers: np.ndarray, n_vocab: Optional[int]) -> list[np.ndarray]:
    """Serialized Examples (numbered `numbers` in their file, for messages) -> their token ids."""
    if not len(numbers):
        return []
    if hasattr(serialized, "numpy"):  # a batch from tf.data: all its strings in one call
        serialized = serialized.numpy().tolist()
    try:
        values, splits = example_proto.parse_texts(serialized)
    except example_proto.ParseError as e:
        record = int(numbers[e.index])
        if "not an int64_list" in e.why:
            raise NeoError(f"tfrecord file {path}: the 'text' feature of record {record} is not an int64 "
                           f"list of token ids (GPT-Neo's format; {e.why}); re-create the file with "
                           f"data/create_tfrecords.py.") from None
        raise NeoError(f"tfrecord file {path}: record {record} is {e.why}; re-create or re-download "
                       f"it.") from None
    lengths = np.diff(splits)
    if (lengths == 0).any():
        bad = int(np.argmin(lengths))
        raise _empty_record_error(path, int(numbers[bad]), _raw(serialized[bad]))
    if n_vocab is not None and len(values) and (values.max() >= n_vocab or values.min() < 0):
        bad = np.flatnonzero((values >= n_vocab) | (values < 0))[0]
        record = int(numbers[int(np.searchsorted(splits, bad, side="right")) - 1])
        raise NeoError(
            f"{path}: record {record} holds token id {int(values[bad])}, outside the model's "
            f"vocabulary 0..{n_vocab - 1}. (JAX would not fail: it would silently train on garbage.) "
            f"Re-tokenize with the model's tokenizer, or raise the config's 'n_vocab'.")
    values = values.astype(np.int32)
    return [values[splits[i]:splits[i + 1]] for i in range(len(lengths))]


def _raw(item) -> bytes:
    return item if isinstance(item, bytes) else item.numpy()


def _read_error(path: str, index: int, e: Exception) -> NeoError:
    tf = tensorflow()
    msg = getattr(e, "message", str(e)).split("}}")[-1].split("[Op:")[0].strip()
    if isinstance(e, tf.errors.NotFoundError):
        return NeoError(f"tfrecord file {path} does not exist (or cannot be opened).")
    if isinstance(e, tf.errors.DataLossError):
        return NeoError(f"tfrecord file {path} is corrupt or truncated after record {index} ({msg}); "
                        f"re-create or re-download it.")
    if "Data types don't match" in msg:
        return NeoError(f"tfrecord file {path}: the 'text' feature near record {index} is not an int64 "
                        f"list of token ids (GPT-Neo's format); re-create the file with data/create_tfrecords.py.")
    return NeoError(f"tfrecord file {path}: cannot read record {index}: {msg}")


def _empty_record_error(path: str, index: int, raw: bytes) -> NeoError:
    """An empty row is either a record without "text" or with an empty list: say which."""
    keys = example_proto.feature_keys(raw)
    if "text" not in keys:
        return NeoError(f"{path}: record {index} has no 'text' feature (it has {keys or 'no features'}); "
                        f"neo reads GPT-Neo's format, an int64 list named 'text'.")
    return NeoError(f"{path}: record {index} holds no tokens; re-create the file with data/create_tfrecords.py.")


class RecordWriter:
    """Writes `<prefix>_<count>.tfrecords` atomically: records go to `<prefix>.tfrecords.partial`,
    renamed to the final, counted name only by `close()`. `abort()` deletes the partial file, so
    an interrupted run never leaves a file that looks complete."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.partial = prefix + ".tfrecords.partial"
        self.count = 0
        self._writer = open(self.partial, "wb")

    def write(self, ids: np.ndarray) -> None:
        """One record: TFRecord's framing around the serialized Example (as TFRecordWriter)."""
        data = example_proto.serialize_text(ids)
        head = struct.pack("<Q", len(data))
        self._writer.write(b"".join((head, struct.pack("<I", _masked_crc(head)), data,
                                     struct.pack("<I", _masked_crc(data)))))
        self.count += 1

    def close(self) -> str:
        self._writer.close()
        final = f"{self.prefix}_{self.count}.tfrecords"
        os.replace(self.partial, final)
        return final

    def abort(self) -> None:
        self._writer.close()
        Path(self.partial).unlink(missing_ok=True)
