"""GPT-Neo's attention layers: the projections around the attention operation.

    q, k, v = x @ Wq, x @ Wk, x @ Wv                    [batch, seq, heads, features_per_head]
                                                         (k, v: num_kv_heads heads, grouped-query)
    (rotary: q, k rotated by position)   (decoding: k, v written into the KV cache)
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
from neo.model.attention_op import dot_product_attention
from neo.model.layers import Dense, named, normal

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
        cache {"k", "v"} [b, length, kv_heads, features_per_head]: the tokens are written at slot
        `cache_index` and attend to the cache. key_valid [b, keys]: False hides a key slot (a
        left-padded prompt's padding)."""
        cfg = self.cfg
        q, k, v = self.project_qkv(x, positions)
        q_slots = k_slots = None  # the keys are the queries' own sequence
        if cache is not None:
            cache = self.write_cache(cache, k, v, cache_index)
            k, v = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
            q_slots, k_slots = cache_index + jnp.arange(x.shape[1]), jnp.arange(k.shape[1])
        # GPT-Neo drops attention probabilities in global layers only (reference 1.9).
        dropout_rate = cfg.attn_dropout if self.kind == "global" else 0.0
        out = dot_product_attention(
            q, k, v, causal=cfg.causal, window=cfg.local_attention_radius if self.kind == "local" else None,
            q_slots=q_slots, k_slots=k_slots, key_valid=key_valid,
            memory=self.memory_kv(x.shape[0]) if self.kind == "global" and cfg.num_mem_kv else None,
            alibi=alibi_slopes(cfg.n_head) if cfg.position_embedding == "alibi" else None,
            scale=cfg.features_per_head ** -0.5 if cfg.scale_attention else 1.0, dropout_rate=dropout_rate,
            dropout_rng=None if deterministic or not dropout_rate else self.make_rng("dropout"),
            impl=cfg.attention_impl)
        return self.project_out(out), cache

    @staticmethod
    def write_cache(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array) -> dict:
        """The new keys and values [b, t, heads, features_per_head] written at slot `index`."""
        write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), index, 1)
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
