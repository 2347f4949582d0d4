"""The attention operation: softmax(q k^T * scale + mask) v, given projected q, k, v.

This is the one place that turns queries, keys and values into attention outputs for GPT-Neo's
`global` and `local` layers; the projections, rotary embeddings, KV-cache writes and learned
memory slots live in attention.py (MaxText's projection / operation split). Which kernel
computes it is decided here: a dense [batch, heads, Tq, Tk] softmax, or, for a local window over
a long sequence, the blocked sliding window below; a fused kernel, an attention bias or grouped
key/value heads would change this file and no other.

As GPT-Neo (mesh-tf) does it: logits and softmax in float32, probabilities cast back to the
value dtype, masked logits set to -1e10 (not -inf), attention dropout on the probabilities. A
local layer at slot i sees keys i-R < j <= i (R = the window, the current token included); when
the model is not causal (masked-LM training) it sees both sides, |i - j| < R.

Masks are built from "slots": while training, slot = position in the sequence; when decoding
with a KV cache, a query's slot is where its key was written in the cache, and `key_valid` marks
which cache slots hold real tokens (prompts are left-padded), so the same masks serve both.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from neo.mesh import constrain

NEG_INF = -1e10  # mesh-tf's additive mask value; exp() underflows to exactly 0 in float32


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                          window: Optional[int] = None, q_slots: Optional[jax.Array] = None,
                          k_slots: Optional[jax.Array] = None, key_valid: Optional[jax.Array] = None,
                          memory: Optional[tuple[jax.Array, jax.Array]] = None, scale: float = 1.0,
                          dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """q [b, tq, h, d], k and v [b, tk, h, d] -> [b, tq, h, d] in v's dtype.

    causal: keys after the query are hidden. window: keys R or more slots away are hidden.
    q_slots [tq], k_slots [tk]: the slots of queries and keys; None means the keys are the
    queries' own sequence (slots 0..t-1). key_valid [b, tk]: False hides that key slot.
    memory: learned (keys, values) [b, m, h, d], visible to every query, in front of the keys.
    dropout_rng: None means no attention dropout (deterministic)."""
    t = q.shape[1]
    # nothing but the window hides a key (no cache, padding, memory or dropout): blocked
    window_only = q_slots is None and k_slots is None and key_valid is None and memory is None \
        and dropout_rng is None
    if window is not None and window_only and t > 2 * window:
        return attend_local_blocked(q, k, v, window, scale, causal=causal)
    q_slots = jnp.arange(t) if q_slots is None else q_slots
    k_slots = jnp.arange(k.shape[1]) if k_slots is None else k_slots
    mask = visible(q_slots, k_slots, causal=causal, window=window)[None, None]  # [1, 1, tq, tk]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if memory is not None:  # memory slots in front of the keys: always visible
        k = jnp.concatenate([memory[0], k], axis=1)
        v = jnp.concatenate([memory[1], v], axis=1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (memory[0].shape[1],), bool), mask], axis=-1)
    return attend(q, k, v, mask, scale, dropout_rate, dropout_rng)


def visible(q_slots: jax.Array, k_slots: jax.Array, *, causal: bool, window: Optional[int]) -> jax.Array:
    """[..., Tq, Tk] bool: may query slot i see key slot j?"""
    i, j = q_slots[..., :, None], k_slots[..., None, :]
    ok = j <= i if causal else jnp.ones_like(i == j)
    if window is not None:
        ok &= (i - j < window) & (causal | (j - i < window))
    return ok


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
           dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Dense softmax attention with float32 logits. q: [b,tq,h,d], k/v: [b,tk,h,d], mask
    broadcastable to [b,h,tq,tk]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    if scale != 1.0:
        logits = logits * scale
    logits = constrain(logits, ("batch", "heads", "sequence", "memory_length"))
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, dropout_rng)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attend_local_blocked(q: jax.Array, k: jax.Array, v: jax.Array, window: int, scale: float,
                         causal: bool = True) -> jax.Array:
    """Sliding-window attention in O(T * R) work and memory instead of O(T^2): queries are cut
    into blocks of R, each block attends to its own and the previous block of keys (and the
    next one when not causal). Numerically identical to `attend` with the dense window mask."""
    b, t, h, d = q.shape
    n = -(-t // window)
    pad = n * window - t
    if pad:  # padded keys are masked below (causal: they are in every real query's future)
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    qb = q.reshape(b, n, window, h, d)
    kb, vb = k.reshape(b, n, window, h, d), v.reshape(b, n, window, h, d)
    prev = lambda a: jnp.pad(a, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
    nxt = lambda a: jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0)))[:, 1:]
    parts = (prev, lambda a: a) if causal else (prev, lambda a: a, nxt)
    k2 = jnp.concatenate([f(kb) for f in parts], axis=2)  # [b, n, 2R or 3R, h, d]
    v2 = jnp.concatenate([f(vb) for f in parts], axis=2)
    logits = jnp.einsum("bnqhd,bnkhd->bnhqk", qb.astype(jnp.float32), k2.astype(jnp.float32))
    if scale != 1.0:
        logits = logits * scale
    q_slots = jnp.arange(window) + window  # query slot within the key frame
    frame = jnp.arange(len(parts) * window)
    mask = visible(q_slots, frame, causal=causal, window=window)
    # absolute key position of each frame slot, per block: outside [0, t) there is no key
    key_pos = jnp.arange(n)[:, None] * window + frame[None, :] - window  # [n, frame]
    mask = mask[None] & ((key_pos >= 0) & (key_pos < t))[:, None, :]  # [n, R, frame]
    logits = jnp.where(mask[None, :, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnhqk,bnkhd->bnqhd", probs, v2).reshape(b, n * window, h, d)
    return out[:, :t]


def dropout(probs: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    """Attention dropout as flax's nn.Dropout applies it: keep with probability 1 - rate and
    scale by 1 / (1 - rate); nothing without an rng or at rate 0."""
    if rng is None or rate == 0.0:
        return probs
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    return jax.lax.select(keep, probs / (1.0 - rate), jnp.zeros_like(probs))
