"""Mixture of experts: routing, capacity, the balance loss, equality with a plain MLP, and
expert parallelism giving the unsharded loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import MoEParams, parse_model_config
from neo.errors import NeoError
from neo.flops import flops_per_token
from neo.mesh import make_layout
from neo.model.gpt import MLP
from neo.model.moe import MoE, capacity, group_size, route
from neo.train import build, global_batch

RNG = np.random.RandomState(0)


@pytest.fixture
def moe_config(tiny_config):
    def make(**moe):
        return parse_model_config(tiny_config(n_embd=32, n_head=4, moe_layers=[1], moe_activation="relu",
                                              moe_params={"moe_hidden_size": 48, **moe}))

    return make


def test_defaults_are_the_originals(moe_config):
    p = moe_config().model.moe_params
    assert (p.moe_num_experts, p.moe_gating, p.moe_loss_coef, p.moe_capacity_factor_train,
            p.moe_capacity_factor_eval, p.moe_group_size, p.moe_second_policy_train,
            p.moe_second_threshold_train) == (16, "top_2", 1e-2, 1.25, 2.0, 1024, "random", 0.2)
    assert MoEParams().moe_hidden_size == 4096
    assert capacity(1024, p, train=True) == 80 and capacity(1024, p, train=False) == 128
    assert group_size(2048, 1024) == 1024 and group_size(96, 1024) == 96 and group_size(3000, 1024) == 1000


def test_bad_moe_params_are_named_when_the_config_loads(moe_config):
    with pytest.raises(NeoError, match="unknown moe_params key 'moe_num_expert'.*moe_num_experts"):
        moe_config(moe_num_expert=4)
    with pytest.raises(NeoError, match="top_1, top_2"):
        moe_config(moe_gating="softmax")
    with pytest.raises(NeoError, match="'moe_hidden_size' must be >= 1"):
        moe_config(moe_hidden_size=0)


def test_one_expert_with_room_for_every_token_is_a_plain_mlp(moe_config):
    cfg = moe_config(moe_num_experts=1, moe_gating="top_1", moe_capacity_factor_eval=1.0)
    x = jnp.asarray(RNG.randn(2, 16, 32).astype(np.float32))
    layer = MoE(cfg.model)
    params = layer.init(jax.random.PRNGKey(0), x, deterministic=True)["params"]
    params = jax.tree.map(lambda v: getattr(v, "value", v), params, is_leaf=lambda v: hasattr(v, "value"))
    out = layer.apply({"params": params}, x, deterministic=True)
    # the same weights in neo's MLP (zero biases, relu): identical output
    mlp_cfg = cfg.replace(activation_fn="relu", intermediate_size=48)
    mlp_params = {"c_fc": {"kernel": params["wi"][0], "bias": jnp.zeros(48)},
                  "c_proj": {"kernel": params["wo"][0], "bias": jnp.zeros(32)}}
    ref = MLP(mlp_cfg.model).apply({"params": mlp_params}, x, deterministic=True)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_routing_fills_experts_in_order_and_drops_the_overflow():
    p = MoEParams(moe_num_experts=3, moe_second_policy_eval="all")
    # 4 tokens; first choices 0, 0, 0, 1; second choices 1, 2, 1, 0; capacity 2
    gates = jnp.asarray([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    dispatch, combine, _ = route(gates, p, 2, train=False, rng=jax.random.PRNGKey(0))
    d = np.asarray(dispatch)  # [token, expert, slot]
    assert d[0, 0, 0] == 1 and d[1, 0, 1] == 1 and d[2, 0].sum() == 0  # token 2 overflows expert 0
    assert d[3, 1, 0] == 1  # first choices before second choices
    assert d[0, 1, 1] == 1 and d[2, 1].sum() == 0  # second choices fill what is left of expert 1
    assert d[1, 2, 0] == 1 and d[3, 0].sum() == 0  # expert 0 is full for token 3's second choice
    # combine weights: top-2 gates renormalised to sum to 1 (mesh-tf)
    np.testing.assert_allclose(np.asarray(combine)[0].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(combine)[0, 0, 0], 0.6 / 0.9, rtol=1e-6)


def test_balance_loss_is_one_when_balanced_and_grows_when_collapsed():
    p = MoEParams(moe_num_experts=4)
    balanced = jnp.tile(jnp.eye(4) * 0.6 + 0.1, (8, 1))  # each expert first for a quarter of tokens
    _, _, loss = route(balanced, p, 8, train=False, rng=jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(1.0, rel=1e-5)
    collapsed = jnp.tile(jnp.asarray([[0.97, 0.01, 0.01, 0.01]]), (32, 1))
    _, _, loss = route(collapsed, p, 8, train=False, rng=jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(4 * 0.97, rel=1e-5)


def test_random_second_policy_keeps_the_second_expert_with_probability_gate_over_threshold():
    p = MoEParams(moe_num_experts=2)
    gates = jnp.tile(jnp.asarray([[0.9, 0.1]]), (1000, 10, 1))  # normalised gate_2 = 0.1 -> p = 0.5
    dispatch, _, _ = route(gates, p, 10, train=True, rng=jax.random.PRNGKey(3))
    assert float(dispatch[..., 1, :].sum()) / 10000 == pytest.approx(0.5, abs=0.02)


BATCH = np.random.RandomState(1).randint(0, 128, (8, 33)).astype(np.int32)


def train(cfg, mesh_shape, layout, devices=None, steps=2):
    setup = build(cfg, make_layout(mesh_shape, layout, devices))
    state = setup.init()
    for _ in range(steps):
        state, metrics = setup.step(state, global_batch(setup, BATCH))
    return state, jax.device_get(metrics)


def test_expert_parallel_training_gives_the_unsharded_loss(moe_config):
    cfg = moe_config(moe_num_experts=8, moe_capacity_factor_train=1.0)
    _, ref = train(cfg, "", "", jax.devices()[:1])
    state, got = train(cfg, "x:8", "experts:x,batch:x")
    assert ref["moe_loss"] > 0
    assert abs(got["loss"] - ref["loss"]) < 2e-6 and abs(got["moe_loss"] - ref["moe_loss"]) < 1e-7
    wi = state.params["h_1"]["moe"]["wi"]
    assert wi.addressable_shards[0].data.shape[0] == 1  # one expert per device


@pytest.mark.parametrize("gating", ["top_1", "top_2"])
def test_the_router_gets_the_gradient_of_the_output_and_of_the_balance_loss(moe_config, gating):
    """jax.grad with respect to the router's weights equals central finite differences of the
    layer's output (through the gates that weight the experts) and of the load-balancing loss
    (through the mean router probabilities), along random directions small enough that no
    token changes experts; so a router cut off from either gradient fails here."""
    cfg = moe_config(moe_num_experts=4, moe_gating=gating, moe_second_policy_eval="all", moe_loss_coef=1.0)
    layer = MoE(cfg.model)
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(2, 16, 32).astype(np.float32))
    readout = jnp.asarray(rng.randn(2, 16, 32).astype(np.float32))
    params = layer.init(jax.random.PRNGKey(0), x, deterministic=True)["params"]
    params = jax.tree.map(lambda v: getattr(v, "value", v), params, is_leaf=lambda v: hasattr(v, "value"))

    def objective(gate, which):
        y, aux = layer.apply({"params": {**params, "gate": gate}}, x, deterministic=True, mutable=["aux_loss"])
        return jnp.sum(y * readout) if which == "output" else sum(jnp.sum(v) for v in jax.tree.leaves(aux))

    def choices(gate):  # each token's experts in order of preference
        return np.argsort(-np.asarray(x @ gate), axis=-1)[..., :cfg.model.moe_params.top_k]

    eps = 1e-2
    gate = params["gate"]
    for which in ("output", "balance"):
        grad = jax.grad(objective)(gate, which)
        for seed in range(3):
            v = jnp.asarray(np.random.RandomState(seed).randn(*gate.shape).astype(np.float32))
            v = v / jnp.linalg.norm(v)
            assert (choices(gate + eps * v) == choices(gate - eps * v)).all()  # no routing decision flips
            fd = (objective(gate + eps * v, which) - objective(gate - eps * v, which)) / (2 * eps)
            assert abs(float(fd)) > 1e-4, (which, float(fd))
            np.testing.assert_allclose(float(jnp.vdot(grad, v)), float(fd), rtol=2e-2)


def test_flops_count_the_active_experts(moe_config):
    cfg = moe_config(moe_num_experts=8)
    dense = cfg.replace(moe_layers=None)
    d, h = cfg.model.n_embd, 48
    per_token_moe = 2 * (2 * (2 * d * h) + d * 8)  # two experts' matmuls + the router
    per_token_mlp = 2 * (2 * d * cfg.model.intermediate_expanded)
    assert flops_per_token(cfg.model, training=False) - flops_per_token(dense.model, training=False) == per_token_moe - per_token_mlp
