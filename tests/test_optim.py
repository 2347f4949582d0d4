"""Optimizers, schedules, weight-decay masks, bf16 master weights, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from neo.config import parse_model_config
from neo.mesh import make_layout
from neo.optim import decay_mask, lr_schedule
from neo.train import build, global_batch

ONE = jax.devices()[:1]


@pytest.fixture
def cfg(tiny_config):
    def make(**kw):
        return parse_model_config(tiny_config(**kw))

    return make


@pytest.fixture
def schedule(cfg):
    def make(**kw):
        c = cfg(**kw)
        return lr_schedule(c.optimizer, c.run.train_steps)

    return make


def test_warmup_then_cosine_to_ten_percent(schedule):
    s = schedule(lr=1.0, warmup_steps=10, lr_decay="cosine", train_steps=110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # halfway: 0.1 + 0.9 * 0.5
    assert float(s(110)) == pytest.approx(0.1) and float(s(10_000)) == pytest.approx(0.1)


def test_linear_and_constant_and_decay_end(schedule):
    s = schedule(lr=2.0, lr_decay="linear", train_steps=100, lr_decay_end=50)
    assert float(s(0)) == pytest.approx(2.0) and float(s(25)) == pytest.approx(1.1)
    assert float(s(50)) == pytest.approx(0.2) and float(s(99)) == pytest.approx(0.2)
    assert float(schedule(lr=3.0)(77)) == pytest.approx(3.0)


def test_weight_decay_skips_every_norm_and_bias(cfg):
    setup = build(cfg(), make_layout("", "", ONE))
    mask = decay_mask(jax.eval_shape(setup.init).params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['wte']"] and flat["['wpe']"] and flat["['h_0']['attn']['q']['kernel']"]
    assert flat["['h_0']['mlp']['c_fc']['kernel']"]
    assert not flat["['ln_f']['scale']"] and not flat["['ln_f']['bias']"]  # GPT-Neo decayed ln_f
    assert not flat["['h_1']['ln_2']['scale']"] and not flat["['h_0']['attn']['o']['bias']"]
    assert not flat["['h_0']['mlp']['c_proj']['bias']"]


def test_decoupled_weight_decay_shrinks_only_decayed_parameters(cfg):
    c = cfg(lr=0.1, weight_decay=0.5)
    setup = build(c, make_layout("", "", ONE))
    state = setup.init()
    zero = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = setup.optimizer.update(zero, state.opt_state, state.params)
    # with zero gradients AdamW's update is -lr * wd * w on decayed leaves, 0 elsewhere
    np.testing.assert_allclose(updates["wte"], -0.1 * 0.5 * np.asarray(state.params["wte"]), rtol=1e-6)
    assert np.all(np.asarray(updates["ln_f"]["scale"]) == 0)


def losses_after(c, steps=8):
    setup = build(c, make_layout("", "", ONE))
    state = setup.init()
    batch = np.random.RandomState(0).randint(0, c.model.n_vocab, (c.run.train_batch_size, c.model.n_ctx + 1)).astype(np.int32)
    out = []
    for _ in range(steps):
        state, m = setup.step(state, global_batch(setup, batch))
        out.append(float(m["loss"]))
    return out, state


def test_adafactor_trains_with_factored_statistics(cfg):
    c = cfg(opt_name="adafactor", lr=1e-2, beta1=0.0, n_embd=128, n_head=8, n_vocab=256)
    losses, state = losses_after(c)
    assert losses[-1] < losses[0] - 0.5
    shapes = [x.shape for x in jax.tree.leaves(state.opt_state)]
    assert (256,) in shapes and (128,) in shapes  # row/column statistics of the [256, 128] wte


def test_gradient_clipping_bounds_the_adam_input(cfg):
    c = cfg(gradient_clipping=1e-3, lr=1e-3)
    setup = build(c, make_layout("", "", ONE))
    state = setup.init()
    batch = np.random.RandomState(0).randint(0, c.model.n_vocab, (8, c.model.n_ctx + 1)).astype(np.int32)
    new, m = setup.step(state, global_batch(setup, batch))
    assert float(m["grad_norm"]) > 1e-3  # reported before clipping
    mu = new.opt_state[1][0].mu  # chain(clip, adamw): adamw's first state holds the first moment
    norm = float(optax.tree.norm(mu)) / (1 - c.optimizer.beta1)  # mu = (1 - b1) * clipped grad after one step
    assert norm == pytest.approx(1e-3, rel=1e-4)


def test_bfloat16_keeps_float32_master_weights_and_optimizer_state(cfg):
    losses, state = losses_after(cfg(precision="bfloat16", lr=1e-3), steps=3)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))
    f32, _ = losses_after(cfg(lr=1e-3), steps=3)
    assert losses[0] == pytest.approx(f32[0], abs=0.02)  # same model, bf16 rounding only


def test_recompute_grad_gives_the_same_step_and_really_rematerialises(cfg):
    plain, _ = losses_after(cfg(), steps=2)
    remat, _ = losses_after(cfg(recompute_grad=True), steps=2)
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    c = cfg(recompute_grad=True)
    setup = build(c, make_layout("", "", ONE))
    state = setup.init()
    batch = global_batch(setup, np.zeros((8, c.model.n_ctx + 1), np.int32))
    jaxpr = str(jax.make_jaxpr(setup.step)(state, batch))
    # one rematerialised block per layer (the norms inside are checkpoints without a policy)
    assert jaxpr.count("policy=<function nothing_saveable") == c.model.n_layer
