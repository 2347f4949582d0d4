"""`main.py --check_dataset`: what the model will be trained on, before any cluster time is spent.

For each dataset of the config and each of its splits: files, records, documents and tokens,
the smallest and largest token id against n_vocab (an id >= n_vocab is an error naming the
files: in JAX an out-of-range embedding lookup does not fail, it silently trains on garbage),
and a histogram of document lengths. Then the first rows of the first training batch, exactly
as the model will see them, decoded back to text.

Documents are records for the documents_* sampling modes, and the separator-delimited runs of
the token stream for `chunks` (whose records cut through documents).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from neo.config import DatasetEntry, Config, resolve_path
from neo.errors import NeoError

SHOW_CHARS = 500


@dataclass
class SplitReport:
    """What one glob of one dataset holds."""

    pattern: str
    files: int = 0
    records: int = 0
    tokens: int = 0
    documents: int = 0
    document_tokens: int = 0
    min_id: int = 0
    max_id: int = -1
    min_length: int = 0
    max_length: int = 0
    histogram: dict[int, int] = field(default_factory=dict)  # floor(log2(length)) -> documents
    bad_files: list[tuple[str, int]] = field(default_factory=list)  # (file, offending id)


def check_dataset(cfg: Config, log=print, show: int = 3) -> dict[str, dict[str, SplitReport]]:
    """Print the report; raise NeoError if any token id is outside the vocabulary."""
    from neo.data import dataset_file

    if cfg.data.no_dataset:
        raise NeoError(f"{cfg.source}: no_dataset is true: this config has no data to check.")
    if not cfg.data.datasets:
        raise NeoError(f"{cfg.source}: no 'datasets' configured; nothing to check.")
    reports: dict[str, dict[str, SplitReport]] = {}
    seen = set()
    for entry in cfg.data.datasets:
        if entry.id in seen:
            continue
        seen.add(entry.id)
        ds = entry.config
        log(f"dataset '{entry.id}' ({dataset_file(entry)}): sampling {entry.sampling_mode or 'chunks'}, "
            f"stitch {entry.stitch or 1}, weight {entry.weight or 1.0:g}, eos_id {ds.eos_id}, "
            f"padding_id {ds.padding_id}")
        reports[entry.id] = {}
        for split, pattern in (("train", ds.path), ("eval", ds.eval_path)):
            if not pattern:
                continue
            if pattern.endswith(".txt"):
                rep = _scan_text(entry, split)
            else:
                rep = _scan_tfrecords(entry, resolve_path(pattern, ds.source), split, cfg.model.n_vocab)
            reports[entry.id][split] = rep
            _print_report(rep, split, entry, cfg.model.n_vocab, log)
    bad = [(f, i) for splits in reports.values() for r in splits.values() for f, i in r.bad_files]
    if bad:
        lines = "\n".join(f"  {f}: token id {i}" for f, i in bad[:20])
        raise NeoError(f"token ids outside the vocabulary in {len(bad)} file(s):\n{lines}\nRe-tokenize these "
                       f"files with the dataset's tokenizer, or fix 'n_vocab' in the dataset and model configs.")
    _show_examples(cfg, log, show)
    return reports


def _scan_tfrecords(entry: DatasetEntry, pattern: str, split: str, model_vocab: int) -> SplitReport:
    from tqdm import tqdm

    from neo.data import dataset_file
    from neo.data.tfrecords import count_from_name, list_files, read_records

    ds = entry.config
    files = list_files(pattern, f"dataset '{entry.id}' ({dataset_file(entry)}), "
                                f"{'path' if split == 'train' else 'eval_path'}")
    rep = SplitReport(pattern, files=len(files), min_id=np.iinfo(np.int64).max)
    documents_mode = (entry.sampling_mode or "chunks").startswith("documents")
    limit = min(ds.n_vocab, model_vocab)
    lengths = _Lengths()
    named = [count_from_name(f) for f in files]
    with tqdm(total=sum(named) if None not in named else None, unit=" records", desc=f"{entry.id} {split}",
              leave=False, mininterval=0.5) as bar:  # closed (its line cleared) by an error too
        carry = 0
        for path in files:
            lo, hi, before = np.iinfo(np.int64).max, -1, rep.records
            for rec in read_records(path):
                rep.records += 1
                rep.tokens += len(rec)
                lo, hi = min(lo, int(rec.min())), max(hi, int(rec.max()))
                if documents_mode:
                    lengths.add(np.array([len(rec) - (rec[-1] == ds.eos_id)]))
                    continue
                pos = np.flatnonzero(rec == ds.eos_id)
                if not len(pos):
                    carry += len(rec)
                    continue
                lengths.add(np.concatenate([[carry + pos[0]], np.diff(pos) - 1]))
                carry = len(rec) - pos[-1] - 1
            bar.update(rep.records - before)
            rep.min_id, rep.max_id = min(rep.min_id, lo), max(rep.max_id, hi)
            if hi >= limit or lo < 0:
                rep.bad_files.append((path, hi if hi >= limit else lo))
    if carry:
        lengths.add(np.array([carry]))
    lengths.fill(rep)
    return rep


def _scan_text(entry: DatasetEntry, split: str) -> SplitReport:
    from neo.data.text import read_text_tokens
    from neo.data.tokenizer import load_tokenizer

    ds = entry.config
    path = resolve_path(ds.path if split == "train" else ds.eval_path, ds.source)
    tokens = read_text_tokens(path, load_tokenizer(ds.tokenizer_path, ds.tokenizer_is_pretrained))
    rep = SplitReport(path, files=1, records=1, tokens=len(tokens))
    rep.min_id, rep.max_id = int(tokens.min()), int(tokens.max())
    lengths = _Lengths()
    lengths.add(np.array([len(tokens)]))
    lengths.fill(rep)
    if rep.max_id >= ds.n_vocab:
        rep.bad_files.append((path, rep.max_id))
    return rep


class _Lengths:
    """Streaming count, sum, min, max and log2 histogram of document lengths."""

    def __init__(self):
        self.n = self.total = 0
        self.lo, self.hi = None, 0
        self.hist = np.zeros(64, np.int64)

    def add(self, lengths: np.ndarray) -> None:
        lengths = lengths.astype(np.int64)
        if not len(lengths):
            return
        self.n += len(lengths)
        self.total += int(lengths.sum())
        lo = int(lengths.min())
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = max(self.hi, int(lengths.max()))
        buckets = np.where(lengths > 0, np.floor(np.log2(np.maximum(lengths, 1))) + 1, 0).astype(np.int64)
        self.hist += np.bincount(buckets, minlength=64)[:64]

    def fill(self, rep: SplitReport) -> None:
        rep.documents, rep.document_tokens = self.n, self.total
        rep.min_length, rep.max_length = self.lo or 0, self.hi
        rep.histogram = {int(b): int(c) for b, c in enumerate(self.hist) if c}


def _print_report(rep: SplitReport, split: str, entry: DatasetEntry, model_vocab: int, log) -> None:
    ds = entry.config
    log(f"  {split}: {rep.files:,} file(s) matching {rep.pattern}")
    log(f"    records    {rep.records:,}")
    mean = rep.document_tokens / rep.documents if rep.documents else 0
    log(f"    documents  {rep.documents:,}  (length min {rep.min_length:,}, mean {mean:,.1f}, "
        f"max {rep.max_length:,} tokens)")
    log(f"    tokens     {rep.tokens:,}  ({rep.document_tokens:,} in documents + "
        f"{rep.tokens - rep.document_tokens:,} separators)")
    verdict = "ok" if not rep.bad_files else f"ERROR in {len(rep.bad_files)} file(s)"
    log(f"    token ids  {rep.min_id:,} .. {rep.max_id:,}  (dataset n_vocab {ds.n_vocab:,}, model n_vocab "
        f"{model_vocab:,}): {verdict}")
    for path, token in rep.bad_files[:5]:
        log(f"      {path}: token id {token:,} outside 0..{min(ds.n_vocab, model_vocab) - 1:,}")
    log("    document lengths (tokens):")
    top = max(rep.histogram.values(), default=1)
    for b, count in sorted(rep.histogram.items()):
        lo, hi = (0, 0) if b == 0 else (2 ** (b - 1), 2 ** b - 1)
        log(f"      {lo:>9,} - {hi:>9,} | {'#' * max(1, round(40 * count / top)):<40} {count:,}")


def _show_examples(cfg: Config, log, show: int) -> None:
    from neo.data import make_source
    from neo.data.tokenizer import load_tokenizer

    batch = next(make_source(cfg, "train"))
    tokenizer = None  # without a configured tokenizer the examples are shown as ids, and it says so
    if cfg.data.tokenizer_path is None:
        log("(no 'tokenizer_path' configured: the examples are shown as token ids)")
    else:  # a tokenizer that does not load is an error (its message names the file and the fix)
        tokenizer = load_tokenizer(cfg.data.tokenizer_path, cfg.data.datasets[0].config.tokenizer_is_pretrained)
    for row in range(min(show, len(batch))):
        tokens = batch[row][batch[row] >= 0]  # without the padding (PAD), which is no token
        padding = f", then {len(batch[row]) - len(tokens)} padding (no target)" if len(tokens) < len(batch[row]) else ""
        log(f"--- training example {row + 1} of the first batch: {len(tokens)} tokens{padding} "
            f"(ids {tokens[:8].tolist()} ...) ---")
        text = tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))
        log(text if len(text) <= 2 * SHOW_CHARS else f"{text[:SHOW_CHARS]}\n...\n{text[-SHOW_CHARS:]}")
    log("-" * 40)
