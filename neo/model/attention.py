"""GPT-Neo's attention layers: the projections around the attention operation.

    q, k, v = x @ Wq, x @ Wk, x @ Wv                    [batch, seq, heads, features_per_head]
                                                         (k, v: num_kv_heads heads, grouped-query)
    (rotary: q, k rotated by position)   (decoding: k, v written into the KV cache;
                                          local layers keep a ring of their window)
    out = dot_product_attention(q, k, v, masks, alibi)   attention_op.py
    return out @ Wo + bo                                 [batch, seq, embd]

`Attention` is the softmax kind, `global` (full) or `local` (sliding window); `LinearAttention`
(linear_attention.py) shares these projections with a softmax-free operation, and the block
chooses between them. All kinds are bidirectional when the model is not causal (masked-LM).

Exactly as the original: q, k, v without bias (GPT-NeoX: with), output projection with bias,
no 1/sqrt(d_head) scaling (GPT-Neo folds it into the q initialiser; GPT-NeoX scales). Global
layers may prepend `num_mem_kv` learned key/value slots (the all-attention paper).
GPT-NeoX's `use_bias_in_attn_linear: false` drops every projection bias (LLaMA), and
`num_kv_heads` shares each key/value head among n_head / num_kv_heads query heads (GQA,
Ainslie et al. 2023; 1 is multi-query attention), which also shrinks the KV cache.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neo.config import ModelConfig
from neo.mesh import constrain
from neo.kernels import cpu as cpu_kernels
from neo.model.attention_op import NEG_INF, alibi_bias, dot_product_attention, visible
from neo.model.layers import Dense, named, normal, packs_for_decoding

HEADS = ("batch", "sequence", "heads", "features_per_head")
KV_HEADS = ("batch", "memory_length", "heads", "features_per_head")


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


def alibi_slopes(n_head: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al. 2022; GPT-NeoX positional_embeddings.py): for a
    power of two n, 2^(-8i/n) for i = 1..n; otherwise the nearest lower power of two's slopes,
    then every other slope of twice that power. The attention op adds -slope * |i - j| to the
    scaled scores (attention_op.py)."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return np.array(power_of_2(n_head), np.float32)
    closest = 2 ** math.floor(math.log2(n_head))
    return np.array(power_of_2(closest) + list(alibi_slopes(2 * closest)[0::2][: n_head - closest]), np.float32)


class Projections:
    """The q/k/v/o projections every attention kind shares, as methods of a flax module with
    `cfg` and `dtype` (the parameters sit directly under the layer: attn/q/kernel, ...)."""

    cfg: ModelConfig
    dtype: jnp.dtype

    def project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [b, t, embd] -> q [b, t, heads, features_per_head], k, v [b, t, kv_heads,
        features_per_head], rotary applied."""
        cfg = self.cfg
        d, dh = cfg.n_embd, cfg.features_per_head
        proj = lambda name, heads, std: Dense((heads, dh), ("embd", "heads", "features_per_head"), normal(std),
                                              use_bias=cfg.attn_qkv_bias, dtype=self.dtype, name=name)(x)
        # mesh-tf folds GPT-Neo's missing 1/sqrt(dh) into the q initialiser (reference 1.8).
        q_std = d ** -0.5 if cfg.scale_attention else d ** -0.5 * dh ** -0.5
        q = proj("q", cfg.n_head, q_std)
        k, v = proj("k", cfg.kv_heads, d ** -0.5), proj("v", cfg.kv_heads, d ** -0.5)
        q, k, v = constrain(q, HEADS), constrain(k, KV_HEADS), constrain(v, KV_HEADS)
        if cfg.position_embedding == "rotary":
            dims = int(dh * cfg.rotary_pct)
            q = rotary(q, positions, dims, cfg.rotary_emb_base)
            k = rotary(k, positions, dims, cfg.rotary_emb_base)
        return q, k, v

    def project_out(self, out: jax.Array) -> jax.Array:
        """[b, t, heads, features_per_head] -> [b, t, embd]."""
        cfg = self.cfg
        out = constrain(out, HEADS)
        return Dense((cfg.n_embd,), ("heads", "features_per_head", "embd"),
                     normal((cfg.n_head * cfg.features_per_head) ** -0.5), axes=2, use_bias=cfg.attn_out_bias,
                     dtype=self.dtype, name="o")(out)


