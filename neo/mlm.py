"""Masked-LM training (`mlm_training`), the way BERT defines it, on device from the raw batch.

From each row (n_ctx tokens; or CLS + n_ctx - 1 tokens when `mlm_cls_token_id` is set), every
maskable token is selected with probability `mlm_mask_prob`. A selected token is replaced by
`mlm_mask_id`, or by a random token (probability `mlm_random_token_prob`), or left as it is
(probability `mlm_same_token_prob`). The model sees the result with bidirectional attention
and is trained to predict the original token at the selected positions only.

Maskable = not CLS, not the mask id, not `padding_id`, not in `mlm_mask_ignore_ids`; random
replacements are drawn uniformly from the maskable ids below the data's vocabulary size.
The original inverted the labels (it trained on the unmasked positions) and drew its random
replacements independently of the selection (docs/differences.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from neo.config import ModelConfig
from neo.errors import NeoError


def check_mlm(cfg: ModelConfig) -> None:
    """Config mistakes that only matter for masked-LM training."""
    where = cfg.source or "config"
    if cfg.mlm_same_token_prob + cfg.mlm_random_token_prob > 1.0:
        raise NeoError(f"{where}: mlm_same_token_prob ({cfg.mlm_same_token_prob}) + mlm_random_token_prob "
                       f"({cfg.mlm_random_token_prob}) exceed 1; they are shares of the selected tokens.")
    if not len(replacement_ids(cfg)):
        raise NeoError(f"{where}: every token id is excluded from masking (mlm_mask_ignore_ids); "
                       f"nothing could be masked.")


def excluded_ids(cfg: ModelConfig) -> set[int]:
    ids = set(cfg.mlm_mask_ignore_ids)
    for special in (cfg.mlm_cls_token_id, cfg.mlm_mask_id, cfg.padding_id):
        if special is not None:
            ids.add(special)
    return ids


def replacement_ids(cfg: ModelConfig) -> np.ndarray:
    """Token ids a random replacement may take: the data's vocabulary minus the excluded ids."""
    vocab = min([cfg.n_vocab] + [e.config.n_vocab for e in cfg.datasets])
    keep = np.ones(vocab, bool)
    keep[[i for i in excluded_ids(cfg) if i < vocab]] = False
    return np.flatnonzero(keep).astype(np.int32)


def mask_tokens(cfg: ModelConfig, batch: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """batch [b, >= n_ctx] token ids -> (inputs, labels, loss mask), each [b, n_ctx]."""
    tokens = batch[:, : cfg.n_ctx].astype(jnp.int32)
    if cfg.mlm_cls_token_id is not None:
        cls = jnp.full((tokens.shape[0], 1), cfg.mlm_cls_token_id, jnp.int32)
        tokens = jnp.concatenate([cls, tokens[:, : cfg.n_ctx - 1]], axis=1)
    excluded = jnp.asarray(sorted(excluded_ids(cfg)), jnp.int32)
    maskable = ~jnp.isin(tokens, excluded)
    k_select, k_action, k_token = jax.random.split(rng, 3)
    selected = (jax.random.uniform(k_select, tokens.shape) < cfg.mlm_mask_prob) & maskable
    action = jax.random.uniform(k_action, tokens.shape)
    same = action < cfg.mlm_same_token_prob
    randomize = ~same & (action < cfg.mlm_same_token_prob + cfg.mlm_random_token_prob)
    pool = jnp.asarray(replacement_ids(cfg))
    random_ids = pool[jax.random.randint(k_token, tokens.shape, 0, pool.shape[0])]
    inputs = jnp.where(selected & randomize, random_ids, tokens)
    inputs = jnp.where(selected & ~same & ~randomize, cfg.mlm_mask_id, inputs)
    return inputs, tokens, selected
