"""Mixture of experts: the MLP of the layers in `moe_layers`, as mesh-tensorflow's
`transformer_moe_layer_v1` that GPT-Neo used.

Tokens are cut into groups (within a sequence); a router (softmax over experts, float32) picks
the top-k experts per token (`moe_gating` "top_2" by default, "top_1", "top_3", ...); each
expert takes at most `capacity` tokens per group, first come first served, first choices
before second choices; tokens over capacity skip that expert (their residual passes through).
k = 2 follows mesh-tf exactly: the two gates are renormalised to sum to 1, and the second
expert is used by `moe_second_policy` ("random": with probability min(1, gate_2 / threshold);
"threshold", "all", "none"). k = 1 keeps the raw router probability as the gate (Switch
Transformer), so the router still learns. The load-balancing loss is mesh-tf's
mean(fraction routed to e as first choice * mean router probability of e) * experts^2 *
`moe_loss_coef`, sown into the "aux_loss" collection for the train step to add.

Dispatch and combine are one-hot einsums, so everything shards by name: `experts` (expert
parallelism), `expert_capacity`, `intermediate_expanded` (the expert hidden size).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo.config import ModelConfig, MoEParams
from neo.mesh import constrain
from neo.model.activations import Activation
from neo.model.layers import einsum, named, normal, product_dtype


def group_size(seq: int, max_group: int) -> int:
    """mesh-tf's `_split_into_groups`, per sequence: the fewest groups of at most `max_group`
    tokens that divide the sequence evenly (mesh-tf started from floor(n / max_group) groups and
    so could exceed it). Groups never span sequences, so routing does not depend on how the
    batch is sharded."""
    groups = -(-seq // max_group)
    while seq % groups:
        groups += 1
    return seq // groups


def capacity(group: int, p: MoEParams, train: bool) -> int:
    """Tokens each expert takes per group: mesh-tf's min(S, int(S * factor / E)), at least the
    minimum capacity."""
    factor = p.moe_capacity_factor_train if train else p.moe_capacity_factor_eval
    return max(min(group, int(group * factor / p.moe_num_experts)), p.moe_min_expert_capacity)


def route(gates: jax.Array, p: MoEParams, cap: int, train: bool,
          rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """gates [..., S, E] router probabilities (float32) -> (dispatch, combine [..., S, E, C],
    load-balancing loss before the coefficient)."""
    e = gates.shape[-1]
    k = p.top_k
    remaining = gates
    masks, values = [], []
    for _ in range(k):
        mask = jax.nn.one_hot(jnp.argmax(remaining, axis=-1), e, dtype=jnp.float32)
        masks.append(mask)
        values.append(jnp.sum(remaining * mask, axis=-1))
        remaining = remaining * (1.0 - mask)

    # balance loss: fraction of tokens whose first choice is e, times e's mean probability
    density = masks[0].mean(axis=-2)
    density_proxy = gates.mean(axis=-2)
    loss = jnp.mean(density * density_proxy) * e * e
    if p.moe_use_second_place_loss and k > 1:
        others = gates * (1.0 - masks[0])
        normalized = others / (others.sum(-1, keepdims=True) + 1e-9)
        loss += 0.5 * jnp.mean(masks[1].mean(axis=-2) * normalized.mean(axis=-2)) * e * e

    if k > 1:
        denom = sum(values) + 1e-9
        values = [v / denom for v in values]
        policy = p.moe_second_policy_train if train else p.moe_second_policy_eval
        threshold = p.moe_second_threshold_train if train else p.moe_second_threshold_eval
        for j in range(1, k):
            if policy == "none":
                keep = jnp.zeros_like(values[j])
            elif policy == "threshold":
                keep = (values[j] > threshold).astype(jnp.float32)
            elif policy == "random":
                u = jax.random.uniform(jax.random.fold_in(rng, j), values[j].shape)
                keep = (u < values[j] / max(threshold, 1e-9)).astype(jnp.float32)
            else:
                keep = jnp.ones_like(values[j])
            masks[j] = masks[j] * keep[..., None]

    dispatch = jnp.zeros(gates.shape + (cap,), jnp.float32)
    combine = jnp.zeros(gates.shape + (cap,), jnp.float32)
    filled = jnp.zeros(gates.shape[:-2] + (1, e), jnp.float32)  # tokens already in each expert
    for mask, value in zip(masks, values):
        position = (jnp.cumsum(mask, axis=-2) - mask + filled) * mask
        mask = mask * (position < cap)
        filled = filled + mask.sum(axis=-2, keepdims=True)
        slot = jax.nn.one_hot(position.sum(-1).astype(jnp.int32), cap, dtype=jnp.float32)  # [..., S, C]
        chosen = mask[..., None] * slot[..., None, :]  # [..., S, E, C]
        dispatch = dispatch + chosen
        combine = combine + chosen * value[..., None, None]
    return dispatch, combine, loss


class MoE(nn.Module):
    """The mixture-of-experts MLP: [batch, sequence, embd] -> same shape."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg, p = self.cfg, self.cfg.moe_params
        train = not deterministic
        b, t, d = x.shape
        e, f = p.moe_num_experts, p.moe_hidden_size
        s = group_size(t, p.moe_group_size)
        xg = x.reshape(b, t // s, s, d)
        cap = capacity(s, p, train)

        # mesh-tf's dense layers default to variance-scaling init: N(0, 1/fan_in)
        w_gate = self.param("gate", named(normal(d ** -0.5), ("embd", None)), (d, e), jnp.float32)
        w_in = self.param("wi", named(normal(d ** -0.5), ("experts", "embd", "intermediate_expanded")),
                          (e, d, f), jnp.float32)
        w_out = self.param("wo", named(normal(f ** -0.5), ("experts", "intermediate_expanded", "embd")),
                           (e, f, d), jnp.float32)

        logits = jnp.einsum("bgsd,de->bgse", xg.astype(jnp.float32), w_gate)
        gates = jax.nn.softmax(logits, axis=-1)
        rng = self.make_rng("dropout") if train else jax.random.PRNGKey(0)
        dispatch, combine, loss = route(gates, p, cap, train, rng)
        self.sow("aux_loss", "moe", loss * p.moe_loss_coef)

        # Expert matmuls in the compute dtype with float32 accumulation (layers.einsum), their
        # results rounded to it (inside the kernel off CPU: layers.product_dtype); the router
        # above stays float32.
        mm = lambda eq, a, b: einsum(eq, a, b, self.dtype, product_dtype(self.dtype)).astype(self.dtype)
        expert_in = mm("bgsec,bgsd->ebgcd", dispatch, xg)
        expert_in = constrain(expert_in, ("experts", "batch", None, "expert_capacity", "embd"))
        h = mm("ebgcd,edf->ebgcf", expert_in, w_in)
        h = constrain(h, ("experts", "batch", None, "expert_capacity", "intermediate_expanded"))
        h = Activation(cfg.moe_activation, name="act")(h)
        h = nn.Dropout(p.moe_dropout_rate)(h, deterministic=deterministic)
        out = mm("ebgcf,efd->ebgcd", h, w_out)
        out = constrain(out, ("experts", "batch", None, "expert_capacity", "embd"))
        y = mm("ebgcd,bgsec->bgsd", out, combine)
        return y.reshape(b, t, d)
