"""GPT-NeoX's architecture options without a transformers twin (ALiBi, sinusoidal positions,
ScaleNorm, GeGLU/ReGLU, grouped/multi-query heads, bias-free layers, with and without a norm
bias) equal a plain numpy forward pass written here from GPT-NeoX's definitions; ALiBi's bias
is right in every attention kernel, forward and backward, and under sequence and head sharding
8 devices train as 1 does; every bad option value gets its one-line error."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import parse_model_config
from neo.errors import NeoError
from neo.mesh import make_layout
from neo.model import GPT, init_params, per_layer
from neo.model import attention_op
from neo.model.attention import alibi_slopes
from neo.model.attention_op import dot_product_attention
from neo.train import build, global_batch

# ----------------------------------------------------------------------------------------------
# The numpy reference (GPT-NeoX megatron/model: norms.py, positional_embeddings.py,
# transformer.py), sequential pre-norm residual, scaled attention


def ref_slopes(n):
    """ALiBi's slopes from the paper's recipe: 2^(-8i/n) for a power of two n; otherwise the
    lower power of two c's slopes and the odd-numbered slopes of 2c."""
    c = 2 ** int(math.log2(n))
    return np.array([2 ** (-8 * (i + 1) / c) for i in range(c)]
                    + [2 ** (-8 * (i + 1) / (2 * c)) for i in range(0, 2 * c, 2)][: n - c])


def ref_norm(kind, p, x, eps):
    if kind == "layernorm":
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"]
    elif kind == "rmsnorm":
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"]
    else:  # GPT-NeoX ScaleNorm: x / max(||x||, eps) * g
        y = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


ACT = {
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "geglu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),
    "reglu": lambda x: np.maximum(x, 0),
    "swiglu": lambda x: x / (1 + np.exp(-x)),
}


def ref_attention(p, x, m, kind):
    t, (d, h, kv) = x.shape[0], (m.n_embd, m.n_head, m.kv_heads)
    dh = d // h
    proj = lambda name, heads: (x @ p[name]["kernel"].reshape(d, heads * dh)
                                + p[name].get("bias", np.zeros((heads, dh))).reshape(-1)).reshape(t, heads, dh)
    q, k, v = proj("q", h), np.repeat(proj("k", kv), h // kv, 1), np.repeat(proj("v", kv), h // kv, 1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    if m.position_embedding == "alibi":
        scores = scores - ref_slopes(h)[:, None, None] * (i - j)
    seen = (j <= i) & ((i - j < m.local_attention_radius) if kind == "local" else True)
    scores = np.where(seen, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(t, h * dh)
    return out @ p["o"]["kernel"].reshape(h * dh, d) + p["o"].get("bias", 0)


def ref_mlp(p, x, act):
    if act == "gelu":
        fc = x @ p["c_fc"]["kernel"] + p["c_fc"].get("bias", 0)
        hidden = ACT[act](fc)
    else:  # gated: half 0 is the value, half 1 the gate
        fc = np.einsum("td,dgf->tgf", x, p["c_fc"]["kernel"]) + p["c_fc"].get("bias", 0)
        hidden = fc[:, 0] * ACT[act](fc[:, 1])
    return hidden @ p["c_proj"]["kernel"] + p["c_proj"].get("bias", 0)


def ref_forward(params, m, tokens, eps):
    p = per_layer(params)
    x = p["wte"][tokens]
    t, d = tokens.shape[0], m.n_embd
    if m.position_embedding == "sinusoidal":
        angle = np.arange(t)[:, None] / 10000 ** (np.arange(0, d, 2) / d)
        x = x + np.concatenate([np.sin(angle), np.cos(angle)], -1)
    for i, kind in enumerate(m.attention_types):
        blk = p[f"h_{i}"]
        x = x + ref_attention(blk["attn"], ref_norm(m.norm_kind, blk["ln_1"], x, eps), m, kind)
        x = x + ref_mlp(blk["mlp"], ref_norm(m.norm_kind, blk["ln_2"], x, eps), m.activation_fn)
    return ref_norm(m.norm_kind, p["ln_f"], x, eps) @ p["wte"].T


OPTIONS = {
    "alibi_gqa_6_heads_layernorm_without_bias": dict(pos_emb="alibi", n_head=6, num_kv_heads=3,
                                                     use_bias_in_norms=False, activation_fn="gelu"),
    "sinusoidal_scalenorm_geglu_no_mlp_bias": dict(pos_emb="sinusoidal", norm="scalenorm", scalenorm_epsilon=1e-5,
                                                   activation_fn="geglu", use_bias_in_mlp=False, n_head=4),
    "none_rmsnorm_with_bias_reglu_mqa_no_attn_bias": dict(pos_emb="none", norm="rmsnorm", rms_norm_epsilon=1e-5,
                                                          activation_fn="reglu", num_kv_heads=1, n_head=4,
                                                          use_bias_in_attn_linear=False),
    "alibi_swiglu_rmsnorm_8_heads": dict(pos_emb="alibi", norm="rmsnorm", rms_norm_epsilon=1e-5,
                                         activation_fn="swiglu", mlp_multiple_of=16, n_head=8, num_kv_heads=2),
}


@pytest.mark.parametrize("impl", ["xla", "blocked", "dot_product"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_equal_the_numpy_reference(name, impl, monkeypatch):
    monkeypatch.setattr(attention_op, "BLOCK", 8)  # several query/key blocks in `blocked`
    raw = dict(n_embd=48, n_layer=2, n_ctx=32, n_vocab=97, attention_types=[[["global", "local"], 1]],
               local_attention_radius=5, scale_attention=True, no_weight_tie=False, attention_impl=impl,
               **OPTIONS[name])
    m = parse_model_config(raw).model
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda a: np.asarray(a) + np.asarray(0.1 * rng.randn(*np.shape(a)), np.float32),
                          nn.meta.unbox(init_params(m, jax.random.PRNGKey(0))))  # gains and biases away from 1, 0
    tokens = rng.randint(0, 97, (2, 27))
    ours = np.asarray(GPT(m).apply({"params": params}, jnp.asarray(tokens)))
    as64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    for row, toks in zip(ours, tokens):
        np.testing.assert_allclose(row, ref_forward(as64, m, toks, 1e-5), atol=2e-5, rtol=0)


def test_alibi_slopes_are_gpt_neoxs():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(12), [2.0 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5,
                                                                                       2 ** -2.5, 2 ** -3.5])
    for n in (1, 3, 5, 6, 16, 20, 40):
        np.testing.assert_allclose(alibi_slopes(n), ref_slopes(n), rtol=1e-6)


@pytest.mark.parametrize("window", [None, 6])
def test_alibi_gradients_agree_across_kernels(window, monkeypatch):
    """The blocked kernel's hand-written backward includes the bias."""
    monkeypatch.setattr(attention_op, "BLOCK", 8)
    rng = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rng.randn(2, 30, 4, 8), jnp.float32) for _ in range(3))
    slopes = alibi_slopes(4)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, causal=True, window=window,
                                                                      scale=8 ** -0.5, alibi=slopes, impl=impl)))

    ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for impl in ("blocked", "dot_product"):
        np.testing.assert_allclose(loss(impl)(q, k, v), loss("xla")(q, k, v), rtol=1e-5)
        for a, b in zip(jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v), ref):
            np.testing.assert_allclose(a, b, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# 8 devices == 1 device


def train(cfg, batch, mesh_shape, layout, devices=None):
    setup = build(cfg, make_layout(mesh_shape, layout, devices))
    state = setup.init()
    for _ in range(2):
        state, metrics = setup.step(state, global_batch(setup, batch))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("layout", [("x:2,y:4", "batch:x,sequence:y,embd:y"),
                                    ("x:2,y:4", "batch:x,heads:y,intermediate_expanded:y")])
def test_alibi_gqa_model_trains_the_same_on_eight_devices(tiny_config, layout, monkeypatch):
    monkeypatch.setattr(attention_op, "BLOCK", 8)  # the sequence of 32 is 4 blocks, split over y
    cfg = parse_model_config(tiny_config(pos_emb="alibi", num_kv_heads=4, norm="rmsnorm", activation_fn="swiglu",
                                         scale_attention=True, use_bias_in_attn_linear=False, mlp_multiple_of=8,
                                         attention_impl="blocked"))
    batch = np.random.RandomState(0).randint(0, 128, (8, 33)).astype(np.int32)
    ref_params, ref = train(cfg, batch, "", "", jax.devices()[:1])
    params, metrics = train(cfg, batch, *layout)
    assert abs(metrics["loss"] - ref["loss"]) < 5e-6  # float32 sums in another order: a few ulps of 4.85
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, ref_params)
    assert max(jax.tree.leaves(diffs)) < 3e-6, diffs


