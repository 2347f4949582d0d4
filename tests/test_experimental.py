"""GPT-Neo's experimental options compute what they say: axial position embeddings, GLU MLP,
ScaleNorm, ReZero, macaron, the activation list, untied head, init scaling, rotary
embeddings, shared parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import parse_model_config
from neo.model import GPT, init_params, per_layer
from neo.model.activations import ACTIVATIONS, PARAMETRIC, Activation
from neo.model.attention import Attention, rotary
from neo.model.gpt import MLP, Block, LayerSpec
from neo.model.layers import LayerNorm, ScaleNorm

RNG = np.random.RandomState(0)
TOKENS = jnp.asarray(RNG.randint(0, 128, (2, 16)))


def unbox(tree):
    return jax.tree.map(lambda x: getattr(x, "value", x), tree, is_leaf=lambda x: hasattr(x, "value"))


def init(cfg, seed=0):
    return unbox(init_params(cfg.model, jax.random.PRNGKey(seed)))


def test_axial_position_embedding_is_the_mean_of_two_tables(tiny_config):
    cfg = parse_model_config(tiny_config(axial_pos_emb=[4, 9]))  # 36 >= n_ctx 32
    params = init(cfg)
    a1, a2 = params["axial_wpe_1"], params["axial_wpe_2"]
    assert a1.shape == (4, 64) and a2.shape == (9, 64) and "wpe" not in params
    table = np.array([(a1[p // 9] + a2[p % 9]) / 2 for p in range(32)])
    plain = parse_model_config(tiny_config())
    ref_params = {**{k: v for k, v in params.items() if not k.startswith("axial")}, "wpe": table}
    np.testing.assert_allclose(GPT(cfg.model).apply({"params": params}, TOKENS),
                               GPT(plain.model).apply({"params": ref_params}, TOKENS), atol=1e-6)


def test_glu_mlp_gates_one_half_by_the_activation_of_the_other(tiny_config):
    cfg = parse_model_config(tiny_config(mlp_glu=True))
    x = jnp.asarray(RNG.randn(2, 5, 64).astype(np.float32))
    params = unbox(MLP(cfg.model).init(jax.random.PRNGKey(0), x, deterministic=True)["params"])
    w = params["c_fc"]["kernel"]
    assert w.shape == (64, 2, 256)  # the original's 8 x n_embd, as two halves
    hg = jnp.einsum("btd,dkf->btkf", x, w) + params["c_fc"]["bias"]
    h = hg[..., 0, :] * jax.nn.gelu(hg[..., 1, :], approximate=True)
    ref = h @ params["c_proj"]["kernel"] + params["c_proj"]["bias"]
    np.testing.assert_allclose(MLP(cfg.model).apply({"params": params}, x, deterministic=True), ref, atol=1e-5)


def test_scalenorm_normalises_with_one_scalar_gain(tiny_config):
    x = jnp.asarray(RNG.randn(3, 64).astype(np.float32) * 3 + 1)
    params = {"scale": jnp.float32(1.7)}
    centred = x - x.mean(-1, keepdims=True)
    ref = 1.7 * centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ScaleNorm().apply({"params": params}, x), ref, rtol=1e-5)
    cfg = parse_model_config(tiny_config(scalenorm=True))
    assert init(cfg)["h_0"]["ln_1"]["scale"].shape == ()
    assert init(cfg)["ln_f"]["scale"].shape == (64,)  # the final norm stays a LayerNorm, as in GPT-Neo


def test_rezero_blocks_start_as_identity_and_scale_unnormalised_branches(tiny_config):
    cfg = parse_model_config(tiny_config(rezero=True))
    params = init(cfg)
    assert "ln_1" not in params["h_0"] and params["h_0"]["rezero_1"] == 0
    emb = params["wte"][TOKENS] + params["wpe"][jnp.arange(16)]
    at_init = LayerNorm().apply({"params": params["ln_f"]}, emb) @ params["wte"].T
    np.testing.assert_allclose(GPT(cfg.model).apply({"params": params}, TOKENS), at_init, atol=1e-5)
    # with gates g1, g2: x + g1 * Attn(x); x + g2 * MLP(x) -- no pre-norm
    block = {**params["h_0"], "rezero_1": jnp.float32(0.5), "rezero_2": jnp.float32(-2.0)}
    x = jnp.asarray(RNG.randn(2, 16, 64).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    out, _ = Block(cfg.model).apply({"params": block}, x, pos, spec=LayerSpec("global"))
    a, _ = Attention(cfg.model, "global").apply({"params": block["attn"]}, x, pos)
    h = x + 0.5 * a
    ref = h - 2.0 * MLP(cfg.model).apply({"params": block["mlp"]}, h, deterministic=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_macaron_adds_a_half_step_mlp_before_attention_and_halves_the_main_mlp(tiny_config):
    cfg = parse_model_config(tiny_config(macaron=True))
    block = init(cfg)["h_0"]
    x = jnp.asarray(RNG.randn(2, 16, 64).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    out, _ = Block(cfg.model).apply({"params": block}, x, pos, spec=LayerSpec("global"))
    ln = lambda name, h: LayerNorm().apply({"params": block[name]}, h)
    mlp = lambda name, h: MLP(cfg.model).apply({"params": block[name]}, h, deterministic=True)
    h = x + 0.5 * mlp("mlp_macaron", ln("ln_macaron", x))
    h = h + Attention(cfg.model, "global").apply({"params": block["attn"]}, ln("ln_1", h), pos)[0]
    ref = h + 0.5 * mlp("mlp", ln("ln_2", h))
    np.testing.assert_allclose(out, ref, atol=1e-5)


# The original's formulas (GPT-Neo models/activations.py), written out independently with numpy.
_sp = lambda x: np.log1p(np.exp(x))
_sig = lambda x: 1 / (1 + np.exp(-x))
_ln2 = math.log(2)
REFERENCE = {
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0), "sigmoid": _sig, "tanh": np.tanh,
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)), "abs": np.abs, "sin": np.sin, "cos": np.cos,
    "sign": np.sign, "silu": lambda x: x * _sig(x), "softplus": _sp,
    "lrelu001": lambda x: np.where(x > 0, x, 0.01 * x), "lrelu020": lambda x: np.where(x > 0, x, 0.2 * x),
    "id": lambda x: x,
    "triangle_relax": lambda x: np.sin(x) - np.sin(3 * x) / 9 + np.sin(5 * x) / 25 - np.sin(7 * x) / 49,
    "square_relax": lambda x: np.cos(x) - np.cos(3 * x) / 3 + np.cos(5 * x) / 5 - np.cos(7 * x) / 7,
    "spike": lambda x: 1 / (1 + x ** 2), "spike2": lambda x: np.exp(-x ** 2),
    "tanhshrink": lambda x: x - np.tanh(x), "softsign": lambda x: x / (np.abs(x) + 1),
    "softmax": lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True),
    "logsoftmax": lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True)),
    "bipolarsigmoid": lambda x: 2 * _sig(x) - 1,
    "rrelu": lambda x: np.where(x > 0, x, (1 / 8 + 1 / 3) / 2 * x),
    "elish": lambda x: np.where(x >= 0, x * _sig(x), (np.exp(x) - 1) * _sig(x)),
    "arcsinh": lambda x: np.log(x + np.sqrt(1 + x ** 2)),
    "maxsig": lambda x: np.maximum(x, _sig(x)), "cosid": lambda x: np.cos(x) - x,
    "minsin": lambda x: np.minimum(x, np.sin(x)), "maxtanh": lambda x: np.maximum(x, np.tanh(x)),
    "mish": lambda x: x * np.tanh(_sp(x)), "tanhexp": lambda x: x * np.tanh(np.exp(x)),
    "lisht": lambda x: x * np.tanh(x), "seagull": lambda x: np.log(1 + x ** 2),
    "snake": lambda x: x + np.sin(x) ** 2, "roottanh": lambda x: np.cbrt(x ** 2 + 1) * np.tanh(x),
    "softplusmone": lambda x: _sp(x) - 1,
    # with learned scalars, at their initial values
    "aria": lambda x: x * (0 + 1 / (_ln2 + 1 * np.exp(-1 * x) ** (1 / (1 + _ln2)))),
    "prelu": lambda x: np.where(x > 0, x, 0.2 * x),
    "parcsinh": lambda x: np.arcsinh(x * (1 + _ln2)),
    "psoftplus": lambda x: _sp(x),
    "proottanh": lambda x: (np.abs(x) ** (2 + _ln2) + 1 + _ln2) ** (1 / (3 + _ln2)) * np.tanh(x),
}


def test_the_originals_activation_list_is_complete_and_computes_its_formulas():
    aliases = {"gelu_new", "gelu_fast", "gelu_tanh", "gelu_exact", "swish"}  # neo's extra names
    assert set(ACTIVATIONS) | set(PARAMETRIC) == set(REFERENCE) | aliases
    x = np.linspace(-4, 4, 41).astype(np.float32).reshape(1, 41)
    for name, ref in REFERENCE.items():
        layer = Activation(name)
        params = layer.init(jax.random.PRNGKey(0), x)
        got = np.asarray(layer.apply(params, x))
        np.testing.assert_allclose(got, ref(x.astype(np.float64)), rtol=2e-5, atol=2e-6, err_msg=name)
        assert bool(params) == (name in PARAMETRIC), name


def test_exact_gelu_and_its_gradient_are_the_erf_formula():
    """gelu_exact (Pythia's "gelu") against float64's 0.5x(1 + erf(x/sqrt(2))) and its
    derivative, tails included (neo writes it with erf, not jax.nn.gelu's erfc)."""
    x = np.linspace(-12, 12, 481).astype(np.float32)
    xd = x.astype(np.float64)
    erf = np.vectorize(math.erf)(xd / math.sqrt(2))
    ref = 0.5 * xd * (1 + erf)
    dref = 0.5 * (1 + erf) + xd * np.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)
    got, grad = jax.vmap(jax.value_and_grad(ACTIVATIONS["gelu_exact"]))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), dref, rtol=1e-6, atol=2e-6)


