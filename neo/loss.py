"""Language-model loss: token cross-entropy plus GPT-Neo's z-loss.

The objective is CE + z_loss * logsumexp(logits)^2 (z_loss = 1e-4 as in GPT-Neo), but neo
reports plain cross-entropy as `loss` (and perplexity/bits per byte from it) with the z term
logged apart: the original folded z-loss into every reported number (docs/differences.md).

Training never holds the float32 logits of the whole batch ([batch, T, vocab]: 400 MiB per
sequence of 2048 tokens with GPT-2's vocabulary, twice that with its gradient): `chunked_lm_loss`
projects the final hidden states onto the vocabulary a chunk of positions at a time, inside a
scan whose body is rematerialised, so the backward pass recomputes each chunk's logits too.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

# Positions x rows of one chunk of logits (the batch's rows all take part in every chunk, so a
# layout's batch split stays as it is): a chunk is CHUNK_TOKENS // rows positions, at least 1.
CHUNK_TOKENS = 8192


def lm_loss(logits: jax.Array, targets: jax.Array, z_loss: float,
            mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """logits [b, t, v] float32, targets [b, t] int -> (objective, {"loss", "z_loss"}), means over
    the positions where `mask` is true (all positions without a mask)."""
    ce, z = token_losses(logits, targets)
    weight = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return _objective((ce * weight).sum(), (z * weight).sum(), weight.sum(), z_loss)


def chunked_lm_loss(hidden: jax.Array, project: Callable[[jax.Array], jax.Array], targets: jax.Array,
                    z_loss: float, mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """`lm_loss(project(hidden), ...)`, equal to it, without ever holding all the logits:
    hidden [b, t, embd] final hidden states, project: [b, c, embd] -> float32 logits [b, c, v]
    (the model's head), targets and mask [b, t]."""
    b, t = targets.shape
    c = min(t, max(1, CHUNK_TOKENS // b))
    n = -(-t // c)
    weight = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    if n == 1:  # one chunk: nothing to save by scanning
        ce, z = token_losses(project(hidden), targets)
        return _objective((ce * weight).sum(), (z * weight).sum(), weight.sum(), z_loss)
    pad = n * c - t  # padded positions have weight 0
    pad_t = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    chunks = lambda x: pad_t(x).reshape(b, n, c, *x.shape[2:]).swapaxes(0, 1)  # [n, b, c, ...]

    @jax.checkpoint
    def chunk(xs: tuple) -> tuple[jax.Array, jax.Array]:
        h, y, w = xs
        ce, z = token_losses(project(h), y)
        return (ce * w).sum(), (z * w).sum()

    ce_sums, z_sums = jax.lax.map(chunk, (chunks(hidden), chunks(targets), chunks(weight)))
    return _objective(ce_sums.sum(), z_sums.sum(), weight.sum(), z_loss)


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy and squared log-partition (z-loss), float32 [b, t]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - target_logit, jnp.square(log_z)


def _objective(ce_sum: jax.Array, z_sum: jax.Array, count: jax.Array, z_loss: float) -> tuple[jax.Array, dict]:
    n = jnp.maximum(count, 1.0)
    ce_mean, z_mean = ce_sum / n, z_sum / n
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
