"""Language-model loss: token cross-entropy plus GPT-Neo's z-loss.

The objective is CE + z_loss * logsumexp(logits)^2 (z_loss = 1e-4 as in GPT-Neo), but neo
reports plain cross-entropy as `loss` (and perplexity/bits per byte from it) with the z term
logged apart: the original folded z-loss into every reported number (docs/differences.md).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def lm_loss(logits: jax.Array, targets: jax.Array, z_loss: float,
            mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """logits [b, t, v] float32, targets [b, t] int -> (objective, {"loss", "z_loss"}), means over
    the positions where `mask` is true (all positions without a mask)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = log_z - target_logit
    z = jnp.square(log_z)
    if mask is None:
        ce_mean, z_mean = ce.mean(), z.mean()
    else:
        m = mask.astype(jnp.float32)
        n = jnp.maximum(m.sum(), 1.0)
        ce_mean, z_mean = (ce * m).sum() / n, (z * m).sum() / n
    return ce_mean + z_loss * z_mean, {"loss": ce_mean, "z_loss": z_mean}


def shift(tokens: jax.Array, padding_id: Optional[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A batch [b, n_ctx + 1] -> (inputs, targets, mask), each [b, n_ctx]. Padded positions hold
    PAD (-1, set by the data side where it padded; neo/data/__init__.py): as inputs they become
    `padding_id` (which may lie past the vocabulary: it embeds as zeros), and a PAD target is
    masked out of the loss, so that a real token equal to padding_id (eos, say) still counts."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    pad = 0 if padding_id is None else padding_id
    mask = targets >= 0
    return jnp.where(inputs < 0, pad, inputs), jnp.where(mask, targets, 0), mask
