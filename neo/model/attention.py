"""GPT-Neo attention: global (full) and local (sliding window) softmax attention, and the
softmax-free `linear` kind (neo/model/linear_attention.py). All kinds are bidirectional when
the model is not causal (masked-LM training).

Exactly as the original: q, k, v without bias (GPT-NeoX: with), output projection with bias,
no 1/sqrt(d_head) scaling (GPT-Neo folds it into the q initialiser; GPT-NeoX scales), logits
and softmax in float32, probabilities cast back to the value dtype. A local layer at position p
sees keys p-R < j <= p (R = local_attention_radius, the current token included).

Positions are "slots": in training slot = position in the sequence; when decoding with a KV
cache, slot = index in the cache, and `key_valid` marks which cache slots hold real tokens
(prompts are left-padded), so the same masks serve both.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo.config import ModelConfig
from neo.errors import NeoError
from neo.mesh import constrain
from neo.model.layers import Dense, named, normal
from neo.model.linear_attention import causal_linear_attention, linear_attention

NEG_INF = -1e10  # mesh-tf's additive mask value; exp() underflows to exactly 0 in float32


def visible(q_slots: jax.Array, k_slots: jax.Array, *, causal: bool, window: Optional[int]) -> jax.Array:
    """[..., Tq, Tk] bool: may query slot i see key slot j?"""
    i, j = q_slots[..., :, None], k_slots[..., None, :]
    ok = j <= i if causal else jnp.ones_like(i == j)
    if window is not None:
        ok &= (i - j < window) & (causal | (j - i < window))
    return ok


def rotary(x: jax.Array, positions: jax.Array, dims: int, base: float) -> jax.Array:
    """Rotate the first `dims` features of each head (GPT-NeoX half-split convention).
    x: [batch, seq, heads, features_per_head]; positions: [batch, seq]."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, dims, 2, dtype=jnp.float32) / dims))
    angle = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, dims/2]
    angle = jnp.concatenate([angle, angle], -1)[:, :, None, :]  # [b, t, 1, dims]
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    rot, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
    return jnp.concatenate([rot * cos + rotated * sin, rest], -1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
           dropout: Optional[nn.Dropout] = None, deterministic: bool = True) -> jax.Array:
    """Softmax attention with float32 logits. q: [b,tq,h,d], k/v: [b,tk,h,d], mask broadcastable
    to [b,h,tq,tk]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    if scale != 1.0:
        logits = logits * scale
    logits = constrain(logits, ("batch", "heads", "sequence", "memory_length"))
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
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


class Attention(nn.Module):
    """One attention layer of kind `global`, `local` or `linear`."""

    cfg: ModelConfig
    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, *, deterministic: bool = True,
                 cache: Optional[dict] = None, cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[dict]]:
        cfg = self.cfg
        d, h, dh = cfg.n_embd, cfg.n_head, cfg.features_per_head
        qkv_names = ("embd", "heads", "features_per_head")
        proj = lambda name, std: Dense((h, dh), qkv_names, normal(std), use_bias=cfg.qkv_bias,
                                       dtype=self.dtype, name=name)(x)
        # mesh-tf folds GPT-Neo's missing 1/sqrt(dh) into the q initialiser (reference 1.8).
        q_std = d ** -0.5 if cfg.scale_attention else d ** -0.5 * dh ** -0.5
        q, k, v = proj("q", q_std), proj("k", d ** -0.5), proj("v", d ** -0.5)
        names = ("batch", "sequence", "heads", "features_per_head")
        q = constrain(q, names)
        k = constrain(k, ("batch", "memory_length", "heads", "features_per_head"))
        v = constrain(v, ("batch", "memory_length", "heads", "features_per_head"))
        if cfg.rotary_emb:
            dims = int(dh * cfg.rotary_pct)
            q = rotary(q, positions, dims, cfg.rotary_emb_base)
            k = rotary(k, positions, dims, cfg.rotary_emb_base)

        scale = dh ** -0.5 if cfg.scale_attention else 1.0
        window = cfg.local_attention_radius if self.kind == "local" else None
        # GPT-Neo drops attention probabilities in global layers only (reference 1.9).
        dropout = nn.Dropout(cfg.attn_dropout) if self.kind == "global" and cfg.attn_dropout else None
        t = x.shape[1]
        new_cache = None
        if cache is not None and not cfg.causal:
            raise NeoError("a masked-LM model (mlm_training) sees the whole sequence at once; it "
                           "cannot decode token by token with a KV cache.")
        if self.kind == "linear":
            if not cfg.causal:
                out = linear_attention(q, k, v)
            else:
                valid = None
                if cache is not None and key_valid is not None:
                    valid = jax.lax.dynamic_slice_in_dim(key_valid, cache_index, t, axis=1)
                out, new_cache = causal_linear_attention(q, k, v, cache, valid)
                new_cache = new_cache if cache is not None else None
            out = out.astype(self.dtype)
        else:
            mem = self._memory_kv(x.shape[0]) if self.kind == "global" and cfg.num_mem_kv else None
            if cache is not None:
                k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 1)
                v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 1)
                new_cache = {"k": k_all, "v": v_all}
                q_slots = cache_index + jnp.arange(t)
                k_slots = jnp.arange(k_all.shape[1])
                mask = visible(q_slots, k_slots, causal=cfg.causal, window=window)[None, None]
                if key_valid is not None:
                    mask = mask & key_valid[:, None, None, :]
                k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)
            elif window is not None and t > 2 * window:
                mask = None
                out = attend_local_blocked(q, k, v, window, scale, causal=cfg.causal)
            else:
                slots = jnp.arange(t)
                mask = visible(slots, slots, causal=cfg.causal, window=window)[None, None]
            if mask is not None:
                if mem is not None:  # learned memory slots in front: always visible
                    k = jnp.concatenate([mem[0], k], axis=1)
                    v = jnp.concatenate([mem[1], v], axis=1)
                    mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (cfg.num_mem_kv,), bool), mask], axis=-1)
                out = attend(q, k, v, mask, scale, dropout, deterministic)
        out = constrain(out, names)
        o = Dense((d,), ("heads", "features_per_head", "embd"), normal((h * dh) ** -0.5), axes=2,
                  dtype=self.dtype, name="o")(out)
        return o, new_cache

    def _memory_kv(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """`num_mem_kv` learned key/value slots (all-attention paper), broadcast over the batch:
        [batch, num_mem_kv, heads, features_per_head] each, N(0, 1/sqrt(features_per_head))."""
        cfg = self.cfg
        shape = (cfg.num_mem_kv, cfg.n_head, cfg.features_per_head)
        names = ("mem_kv_sequence", "heads", "features_per_head")
        init = named(normal(cfg.features_per_head ** -0.5), names)
        mem_k, mem_v = (self.param(n, init, shape, jnp.float32) for n in ("mem_k", "mem_v"))
        return tuple(jnp.broadcast_to(m.astype(self.dtype), (batch,) + shape) for m in (mem_k, mem_v))
