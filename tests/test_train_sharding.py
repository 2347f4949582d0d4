"""The sharded train step: 8 devices compute what 1 device computes, under any valid layout,
parameters really are split the way the layout says, and n steps in one compiled call compute
what n one-step calls compute."""

import jax
import numpy as np
import pytest

from neo.config import parse_model_config
from neo.errors import NeoError
from neo.mesh import make_layout, num_microbatches
from neo.train import build, global_batch, global_batches

LAYOUTS = {
    "data": ("x:8", "batch:x"),
    "model": ("x:1,y:8", "embd:y,heads:y,vocab:y,intermediate_expanded:y"),
    "mixed": ("x:2,y:4", "batch:x,heads:y,vocab:y,intermediate_expanded:y,memory_length:y"),
    "fsdp": ("x:8", "batch:x,embd:x"),
    "sequence": ("x:2,y:4", "batch:x,sequence:y,embd:y"),
}


@pytest.fixture(scope="module")
def base_cfg(tiny_config):
    # Adam's epsilon 1e-6, not 1e-8: Adam moves a parameter by lr x g / (|g| + eps), so a
    # gradient entry within a few eps of zero turns float summation noise (1 and 8 devices sum
    # in different orders) into a large part of a step. At 1e-8, on a Zen 4 EPYC, one c_fc entry
    # moved 3.3% of lr = 1e-4 further on 8 devices than on one (first step, same loss and
    # gradient norm); at 1e-6 the largest difference after two steps is 7.8e-8 (`model` layout).
    return parse_model_config(tiny_config(epsilon=1e-6))


@pytest.fixture(scope="module")
def tokens(base_cfg):
    shape = (base_cfg.run.train_batch_size, base_cfg.model.n_ctx + 1)
    return np.random.RandomState(0).randint(0, base_cfg.model.n_vocab, shape).astype(np.int32)


def run(cfg, batch, mesh_shape, layout, devices=None, steps=2):
    setup = build(cfg, make_layout(mesh_shape, layout, devices))
    state = setup.init()
    for _ in range(steps):
        state, metrics = setup.step(state, global_batch(setup, batch))
    return setup, state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference(base_cfg, tokens):
    _, state, metrics = run(base_cfg, tokens, "", "", jax.devices()[:1])
    return jax.device_get(state.params), metrics


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_eight_devices_equal_one(name, reference, base_cfg, tokens):
    ref_params, ref_metrics = reference
    _, state, metrics = run(base_cfg, tokens, *LAYOUTS[name])
    assert abs(metrics["loss"] - ref_metrics["loss"]) < 2e-6
    assert abs(metrics["grad_norm"] - ref_metrics["grad_norm"]) < 2e-6 * ref_metrics["grad_norm"]
    params = jax.device_get(state.params)
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, ref_params)
    # Adam divides by sqrt(v) + eps: summation-order noise in near-zero gradients is amplified
    # (see base_cfg); 2e-6 is 2% of one lr = 1e-4 step, where a wrongly split or reduced
    # parameter is off by a whole step. Measured on a Zen 4 EPYC after two steps: up to 7.9e-7
    # with the dense attention (`attention_impl: xla`), 1.5e-6 with neo's CPU attention kernel
    # (`auto`, data and fsdp layouts), both in the embedding tables (wpe, wte).
    assert max(jax.tree.leaves(diffs)) < 2e-6, diffs


def test_chunked_loss_and_padded_head_on_eight_devices_equal_one_device_without(tiny_config, monkeypatch):
    """The loss as GPU/TPU training runs it at large batches (several chunks, each one's gradient
    taken in the forward pass; the head padded to HEAD_VOCAB_MULTIPLE columns), under layouts
    that split the vocabulary or the embedding, and with microbatches: 8 (2) devices compute
    what 1 device computes with the whole vocabulary in one chunk."""
    import neo.loss
    import neo.train

    cfg = parse_model_config(tiny_config(n_vocab=120))  # 120: padded to 128
    tokens = np.random.RandomState(1).randint(0, 120, (8, cfg.model.n_ctx + 1)).astype(np.int32)
    _, ref_state, ref = run(cfg, tokens, "", "", jax.devices()[:1])
    monkeypatch.setattr(neo.loss, "CHUNK_TOKENS", 64)  # 8 positions x 8 rows: 4 chunks
    monkeypatch.setattr(neo.train, "head_vocab_multiple", lambda: neo.train.HEAD_VOCAB_MULTIPLE)
    micro = cfg.replace(tokens_per_mb_per_replica=2 * cfg.model.n_ctx)  # 2 microbatches of 2 chunks
    for name, c, mesh_layout in (("model", cfg, LAYOUTS["model"]), ("fsdp", cfg, LAYOUTS["fsdp"]),
                                 ("microbatches", micro, ("x:2", "batch:x"))):
        setup, state, metrics = run(c, tokens, *mesh_layout, jax.devices()[:2] if name == "microbatches" else None)
        assert setup.num_microbatches == (2 if name == "microbatches" else 1)
        assert abs(metrics["loss"] - ref["loss"]) < 2e-6, name
        assert abs(metrics["grad_norm"] - ref["grad_norm"]) < 2e-6 * ref["grad_norm"], name
        diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(state.params),
                             jax.device_get(ref_state.params))
        assert max(jax.tree.leaves(diffs)) < 3e-6, (name, diffs)


