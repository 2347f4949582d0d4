"""The GPT-Neo network (and its GPT-NeoX variant), readable in one sitting.

    h = drop(wte[tokens]) + drop(wpe[positions])          (no wpe with rotary embeddings)
    for each layer:  h = h + Attn(LN1(h));  h = h + MLP(LN2(h))
                     (parallel residual: h = h + Attn(LN1(h)) + MLP(LN2(h)))
    logits = LN_f(h) @ wte^T                                (untied: @ lm_head)

Initialisation follows mesh-tensorflow exactly (docs/differences.md): wte N(0, .02), wpe
N(0, .01), c_fc N(0, .02), c_proj N(0, .02) scaled by 1/sqrt(n_layer) with scale_by_depth and
by 1/sqrt(fan_in) with scale_by_in; attention initialisers in attention.py.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo.config import ModelConfig
from neo.errors import NeoError
from neo.mesh import constrain
from neo.model.activations import get_activation
from neo.model.attention import Attention
from neo.model.layers import Dense, LayerNorm, named, normal

ACT = ("batch", "sequence", "embd")


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32


class MLP(nn.Module):
    """c_fc (d -> 4d) -> activation -> c_proj (4d -> d) -> dropout."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.n_embd, cfg.intermediate_expanded
        fc_std = 0.02 * (d ** -0.5 if cfg.scale_by_in else 1.0)
        proj_std = 0.02 * (cfg.n_layer ** -0.5 if cfg.scale_by_depth else 1.0) * (f ** -0.5 if cfg.scale_by_in else 1.0)
        h = Dense((f,), ("embd", "intermediate_expanded"), normal(fc_std), dtype=self.dtype, name="c_fc")(x)
        h = constrain(h, ("batch", "sequence", "intermediate_expanded"))
        h = get_activation(cfg.activation_fn)(h)
        h = Dense((d,), ("intermediate_expanded", "embd"), normal(proj_std), dtype=self.dtype, name="c_proj")(h)
        return nn.Dropout(cfg.res_dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    """One transformer layer: pre-norm attention and MLP, sequential or parallel residual."""

    cfg: ModelConfig
    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, deterministic: bool = True,
                 cache: Optional[dict] = None, cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[dict]]:
        cfg = self.cfg
        eps = cfg.layer_norm_epsilon
        new_cache = None
        if self.kind == "none":
            # A feed-forward-only layer (the original added x to itself here; docs/differences.md).
            a = jnp.zeros_like(x)
        else:
            a, new_cache = Attention(cfg, self.kind, self.dtype, name="attn")(
                LayerNorm(eps, self.dtype, name="ln_1")(x), positions, deterministic=deterministic,
                cache=cache, cache_index=cache_index, key_valid=key_valid)
            a = nn.Dropout(cfg.res_dropout)(a, deterministic=deterministic)
        mlp = MLP(cfg, self.dtype, name="mlp")
        if cfg.parallel_residual:
            x = x + a + mlp(LayerNorm(eps, self.dtype, name="ln_2")(x), deterministic)
        else:
            x = x + a
            x = x + mlp(LayerNorm(eps, self.dtype, name="ln_2")(x), deterministic)
        return constrain(x, ACT), new_cache


class GPT(nn.Module):
    """GPT-Neo. `__call__` returns float32 logits [batch, sequence, vocab] and, when decoding,
    the updated KV cache."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        _check_supported(cfg)
        self.wte = self.param("wte", named(normal(0.02), ("vocab", "embd")), (cfg.n_vocab, cfg.n_embd), jnp.float32)
        if not cfg.rotary_emb:
            self.wpe = self.param("wpe", named(normal(0.01), ("embed_sequence", "embd")),
                                  (cfg.n_ctx, cfg.n_embd), jnp.float32)
        block = nn.remat(Block, static_argnums=(3,)) if cfg.recompute_grad else Block
        self.blocks = [block(cfg, kind, compute_dtype(cfg), name=f"h_{i}") for i, kind in enumerate(cfg.attention_types)]
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, compute_dtype(cfg))
        if cfg.no_weight_tie:
            self.lm_head = self.param("lm_head", named(normal(0.02), ("embd", "vocab")),
                                      (cfg.n_embd, cfg.n_vocab), jnp.float32)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        self.pos_drop = nn.Dropout(cfg.embed_dropout)

    def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None, *,
                 deterministic: bool = True, cache: Optional[list] = None,
                 cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None, last_only: bool = False):
        """tokens, positions: [batch, sequence] int. With `cache` (from `init_cache`), the
        tokens are written at slot `cache_index` and (logits, new_cache) is returned.
        `last_only`: logits for the last position only (a sampler's prompt pass)."""
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        tokens = constrain(tokens, ("batch", "sequence"))
        h = jnp.take(self.wte.astype(dtype), tokens, axis=0)
        h = self.embed_drop(h, deterministic=deterministic)
        if not cfg.rotary_emb:
            # GPT-Neo drops token and position embeddings with separate masks (reference 1.9).
            p = jnp.take(self.wpe.astype(dtype), positions, axis=0)
            h = h + self.pos_drop(p, deterministic=deterministic)
        h = constrain(h, ACT)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            h, c = block(h, positions, deterministic, layer_cache, cache_index, key_valid)
            new_cache.append(c)
        h = self.ln_f(h[:, -1:] if last_only else h)
        head = self.lm_head if cfg.no_weight_tie else self.wte.T
        logits = jnp.einsum("bte,ev->btv", h, head.astype(dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "sequence", "vocab"))
        return logits if cache is None else (logits, new_cache)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Optional[jnp.dtype] = None) -> list:
    """An empty KV cache: per layer {"k", "v"}: [batch, length, heads, features_per_head]."""
    dtype = dtype or compute_dtype(cfg)
    shape = (batch, length, cfg.n_head, cfg.features_per_head)
    return [None if kind == "none" else {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for kind in cfg.attention_types]


def _check_supported(cfg: ModelConfig) -> None:
    """Options of the original config schema that this build of neo cannot run yet."""
    pending = {
        "linear attention": "linear" in cfg.attention_types,
        "moe_layers": bool(cfg.moe_layers),
        "mlm_training": cfg.mlm_training,
        "axial_pos_emb": cfg.axial_pos_emb is not None,
        "mlp_glu": cfg.mlp_glu,
        "scalenorm": cfg.scalenorm,
        "rezero": cfg.rezero,
        "num_mem_kv": cfg.num_mem_kv > 0,
        "macaron": cfg.macaron,
        "share_parameters": cfg.share_parameters,
        "entmax_loss": cfg.entmax_loss,
    }
    on = [k for k, v in pending.items() if v]
    if on:
        raise NeoError(f"{cfg.source or 'config'}: {', '.join(on)} not supported yet in neo; "
                       f"remove it from the config.")
