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

from neo.config import Config
from neo.config.sections import mlm_excluded_ids, mlm_vocab


def replacement_ids(cfg: Config) -> np.ndarray:
    """Token ids a random replacement may take: the data's vocabulary minus the excluded ids."""
    vocab = mlm_vocab(cfg)
    keep = np.ones(vocab, bool)
    keep[[i for i in mlm_excluded_ids(cfg) if i < vocab]] = False
    return np.flatnonzero(keep).astype(np.int32)


def mask_tokens(cfg: Config, batch: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """batch [b, >= n_ctx] token ids -> (inputs, labels, loss mask), each [b, n_ctx]."""
    tokens = batch[:, : cfg.model.n_ctx].astype(jnp.int32)
    padded = tokens < 0  # PAD, where the data side padded (neo/data/__init__.py): never selected
    tokens = jnp.where(padded, 0 if cfg.data.padding_id is None else cfg.data.padding_id, tokens)
    if cfg.run.mlm_cls_token_id is not None:
        cls = jnp.full((tokens.shape[0], 1), cfg.run.mlm_cls_token_id, jnp.int32)
        tokens = jnp.concatenate([cls, tokens[:, : cfg.model.n_ctx - 1]], axis=1)
        padded = jnp.concatenate([jnp.zeros_like(cls, bool), padded[:, : cfg.model.n_ctx - 1]], axis=1)
    excluded = jnp.asarray(sorted(mlm_excluded_ids(cfg)), jnp.int32)
    maskable = ~jnp.isin(tokens, excluded) & ~padded
    k_select, k_action, k_token = jax.random.split(rng, 3)
    selected = (jax.random.uniform(k_select, tokens.shape) < cfg.run.mlm_mask_prob) & maskable
    action = jax.random.uniform(k_action, tokens.shape)
    same = action < cfg.run.mlm_same_token_prob
    randomize = ~same & (action < cfg.run.mlm_same_token_prob + cfg.run.mlm_random_token_prob)
    pool = jnp.asarray(replacement_ids(cfg))
    random_ids = pool[jax.random.randint(k_token, tokens.shape, 0, pool.shape[0])]
    inputs = jnp.where(selected & randomize, random_ids, tokens)
    inputs = jnp.where(selected & ~same & ~randomize, cfg.run.mlm_mask_id, inputs)
    # labels of unselected positions are never scored; padded ones hold a valid id, not padding_id
    # (which may lie past the vocabulary, where a gather of the logits would give NaN)
    return inputs, jnp.where(padded, 0, tokens), selected
