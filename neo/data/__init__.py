"""Token sources: what the train loop pulls batches of [rows, n_ctx + 1] token ids from.

Every source yields this process's rows of the global batch as numpy int32, and exposes
`state()` / `restore(state)` so a checkpoint can resume it exactly.
"""

from __future__ import annotations

from neo.config import ModelConfig, resolve_path
from neo.errors import NeoError


def make_source(cfg: ModelConfig, split: str = "train", process_index: int = 0, process_count: int = 1):
    """The batch source for `split` ("train" or "eval") of the config's datasets."""
    from neo.data.text import TextSource, read_text_tokens, split_holdout
    from neo.data.tokenizer import load_tokenizer

    if not cfg.datasets:
        raise NeoError(f"{cfg.source}: no 'datasets' configured; add e.g. "
                       f"\"datasets\": [[\"tinyshakespeare\", null, null, null]].")
    entry = cfg.datasets[0]
    ds = entry.config
    if ds.path.endswith(".txt"):
        if len(cfg.datasets) > 1:
            raise NeoError(f"{cfg.source}: a plain-text dataset ('{entry.id}') cannot be mixed with others; "
                           f"turn the text into tfrecords with data/create_tfrecords.py.")
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
        batch = cfg.train_batch_size if split == "train" else (cfg.eval_batch_size or cfg.train_batch_size)
        seed = cfg.seed if split == "train" else cfg.seed + 1
        return TextSource(tokens, batch, cfg.n_ctx, seed, process_index, process_count, name=entry.id)
    raise NeoError(f"dataset '{entry.id}': tfrecord input is not available yet in this build of neo "
                   f"(only plain-text .txt datasets).")