def test_fixed_activations_stay_finite_where_the_original_broke():
    x = jnp.asarray([-100.0, -3.0, 0.0, 3.0, 100.0])
    for name in ("elish", "proottanh", "arcsinh"):
        layer = Activation(name)
        params = layer.init(jax.random.PRNGKey(0), x)
        grads = jax.grad(lambda v: layer.apply(params, v).sum())(x)
        assert np.isfinite(layer.apply(params, x)).all() and np.isfinite(grads).all(), name


def test_untied_head_replaces_the_embedding_in_the_output_only(tiny_config):
    cfg = parse_model_config(tiny_config(no_weight_tie=True))
    params = init(cfg)
    assert params["lm_head"].shape == (64, 128) and "ln_f" in params
    tied = {k: v for k, v in params.items() if k != "lm_head"}
    untied_as_tied = {**params, "lm_head": params["wte"].T}
    np.testing.assert_allclose(GPT(cfg.model).apply({"params": untied_as_tied}, TOKENS),
                               GPT(parse_model_config(tiny_config()).model).apply({"params": tied}, TOKENS), atol=1e-6)


@pytest.mark.parametrize("depth, fan_in", [(False, True), (True, True)])
def test_init_scaling_by_depth_and_fan_in(depth, fan_in):
    d, layers = 256, 4
    cfg = parse_model_config(dict(n_embd=d, n_head=4, n_layer=layers, n_ctx=8, n_vocab=64,
                                  attention_types=[[["global"], layers]], scale_by_depth=depth, scale_by_in=fan_in))
    mlp = per_layer(init(cfg))["h_0"]["mlp"]
    std = lambda w: float(np.std(np.asarray(w)))
    assert std(mlp["c_fc"]["kernel"]) == pytest.approx(0.02 / math.sqrt(d), rel=0.05)
    expect = 0.02 / math.sqrt(4 * d) / (math.sqrt(layers) if depth else 1)
    assert std(mlp["c_proj"]["kernel"]) == pytest.approx(expect, rel=0.05)
    q = per_layer(init(cfg))["h_0"]["attn"]["q"]["kernel"]  # attention initialisers are not affected
    assert std(q) == pytest.approx(d ** -0.5 * (d // 4) ** -0.5, rel=0.05)


def test_rotary_rotates_feature_pairs_by_position_times_frequency():
    x = RNG.randn(1, 5, 2, 8).astype(np.float32)
    pos = np.array([[0, 1, 2, 7, 30]])
    out = np.asarray(rotary(jnp.asarray(x), jnp.asarray(pos), 6, 10000.0))
    ref = x.copy()
    for i in range(3):  # pairs (i, i + 3) of the first 6 features; features 6, 7 pass through
        theta = pos[0][:, None] * 10000.0 ** (-2 * i / 6)
        a, b = x[0, :, :, i], x[0, :, :, i + 3]
        ref[0, :, :, i] = a * np.cos(theta) - b * np.sin(theta)
        ref[0, :, :, i + 3] = b * np.cos(theta) + a * np.sin(theta)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_rotary_attention_sees_only_relative_positions(tiny_config):
    cfg = parse_model_config(tiny_config(rotary_emb=True, attention_types=[[["global"], 2]]))
    params = init(cfg)
    assert "wpe" not in params
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    a = GPT(cfg.model).apply({"params": params}, TOKENS, pos)
    b = GPT(cfg.model).apply({"params": params}, TOKENS, pos + 11)
    np.testing.assert_allclose(a, b, atol=2e-4)
    learned = parse_model_config(tiny_config(attention_types=[[["global"], 2]]))
    lp = init(learned)
    assert np.abs(GPT(learned.model).apply({"params": lp}, TOKENS, pos) - GPT(learned.model).apply({"params": lp}, TOKENS, pos + 11)).max() > 1e-3


def test_shared_parameters_apply_one_block_at_every_layer(tiny_config):
    cfg = parse_model_config(tiny_config(share_parameters=True, n_layer=3,
                                         attention_types=[[["global", "local", "global"], 1]]))
    params = init(cfg)
    assert [k for k in params if k.startswith("h_")] == ["h_0"]
    x = params["wte"][TOKENS] + params["wpe"][jnp.arange(16)]
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    for kind in cfg.model.attention_types:
        x, _ = Block(cfg.model).apply({"params": params["h_0"]}, x, pos, spec=LayerSpec(kind))
    ref = LayerNorm().apply({"params": params["ln_f"]}, x) @ params["wte"].T
    np.testing.assert_allclose(GPT(cfg.model).apply({"params": params}, TOKENS), ref, atol=1e-5)
