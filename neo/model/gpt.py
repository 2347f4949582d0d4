"""The GPT-Neo network (and its GPT-NeoX variant), readable in one sitting.

    h = drop(wte[tokens]) + drop(wpe[positions])          (pos_emb: learned table; axial:
                                                           wpe = (A1[i] + A2[j]) / 2; sinusoidal:
                                                           a fixed table; rotary, alibi, none:
                                                           nothing here, see attention.py)
    for each layer:  h = h + Attn(LN1(h));  h = h + MLP(LN2(h))
                     (parallel residual: h = h + Attn(LN1(h)) + MLP(LN2(h)))
    logits = LN_f(h) @ wte^T                                (untied: @ lm_head)

GPT-NeoX's options (docs/configs.md): `norm` chooses LayerNorm, RMSNorm or ScaleNorm for every
norm (ln_f included), `use_bias_in_norms` / `use_bias_in_mlp` drop biases, GLU activations
(`swiglu`, `geglu`, `reglu`) gate the MLP, and attention.py has grouped-query heads, ALiBi
and bias-free projections; LLaMA and Mistral are these options together.

A layer's kind is a `LayerSpec`: its attention (`global`, `local`: attention.py; `linear`:
linear_attention.py; `none`) and whether a mixture of experts replaces its MLP.

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

from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo.config import ModelConfig
from neo.errors import NeoError
from neo.kernels import cpu as cpu_kernels
from neo.mesh import constrain
from neo.model.activations import Activation
from neo.model.attention import Attention
from neo.model.layers import (Dense, L2ScaleNorm, LayerNorm, RMSNorm, ScaleNorm, einsum, named, normal,
                              packs_for_decoding)
from neo.model.linear_attention import LinearAttention, init_state
from neo.model.moe import MoE

ACT = ("batch", "sequence", "embd")


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32


def make_norm(cfg: ModelConfig, dtype: jnp.dtype, **name) -> nn.Module:
    """The norm `norm` chooses (GPT-NeoX megatron/model/norms.py get_norm), with its epsilon:
    layernorm `layer_norm_epsilon`, rmsnorm `rms_norm_epsilon`, scalenorm `scalenorm_epsilon`
    (GPT-NeoX's defaults 1e-5, 1e-8, 1e-8)."""
    kind, bias = cfg.norm_kind, cfg.use_bias_in_norms
    if kind == "rmsnorm":
        return RMSNorm(cfg.rms_norm_epsilon or 1e-8, dtype, bias, **name)
    if kind == "scalenorm":
        return L2ScaleNorm(cfg.scalenorm_epsilon or 1e-8, dtype, **name)
    return LayerNorm(cfg.layer_norm_epsilon, dtype, bias, **name)


def sinusoid_table(positions: jax.Array, d: int) -> jax.Array:
    """GPT-NeoX's `sinusoidal` embeddings (Vaswani et al. 2017; positional_embeddings.py):
    [sin(p * f) | cos(p * f)] halves, f = 1 / 10000^(2i / d). positions [b, t] -> [b, t, d]."""
    inv_freq = 1.0 / (10000 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angle = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], -1)


class MLP(nn.Module):
    """c_fc (d -> f) -> activation -> c_proj (f -> d) -> dropout, f = `intermediate_expanded`
    (4d). Gated (`mlp_glu`, or a GLU activation such as swiglu = LLaMA's MLP): c_fc makes two
    halves h and gate, and c_proj takes h * act(gate) (LLaMA: up, gate, down)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.n_embd, cfg.intermediate_expanded
        fc_std = 0.02 * (d ** -0.5 if cfg.scale_by_in else 1.0)
        proj_std = 0.02 * (cfg.n_layer ** -0.5 if cfg.scale_by_depth else 1.0) * (f ** -0.5 if cfg.scale_by_in else 1.0)
        hidden = ("batch", "sequence", "intermediate_expanded")
        act, bias = Activation(cfg.mlp_activation, name="act"), cfg.use_bias_in_mlp
        if cfg.gated:
            hg = Dense((2, f), ("embd", None, "intermediate_expanded"), normal(fc_std), use_bias=bias, dtype=self.dtype,
                       name="c_fc")(x)
            h = constrain(hg[..., 0, :], hidden) * act(constrain(hg[..., 1, :], hidden))
        else:
            h = Dense((f,), ("embd", "intermediate_expanded"), normal(fc_std), use_bias=bias, dtype=self.dtype,
                      name="c_fc")(x)
            h = act(constrain(h, hidden))
        h = Dense((d,), ("intermediate_expanded", "embd"), normal(proj_std), use_bias=bias, dtype=self.dtype,
                  name="c_proj")(h)
        return nn.Dropout(cfg.res_dropout)(h, deterministic=deterministic)


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is: its attention kind (`global`, `local`, `linear` or `none`) and whether
    its MLP is a mixture of experts (`moe_layers`)."""

    attention: str
    moe: bool = False


