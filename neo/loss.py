"""Language-model loss: token cross-entropy plus GPT-Neo's z-loss.

The objective is CE + z_loss * logsumexp(logits)^2 (z_loss = 1e-4 as in GPT-Neo), but neo
reports plain cross-entropy as `loss` (and perplexity/bits per byte from it) with the z term
logged apart: the original folded z-loss into every reported number (docs/differences.md).

Training never holds the float32 logits of the whole batch ([batch, T, vocab]: 400 MiB per
sequence of 2048 tokens with GPT-2's vocabulary, twice that with its gradient): `chunked_lm_loss`
projects the final hidden states onto the vocabulary a chunk of positions at a time, and takes
each chunk's gradient right there, in the forward pass. The loss is the last thing computed, so
its gradient is known then up to one scalar factor (the objective's cotangent, 1 in training);
the backward pass only scales the stored gradients of the hidden states and of the head. A
rematerialised chunk, as neo had before, computed every chunk's logits a second time: one more
[tokens, embd] x [embd, vocab] product and softmax pass per step (gpt_neo_1.3B at batch 8 x 2048
on an H200: 0.2747 s per step then, 0.2601 s now; docs/benchmarks.md). One chunk (on CPU at the
benchmarks' batches) is plain autodiff of the full logits.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

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


def chunked_lm_loss(hidden: jax.Array, head: jax.Array, project: Callable[[jax.Array, jax.Array], jax.Array],
                    targets: jax.Array, z_loss: float, mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """`lm_loss(project(hidden, head), ...)`, equal to it with equal gradients for `hidden`
    and `head`, without ever holding all the logits: hidden [b, t, embd] final hidden states,
    head the projection's weights, project(h [b, c, embd], head) -> float32 logits [b, c, v]
    (GPT's project_logits; a pure function of its arguments), targets and mask [b, t]. The
    metrics in the returned dict carry no gradient, nor do targets and mask."""
    b, t = targets.shape
    c = min(t, max(1, CHUNK_TOKENS // b))
    n = -(-t // c)
    weight = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    if n == 1:  # one chunk: nothing to save by splitting
        ce, z = token_losses(project(hidden, head), targets)
        return _objective((ce * weight).sum(), (z * weight).sum(), weight.sum(), z_loss)
    pad = n * c - t  # padded positions have weight 0
    pad_t = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    chunks = lambda x: pad_t(x).reshape(b, n, c, *x.shape[2:]).swapaxes(0, 1)  # [n, b, c, ...]

    def forward(hidden, head, targets, weight):
        count = jnp.maximum(weight.sum(), 1.0)
        ce_scale, z_scale = 1 / count, z_loss / count  # the objective's weights on the sums

        def chunk(head_grad, xs):
            h, y, w = xs
            logits, project_vjp = jax.vjp(project, h, head)
            logits32 = logits.astype(jnp.float32)
            log_z, target_logit = _log_z_and_target(logits32, y)
            ce = log_z - target_logit
            # d/dlogits of w * (ce_scale * ce + z_scale * log_z^2): softmax weighted, minus the target
            p = jnp.exp(logits32 - log_z[..., None])
            is_target = jnp.arange(logits.shape[-1]) == y[..., None]
            d = (w * (ce_scale + 2 * z_scale * log_z))[..., None] * p - jnp.where(is_target, (w * ce_scale)[..., None], 0)
            h_grad, head_grad_c = project_vjp(d.astype(logits.dtype))
            return head_grad + head_grad_c, ((ce * w).sum(), (jnp.square(log_z) * w).sum(), h_grad)

        head_grad, (ce_sums, z_sums, h_grads) = jax.lax.scan(
            chunk, jnp.zeros_like(head), (chunks(hidden), chunks(targets), chunks(weight)))
        h_grad = h_grads.swapaxes(0, 1).reshape(b, n * c, *hidden.shape[2:])[:, :t]
        return _objective(ce_sums.sum(), z_sums.sum(), count, z_loss), (h_grad, head_grad)

    @jax.custom_vjp
    def loss(hidden, head, targets, weight):
        return forward(hidden, head, targets, weight)[0]

    def loss_bwd(grads, cotangents):
        h_grad, head_grad = grads
        g = cotangents[0]  # the objective's; the metrics' are ignored
        return ((h_grad * g).astype(h_grad.dtype), head_grad * g,
                np.zeros((b, t), jax.dtypes.float0), jnp.zeros((b, t), jnp.float32))

    loss.defvjp(forward, loss_bwd)  # forward returns (value, what the backward pass needs)
    return loss(hidden, head, targets, weight)


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy and squared log-partition (z-loss), float32 [b, t]."""
    log_z, target_logit = _log_z_and_target(logits.astype(jnp.float32), targets)
    return log_z - target_logit, jnp.square(log_z)


def _log_z_and_target(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logsumexp over the vocabulary, and the target's logit, per position."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z, jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


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