# ----------------------------------------------------------------------------------------------
# Bad values


BAD = [
    (dict(pos_emb="alibbi"), "'pos_emb' must be one of learned, rotary, alibi, sinusoidal, none"),
    (dict(norm="batchnorm"), "'norm' must be one of layernorm, rmsnorm, scalenorm"),
    (dict(rotary_emb=True, pos_emb="alibi"), "rotary_emb is true but pos_emb is 'alibi'"),
    (dict(axial_pos_emb=[4, 8], pos_emb="sinusoidal"), "axial_pos_emb is a learned position table"),
    (dict(pos_emb="alibi", num_mem_kv=2), "num_mem_kv memory slots have no position"),
    (dict(pos_emb="alibi", attention_types=[[["global", "linear"], 1]]), "linear attention layers have none"),
    (dict(scalenorm=True, norm="rmsnorm"), "scalenorm flag and 'norm'"),
    (dict(rms_norm_epsilon=1e-6), "'rms_norm_epsilon' is set but norm is 'layernorm'"),
    (dict(norm="rmsnorm", scalenorm_epsilon=1e-6), "'scalenorm_epsilon' is set but norm is 'rmsnorm'"),
    (dict(num_kv_heads=3), r"'num_kv_heads' \(3\) must divide n_head \(8\)"),
    (dict(num_kv_heads=2, attention_types=[[["global", "linear"], 1]]), "linear layers have one key/value head"),
    (dict(qkv_bias=True, use_bias_in_attn_linear=False), "qkv_bias is true but use_bias_in_attn_linear is false"),
    (dict(mlp_glu=True, activation_fn="swiglu"), "'swiglu' is already gated; drop mlp_glu"),
    (dict(mlp_multiple_of=0), "'mlp_multiple_of' must be >= 1"),
    (dict(intermediate_size=0), "'intermediate_size' must be a positive integer"),
    (dict(norm="rmsnorm", rms_norm_epsilon=0), "'rms_norm_epsilon' must be a finite number > 0"),
    (dict(activation_fn="swigelu"), "unknown activation_fn 'swigelu'"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_option_values_get_one_line_errors(tiny_config, change, message):
    with pytest.raises(NeoError, match=message) as e:
        parse_model_config(tiny_config(**change), "cfg.json")
    assert "\n" not in str(e.value) and "cfg.json" in str(e.value)
