"""A folder of text -> GPT-Neo tfrecords: `python -m neo.data.prep.create_tfrecords --help`
(or data/create_tfrecords.py, the script GPT-Neo's README names; docs/data.md).

The main process reads documents in file order and writes records; worker processes clean and
tokenize batches of documents. Batches come back in the order they were sent, so the output
depends only on the input and the options: the same input gives byte-identical files, whatever
the number of processes.

Two layouts (`--mode`):
- `documents`, the default as GPT-Neo's README says: one record per document (its tokens and
  the separator), for the `documents_fixed` / `documents_random` sampling modes;
- `chunks`: the documents (each followed by the separator) as one token stream, cut into records
  of exactly chunk_size + 1 tokens, for the `chunks` sampling mode. A document's tail is carried
  into the next record, across documents and input files; only the stream's final tail (less
  than one record) is not written.
Documents with fewer than `minimum_size` tokens are dropped in both layouts.
Every document ends with the separator (GPT-Neo's); `--append-eod` (GPT-NeoX's preprocess_data.py flag) makes it the
tokenizer's end-of-document token. In JSON input `--jsonl_keys` names the fields that are documents
(GPT-NeoX's --jsonl-keys; default "text"). The progress bar counts documents, tokens and MB/s.

`--use_gpt2_tokenizer` (the README's flag) tokenizes with GPT-2's BPE from data/gpt2, offline,
the separator then being its `<|endoftext|>`, 50256.

Output files are `<name>_<index>_<records>.tfrecords`, written under a `.partial` name and renamed
when complete: an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from neo.data.prep.documents import Skipped, iter_documents, list_inputs
from neo.data.tokenizer import load_tokenizer
from neo.errors import NeoError, run_command

BATCH_CHARS = 1 << 20  # text per worker task


@dataclass(frozen=True)
class Options:
    input_dir: str
    output_dir: str = "./tfrecords"
    name: str = "openwebtext"
    encoder_path: str = "gpt2"
    mode: str = "documents"
    chunk_size: int = 2048
    minimum_size: int = 100
    separator: Optional[int] = None
    files_per: int = 100_000
    processes: int = 0
    ftfy: bool = False
    wikitext_detokenize: bool = False
    write_dataset_config: bool = False
    progress: bool = True
    jsonl_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False


@dataclass
class Stats:
    input_files: int = 0
    input_bytes: int = 0
    documents: int = 0
    skipped: int = 0
    too_short: int = 0
    records: int = 0
    tokens: int = 0
    tail_tokens_dropped: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- worker side: clean and tokenize


_worker: dict = {}


def _init_worker(encoder_path: str, ftfy: bool, wikitext: bool, in_pool: bool = True) -> None:
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker.update(tokenizer=load_tokenizer(encoder_path), ftfy=ftfy, wikitext=wikitext)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a batch of documents, concatenated, and each document's length."""
    from neo.data.prep.cleaning import fix_text, wikitext_detokenize

    if _worker["ftfy"]:
        texts = [fix_text(t) for t in texts]
    if _worker["wikitext"]:
        texts = [wikitext_detokenize(t) for t in texts]
    tok = _worker["tokenizer"]
    ids = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    lengths = np.array([len(x) for x in ids], np.int64)
    flat = np.fromiter((i for x in ids for i in x), np.int64, count=int(lengths.sum()))
    return flat, lengths


# --- main side: read, write


class _Output:
    """Records into files of `files_per` records each, named with their count when complete."""

    def __init__(self, output_dir: str, name: str, files_per: int):
        from neo.data.tfrecords import RecordWriter

        self._writer_cls = RecordWriter
        self.output_dir, self.name, self.files_per = output_dir, name, files_per
        self.current = None
        self.files: list[str] = []
        self.records = 0

    def write(self, ids: np.ndarray) -> None:
        if self.current is None:
            self.current = self._writer_cls(os.path.join(self.output_dir, f"{self.name}_{len(self.files)}"))
        self.current.write(ids)
        self.records += 1
        if self.current.count == self.files_per:
            self.files.append(self.current.close())
            self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.files.append(self.current.close())
            self.current = None

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()


def _batches(files: list[str], skipped: Skipped, stats: Stats, bar, keys: tuple[str, ...]) -> Iterator[list[str]]:
    batch, chars, done = [], 0, 0
    for path in files:
        size, last = os.path.getsize(path), 0
        for text, pos in iter_documents(path, skipped, keys):
            stats.documents += 1
            batch.append(text)
            chars += len(text)
            bar.update(pos - last)
            last = pos
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
        bar.update(size - last)
        done += size
    if batch:
        yield batch


