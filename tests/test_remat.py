"""`remat_policy` (and GPT-Neo's `recompute_grad`) changes what the backward pass keeps: XLA's
own memory analysis of the compiled gradient shows the temporary memory drop as each policy
says (full keeps least, `none` most, the two partial policies in between)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from neo.config import parse_model_config
from neo.loss import lm_loss
from neo.model import GPT, init_params, layers

# Activations large against the weights, so what the policy keeps dominates the temporaries;
# scanned layers in their loop (the default above 12 layers: eight alone would be unrolled, and
# XLA:CPU keeps what remat recomputes in unrolled layers, docs/configs.md) and the blocked
# kernel, which long sequences get.
SHAPE = dict(n_embd=64, n_head=4, n_layer=8, n_ctx=128, n_vocab=128, attention_types=[[["global"], 8]],
             precision="bfloat16", attention_impl="blocked", scan_unroll=1)


@functools.lru_cache
def temp_bytes(policy: str, **keys) -> int:
    """Temporary bytes of the compiled (never run) loss gradient on one device."""
    cfg = parse_model_config({**SHAPE, **keys, "remat_policy": policy}).model
    model = GPT(cfg)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((4, cfg.n_ctx), jnp.int32)
    loss = lambda p, t: lm_loss(model.apply({"params": p}, t), t, 1e-4)[0]
    return jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_full_remat_keeps_far_less_than_none():
    assert temp_bytes("full") < 0.5 * temp_bytes("none"), (temp_bytes("full"), temp_bytes("none"))
    assert parse_model_config({**SHAPE, "recompute_grad": True}).model.remat == "full"  # GPT-Neo's key


def test_partial_policies_keep_more_than_full_and_less_than_none():
    for policy in ("save_dots", "save_attention_out"):
        assert temp_bytes("full") < temp_bytes(policy) < temp_bytes("none"), (policy, temp_bytes(policy))


@pytest.mark.parametrize("norm", [{}, {"norm": "rmsnorm"}, {"norm": "scalenorm"}, {"scalenorm": True}],
                         ids=["layernorm", "rmsnorm", "neox-scalenorm", "gpt-neo-scalenorm"])
def test_scanned_norms_keep_only_their_input(monkeypatch, norm):
    """With `none`, scanned layers keep what the backward pass reads in per-layer stacks, and XLA
    cannot recompute across the loop. A norm's own float32 intermediates ([tokens, embd]) are
    not among them (layers.recomputed_norm): it keeps its bfloat16 input and recomputes the
    rest. Plain autodiff of the same norms holds at least one float32 [tokens, embd] array more
    per norm (two norms a layer) in the compiled step."""
    kept = temp_bytes.__wrapped__("none", **norm)
    monkeypatch.setattr(layers, "recomputed_norm", lambda norm: norm)
    plain = temp_bytes.__wrapped__("none", **norm)
    one_array = 4 * SHAPE["n_ctx"] * SHAPE["n_embd"] * 4  # float32 [4 x n_ctx tokens, n_embd]
    assert plain - kept >= 2 * SHAPE["n_layer"] * one_array, (plain, kept)
