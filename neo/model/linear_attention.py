"""GPT-Neo's `linear` attention kind: softmax-free attention in O(T * d_head^2) work.

What the original computes (models/layers.py, `linear_attention` / `causal_linear_attention`),
per head, with q~ = softmax of q over its features:

    non-causal:  k~ = softmax of k over the sequence;   out_t = q~_t . sum_s k~_s (x) v_s
    causal:      k~ = exp(k);  K_t = sum_{s<=t} k~_s;   C_t = sum_{s<=t} k~_s (x) v_s
                 out_t[e] = sum_i q~_t[i] * C_t[i, e] / (K_t[i] + 1e-6)

i.e. every feature i of the key is a softmax over positions (causally accumulated), and the
query mixes those per-feature averages of v. The original materialised C_t for every t
(T * d_head^2 per head). Here the division moves onto the query (q'_t = q~_t / (K_t + eps)),
which turns the causal case into plain causal linear attention with query q' and no further
normalisation; that is computed chunk by chunk: inside a chunk of c positions with a c x c
causal mask, across chunks through a running d_head x d_head state. Memory is O(T * (c +
d_head)) per head and no T x T matrix ever exists. All in float32.

The causal form is a recurrence, so decoding keeps a per-layer state {"s": sum k~ (x) v,
"z": sum k~} instead of a key/value cache. `LinearAttention` wraps it in the same q/k/v/o
projections as softmax attention (attention.py), so a `linear` layer has the same parameters.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo.config import ModelConfig
from neo.model.attention import Projections

EPS = 1e-6
CHUNK = 64


class LinearAttention(Projections, nn.Module):
    """An attention layer of kind `linear`."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, *, deterministic: bool = True,
                 cache: Optional[dict] = None, cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[dict]]:
        """x [b, t, embd], positions [b, t] -> ([b, t, embd], the updated state or None).
        cache: the running sums (`init_state`), advanced over the t tokens; key_valid
        [b, keys]: False drops a position (a cache slot when decoding, from `cache_index`).
        `deterministic` is taken for the common interface: linear attention has no dropout."""
        q, k, v = self.project_qkv(x, positions)
        if not self.cfg.causal:
            out = linear_attention(q, k, v)
        else:
            if cache is not None and key_valid is not None:
                key_valid = jax.lax.dynamic_slice_in_dim(key_valid, cache_index, x.shape[1], axis=1)
            out, state = causal_linear_attention(q, k, v, cache, key_valid)
            cache = None if cache is None else state
        return self.project_out(out.astype(self.dtype)), cache


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Non-causal: q, k, v [b, t, h, d] -> [b, t, h, d] (float32)."""
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1)
    context = jnp.einsum("bthi,bthe->bhie", k, v.astype(jnp.float32))
    return jnp.einsum("bthi,bhie->bthe", q, context)


def causal_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, state: Optional[dict] = None,
                            key_valid: Optional[jax.Array] = None,
                            chunk: int = CHUNK) -> tuple[jax.Array, dict]:
    """Causal: q, k, v [b, t, h, d] -> ([b, t, h, d] float32, new state). `state` carries the
    sums over earlier positions (decoding); `key_valid` [b, t] drops padded positions."""
    b, t, h, d = q.shape
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)
    k = jnp.exp(k.astype(jnp.float32))
    v = v.astype(jnp.float32)
    if key_valid is not None:
        k = k * key_valid[:, :, None, None].astype(jnp.float32)
    if state is None:
        state = init_state(b, h, d)
    k_cum = jnp.cumsum(k, axis=1) + state["z"][:, None]
    q = q / (k_cum + EPS)  # the per-feature normalisation, moved onto the query
    new_state = {"s": state["s"] + jnp.einsum("bthi,bthe->bhie", k, v), "z": k_cum[:, -1]}

    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:  # zero keys add nothing; the padded queries are cut off below
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    qc, kc, vc = (a.reshape(b, n, c, h, d) for a in (q, k, v))
    chunk_kv = jnp.einsum("bnchi,bnche->bnhie", kc, vc)
    earlier = jnp.cumsum(chunk_kv, axis=1) - chunk_kv + state["s"][:, None]  # sums over earlier chunks
    scores = jnp.einsum("bnqhi,bnkhi->bnhqk", qc, kc) * jnp.tril(jnp.ones((c, c), jnp.float32))
    out = jnp.einsum("bnhqk,bnkhe->bnqhe", scores, vc) + jnp.einsum("bnqhi,bnhie->bnqhe", qc, earlier)
    return out.reshape(b, n * c, h, d)[:, :t], new_state


def init_state(batch: int, heads: int, features: int) -> dict:
    """An empty decoding state for one causal linear-attention layer."""
    return {"s": jnp.zeros((batch, heads, features, features), jnp.float32),
            "z": jnp.zeros((batch, heads, features), jnp.float32)}
