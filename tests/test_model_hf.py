"""The network computes what transformers' GPTNeoForCausalLM computes, on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from neo.config import expand_attention_types, parse_model_config  # noqa: E402
from neo.convert.gpt_neo import config_from_hf, params_from_hf  # noqa: E402
from neo.model import GPT, as_model_tree, init_params, per_layer  # noqa: E402
from neo.model.attention_op import attend, blocked, visible  # noqa: E402


def hf_gpt_neo(attention_types, window, seed=0, **kw):
    torch.manual_seed(seed)
    hfc = transformers.GPTNeoConfig(
        vocab_size=211, max_position_embeddings=96, hidden_size=48,
        num_layers=len(expand_attention_types(attention_types)),
        num_heads=4, attention_types=attention_types, window_size=window, embed_dropout=0.0,
        resid_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, **kw)
    model = transformers.GPTNeoForCausalLM(hfc).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants; randomise them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hfc, model


def neo_from_hf(hfc, model):
    cfg = parse_model_config(config_from_hf(hfc.to_dict()), "hf")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, as_model_tree(cfg.model, params_from_hf(sd, cfg.model.n_layer, cfg.model.n_head))


@pytest.mark.parametrize("seq", [20, 90])  # 90 > 2 * window: the blocked local-attention path
def test_logits_match_transformers(seq):
    hfc, model = hf_gpt_neo([[["global", "local"], 2]], window=8)
    cfg, params = neo_from_hf(hfc, model)
    tokens = np.random.RandomState(1).randint(0, 211, (3, seq))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    out = np.asarray(GPT(cfg.model).apply({"params": params}, jnp.asarray(tokens)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_local_only_stack_and_exact_gelu():
    hfc, model = hf_gpt_neo([[["local"], 2]], window=5, activation_function="gelu")
    cfg, params = neo_from_hf(hfc, model)
    assert cfg.model.activation_fn == "gelu_exact"
    tokens = np.random.RandomState(2).randint(0, 211, (2, 33))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    out = np.asarray(GPT(cfg.model).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_blocked_local_attention_equals_dense_mask():
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(2, 37, 3, 8).astype(np.float32)) for _ in range(3))
    slots = jnp.arange(37)
    dense = attend(q, k, v, visible(slots, slots, causal=True, window=6)[None, None], 1.0)
    np.testing.assert_allclose(blocked(q, k, v, causal=True, window=6, scale=1.0), dense, atol=1e-6)


def test_window_includes_the_current_token():
    m = np.asarray(visible(jnp.arange(6), jnp.arange(6), causal=True, window=3))
    assert m[5].tolist() == [False, False, False, True, True, True]  # keys 3, 4, 5: R keys incl. self
    assert not m[0, 1]


def test_bfloat16_forward_stays_close_to_float32():
    hfc, model = hf_gpt_neo([[["global", "local"], 2]], window=8)
    cfg, params = neo_from_hf(hfc, model)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 211, (2, 24)))
    f32 = GPT(cfg.model).apply({"params": params}, tokens)
    bf16 = GPT(cfg.replace(precision="bfloat16").model).apply({"params": params}, tokens)
    assert bf16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    err = float(jnp.abs(bf16 - f32).max()) / float(jnp.abs(f32).max())
    assert 0 < err < 0.05


def test_initialisation_follows_mesh_tensorflow():
    cfg = parse_model_config(dict(n_embd=256, n_head=4, n_layer=4, n_ctx=64, n_vocab=1000,
                                  attention_types=[[["global"], 4]], scale_by_depth=True))
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    params = per_layer(jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")))
    std = lambda x: float(np.std(np.asarray(x)))
    d, dh = 256, 64
    assert std(params["wte"]) == pytest.approx(0.02, rel=0.05)
    assert std(params["wpe"]) == pytest.approx(0.01, rel=0.05)
    attn = params["h_0"]["attn"]
    assert std(attn["q"]["kernel"]) == pytest.approx(d ** -0.5 * dh ** -0.5, rel=0.05)
    assert std(attn["k"]["kernel"]) == pytest.approx(d ** -0.5, rel=0.05)
    assert std(params["h_0"]["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert std(params["h_0"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(0.02 / 2, rel=0.05)  # 1/sqrt(4 layers)
    assert "bias" not in attn["q"] and np.all(np.asarray(attn["o"]["bias"]) == 0)
