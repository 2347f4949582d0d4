"""The GPT-Neo network (and its GPT-NeoX variant), readable in one sitting.

    h = drop(wte[tokens]) + drop(wpe[positions])          (no wpe with rotary embeddings;
                                                           axial: wpe = (A1[i] + A2[j]) / 2)
    for each layer:  h = h + Attn(LN1(h));  h = h + MLP(LN2(h))
                     (parallel residual: h = h + Attn(LN1(h)) + MLP(LN2(h)))
    logits = LN_f(h) @ wte^T                                (untied: @ lm_head)

GPT-Neo's experimental block options: `scalenorm` (ScaleNorm for LN1/LN2), `rezero` (no
pre-norm; each branch scaled by a learned scalar initialised to 0), `macaron` (a half-step
MLP before attention, and the main MLP halved), `mlp_glu` (gated MLP), `moe_layers` (a
mixture of experts instead of the MLP, neo/model/moe.py), `num_mem_kv` (attention.py) and
`share_parameters` (every block uses the same variables).

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
from neo.mesh import constrain
from neo.model.activations import Activation
from neo.model.attention import Attention
from neo.model.layers import Dense, LayerNorm, ScaleNorm, named, normal
from neo.model.linear_attention import init_state
from neo.model.moe import MoE

ACT = ("batch", "sequence", "embd")


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32


class MLP(nn.Module):
    """c_fc (d -> 4d) -> activation -> c_proj (4d -> d) -> dropout. With `mlp_glu`, c_fc makes
    two 4d halves h and gate, and c_proj takes h * activation(gate)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.n_embd, cfg.intermediate_expanded
        fc_std = 0.02 * (d ** -0.5 if cfg.scale_by_in else 1.0)
        proj_std = 0.02 * (cfg.n_layer ** -0.5 if cfg.scale_by_depth else 1.0) * (f ** -0.5 if cfg.scale_by_in else 1.0)
        hidden = ("batch", "sequence", "intermediate_expanded")
        act = Activation(cfg.activation_fn, name="act")
        if cfg.mlp_glu:
            hg = Dense((2, f), ("embd", None, "intermediate_expanded"), normal(fc_std), dtype=self.dtype, name="c_fc")(x)
            h = constrain(hg[..., 0, :], hidden) * act(constrain(hg[..., 1, :], hidden))
        else:
            h = Dense((f,), ("embd", "intermediate_expanded"), normal(fc_std), dtype=self.dtype, name="c_fc")(x)
            h = act(constrain(h, hidden))
        h = Dense((d,), ("intermediate_expanded", "embd"), normal(proj_std), dtype=self.dtype, name="c_proj")(h)
        return nn.Dropout(cfg.res_dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    """One transformer layer: pre-norm attention and MLP (or MoE), sequential or parallel
    residual, with GPT-Neo's scalenorm / rezero / macaron options. `kind` and `moe` may be
    given per call, so that with `share_parameters` one Block serves every layer."""

    cfg: ModelConfig
    kind: str
    dtype: jnp.dtype = jnp.float32
    moe: bool = False

    def _norm(self, name: str):
        cfg = self.cfg
        if cfg.rezero:
            return lambda x: x
        if cfg.scalenorm:
            return ScaleNorm(cfg.layer_norm_epsilon, self.dtype, name=name)
        return LayerNorm(cfg.layer_norm_epsilon, self.dtype, name=name)

    def _gate(self, name: str, branch: jax.Array) -> jax.Array:
        """ReZero: the branch times a learned scalar that starts at 0."""
        if not self.cfg.rezero:
            return branch
        g = self.param(name, named(nn.initializers.zeros, ()), (), jnp.float32)
        return branch * g.astype(branch.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, deterministic: bool = True,
                 cache: Optional[dict] = None, cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None, kind: Optional[str] = None,
                 moe: Optional[bool] = None) -> tuple[jax.Array, Optional[dict]]:
        cfg = self.cfg
        kind = self.kind if kind is None else kind
        moe = self.moe if moe is None else moe
        new_cache = None
        half = 0.5 if cfg.macaron else 1.0
        if cfg.macaron:
            # Macaron: x + 1/2 MLP(x) before attention. The original fed it the raw residual
            # stream; neo pre-normalises it like every other branch (docs/differences.md).
            m0 = MLP(cfg, self.dtype, name="mlp_macaron")(self._norm("ln_macaron")(x), deterministic)
            x = x + self._gate("rezero_macaron", half * m0)
        if kind == "none":
            # A feed-forward-only layer (the original added x to itself here; docs/differences.md).
            a = jnp.zeros_like(x)
        else:
            a, new_cache = Attention(cfg, kind, self.dtype, name="attn")(
                self._norm("ln_1")(x), positions, deterministic=deterministic,
                cache=cache, cache_index=cache_index, key_valid=key_valid)
            a = self._gate("rezero_1", nn.Dropout(cfg.res_dropout)(a, deterministic=deterministic))
        ffn = MoE(cfg, self.dtype, name="moe") if moe else MLP(cfg, self.dtype, name="mlp")

        def feed_forward(h: jax.Array) -> jax.Array:
            m = ffn(self._norm("ln_2")(h), deterministic)
            if moe:
                m = nn.Dropout(cfg.res_dropout)(m, deterministic=deterministic)
            return self._gate("rezero_2", half * m)

        if cfg.parallel_residual:
            x = x + a + feed_forward(x)
        else:
            x = x + a
            x = x + feed_forward(x)
        return constrain(x, ACT), new_cache


class GPT(nn.Module):
    """GPT-Neo. `__call__` returns float32 logits [batch, sequence, vocab] and, when decoding,
    the updated KV cache."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.wte = self.param("wte", named(normal(0.02), ("vocab", "embd")), (cfg.n_vocab, cfg.n_embd), jnp.float32)
        if cfg.axial_pos_emb is not None:
            a1, a2 = cfg.axial_pos_emb
            self.axial_wpe_1 = self.param("axial_wpe_1", named(normal(0.01), ("axial_dim", "embd")),
                                          (a1, cfg.n_embd), jnp.float32)
            self.axial_wpe_2 = self.param("axial_wpe_2", named(normal(0.01), ("axial_dim", "embd")),
                                          (a2, cfg.n_embd), jnp.float32)
        elif not cfg.rotary_emb:
            self.wpe = self.param("wpe", named(normal(0.01), ("embed_sequence", "embd")),
                                  (cfg.n_ctx, cfg.n_embd), jnp.float32)
        block = nn.remat(Block, static_argnums=(3, 7, 8)) if cfg.recompute_grad else Block
        moe = set(cfg.moe_layers or ())
        if cfg.share_parameters:  # one Block (variables under h_0) called for every layer
            shared = block(cfg, cfg.attention_types[0], compute_dtype(cfg), moe=0 in moe, name="h_0")
            self.blocks = [shared] * cfg.n_layer
        else:
            self.blocks = [block(cfg, kind, compute_dtype(cfg), moe=i in moe, name=f"h_{i}")
                           for i, kind in enumerate(cfg.attention_types)]
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, compute_dtype(cfg))
        if cfg.no_weight_tie:
            self.lm_head = self.param("lm_head", named(normal(0.02), ("embd", "vocab")),
                                      (cfg.n_embd, cfg.n_vocab), jnp.float32)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        self.pos_drop = nn.Dropout(cfg.embed_dropout)

    def position_table(self) -> jax.Array:
        """[n_ctx, embd] learned position embeddings; axial ones are (A1[i] + A2[j]) / 2 for
        position i * a2 + j."""
        if self.cfg.axial_pos_emb is None:
            return self.wpe
        a1, a2 = self.cfg.axial_pos_emb
        table = (self.axial_wpe_1[:, None, :] + self.axial_wpe_2[None, :, :]) / 2
        return table.reshape(a1 * a2, -1)[: self.cfg.n_ctx]

    def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None, *,
                 deterministic: bool = True, cache: Optional[list] = None,
                 cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None, last_only: bool = False,
                 logits_at: Optional[jax.Array] = None):
        """tokens, positions: [batch, sequence] int. With `cache` (from `init_cache`), the
        tokens are written at slot `cache_index` and (logits, new_cache) is returned.
        `last_only`: logits for the last position only (a sampler's prompt pass).
        `logits_at` [batch, k]: logits at these positions only (a scorer that needs a few
        positions per row skips most of the vocabulary projection)."""
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        tokens = constrain(tokens, ("batch", "sequence"))
        h = jnp.take(self.wte.astype(dtype), tokens, axis=0)
        h = self.embed_drop(h, deterministic=deterministic)
        if not cfg.rotary_emb:
            # GPT-Neo drops token and position embeddings with separate masks (reference 1.9).
            p = jnp.take(self.position_table().astype(dtype), positions, axis=0)
            h = h + self.pos_drop(p, deterministic=deterministic)
        h = constrain(h, ACT)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            h, c = block(h, positions, deterministic, layer_cache, cache_index, key_valid,
                         cfg.attention_types[i], i in set(cfg.moe_layers or ()))
            new_cache.append(c)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        h = self.ln_f(h[:, -1:] if last_only else h)
        head = self.lm_head if cfg.no_weight_tie else self.wte.T
        logits = jnp.einsum("bte,ev->btv", h, head.astype(dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "sequence", "vocab"))
        return logits if cache is None else (logits, new_cache)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Optional[jnp.dtype] = None) -> list:
    """An empty KV cache: per layer {"k", "v"}: [batch, length, heads, features_per_head];
    for `linear` layers the running sums of linear attention (neo/model/linear_attention.py)."""
    dtype = dtype or compute_dtype(cfg)
    shape = (batch, length, cfg.n_head, cfg.features_per_head)

    def layer(kind: str):
        if kind == "none":
            return None
        if kind == "linear":
            return init_state(batch, cfg.n_head, cfg.features_per_head)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    return [layer(kind) for kind in cfg.attention_types]
