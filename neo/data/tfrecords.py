"""TFRecord files in GPT-Neo's format, read and written.

Each record is a `tf.train.Example` with one feature, "text": an int64 list of token ids.
File names end in `_<records>.tfrecords`, so a reader knows a file's length without reading it
(and can skip whole files when resuming). Files made by the original GPT-Neo tools and by neo
are interchangeable.

TensorFlow is imported lazily (it costs ~8 s per process) and never sees a GPU.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from neo.errors import NeoError

_COUNT = re.compile(r"_(\d+)\.tfrecords?$")
_READ_BATCH = 256  # records parsed per tf.data call


def tensorflow():
    """The `tensorflow` module, imported on first use with its GPUs hidden (tf.data only)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

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


def list_files(pattern: str, what: str) -> list[str]:
    """Files matching a glob (local or gs://), naturally sorted; a folder means its *.tfrecords.
    An empty match is an error naming `what` (e.g. the dataset config) and the glob."""
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
    """Records in a file, by reading it (for files whose names carry no count)."""
    tf = tensorflow()
    n = 0
    try:
        for batch in tf.data.TFRecordDataset(path).batch(4096):
            n += int(batch.shape[0])
    except tf.errors.OpError as e:
        raise _read_error(path, n, e) from None
    return n


def record_counts(files: list[str]) -> list[int]:
    """Per-file record counts: from the `_<count>.tfrecords` suffix, else by reading the file."""
    return [count_from_name(f) if count_from_name(f) is not None else count_records(f) for f in files]


def read_records(path: str, start: int = 0, n_vocab: Optional[int] = None) -> Iterator[np.ndarray]:
    """Records `start`, `start`+1, ... of one file as int32 arrays. Ids outside [0, n_vocab) and
    unreadable records are errors naming the file and the record."""
    tf = tensorflow()
    # Parsed outside tf.data by one function traced once per process: a `map` in the pipeline
    # would be traced again for every reader opened (~30 ms each), and readers are opened at
    # every epoch and wherever a process's rows jump ahead in the stream.
    ds = tf.data.TFRecordDataset(path, buffer_size=8 << 20).skip(start).batch(_READ_BATCH).prefetch(4)
    index = start
    it = iter(ds)
    while True:
        try:
            serialized = next(it)
            values, splits = (x.numpy() for x in _parser()(serialized))
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise _read_error(path, index, e) from None
        lengths = np.diff(splits)
        if (lengths == 0).any():
            raise _empty_record_error(path, index + int(np.argmin(lengths)))
        if n_vocab is not None and len(values) and (values.max() >= n_vocab or values.min() < 0):
            bad = np.flatnonzero((values >= n_vocab) | (values < 0))[0]
            record = index + int(np.searchsorted(splits, bad, side="right")) - 1
            raise NeoError(
                f"{path}: record {record} holds token id {int(values[bad])}, outside the model's "
                f"vocabulary 0..{n_vocab - 1}. (JAX would not fail: it would silently train on garbage.) "
                f"Re-tokenize with the model's tokenizer, or raise the config's 'n_vocab'.")
        values = values.astype(np.int32)
        for i in range(len(lengths)):
            yield values[splits[i]:splits[i + 1]]
        index += len(lengths)


@functools.cache
def _parser():
    """serialized Examples [n] -> (token ids of all n "text" features, row splits [n + 1])."""
    tf = tensorflow()
    feature = {"text": tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def parse(serialized):
        text = tf.io.parse_example(serialized, feature)["text"]
        return text.values, text.row_splits

    return parse


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


def _empty_record_error(path: str, index: int) -> NeoError:
    """An empty row is either a record without "text" or with an empty list: say which."""
    tf = tensorflow()
    raw = next(iter(tf.data.TFRecordDataset(path).skip(index).take(1))).numpy()
    keys = sorted(tf.train.Example.FromString(raw).features.feature.keys())
    if "text" not in keys:
        return NeoError(f"{path}: record {index} has no 'text' feature (it has {keys or 'no features'}); "
                        f"neo reads GPT-Neo's format, an int64 list named 'text'.")
    return NeoError(f"{path}: record {index} holds no tokens; re-create the file with data/create_tfrecords.py.")


class RecordWriter:
    """Writes `<prefix>_<count>.tfrecords` atomically: records go to `<prefix>.tfrecords.partial`,
    renamed to the final, counted name only by `close()`. `abort()` deletes the partial file, so
    an interrupted run never leaves a file that looks complete."""

    def __init__(self, prefix: str):
        tf = tensorflow()
        self.prefix = prefix
        self.partial = prefix + ".tfrecords.partial"
        self.count = 0
        self._writer = tf.io.TFRecordWriter(self.partial)
        self._tf = tf

    def write(self, ids: np.ndarray) -> None:
        tf = self._tf
        feature = tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(ids).tolist()))
        self._writer.write(tf.train.Example(features=tf.train.Features(feature={"text": feature}))
                           .SerializeToString())
        self.count += 1

    def close(self) -> str:
        self._writer.close()
        final = f"{self.prefix}_{self.count}.tfrecords"
        os.replace(self.partial, final)
        return final

    def abort(self) -> None:
        self._writer.close()
        Path(self.partial).unlink(missing_ok=True)
