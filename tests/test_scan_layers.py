"""Layers under nn.scan (`scan_layers`): the scanned model computes what the unrolled one
computes (logits, gradients, decoding, optimizer updates, on 1 and 8 devices), in a loop or with
the loop unrolled (`scan_unroll`); checkpoints written in either form load into the other; the
compiled program does not grow with depth while it loops."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from neo.checkpoint import Checkpointer
from neo.config import parse_model_config
from neo.errors import NeoError
from neo.loop import restore_or_init
from neo.mesh import make_layout
from neo.model import GPT, abstract_init, as_model_tree, init_cache, init_params, per_layer
from neo.train import build, global_batch

RNG = np.random.RandomState(0)
EVERY_KIND = dict(n_layer=6, attention_types=[[["global", "local", "linear"], 2]], local_attention_radius=5,
                  num_mem_kv=2, mlp_glu=True, activation_fn="prelu", scalenorm=True)


def pair(tiny_config, scan_unroll=1, **kw):
    """(scanned, unrolled) configs of one model; the scanned one loops over its groups unless
    `scan_unroll` says otherwise (small models unroll the loop by default)."""
    scanned = parse_model_config(tiny_config(scan_unroll=scan_unroll, **kw))
    return scanned, scanned.replace(scan_layers=False, scan_unroll=None)


@pytest.mark.parametrize("scan_unroll,groups_per_iteration", [(1, 1), ("full", 2)])
def test_scanned_layers_compute_what_unrolled_layers_compute(tiny_config, scan_unroll, groups_per_iteration):
    scanned, unrolled = pair(tiny_config, scan_unroll, **EVERY_KIND)
    assert scanned.model.scan_period == 3 and unrolled.model.scan_period is None
    assert scanned.model.scan_unroll_groups == groups_per_iteration
    params = meta.unbox(init_params(unrolled.model, jax.random.PRNGKey(0)))
    stacked = as_model_tree(scanned.model, params)
    assert jax.tree.structure(stacked) == jax.tree.structure(meta.unbox(abstract_init(scanned.model)))
    tokens = jnp.asarray(RNG.randint(0, 128, (2, 20)))
    # each jitted whole: the same numbers as op by op, compiled in a fraction of the time
    apply = lambda cfg: jax.jit(lambda p: GPT(cfg.model).apply({"params": p}, tokens))
    np.testing.assert_allclose(apply(scanned)(stacked), apply(unrolled)(params), atol=1e-5)
    loss = lambda cfg: jax.jit(jax.grad(lambda p: GPT(cfg.model).apply({"params": p}, tokens).std()))
    grads = per_layer(loss(scanned)(stacked))
    want = loss(unrolled)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, want)
    # the two forms convert into each other exactly
    jax.tree.map(np.testing.assert_array_equal, per_layer(stacked), params)


def test_scanned_layers_decode_with_a_stacked_cache(tiny_config):
    scanned, _ = pair(tiny_config, **EVERY_KIND)
    params = init_params(scanned.model, jax.random.PRNGKey(1))
    model = GPT(scanned.model)
    tokens = jnp.asarray(RNG.randint(0, 128, (2, 10)))
    full = jax.jit(lambda p: model.apply({"params": p}, tokens))(params)
    cache = init_cache(scanned.model, 2, 12)
    assert jax.tree.leaves(cache)[0].shape[0] == 2  # 6 layers in groups of 3: two of each
    decode = jax.jit(lambda p, x, position, cache, i: model.apply({"params": p}, x, position, cache=cache,
                                                                 cache_index=i))
    logits, cache = decode(params, tokens[:, :6], None, cache, jnp.int32(0))
    steps = [logits]
    for i in range(6, 10):  # one compiled step, four times
        logits, cache = decode(params, tokens[:, i:i + 1], jnp.full((2, 1), i), cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def test_which_layers_scan():
    base = dict(n_embd=16, n_head=2, n_ctx=16, n_vocab=32)
    period = lambda **kw: parse_model_config({**base, **kw}).model.scan_period
    assert period(n_layer=24, attention_types=[[["global", "local"], 12]]) == 2  # GPT-Neo
    assert period(n_layer=4, attention_types=[[["global"], 4]]) == 1  # GPT-NeoX
    assert period(n_layer=3, attention_types=[[["global", "local", "global"], 1]]) is None  # no repeat
    assert period(n_layer=4, attention_types=[[["global"], 4]], share_parameters=True) is None
    assert period(n_layer=4, attention_types=[[["global"], 4]], moe_layers=[1]) is None
    assert period(n_layer=4, attention_types=[[["global"], 4]], scan_layers=False) is None
    with pytest.raises(NeoError, match="scan_layers is true but the layers cannot be scanned: moe_layers"):
        parse_model_config({**base, "n_layer": 4, "attention_types": [[["global"], 4]], "moe_layers": [1],
                            "scan_layers": True})
    with pytest.raises(NeoError, match="'scan_layers' must be \"auto\", true or false"):
        parse_model_config({**base, "n_layer": 2, "attention_types": [[["global"], 2]], "scan_layers": "yes"})


def test_how_many_groups_each_loop_iteration_runs():
    """`scan_unroll`: "auto" unrolls the loop of models up to 12 layers (their compile time is
    small), "full" always, a number runs that many groups per iteration; deeper models loop."""
    base = dict(n_embd=16, n_head=2, n_ctx=16, n_vocab=32)
    neo_24 = dict(n_layer=24, attention_types=[[["global", "local"], 12]])
    groups = lambda **kw: parse_model_config({**base, **kw}).model.scan_unroll_groups
    assert groups(n_layer=12, attention_types=[[["global", "local"], 6]]) == 6  # gpt_neo_125M: no loop
    assert groups(**neo_24) == 1
    assert groups(**neo_24, scan_unroll="full") == groups(**neo_24, scan_unroll=True) == 12
    assert groups(**neo_24, scan_unroll=5) == 5  # 12 groups: two iterations of 5, then 2
    assert groups(**neo_24, scan_unroll=40) == 12
    assert groups(n_layer=4, attention_types=[[["global"], 4]], scan_unroll=1) == 1
    assert groups(n_layer=4, attention_types=[[["global"], 4]], scan_layers=False) is None
    for bad in (0, -2, 1.5, "yes", [2]):
        with pytest.raises(NeoError, match="'scan_unroll' must be \"auto\", \"full\" or a whole number"):
            groups(**neo_24, scan_unroll=bad)
    with pytest.raises(NeoError, match="scan_unroll is 2 but the layers are not scanned \\(scan_layers is false\\); "
                                       "drop scan_unroll"):
        groups(**neo_24, scan_layers=False, scan_unroll=2)
    with pytest.raises(NeoError, match="scan_unroll is \"full\" but the layers are not scanned \\(moe_layers"):
        groups(n_layer=4, attention_types=[[["global"], 4]], moe_layers=[1], scan_unroll="full")


def test_a_partly_unrolled_loop_computes_what_the_loop_computes(tiny_config):
    """Five groups, two per iteration: two iterations and a remainder of one."""
    kw = dict(n_layer=5, attention_types=[[["global"], 5]])
    loop, unrolled = pair(tiny_config, 1, **kw)
    part, _ = pair(tiny_config, 2, **kw)
    params = meta.unbox(init_params(loop.model, jax.random.PRNGKey(0)))
    tokens = jnp.asarray(RNG.randint(0, 128, (2, 20)))
    loss = lambda cfg, p: jax.jit(jax.value_and_grad(lambda p: GPT(cfg.model).apply({"params": p}, tokens).std()))(p)
    (want, want_grads), (got, grads) = loss(loop, params), loss(part, params)
    assert abs(float(got) - float(want)) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, want_grads)
    np.testing.assert_allclose(float(loss(unrolled, per_layer(params))[0]), float(want), atol=1e-6)


def setups(tiny_config, opt_name="adam", layout=("", ""), lr=1e-3):
    scanned, unrolled = pair(tiny_config, n_layer=4, attention_types=[[["global", "local"], 2]], opt_name=opt_name,
                             lr=lr)
    devices = jax.devices()[:1] if not layout[0] else None
    return [build(cfg, make_layout(*layout, devices)) for cfg in (scanned, unrolled)]


def batch(setup, seed=0):
    cfg = setup.cfg
    rows = np.random.RandomState(seed).randint(0, 128, (cfg.run.train_batch_size, cfg.model.n_ctx + 1))
    return global_batch(setup, rows.astype(np.int32))


@pytest.mark.parametrize("opt_name", ["adam", "adafactor"])
def test_a_scanned_train_step_updates_what_an_unrolled_one_does(tiny_config, opt_name):
    """Adafactor's per-parameter statistics stay per layer when the layers are stacked."""
    scanned, unrolled = setups(tiny_config, opt_name)
    s_state, u_state = scanned.init(), unrolled.init()
    copy = lambda tree: jax.tree.map(jnp.copy, as_model_tree(scanned.cfg.model, tree))  # steps donate their state
    s_state = s_state.replace(params=copy(u_state.params), opt_state=copy(u_state.opt_state))
    for i in range(2):
        s_state, s_m = scanned.step(s_state, batch(scanned, i))
        u_state, u_m = unrolled.step(u_state, batch(unrolled, i))
        assert abs(float(s_m["loss"]) - float(u_m["loss"])) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), per_layer(s_state.params), u_state.params)


