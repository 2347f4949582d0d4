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
