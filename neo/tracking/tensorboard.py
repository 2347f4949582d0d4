"""A TensorBoard event-file writer for scalars, with no TensorFlow or torch import.

An event file is a TFRecord stream of `Event` protocol buffers. neo only logs scalars, so the
three messages involved (Event, Summary, Summary.Value, plus SessionLog for restarts) are
encoded by hand here rather than importing a 2-8 s dependency into every training process.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(step: int, wall_time: float, body: bytes) -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), <body>}."""
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + body


class EventWriter:
    """Appends scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.neo"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._write(_event(0, time.time(), _bytes_field(3, b"brain.Event:2")))  # file_version

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in values.items())
        self._write(_event(step, time.time(), _bytes_field(5, summary)))
        self._file.flush()

    def restart(self, step: int) -> None:
        """SessionLog START at `step`: TensorBoard drops events a crashed run wrote after it."""
        self._write(_event(step, time.time(), _bytes_field(7, _field(1, 0, _varint(1)))))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