class Attention(Projections, nn.Module):
    """Softmax attention of kind `global` or `local`."""

    cfg: ModelConfig
    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, *, deterministic: bool = True,
                 cache: Optional[dict] = None, cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[dict]]:
        """x [b, t, embd], positions [b, t] -> ([b, t, embd], the updated cache or None).
        cache {"k", "v"} [b, kv_heads, length, features_per_head] (`local` layers: [b, kv_heads,
        window, ...], a ring, see `ring_attend_write`): the tokens are written at slot
        `cache_index` and attend to the cache. key_valid [b, length]: False hides a key slot (a
        left-padded prompt's padding)."""
        cfg = self.cfg
        q, k, v = self.project_qkv(x, positions)
        # GPT-Neo drops attention probabilities in global layers only (reference 1.9).
        dropout_rate = cfg.attn_dropout if self.kind == "global" else 0.0
        if cache is not None and x.shape[1] == 1 and self.decodes_with_kernel(cache, deterministic or not dropout_rate):
            out, cache = self.attend_cache_kernel(q, k, v, cache, cache_index, key_valid)
            return self.project_out(out), cache
        q_slots = k_slots = None  # the keys are the queries' own sequence
        if cache is not None:
            q_slots = cache_index + jnp.arange(x.shape[1])
            if self.kind == "local":
                k, v, k_slots, cache = ring_attend_write(cache, k, v, cache_index)
                key_valid = ring_key_valid(key_valid, k_slots, x.shape[0])
            else:
                cache = self.write_cache(cache, k, v, cache_index)
                k, v = as_keys(cache["k"], self.dtype), as_keys(cache["v"], self.dtype)
                k_slots = jnp.arange(k.shape[1])
        out = dot_product_attention(
            q, k, v, causal=cfg.causal, window=cfg.local_attention_radius if self.kind == "local" else None,
            q_slots=q_slots, k_slots=k_slots, key_valid=key_valid,
            memory=self.memory_kv(x.shape[0]) if self.kind == "global" and cfg.num_mem_kv else None,
            alibi=alibi_slopes(cfg.n_head) if cfg.position_embedding == "alibi" else None,
            scale=cfg.features_per_head ** -0.5 if cfg.scale_attention else 1.0, dropout_rate=dropout_rate,
            dropout_rng=None if deterministic or not dropout_rate else self.make_rng("dropout"),
            impl=cfg.attention_impl)
        return self.project_out(out), cache

    def decodes_with_kernel(self, cache: dict, no_dropout: bool) -> bool:
        """Does a decode step of this layer attend with neo's CPU kernel (neo/kernels/
        decode_attention.cc)? Where neo/predict.py make_pack prepared the model for it (it marks
        each layer in the "decode" collection), for a cache in the compute dtype, without memory
        slots or attention dropout. Why: XLA:CPU rewrote a bfloat16 cache whole at every step and
        copied it into float32 to multiply it (docs/benchmarks.md, "decode attention on CPU")."""
        if packs_for_decoding(self) and not self.has_variable("decode", "attention"):
            self.put_variable("decode", "attention", jnp.ones((), bool))
        return (self.has_variable("decode", "attention") and no_dropout and not self.cfg.num_mem_kv
                and cpu_kernels.supports(self.dtype) and cache["k"].dtype == jnp.dtype(self.dtype))

    def attend_cache_kernel(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, index: jax.Array,
                            key_valid: Optional[jax.Array]) -> tuple[jax.Array, dict]:
        """A decode step, one token per row, through the kernel: the token's key and value
        written at slot `index` (local layers: ring position index % window, as
        `ring_attend_write`), then the masks and ALiBi's bias of `attention_op.dense` as one
        float32 bias over the cache's slots. q [b, 1, heads, d] -> ([b, 1, heads, d], cache)."""
        cfg = self.cfg
        b, slots = q.shape[0], cache["k"].shape[2]
        if self.kind == "local":
            at, k_slots = ring_one_token(index, slots)
            key_valid = ring_key_valid(key_valid, k_slots, b)
        else:
            at, k_slots = index, jnp.arange(slots)
        q_slots = jnp.reshape(index, (1,))
        mask = visible(q_slots, k_slots, causal=cfg.causal,
                       window=cfg.local_attention_radius if self.kind == "local" else None)  # [1, slots]
        if key_valid is not None:
            mask = mask & key_valid
        bias = jnp.broadcast_to(jnp.where(mask, 0.0, NEG_INF), (b, slots))[:, None]  # [b, 1, slots]
        if cfg.position_embedding == "alibi":
            bias = bias + alibi_bias(alibi_slopes(cfg.n_head), q_slots, k_slots)[None, :, 0]  # [b, heads, slots]
        scale = cfg.features_per_head ** -0.5 if cfg.scale_attention else 1.0
        out, cache = cpu_kernels.attention(q[:, 0], k[:, 0], v[:, 0], cache, at, bias, scale)
        return out[:, None], cache

    @staticmethod
    def write_cache(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array) -> dict:
        """The new keys and values [b, t, heads, features_per_head] written at slot `index`."""
        write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, as_cached(x, c.dtype), index, 2)
        return {"k": write(cache["k"], k), "v": write(cache["v"], v)}

    def memory_kv(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """`num_mem_kv` learned key/value slots (all-attention paper), broadcast over the batch:
        [batch, num_mem_kv, heads, features_per_head] each, N(0, 1/sqrt(features_per_head))."""
        cfg = self.cfg
        shape = (cfg.num_mem_kv, cfg.n_head, cfg.features_per_head)
        names = ("mem_kv_sequence", "heads", "features_per_head")
        init = named(normal(cfg.features_per_head ** -0.5), names)
        mem_k, mem_v = (self.param(n, init, shape, jnp.float32) for n in ("mem_k", "mem_v"))
        return tuple(jnp.broadcast_to(m.astype(self.dtype), (batch,) + shape) for m in (mem_k, mem_v))


# ----------------------------------------------------------------------------------------------
# The KV cache: [batch, heads, slots, features_per_head], heads before slots, so that a decode
# step's attention reads it as stored (XLA's CPU dot would otherwise transpose the whole cache
# of every layer at every step: 12x slower attention at 512 slots, batch 8). The attention
# operation sees [batch, slots, heads, features_per_head] views; XLA folds the transposes.


def as_cached(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[b, t, heads, d] keys or values -> the cache's [b, heads, t, d] in its dtype."""
    return x.swapaxes(1, 2).astype(dtype)


def as_keys(c: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The cache's [b, heads, slots, d] -> [b, slots, heads, d] as attention takes them."""
    return c.swapaxes(1, 2).astype(dtype)


# The KV cache of `local` layers: a ring of `window` slots


def ring_attend_write(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """A local layer's cache holds only its window: W = min(local_attention_radius, length)
    slots [b, heads, W, d], slot s at ring position s % W (a query never sees a key W or more
    slots back).
    The t new keys/values [b, t, heads, features_per_head] are those of slots index..index+t-1.

    Returns (keys, values, their slots [keys], the updated ring); the slots are what
    attention_op masks by (causal, window, and below 0: empty). Decoding (t = 1) writes first
    and attends to the ring in place; a longer block (the prompt) attends to the ring as it
    was followed by its own keys, then keeps its newest min(t, W) keys."""
    w, t = cache["k"].shape[2], k.shape[1]
    ring = jnp.arange(w)
    if t == 1:
        at, slots = ring_one_token(index, w)
        write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, as_cached(x, c.dtype), at, 2)
        cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
        return as_keys(cache["k"], k.dtype), as_keys(cache["v"], v.dtype), slots, cache
    before = index - 1 - (index - 1 - ring) % w  # the newest slot < index at each position
    slots = jnp.concatenate([before, index + jnp.arange(t)])
    keys = jnp.concatenate([as_keys(cache["k"], k.dtype), k], axis=1)
    values = jnp.concatenate([as_keys(cache["v"], v.dtype), v], axis=1)
    n = min(t, w)
    at = (index + t - n + jnp.arange(n)) % w  # distinct positions: no write is lost to another
    write = lambda c, x: c.at[:, :, at].set(as_cached(x[:, t - n:], c.dtype))
    return keys, values, slots, {"k": write(cache["k"], k), "v": write(cache["v"], v)}


def ring_one_token(index: jax.Array, w: int) -> tuple[jax.Array, jax.Array]:
    """A decode step's token at slot `index` in a ring of `w` positions: (its position, index %
    w; the slot each position then holds, the newest <= index, below 0 where none yet)."""
    return index % w, index - (index - jnp.arange(w)) % w


def ring_key_valid(key_valid: Optional[jax.Array], slots: jax.Array, batch: int) -> jax.Array:
    """[b, keys] for keys at `slots`: the slot holds a token (>= 0) that `key_valid` [b, length]
    (indexed by slot) does not hide."""
    valid = jnp.broadcast_to(slots >= 0, (batch, slots.shape[0]))
    if key_valid is None:
        return valid
    return valid & jnp.take(key_valid, jnp.maximum(slots, 0), axis=1)
