"""Token sources: what the train loop pulls batches of [rows, n_ctx + 1] token ids from.

Every source yields the rows it is asked for (the rows this process's devices hold, from
neo/mesh.py `process_rows`) of each global batch as numpy int32, and exposes `state()` /
`restore(state)` so a checkpoint can resume it exactly; `take` stacks the next n batches for
a compiled call of n train steps. The global batches are a function of the config, the seed
and the step only: the same whatever the number of processes. A dataset whose `path` is a
.txt file is read by neo/data/text.py; tfrecord globs by tfrecords.py -> sampling.py -> mixture.py.
check.py is `--check_dataset`; the offline corpus tools (tfrecords and tokenizers from raw text)
are in prep/.

Padding is marked where it is added: a row position that holds no data (a documents_* example
shorter than n_ctx + 1) holds PAD, which is no token id. The train and eval steps turn PAD
into `padding_id` as an input and never score a PAD target (neo/loss.py `shift`), so padding is
never trained on or counted, even when padding_id equals eos_id, whose real occurrences are
targets like any token (GPT-Neo's loss counted every position, padding included).

`input_fn` picks GPT-Neo's reader: `sequential_input` reads the records of every dataset's files
in (seeded, shuffled) file order as chunks, ignoring the entries' stitch, sampling mode and
weight as GPT-Neo's default reader did; `generic_text`, and neo's default, sample each entry as
it says and mix the datasets by weight (docs/data.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from neo.config import Config, resolve_path
from neo.errors import NeoError

PAD = -1  # a padded row position (see above); never a token id


def make_source(cfg: Config, split: str = "train", rows: Optional[Sequence[int]] = None):
    """The batch source for `split` ("train" or "eval") of the config's datasets, yielding rows
    `rows` (ascending; default all) of each global batch."""
    from neo.data.text import TextSource, read_text_tokens, split_holdout
    from neo.data.tokenizer import load_tokenizer

    if cfg.data.no_dataset:
        raise NeoError(f"{cfg.source}: no_dataset is true: this config runs without data (--predict, "
                       f"--auto_layout); to train or validate, remove no_dataset and add 'datasets'.")
    if not cfg.data.datasets:
        raise NeoError(f"{cfg.source}: no 'datasets' configured; add e.g. "
                       f"\"datasets\": [[\"tinyshakespeare\", null, null, null]].")
    entry = cfg.data.datasets[0]
    ds = entry.config
    if ds.path.endswith(".txt"):  # alone: neo/config/validate.py refuses mixing it
        tokenizer = load_tokenizer(ds.tokenizer_path, ds.tokenizer_is_pretrained)
        if split == "eval" and ds.eval_path:
            tokens = read_text_tokens(resolve_path(ds.eval_path, ds.source), tokenizer)
        else:
            tokens = read_text_tokens(resolve_path(ds.path, ds.source), tokenizer)
            if ds.holdout:
                train, held = split_holdout(tokens, ds.holdout)
                tokens = held if split == "eval" else train
            elif split == "eval":
                raise NeoError(f"dataset '{entry.id}' has no eval data: set 'eval_path' or 'holdout' in {ds.source}.")
        batch = cfg.run.train_batch_size if split == "train" else cfg.run.eval_rows
        seed = cfg.run.seed if split == "train" else cfg.run.seed + 1
        return TextSource(tokens, batch, cfg.model.n_ctx, seed, rows, name=entry.id)
    return tfrecord_source(cfg, split, rows)


def take(source, n: int) -> np.ndarray:
    """The next `n` batches of `source`, stacked: [n, rows, n_ctx + 1] int32, what one compiled
    call of n train steps consumes (neo/train.py `Setup.steps`)."""
    return np.stack([next(source) for _ in range(n)])


def dataset_file(entry) -> str:
    """The dataset config file an entry came from, for messages."""
    if entry.inline:
        return "its datasets entry"
    return entry.id if entry.id.endswith(".json") else f"{entry.config.source}/{entry.id}.json"


def tfrecord_source(cfg: Config, split: str, rows: Optional[Sequence[int]]):
    """The mixture of the config's tfrecord datasets (docs/data.md)."""
    from neo.data.mixture import TFRecordSource
    from neo.data.sampling import DatasetSpec, DatasetStream
    from neo.data.tfrecords import list_files, record_counts

    seed = cfg.run.seed if split == "train" else cfg.run.seed + 1
    streams, weights, listed = [], [], []
    for k, entry in enumerate(cfg.data.datasets):
        ds = entry.config
        pattern = ds.path if split == "train" else ds.eval_path
        if not pattern:
            if split == "train":
                raise NeoError(f"dataset '{entry.id}' has no 'path' in {dataset_file(entry)}.")
            continue
        files = list_files(resolve_path(pattern, ds.source), f"dataset '{entry.id}' ({dataset_file(entry)}), "
                           f"{'path' if split == 'train' else 'eval_path'}")
        listed.append(files)
        spec = DatasetSpec(name=entry.id, files=tuple(files), counts=tuple(record_counts(files)),
                           mode=entry.sampling_mode or "chunks", stitch=entry.stitch or 1, n_ctx=cfg.model.n_ctx,
                           eos_id=ds.eos_id, n_vocab=cfg.model.n_vocab, seed=(seed, k),
                           shuffle_files=cfg.data.shuffle_input_filenames)
        streams.append(DatasetStream(spec))
        weights.append(1.0 if entry.weight is None else entry.weight)
    if not streams:
        raise NeoError(f"{cfg.source}: no dataset has an 'eval_path'; set one in a dataset config to evaluate.")
    if cfg.data.input_fn == "sequential_input":
        streams, weights = [_sequential(cfg, listed, seed)], [1.0]
    batch = cfg.run.train_batch_size if split == "train" else cfg.run.eval_rows
    return TFRecordSource(streams, weights, batch, cfg.model.n_ctx, seed, rows)


def _sequential(cfg: Config, listed: list[list[str]], seed: int):
    """GPT-Neo's `sequential_input`: one stream over the files of every dataset, naturally
    sorted, in an order shuffled by the seed unless shuffle_input_filenames is false, each
    file's records read in order as chunks (stitch, sampling mode and weight are not used)."""
    from neo.data.sampling import DatasetSpec, DatasetStream
    from neo.data.tfrecords import natural_key, record_counts

    files = sorted({f for group in listed for f in group}, key=natural_key)
    spec = DatasetSpec(name="sequential_input", files=tuple(files), counts=tuple(record_counts(files)),
                       mode="chunks", stitch=1, n_ctx=cfg.model.n_ctx, eos_id=cfg.data.eos_id or 0,
                       n_vocab=cfg.model.n_vocab, seed=(seed, 0), shuffle_files=cfg.data.shuffle_input_filenames,
                       shuffle_records=False)
    return DatasetStream(spec)