def test_compiled_step_shards_parameters_as_the_layout_says(base_cfg, tokens):
    setup = build(base_cfg, make_layout("x:2,y:4", "batch:x,heads:y,vocab:y,intermediate_expanded:y"))
    state = setup.init()
    compiled = setup.step.lower(state, global_batch(setup, tokens)).compile()
    state_in = compiled.input_shardings[0][0]
    params_in, params_out = state_in.params, compiled.output_shardings[0].params
    expect = {
        ("wte",): ("y", None),
        ("h_0", "attn", "q", "kernel"): (None, "y", None),
        ("h_0", "attn", "o", "kernel"): ("y", None, None),
        ("h_0", "mlp", "c_fc", "kernel"): (None, "y"),
        ("h_0", "mlp", "c_proj", "kernel"): ("y", None),
        ("h_0", "ln_1", "scale"): (None,),
    }
    for path, spec in expect.items():
        node_in, node_out, arr = params_in, params_out, state.params
        for key in path:
            node_in, node_out, arr = node_in[key], node_out[key], arr[key]
        assert tuple(node_in.spec) + (None,) * (len(spec) - len(node_in.spec)) == spec, path
        assert node_in.is_equivalent_to(node_out, len(spec))
        # each device holds 1/4 of the sharded dimension, and the compiled program agrees
        shard = arr.addressable_shards[0].data.shape
        dim = spec.index("y") if "y" in spec else None
        if dim is not None:
            assert shard[dim] == arr.shape[dim] // 4
    assert compiled.input_shardings[0][1].spec[0] == "x"  # the batch is split over x
    # the Adam moments follow their parameters
    mu = state.opt_state[-1][0].mu if hasattr(state.opt_state[-1][0], "mu") else None
    if mu is not None:
        assert mu["h_0"]["mlp"]["c_fc"]["kernel"].sharding.spec == state.params["h_0"]["mlp"]["c_fc"]["kernel"].sharding.spec


def test_gradient_accumulation_gives_the_full_batch_update(reference, base_cfg, tokens):
    cfg = base_cfg.replace(tokens_per_mb_per_replica=2 * base_cfg.model.n_ctx)  # 2 sequences per microbatch
    setup = build(cfg, make_layout("x:2", "batch:x", jax.devices()[:2]))
    assert setup.num_microbatches == 2  # 4 sequences per replica / 2 per microbatch
    _, state, metrics = run(cfg, tokens, "x:2", "batch:x", jax.devices()[:2])
    ref_params, ref_metrics = reference
    assert abs(metrics["loss"] - ref_metrics["loss"]) < 2e-6
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(state.params), ref_params)
    assert max(jax.tree.leaves(diffs)) < 3e-6


def test_microbatch_count_follows_gpt_neo(base_cfg):
    layout = make_layout("x:8", "batch:x")
    cfg = base_cfg.replace(train_batch_size=48, tokens_per_mb_per_replica=4 * base_cfg.model.n_ctx)
    count = lambda c: num_microbatches(c.run.train_batch_size, c.model.n_ctx, c.run.tokens_per_mb_per_replica,
                                       layout.axis_size("batch"))
    assert count(cfg) == 2  # 6 per replica; 4 does not divide 6 -> 3 per microbatch
    assert count(base_cfg) == 1


def test_layout_that_cannot_split_fails_before_compiling(base_cfg):
    with pytest.raises(NeoError, match=r"'vocab' \(size 130 in parameter wte\).*pad n_vocab to"):
        build(base_cfg.replace(n_vocab=130), make_layout("x:2,y:4", "batch:x,vocab:y"))
    with pytest.raises(NeoError, match=r"'batch' \(size 4 in the config\).*multiple of 8"):
        build(base_cfg.replace(train_batch_size=4), make_layout("x:8", "batch:x"))


@pytest.mark.parametrize("mesh_shape,layout,micro", [("", "", None), ("x:2,y:4", "batch:x,heads:y,embd:y", 2)])
def test_steps_in_one_call_equal_one_step_calls(tiny_config, mesh_shape, layout, micro,
                                               rerun_with_xla_default_emitters):
    """GPT-Neo's `iterations`: 4 steps in one compiled call (a scan over a stack of batches)
    give every step's metrics and the state of 4 one-step calls; with dropout on, so the
    steps' random numbers must be the same too. (Within 1e-6 with XLA's default emitters, which
    give the same bits here, and not with the suite's: tests/conftest.py.)"""
    if rerun_with_xla_default_emitters:
        return
    cfg = parse_model_config(tiny_config(embed_dropout=0.1, res_dropout=0.1, attn_dropout=0.1, lr=1e-3,
                                         tokens_per_mb_per_replica=micro and micro * 32))
    setup = build(cfg, make_layout(mesh_shape, layout, None if mesh_shape else jax.devices()[:1]))
    assert setup.num_microbatches == (micro or 1)
    stack = np.random.RandomState(1).randint(0, cfg.model.n_vocab, (4, 8, 33)).astype(np.int32)
    one = setup.init()
    singles = []
    for batch in stack:
        one, m = setup.step(one, global_batch(setup, batch))
        singles.append(jax.device_get(m))
    many, stacked = setup.steps(setup.init(), global_batches(setup, stack))
    stacked = jax.device_get(stacked)
    assert int(many.step) == 4 and stacked["loss"].shape == (4,)
    for name in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(stacked[name], [m[name] for m in singles], rtol=1e-6)
    assert len(set(stacked["loss"])) == 4  # four different steps, not one repeated
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(many.params),
                         jax.device_get(one.params))
    assert max(jax.tree.leaves(diffs)) < 1e-6, diffs
    assert jax.tree.map(lambda x: x.sharding, many.params) == jax.tree.map(lambda x: x.sharding, one.params)