def layer_specs(cfg: ModelConfig) -> tuple[LayerSpec, ...]:
    moe = set(cfg.moe_layers or ())
    return tuple(LayerSpec(kind, i in moe) for i, kind in enumerate(cfg.attention_types))


class Block(nn.Module):
    """One transformer layer: pre-norm attention and MLP (or MoE), sequential or parallel
    residual, with GPT-Neo's scalenorm / rezero / macaron options. The layer's `spec` is given
    per call, so that with `share_parameters` one Block serves layers of every kind."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, *, spec: LayerSpec, deterministic: bool = True,
                 cache: Optional[dict] = None, cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[dict]]:
        """x [batch, sequence, embd] -> (same shape, the layer's updated cache or None)."""
        if self.cfg.macaron:
            x = x + self.macaron(x, deterministic)
        a, cache = self.attention(x, positions, kind=spec.attention, deterministic=deterministic,
                                  cache=cache, cache_index=cache_index, key_valid=key_valid)
        if self.cfg.parallel_residual:
            x = x + a + self.feed_forward(x, moe=spec.moe, deterministic=deterministic)
        else:
            x = x + a
            x = x + self.feed_forward(x, moe=spec.moe, deterministic=deterministic)
        return constrain(x, ACT), cache

    def attention(self, x: jax.Array, positions: jax.Array, *, kind: str, deterministic: bool,
                  **decoding) -> tuple[jax.Array, Optional[dict]]:
        """The attention branch, dropout(Attn(LN1(x))). A `none` layer has none (the original
        added x to itself there; docs/differences.md)."""
        if kind == "none":
            return jnp.zeros_like(x), None
        if kind == "linear":
            attn = LinearAttention(self.cfg, self.dtype, name="attn")
        else:
            attn = Attention(self.cfg, kind, self.dtype, name="attn")
        a, cache = attn(self.norm("ln_1")(x), positions, deterministic=deterministic, **decoding)
        return self.gate("rezero_1", nn.Dropout(self.cfg.res_dropout)(a, deterministic=deterministic)), cache

    def feed_forward(self, x: jax.Array, *, moe: bool, deterministic: bool) -> jax.Array:
        """The MLP branch, MLP(LN2(x)) (halved with macaron); a mixture of experts in MoE layers."""
        h = self.norm("ln_2")(x)
        if moe:
            m = MoE(self.cfg, self.dtype, name="moe")(h, deterministic=deterministic)
            m = nn.Dropout(self.cfg.res_dropout)(m, deterministic=deterministic)
        else:
            m = MLP(self.cfg, self.dtype, name="mlp")(h, deterministic=deterministic)
        return self.gate("rezero_2", (0.5 if self.cfg.macaron else 1.0) * m)

    def macaron(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """Macaron: a half-step MLP before attention. The original fed it the raw residual
        stream; neo pre-normalises it like every other branch (docs/differences.md)."""
        m = MLP(self.cfg, self.dtype, name="mlp_macaron")(self.norm("ln_macaron")(x), deterministic=deterministic)
        return self.gate("rezero_macaron", 0.5 * m)

    def norm(self, name: str):
        cfg = self.cfg
        if cfg.rezero:
            return lambda x: x
        if cfg.scalenorm:
            return ScaleNorm(cfg.layer_norm_epsilon, self.dtype, name=name)
        return make_norm(cfg, self.dtype, name=name)

    def gate(self, name: str, branch: jax.Array) -> jax.Array:
        """ReZero: the branch times a learned scalar that starts at 0."""
        if not self.cfg.rezero:
            return branch
        g = self.param(name, named(nn.initializers.zeros, ()), (), jnp.float32)
        return branch * g.astype(branch.dtype)


# What each `remat_policy` keeps for the backward pass (docs/configs.md); the rest is recomputed.
# The names are attached where the values are made: "dense" in layers.Dense, "attention_out" in
# attention_op (its output, and blocked attention's logsumexp).
REMAT_SAVED = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.save_only_these_names("dense"),
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def apply_block(block: Block, x: jax.Array, *, spec: LayerSpec, deterministic: bool, remat: str,
                scanned: bool = False, **arrays) -> tuple[jax.Array, Optional[dict]]:
    """Run one layer. With a `remat` policy other than `none`, what the policy does not save is
    recomputed in the backward pass (GPT-Neo's `recompute_grad`: everything but the layer's
    input). jax.checkpoint traces every argument it is handed, so the static ones (spec,
    deterministic) are closed over and only arrays pass through it. Under nn.scan the loop
    already keeps the forward and backward apart, so XLA's common-subexpression barrier is not
    needed (`prevent_cse`)."""
    call = lambda block, x, arrays: block(x, spec=spec, deterministic=deterministic, **arrays)
    if remat != "none":
        call = nn.remat(call, policy=REMAT_SAVED[remat], prevent_cse=not scanned)
    return call(block, x, arrays)


class LayerGroup(nn.Module):
    """One repetition of the attention pattern: `len(specs)` layers, named "0", "1", ...
    GPT runs it under nn.scan, n_layer / len(specs) times, with every parameter stacked along
    a leading `layers` axis (layer g * len(specs) + j is group g's "j")."""

    cfg: ModelConfig
    dtype: jnp.dtype
    specs: tuple[LayerSpec, ...]

    @nn.compact
    def __call__(self, x: jax.Array, cache: Optional[tuple], positions: jax.Array, deterministic: bool,
                 cache_index: Optional[jax.Array], key_valid: Optional[jax.Array]) -> tuple[jax.Array, Optional[tuple]]:
        """x [batch, sequence, embd] (the carry), cache: this group's slice of the stacked cache
        (one entry per layer of the group) -> (x, the group's updated cache)."""
        new_cache = []
        for j, spec in enumerate(self.specs):
            x, c = apply_block(Block(self.cfg, self.dtype, name=str(j)), x, spec=spec, deterministic=deterministic,
                               remat=self.cfg.remat, scanned=True, positions=positions,
                               cache=None if cache is None else cache[j], cache_index=cache_index, key_valid=key_valid)
            new_cache.append(c)
        return x, None if cache is None else tuple(new_cache)


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
        elif cfg.position_embedding == "learned":
            self.wpe = self.param("wpe", named(normal(0.01), ("embed_sequence", "embd")),
                                  (cfg.n_ctx, cfg.n_embd), jnp.float32)
        self.specs = layer_specs(cfg)
        period = cfg.scan_period
        if period:  # the repeating pattern under nn.scan: compile time does not grow with depth
            self.layers = nn.scan(LayerGroup, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                                  length=cfg.n_layer // period, unroll=cfg.scan_unroll_groups,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(
                cfg, compute_dtype(cfg), self.specs[:period], name="layers")
        elif cfg.share_parameters:  # one Block (variables under h_0) serves every layer
            self.blocks = [Block(cfg, compute_dtype(cfg), name="h_0")] * cfg.n_layer
        else:
            self.blocks = [Block(cfg, compute_dtype(cfg), name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = make_norm(cfg, compute_dtype(cfg))
        if cfg.no_weight_tie:
            self.lm_head = self.param("lm_head", named(normal(0.02), ("embd", "vocab")),
                                      (cfg.n_embd, cfg.n_vocab), jnp.float32)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        self.pos_drop = nn.Dropout(cfg.embed_dropout)

    def position_embeddings(self, positions: jax.Array) -> jax.Array:
        """[b, t] -> [b, t, embd]: the learned table's rows (axial: (A1[i] + A2[j]) / 2 for
        position i * a2 + j), or the sinusoids."""
        cfg = self.cfg
        if cfg.position_embedding == "sinusoidal":
            return sinusoid_table(positions, cfg.n_embd)
        if cfg.axial_pos_emb is None:
            return jnp.take(self.wpe, positions, axis=0)
        a1, a2 = cfg.axial_pos_emb
        table = (self.axial_wpe_1[:, None, :] + self.axial_wpe_2[None, :, :]) / 2
        return jnp.take(table.reshape(a1 * a2, -1)[: cfg.n_ctx], positions, axis=0)

    def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None, *,
                 deterministic: bool = True, cache: Optional[list] = None,
                 cache_index: Optional[jax.Array] = None,
                 key_valid: Optional[jax.Array] = None, last_only: bool = False,
                 logits_at: Optional[jax.Array] = None, return_hidden: bool = False):
        """tokens, positions: [batch, sequence] int. With `cache` (from `init_cache`), the
        tokens are written at slot `cache_index` and (logits, new_cache) is returned;
        `key_valid` [batch, cache length] marks the slots that hold real tokens (left padding).
        `last_only`: logits for the last position only (a sampler's prompt pass).
        `logits_at` [batch, k]: logits at these positions only (a scorer that needs a few
        positions per row skips most of the vocabulary projection).
        `return_hidden`: the final hidden state LN_f(h) [batch, sequence, embd] instead of
        logits; `head_logits` projects it (a loss that never holds all logits at once)."""
        cfg = self.cfg
        if cache is not None and not cfg.causal:
            raise NeoError("a masked-LM model (mlm_training) sees the whole sequence at once; it "
                           "cannot decode token by token with a KV cache.")
        dtype = compute_dtype(cfg)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        tokens = constrain(tokens, ("batch", "sequence"))
        # an id past the table (GPT-Neo's padding_id 50257 of 50257) embeds as zeros, as mesh-tf's gather did
        if cache is None:
            h = jnp.take(self.wte.astype(dtype), tokens, axis=0, mode="fill", fill_value=0)
        else:
            # Decoding: gather the rows, then cast them. Cast first, XLA converted the whole table
            # at every sampler call, and back (gpt_neo_125M bfloat16: 72-75 ms a call).
            # Same values either way; training keeps the cast first, so the embedding's gradient
            # is summed in the compute dtype as before.
            h = jnp.take(self.wte, tokens, axis=0, mode="fill", fill_value=0).astype(dtype)
        h = self.embed_drop(h, deterministic=deterministic)
        if cfg.position_embedding in ("learned", "sinusoidal"):
            # GPT-Neo drops token and position embeddings with separate masks (reference 1.9).
            p = self.position_embeddings(positions).astype(dtype)
            h = h + self.pos_drop(p, deterministic=deterministic)
        h = constrain(h, ACT)
        if cfg.scan_period:
            h, new_cache = self.layers(h, None if cache is None else tuple(cache), positions, deterministic,
                                       cache_index, key_valid)
        else:
            new_cache = []
            for i, (block, spec) in enumerate(zip(self.blocks, self.specs)):
                h, c = apply_block(block, h, spec=spec, deterministic=deterministic, remat=cfg.remat,
                                   positions=positions, cache=None if cache is None else cache[i],
                                   cache_index=cache_index, key_valid=key_valid)
                new_cache.append(c)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        h = self.ln_f(h[:, -1:] if last_only else h)
        if return_hidden:
            return h
        if cache is None:
            return self.head_logits(h)
        return self.decode_logits(h), list(new_cache)

    def head(self) -> jax.Array:
        """The vocabulary projection [embd, vocab], float32: wte^T (tied) or lm_head."""
        return self.lm_head if self.cfg.no_weight_tie else self.wte.T

    def head_logits(self, h: jax.Array, vocab_multiple: int = 1) -> jax.Array:
        """Final hidden states [batch, sequence, embd] -> float32 logits [batch, sequence, vocab]
        (`project_logits` onto `head`)."""
        return project_logits(h, self.head(), compute_dtype(self.cfg), vocab_multiple)

    def decode_logits(self, h: jax.Array) -> jax.Array:
        """`head_logits` while decoding with a KV cache, where a step projects a few tokens per
        row: a tied head is multiplied in wte's stored [vocab, embd] order rather than as wte^T
        (the same products), which XLA:CPU's matrix-vector products read faster: gpt_neo_125M
        greedy decoding in float32 at batch 1 gained 5-13% in tokens/s over four alternated
        pairs; batch 8 and bfloat16 stayed within the noise (docs/benchmarks.md). Applied with
        the "decode" collection, the head is neo's CPU decode kernel's (see Dense)."""
        dtype = compute_dtype(self.cfg)
        if packs_for_decoding(self) and not self.has_variable("decode", "head"):
            self.put_variable("decode", "head", cpu_kernels.pack(self.head(), dtype))  # see Dense
        if self.has_variable("decode", "head") and cpu_kernels.takes(h.shape[0] * h.shape[1], h.shape[2], dtype):
            logits = cpu_kernels.product(h, self.get_variable("decode", "head"), self.cfg.n_vocab)
            return constrain(logits, ("batch", "sequence", "vocab"))
        if self.cfg.no_weight_tie:
            return self.head_logits(h)
        return constrain(einsum("bte,ve->btv", h, self.wte, dtype), ("batch", "sequence", "vocab"))


def project_logits(h: jax.Array, head: jax.Array, dtype: jnp.dtype, vocab_multiple: int = 1) -> jax.Array:
    """h [batch, sequence, embd] @ head [embd, vocab] -> float32 logits, multiplied in `dtype`.
    vocab_multiple > 1 pads the head with zero columns to a multiple of it and gives the padded
    entries logit -inf (probability 0, gradient 0), so a loss over the padded logits is the loss
    over the real ones: GPT-2's 50,257 entries make a product whose N no tile divides, which
    XLA:GPU runs at a third of its rate (docs/benchmarks.md). A pure function of its arrays, so
    the loss (neo/loss.py) can take its gradient inside the forward pass."""
    v = head.shape[-1]
    pad = -v % vocab_multiple
    if pad:
        head = jnp.pad(head, ((0, 0), (0, pad)))
    logits = constrain(einsum("bte,ev->btv", h, head, dtype), ("batch", "sequence", "vocab"))
    if pad:
        logits = jnp.where(jnp.arange(v + pad) < v, logits, -jnp.inf)
    return logits


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Optional[jnp.dtype] = None) -> list:
    """An empty KV cache for `length` tokens, in the compute dtype: per layer {"k", "v"}:
    [batch, kv_heads, length, features_per_head] (grouped-query: the kv heads only; heads first:
    neo/model/attention.py says why);
    for `local` layers only their window [batch, heads, min(local_attention_radius, length),
    ...], a ring (attention.ring_attend_write); for `linear` layers the running sums of linear
    attention (neo/model/linear_attention.py). With scanned layers, one entry per layer of the
    repeating group, stacked over the groups (leading axis n_layer / period), as the scan reads
    it."""
    dtype = dtype or compute_dtype(cfg)

    def layer(kind: str):
        if kind == "none":
            return None
        if kind == "linear":
            return init_state(batch, cfg.n_head, cfg.features_per_head)
        slots = min(cfg.local_attention_radius, length) if kind == "local" else length
        shape = (batch, cfg.kv_heads, slots, cfg.features_per_head)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    caches = [layer(kind) for kind in cfg.attention_types]
    period = cfg.scan_period
    if not period:
        return caches
    return [jax.tree.map(lambda *c: jnp.stack(c), *caches[j::period]) if caches[j] is not None else None
            for j in range(period)]
