"""tf.train.Example, the payload of every GPT-Neo tfrecord, read and written without TensorFlow.

A record's payload is a serialized `tf.train.Example` (tensorflow/core/example/example.proto
and feature.proto) holding one feature, "text": an int64 list of token ids. Parsing it needs
only those six protobuf messages, declared here in a private descriptor pool and parsed by the
protobuf runtime (its C implementation, upb): so a training process that reads local tfrecords
never imports TensorFlow (3-4 s and a few hundred MB per process), and writing a file makes the
bytes TensorFlow's `tf.train.Example(...).SerializeToString()` makes (tests/test_data_pipeline.py
compares them). The pool is private so that TensorFlow, if it is imported too, registers its own
`tensorflow.Example` without a clash; the wire format does not carry the names.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError


@functools.lru_cache(maxsize=None)
def _messages() -> dict:
    """feature.proto and example.proto as message classes: {name: class}."""
    f = descriptor_pb2.FileDescriptorProto(name="neo/example.proto", package="neo_example", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def message(name):
        return f.message_type.add(name=name)

    def add(m, name, number, kind, label=T.LABEL_OPTIONAL, type_name=None, packed=None, oneof_index=None):
        field = m.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
        if packed is not None:
            field.options.packed = packed
        if oneof_index is not None:
            field.oneof_index = oneof_index

    for name, kind in (("BytesList", T.TYPE_BYTES), ("FloatList", T.TYPE_FLOAT), ("Int64List", T.TYPE_INT64)):
        add(message(name), "value", 1, kind, T.LABEL_REPEATED, packed=None if kind == T.TYPE_BYTES else True)
    feature = message("Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, kind) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                           ("int64_list", "Int64List")), 1):
        add(feature, name, number, T.TYPE_MESSAGE, type_name=f".neo_example.{kind}", oneof_index=0)
    features = message("Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, T.TYPE_STRING)
    add(entry, "value", 2, T.TYPE_MESSAGE, type_name=".neo_example.Feature")
    add(features, "feature", 1, T.TYPE_MESSAGE, T.LABEL_REPEATED, type_name=".neo_example.Features.FeatureEntry")
    add(message("Example"), "features", 1, T.TYPE_MESSAGE, type_name=".neo_example.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"neo_example.{m.name}"))
            for m in f.message_type}


class ParseError(ValueError):
    """A payload that is not a tf.train.Example, or whose "text" is not an int64 list:
    `index` is its position in the list given to `parse_texts`, `why` says what is wrong."""

    def __init__(self, index: int, why: str):
        super().__init__(why)
        self.index, self.why = index, why


def example(data: bytes):
    """One payload as an Example message (raises protobuf's DecodeError if it is not one)."""
    return _messages()["Example"].FromString(data)


# A GPT-Neo record as TensorFlow (and neo) writes it, read as a run of varints: Example.features
# (tag 10, length), Features.feature (10, length), the map entry's key (10, 4, "t" "e" "x" "t"),
# its value (18, length), Feature.int64_list (26, length), Int64List.value packed (10, length),
# then one varint per token id. Position in the header -> the one-byte value it must hold.
_HEADER = 16
_FIXED = {0: 10, 2: 10, 4: 10, 5: 4, 6: ord("t"), 7: ord("e"), 8: ord("x"), 9: ord("t"), 10: 18, 12: 26, 14: 10}
_LENGTHS = (1, 3, 11, 13, 15)  # each a length running to the record's end: nothing else is in it


def _parse_canonical(payloads: Sequence[bytes]):
    """(values, splits) of records that all have exactly that layout, decoded with a few array
    operations over all their bytes at once; None if any does not (the general parser reads
    those). Where a record has another feature beside "text", a field order of its own or
    unpacked ids, a length check fails and it is not taken for one."""
    n = len(payloads)
    sizes = np.fromiter(map(len, payloads), np.int64, n)
    if n == 0 or sizes.min() <= _HEADER:
        return None
    buf = np.frombuffer(b"".join(payloads), np.uint8)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if (buf[ends - 1] >= 0x80).any():  # a record must end a varint, or varints would run across records
        return None
    last = np.flatnonzero(buf < 0x80)  # each varint's last byte
    first = np.empty_like(last)
    first[0], first[1:] = 0, last[:-1] + 1
    width = last - first + 1
    if width.max() > 10:  # longer than any 64-bit varint
        return None
    low = buf & 0x7F
    values = low[first].astype(np.uint64)
    for j in range(1, int(width.max())):  # the j-th byte of every varint that has one
        has = np.flatnonzero(width > j)
        values[has] |= low[first[has] + j].astype(np.uint64) << np.uint64(7 * j)
    head = np.searchsorted(last, starts)[:, None] + np.arange(_HEADER)  # each record's header varints
    count = np.diff(np.append(head[:, 0], len(last)))
    if (count <= _HEADER).any():
        return None
    for k, v in _FIXED.items():
        if (values[head[:, k]] != v).any() or (width[head[:, k]] != 1).any():
            return None
    for k in _LENGTHS:
        if (values[head[:, k]].astype(np.int64) != ends - 1 - last[head[:, k]]).any():
            return None
    ids = np.ones(len(last), bool)
    ids[head.ravel()] = False
    splits = np.zeros(n + 1, np.int64)
    np.cumsum(count - _HEADER, out=splits[1:])
    return values[ids].view(np.int64), splits


def parse_texts(serialized: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Serialized Examples [n] -> (the int64 token ids of all n "text" features, concatenated;
    row splits [n + 1]), as TensorFlow's ParseExampleV2 with a ragged "text" key gives them: a
    record without "text" is an empty row. A payload that does not parse, or whose "text" holds
    bytes or floats, raises ParseError naming it. Records in the layout TensorFlow writes are
    decoded together (`_parse_canonical`: 4x faster than one message at a time for short
    documents); any other layout is parsed by protobuf, message by message."""
    fast = _parse_canonical(serialized)
    if fast is not None:
        return fast
    Example = _messages()["Example"]
    rows = []
    for i, data in enumerate(serialized):
        try:
            features = Example.FromString(data).features.feature
        except DecodeError:
            raise ParseError(i, "not a serialized tf.train.Example (protobuf cannot parse it)") from None
        if "text" not in features:
            rows.append(np.zeros(0, np.int64))
            continue
        text = features["text"]
        kind = text.WhichOneof("kind")
        if kind not in ("int64_list", None):
            raise ParseError(i, f"its 'text' feature is a {kind}, not an int64_list")
        rows.append(np.array(text.int64_list.value, np.int64))
    splits = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=splits[1:])
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), splits


def feature_keys(data: bytes) -> list[str]:
    """The names of a payload's features, sorted (for messages about a record)."""
    return sorted(example(data).features.feature.keys())


def serialize_text(ids) -> bytes:
    """Token ids -> a serialized Example whose one feature "text" holds them as int64s: the
    bytes `tf.train.Example(features=tf.train.Features(feature={"text": tf.train.Feature(
    int64_list=tf.train.Int64List(value=ids))})).SerializeToString()` gives."""
    m = _messages()
    ex = m["Example"]()
    ints = ex.features.feature["text"].int64_list
    ints.SetInParent()  # present even when empty, as TensorFlow writes an empty list
    ints.value.extend(np.asarray(ids, np.int64).tolist())
    return ex.SerializeToString()