def _encoded(opts: Options, batches: Iterator[list[str]], processes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in input order, at most 2 per worker in flight (bounded memory)."""
    if processes <= 1:
        _init_worker(opts.encoder_path, opts.ftfy, opts.wikitext_detokenize, in_pool=False)
        yield from map(_encode, batches)
        return
    import multiprocessing

    # spawn: forking a process that may hold TensorFlow's threads is unsafe
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, _init_worker, (opts.encoder_path, opts.ftfy, opts.wikitext_detokenize)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def create_tfrecords(opts: Options, log=print) -> Stats:
    """Run the conversion; returns what was read, dropped and written."""
    from tqdm import tqdm

    if opts.mode not in ("chunks", "documents"):
        raise NeoError(f"--mode {opts.mode!r}: use 'chunks' (fixed-length records) or 'documents' (one per record).")
    if opts.chunk_size < 1 or opts.files_per < 1:
        raise NeoError("--chunk_size and --files_per must be positive.")
    files = list_inputs(opts.input_dir)
    if not opts.jsonl_keys or not all(opts.jsonl_keys):
        raise NeoError("--jsonl_keys: name at least one field of the JSON records, e.g. --jsonl_keys text.")
    tokenizer = load_tokenizer(opts.encoder_path)  # fail here, once, if it does not load
    separator = end_of_document(opts, tokenizer)
    if not 0 <= separator < tokenizer.vocab_size:
        raise NeoError(f"--separator {separator} is outside the tokenizer's vocabulary 0..{tokenizer.vocab_size - 1}.")
    os.makedirs(opts.output_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(glob.escape(opts.output_dir), f"{glob.escape(opts.name)}_*.tfrecords")))
    if existing:
        raise NeoError(f"{opts.output_dir} already holds {len(existing)} file(s) named {opts.name}_*.tfrecords "
                       f"(e.g. {os.path.basename(existing[0])}); choose another --name or --output_dir, or "
                       f"delete them.")

    stats = Stats(input_files=len(files), input_bytes=sum(os.path.getsize(f) for f in files))
    skipped = Skipped()
    out = _Output(opts.output_dir, opts.name, opts.files_per)
    record_len = opts.chunk_size + 1
    sep = np.array([separator], np.int64)
    minimum = max(opts.minimum_size, 1)
    processes = opts.processes or os.cpu_count() or 1
    t0 = time.perf_counter()
    bar = tqdm(total=stats.input_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=opts.name,
               disable=not opts.progress, mininterval=0.5, file=sys.stderr)
    buffer = np.zeros(0, np.int64)
    try:
        for flat, lengths in _encoded(opts, _batches(files, skipped, stats, bar, opts.jsonl_keys), processes):
            for doc in np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []:
                if len(doc) < minimum:
                    stats.too_short += 1
                    continue
                stats.tokens += len(doc) + 1
                if opts.mode == "documents":
                    out.write(np.concatenate([doc, sep]))
                    continue
                buffer = np.concatenate([buffer, doc, sep])
                full = len(buffer) // record_len
                for k in range(full):
                    out.write(buffer[k * record_len:(k + 1) * record_len])
                buffer = buffer[full * record_len:]
            bar.set_postfix_str(f"{stats.documents:,} documents, {stats.tokens:,} tokens", refresh=False)
        out.close()
    except BaseException:
        out.abort()
        bar.close()
        raise
    bar.close()
    stats.tail_tokens_dropped = len(buffer)
    stats.tokens -= len(buffer)
    stats.records, stats.files, stats.skipped = out.records, out.files, skipped.count
    stats.seconds = time.perf_counter() - t0

    kept = stats.documents - stats.too_short
    log(f"create_tfrecords: {stats.documents:,} documents from {stats.input_files} file(s) "
        f"({stats.input_bytes / 1e6:.1f} MB) in {stats.seconds:.1f}s ({stats.input_bytes / 1e6 / stats.seconds:.2f} MB/s)")
    log(f"  kept {kept:,}; dropped {stats.too_short:,} under --minimum_size {minimum} tokens; "
        f"skipped {stats.skipped:,} unreadable")
    log(f"  wrote {stats.records:,} {opts.mode} records, {stats.tokens:,} tokens, to {len(stats.files)} file(s) "
        f"in {opts.output_dir}" + (f"; the final {stats.tail_tokens_dropped:,} tokens (less than one "
                                   f"{record_len}-token record) were not written" if stats.tail_tokens_dropped else ""))
    if not stats.records:
        raise NeoError(f"no records written: {stats.documents:,} documents read, {stats.too_short:,} under "
                       f"--minimum_size {minimum}, {stats.skipped:,} unreadable"
                       + (f", and fewer than {record_len} tokens in all for one chunk" if opts.mode == "chunks" else "")
                       + ". Lower --minimum_size or --chunk_size, or add text.")
    if opts.write_dataset_config:
        path = write_dataset_config(opts, tokenizer, separator)
        log(f"  dataset config: {path}; use it in a model config as "
            f"\"datasets\": [[\"{path}\", null, \"{'chunks' if opts.mode == 'chunks' else 'documents_random'}\", null]]")
    return stats


def end_of_document(opts: Options, tokenizer) -> int:
    """The token after every document: --separator, else the tokenizer's <|endoftext|> (GPT-NeoX's
    end of document, which --append-eod asks for by name)."""
    eod = tokenizer.token_to_id("<|endoftext|>")
    if opts.append_eod and eod is None:
        raise NeoError(f"--append-eod: tokenizer {opts.encoder_path} has no <|endoftext|> token (the end of "
                       f"document); pass --separator ID instead.")
    if opts.append_eod and opts.separator not in (None, eod):
        raise NeoError(f"--append-eod appends the end-of-document token {eod}, --separator asks for "
                       f"{opts.separator}: give one of them.")
    separator = opts.separator if opts.separator is not None else eod
    if separator is None:
        raise NeoError(f"tokenizer {opts.encoder_path} has no <|endoftext|> token: pass --separator ID.")
    return separator


def write_dataset_config(opts: Options, tokenizer, separator: int) -> str:
    """`<output_dir>/<name>.json`: the dataset config matching what was written."""
    local = os.path.exists(opts.encoder_path)
    hub = not local and opts.encoder_path != "bytes"
    pad = tokenizer.token_to_id("<|padding|>")
    cfg = {
        "n_vocab": tokenizer.vocab_size,
        "path": os.path.join(os.path.abspath(opts.output_dir), f"{opts.name}_*.tfrecords"),
        "eval_path": "",
        "tokenizer_path": os.path.abspath(opts.encoder_path) if local else opts.encoder_path,
        "tokenizer_is_pretrained": hub,
        "eos_id": separator,
        "padding_id": separator if pad is None else pad,
    }
    if opts.mode == "documents":
        cfg["minimum_size"] = max(opts.minimum_size, 1) + 1  # records hold the separator too
    path = os.path.join(opts.output_dir, f"{opts.name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def parse_separator(value: str) -> int:
    """GPT-Neo wrote the separator as a JSON list ("[50256]"); a bare id works too."""
    parsed = json.loads(value)
    if isinstance(parsed, list):
        if len(parsed) != 1:
            raise argparse.ArgumentTypeError("exactly one separator token id, e.g. [50256]")
        parsed = parsed[0]
    if not isinstance(parsed, int):
        raise argparse.ArgumentTypeError("a token id, e.g. 50256 or [50256]")
    return parsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Turn a folder of text into GPT-Neo tfrecords.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input_dir", required=True, help="folder of input files (not recursive), or one file")
    p.add_argument("--output_dir", default="./tfrecords", help="where the tfrecords go (created if missing)")
    p.add_argument("--name", default="openwebtext", help="output file prefix")
    p.add_argument("--encoder_path", default=None,
                   help="tokenizer: a tokenizers JSON file, a folder with GPT-2's encoder.json + vocab.bpe, "
                        "'gpt2' (GPT-2's BPE, shipped in data/gpt2), or a Hugging Face hub name (needs the "
                        "network); default gpt2")
    p.add_argument("--use_gpt2_tokenizer", action="store_true",
                   help="tokenize with GPT-2's BPE (data/gpt2, offline): --encoder_path gpt2, separator 50256")
    p.add_argument("--mode", choices=["chunks", "documents"], default="documents",
                   help="documents: one document per record (for documents_* sampling); "
                        "chunks: fixed chunk_size+1-token records (for chunks sampling)")
    p.add_argument("--chunk_size", type=int, default=2048, help="n_ctx of the model: records hold chunk_size+1 tokens")
    p.add_argument("--minimum_size", type=int, default=100, help="drop documents with fewer tokens than this")
    p.add_argument("--separator", type=parse_separator, default=None,
                   help="token id appended after every document (default: the tokenizer's <|endoftext|>)")
    p.add_argument("--jsonl_keys", "--jsonl-keys", nargs="+", default=["text"],
                   help="JSON input: the fields that are documents, each its own document (GPT-NeoX's flag)")
    p.add_argument("--append-eod", "--append_eod", dest="append_eod", action="store_true",
                   help="end every document with the tokenizer's <|endoftext|> (GPT-NeoX's flag; it is "
                        "--separator's default, the flag refuses a tokenizer without one)")
    p.add_argument("--files_per", type=int, default=100_000, help="records per output file")
    p.add_argument("--processes", type=int, default=0, help="tokenizing worker processes (0: one per core)")
    p.add_argument("--ftfy", action="store_true", help="repair Unicode with ftfy (NFKC) before tokenizing")
    p.add_argument("--wikitext-detokenize", "--wikitext_detokenize", dest="wikitext_detokenize",
                   action="store_true", help="undo WikiText tokenisation before tokenizing")
    p.add_argument("--write_dataset_config", action="store_true",
                   help="also write <output_dir>/<name>.json, the dataset config for these files")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    if args.use_gpt2_tokenizer and args.encoder_path not in (None, "gpt2"):
        p.error(f"--use_gpt2_tokenizer and --encoder_path {args.encoder_path} name two tokenizers; keep one.")
    args.encoder_path = args.encoder_path or "gpt2"
    options = {k: v for k, v in vars(args).items() if k not in ("no_progress", "use_gpt2_tokenizer")}
    options["jsonl_keys"] = tuple(options["jsonl_keys"])
    return run_command("create_tfrecords",
                       lambda: create_tfrecords(Options(**options, progress=not args.no_progress)))


if __name__ == "__main__":
    sys.exit(main())
