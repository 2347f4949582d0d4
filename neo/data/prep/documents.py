"""Documents from the text formats language-model corpora come in.

- `.txt`: the whole file is one document;
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (lm_dataformat's archives): one document per line, the
  line's "text" (a list of paragraphs is joined by blank lines, as lm_dataformat does; a bare
  JSON string is a document too), or with `keys` the value of each key named, each a document
  (GPT-NeoX's preprocess_data.py --jsonl-keys);
- `.json.zst`: a JSON list of documents; `.dat.zst`: lm_dataformat's length-prefixed texts;
- `.jsonl.zst.tar`: a tar of .jsonl.zst files (the Pile's layout);
- `.tar.gz`, `.tgz`, `.tar.xz`, `.xz`: a tar of text files, one document each (OpenWebText).

Bad input is skipped, not fatal: a document that is not UTF-8 or a line that is not JSON with a
"text" is counted and reported (`Skipped`), since real corpora have a few. An archive that cannot
be read at all is an error naming the file.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import sys
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional

from neo.errors import NeoError

FORMATS = (".jsonl.zst.tar", ".jsonl.zst", ".json.zst", ".dat.zst", ".jsonl.gz", ".jsonl", ".txt",
           ".tar.gz", ".tgz", ".tar.xz", ".xz")
_WARN_LIMIT = 10


@dataclass
class Skipped:
    """Documents skipped for bad input; the first few reasons are printed as warnings."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)
    quiet: bool = False

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if self.count <= _WARN_LIMIT and not self.quiet:
            print(f"warning: skipping {where}: {why}", file=sys.stderr)
            if self.count == _WARN_LIMIT:
                print("warning: (further skipped documents are only counted)", file=sys.stderr)
        if len(self.reasons) < _WARN_LIMIT:
            self.reasons.append(f"{where}: {why}")


def format_of(path: str) -> Optional[str]:
    name = path.lower()
    return next((ext for ext in FORMATS if name.endswith(ext)), None)


def list_inputs(input_dir: str, file_type: Optional[str] = None) -> list[str]:
    """The readable files in a folder (not recursive), or the one file named; naturally sorted.
    `file_type` (e.g. "txt", "jsonl.zst") restricts them to one format."""
    from neo.data.tfrecords import natural_key

    if os.path.isfile(input_dir):
        files = [input_dir]
    elif os.path.isdir(input_dir):
        files = [os.path.join(input_dir, f) for f in os.listdir(input_dir)]
        files = [f for f in files if os.path.isfile(f)]
    else:
        raise NeoError(f"input {input_dir} does not exist.")
    if file_type:
        ext = "." + file_type.lstrip(".").lower()
        if ext not in FORMATS:
            raise NeoError(f"--file_type {file_type}: not a format neo reads ({', '.join(f[1:] for f in FORMATS)}).")
        files = [f for f in files if format_of(f) == ext]
    else:
        files = [f for f in files if format_of(f)]
    if not files:
        wanted = f"*.{file_type.lstrip('.')}" if file_type else ", ".join("*" + f for f in FORMATS)
        raise NeoError(f"{input_dir}: no input files ({wanted}).")
    return sorted(files, key=natural_key)


def iter_documents(path: str, skipped: Skipped, keys: tuple[str, ...] = ("text",)) -> Iterator[tuple[str, int]]:
    """(document text, bytes of `path` read so far) for every readable document in the file;
    `keys`: the fields of a JSON record that are documents, in this order."""
    fmt = format_of(path)
    try:
        with open(path, "rb") as raw:
            if fmt == ".txt":
                text = _decode(raw.read(), path, skipped)
                if text is not None:
                    yield text, raw.tell()
            elif fmt in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
                yield from _jsonl(_open_stream(raw, fmt), raw, path, skipped, keys)
            elif fmt == ".json.zst":
                docs = json.load(_open_stream(raw, fmt))
                for i, doc in enumerate(docs):
                    for key, text in _texts_of(doc, keys):
                        if text is None:
                            skipped.add(f"{path} item {i}", f"not a string or an object with a '{key}' string")
                        else:
                            yield text, raw.tell()
            elif fmt == ".dat.zst":
                stream = _open_stream(raw, fmt)
                for i in _counter():
                    head = stream.read(16)
                    if not head:
                        break
                    text = _decode(stream.read(int(head)), f"{path} document {i}", skipped)
                    if text is not None:
                        yield text, raw.tell()
            elif fmt == ".jsonl.zst.tar":
                with tarfile.open(fileobj=raw, mode="r|") as tar:
                    for member in tar:
                        if member.isfile() and member.name.endswith(".jsonl.zst"):
                            inner = _open_stream(tar.extractfile(member), ".jsonl.zst")
                            yield from _jsonl(inner, raw, f"{path}:{member.name}", skipped, keys)
            elif fmt in (".tar.gz", ".tgz", ".tar.xz", ".xz"):
                yield from _tar_of_texts(raw, path, fmt, skipped)
            else:
                raise NeoError(f"{path}: not a format neo reads ({', '.join(FORMATS)}).")
    except NeoError:
        raise
    except FileNotFoundError:
        raise NeoError(f"input file {path} does not exist.") from None
    except (OSError, EOFError, ValueError, tarfile.TarError, lzma.LZMAError) as e:
        raise NeoError(f"{path}: cannot read it as {fmt}: {type(e).__name__}: {e}") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":  # zstandard's error derives from Exception only
            raise NeoError(f"{path}: corrupt zstandard data: {e}") from None
        raise

def _counter() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1


def _open_stream(raw: BinaryIO, fmt: str) -> BinaryIO:
    if fmt.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if fmt.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _decode(data: bytes, where: str, skipped: Skipped) -> Optional[str]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        skipped.add(where, f"not UTF-8 (byte {e.start}); re-encode it as UTF-8")
        return None


def _texts_of(obj, keys: tuple[str, ...]) -> Iterator[tuple[str, Optional[str]]]:
    """(key, its document or None) for each key of a JSON record; a bare string is one document."""
    if isinstance(obj, str):
        yield keys[0], obj
        return
    for key in keys:
        text = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            text = "\n\n".join(text)
        yield key, text if isinstance(text, str) else None


def _jsonl(stream: BinaryIO, raw: BinaryIO, where: str, skipped: Skipped,
           keys: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        line_text = _decode(line, f"{where} line {lineno}", skipped)
        if line_text is None:
            continue
        try:
            obj = json.loads(line_text)
        except json.JSONDecodeError as e:
            skipped.add(f"{where} line {lineno}", f"not JSON ({e.msg})")
            continue
        for key, text in _texts_of(obj, keys):
            if text is None:
                skipped.add(f"{where} line {lineno}", f"no '{key}' string")
            else:
                yield text, raw.tell()


def _tar_of_texts(raw: BinaryIO, path: str, fmt: str, skipped: Skipped) -> Iterator[tuple[str, int]]:
    stream = gzip.GzipFile(fileobj=raw) if fmt in (".tar.gz", ".tgz") else lzma.LZMAFile(raw)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                text = _decode(tar.extractfile(member).read(), f"{path}:{member.name}", skipped)
                if text is not None:
                    yield text, raw.tell()