@pytest.mark.parametrize("layout", [("x:8", "batch:x,embd:x"), ("x:2,y:4", "batch:x,heads:y,intermediate_expanded:y")])
def test_scanned_layers_on_eight_devices_equal_one(tiny_config, layout):
    one, _ = setups(tiny_config, lr=1e-4)  # test_train_sharding's tolerance, for its learning rate
    eight, _ = setups(tiny_config, layout=layout, lr=1e-4)
    a, b = one.init(), eight.init()
    for i in range(2):
        a, ma = one.step(a, batch(one, i))
        b, mb = eight.step(b, batch(eight, i))
    assert abs(float(ma["loss"]) - float(mb["loss"])) < 2e-6
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=3e-6), jax.device_get(a.params),
                 jax.device_get(b.params))


@pytest.mark.parametrize("writer", [0, 1])  # 0: scanned writes, unrolled reads; 1: the reverse
def test_checkpoints_load_whichever_form_wrote_them(tiny_config, tmp_path, writer, caplog):
    setups_ = setups(tiny_config, layout=("x:8", "batch:x,embd:x"))
    write, read = setups_[writer], setups_[1 - writer]
    state, _ = write.step(write.init(), batch(write))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state.params, state.opt_state, {"data": None}, force=True)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), async_save=False)  # as a new process finds it: nothing saved or read yet
    with caplog.at_level(logging.WARNING):
        restored, _ = restore_or_init(read, ckpt, log=lambda _: None)
        ckpt.close()
        ckpt = Checkpointer(str(tmp_path), async_save=False)
        restore_or_init(write, ckpt, log=lambda _: None)  # and into the form that wrote it
        ckpt.close()
    assert "could not be restored" not in caplog.text  # orbax's warning when it cannot read an item's metadata
    assert int(restored.step) == 1
    jax.tree.map(np.testing.assert_array_equal, per_layer(jax.device_get(restored.params)),
                 per_layer(jax.device_get(state.params)))
    jax.tree.map(np.testing.assert_array_equal, per_layer(jax.device_get(restored.opt_state)),
                 per_layer(jax.device_get(state.opt_state)))
    assert jax.tree.map(lambda x: x.sharding, restored.params) == read.state_shardings.params
    _, m = read.step(restored, batch(read, 1))  # and training goes on
    _, want = write.step(state, batch(write, 1))
    assert abs(float(m["loss"]) - float(want["loss"])) < 1e-5


def test_the_compiled_step_does_not_grow_with_depth(tiny_config):
    """Compile time stays flat because the program is the same size at any depth."""
    def program(n_layer, scan, unroll=None):
        cfg = parse_model_config(tiny_config(n_layer=n_layer, attention_types=[[["global", "local"], n_layer // 2]],
                                             scan_layers=scan, scan_unroll=unroll))
        setup = build(cfg, make_layout("", "", jax.devices()[:1]))
        state = jax.eval_shape(setup.init)
        rows = jax.ShapeDtypeStruct((cfg.run.train_batch_size, cfg.model.n_ctx + 1), jnp.int32)
        return setup.step.lower(state, rows).as_text()

    size = lambda *a: len(program(*a))
    assert size(24, "auto") < 1.1 * size(4, "auto", 1)  # deep models loop by default
    assert size(12, "auto", 1) < 1.1 * size(4, "auto", 1)
    assert size(12, False) > 2 * size(4, False)  # the check can fail: unrolled layers do grow
    # the small model's loop is unrolled away: no while loop in its step (the looping one has two,
    # forward and backward)
    assert program(4, "auto").count("stablehlo.while") == 0
    assert program(4, "auto", 1).count("stablehlo.while") == 2
