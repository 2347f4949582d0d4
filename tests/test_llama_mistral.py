"""LLaMA and Mistral: logits and greedy tokens equal transformers' LlamaForCausalLM /
MistralForCausalLM (RMSNorm, SwiGLU, grouped-query attention, no biases, a sliding window),
HF folders round-trip bit-exactly through scripts/convert_hf.py, an imported model trains a
step and loads back into transformers, and the shipped 7B configs have the released sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from neo.config import load_model_config, neox_intermediate_size, parse_model_config  # noqa: E402
from neo.convert import llama  # noqa: E402
from neo.convert.hf import hf_to_neo, neo_to_hf, write_safetensors  # noqa: E402
from neo.errors import NeoError  # noqa: E402
from neo.mesh import make_layout, place, shardings_of  # noqa: E402
from neo.model import GPT, abstract_init, init_cache  # noqa: E402
from neo.predict import Sampler, SamplingOptions  # noqa: E402
from neo.train import TrainState, build, global_batch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 17, 33, 2, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def hf_model(family="llama", kv=2, bias=False, tie=False, window=6, theta=10000.0, seed=0, init=0.1):
    """A tiny random LLaMA or Mistral with every norm weight and bias randomised (HF starts
    them at constants)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie,
                  initializer_range=init, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        hfc = transformers.LlamaConfig(attention_bias=bias, mlp_bias=bias, **common)
        model = transformers.LlamaForCausalLM(hfc)
    else:
        hfc = transformers.MistralConfig(sliding_window=window, **common)
        model = transformers.MistralForCausalLM(hfc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hfc, model.eval()


def state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def neo_logits(cfg, params, tokens):
    return np.asarray(GPT(cfg.model).apply({"params": params}, jnp.asarray(tokens)))


@pytest.mark.parametrize("impl", ["blocked", "xla"])  # the flash kernel and the dense reference
@pytest.mark.parametrize("kw", [dict(kv=2), dict(kv=1, bias=True, tie=True, theta=500000.0), dict(kv=4)])
def test_llama_logits_match_transformers(kw, impl):
    hfc, model = hf_model("llama", **kw)
    raw, cfg, params = hf_to_neo(hfc.to_dict(), state_dict(model))
    assert cfg.model.norm_kind == "rmsnorm" and cfg.model.activation_fn == "swiglu"
    assert cfg.model.kv_heads == kw["kv"] and cfg.model.attn_out_bias == kw.get("bias", False)
    cfg = cfg.replace(attention_impl=impl)
    tokens = np.random.RandomState(1).randint(0, 101, (3, 40))
    np.testing.assert_allclose(neo_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["blocked", "xla"])
def test_mistral_sliding_window_logits_match_transformers(impl):
    hfc, model = hf_model("mistral", window=6)
    raw, cfg, params = hf_to_neo(hfc.to_dict(), state_dict(model))
    assert set(cfg.model.attention_types) == {"local"} and cfg.model.local_attention_radius == 6
    cfg = cfg.replace(attention_impl=impl)
    tokens = np.random.RandomState(2).randint(0, 101, (2, 37))  # far longer than the window
    np.testing.assert_allclose(neo_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)
    wide = hf_model("mistral", window=64)[1]  # the window matters: a wider one changes the logits
    wide.load_state_dict(model.state_dict())
    assert np.abs(hf_logits(wide, tokens) - hf_logits(model, tokens)).max() > 1e-3


def hf_greedy(model, prompt, n):
    """n greedy tokens, EOS included (min_new_tokens would forbid EOS instead)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family,kv", [("llama", 2), ("llama", 1), ("mistral", 2)])
def test_greedy_equals_transformers_generate(family, kv):
    """Left-padded prompts decoded with the KV cache, which holds only the kv heads; Mistral's
    window (6) is far shorter than the 30 generated tokens."""
    hfc, model = hf_model(family, kv=kv, init=0.2)  # sharper logits: no near-ties for argmax
    _, cfg, params = hf_to_neo(hfc.to_dict(), state_dict(model))
    assert jax.tree.leaves(init_cache(cfg.model, 1, 8))[0].shape[-3] == kv  # [(layers,) b, kv_heads, slots, d]
    layout = make_layout("", "", jax.devices()[:1])
    sampler = Sampler(cfg, jax.device_put(params, shardings_of(place(layout, abstract_init(cfg.model)))), layout)
    ours = sampler.generate(PROMPTS, SamplingOptions(temperature=0, max_new_tokens=30), eos_id=None)
    for prompt, row in zip(PROMPTS, ours):
        assert row == hf_greedy(model, prompt, 30)


def run_convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_import_then_export_is_lossless_and_loads_in_transformers(tmp_path, family):
    hfc, model = hf_model(family, bias=family == "llama")
    model.save_pretrained(tmp_path / "hf")
    out = run_convert("import", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "neo"))
    assert out.returncode == 0, out.stderr
    assert ("MistralForCausalLM" if family == "mistral" else "LlamaForCausalLM") in out.stdout
    out = run_convert("export", "--model", str(tmp_path / "neo" / "config.json"), "--output", str(tmp_path / "back"))
    assert out.returncode == 0, out.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(model)
    for key in ("num_key_value_heads", "intermediate_size", "rms_norm_eps", "hidden_act", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(model.config, key), key
    assert back.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    if family == "mistral":
        assert back.config.sliding_window == model.config.sliding_window
    original, exported = model.state_dict(), back.state_dict()
    assert set(original) == set(exported)
    for k in original:
        assert torch.equal(original[k], exported[k]), k  # bit-exact round trip
    tokens = np.random.RandomState(3).randint(0, 101, (2, 20))
    np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(model, tokens))


def test_imported_model_trains_a_step_and_loads_back_into_transformers(tmp_path):
    hfc, model = hf_model("mistral", kv=2)
    _, cfg, params = hf_to_neo(hfc.to_dict(), state_dict(model))
    cfg = cfg.replace(n_ctx=16, train_batch_size=4, lr=1e-2, train_steps=2)
    setup = build(cfg, make_layout("", "", jax.devices()[:1]))
    state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, setup.optimizer.init(params)),
                           setup.state_shardings)
    batch = np.random.RandomState(4).randint(0, 101, (4, 17)).astype(np.int32)
    state, metrics = setup.step(state, global_batch(setup, batch))
    assert np.isfinite(float(metrics["loss"]))
    trained = jax.device_get(state.params)
    hf_cfg, sd = neo_to_hf(cfg, trained)
    (tmp_path / "hf").mkdir()
    write_safetensors(sd, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_cfg))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back) is transformers.MistralForCausalLM
    tokens = batch[:, :16]
    ours = neo_logits(cfg, trained, tokens)
    np.testing.assert_allclose(hf_logits(back, tokens), ours, atol=1e-5, rtol=0)
    assert np.abs(ours - hf_logits(model, tokens)).max() > 1e-3  # the step changed the model


def param_count(cfg) -> int:
    leaves = jax.tree.leaves(abstract_init(cfg.model), is_leaf=lambda x: hasattr(x, "value"))
    return sum(int(np.prod(getattr(x, "value", x).shape)) for x in leaves)


@pytest.mark.parametrize("name,count,hf", [
    ("llama2_7b", 6_738_415_616, dict(intermediate_size=11008, num_key_value_heads=32, rope_theta=10000,
                                      rms_norm_eps=1e-5, vocab_size=32000)),
    ("mistral_7b", 7_241_732_096, dict(intermediate_size=14336, num_key_value_heads=8, sliding_window=4096,
                                       rope_theta=10000, rms_norm_eps=1e-5, vocab_size=32000)),
])
def test_shipped_7b_configs_have_the_released_shapes_and_sizes(name, count, hf):
    """Abstract init (nothing allocated) gives the released parameter count, and the HF config
    export would write the released config's fields."""
    cfg = load_model_config(name)
    assert param_count(cfg) == count
    fields = llama.config_to_hf(cfg)
    assert {k: fields[k] for k in hf} == hf
    assert llama.family(cfg.model) == name.split("_")[0].rstrip("2")


@pytest.mark.parametrize("neox,h,want", [(32768, 4096, 11008), (41472, 5120, 13824), (86016, 8192, 28672),
                                         (53248, 6656, 17920)])
def test_gpt_neox_intermediate_size_rule_gives_llamas_widths(neox, h, want):
    """GPT-NeoX's llama2 YAMLs give intermediate_size 3x-ish; its ParallelMLP rule (mlp_multiple_of
    256) lands on LLaMA's released widths, and neo's default gated width is LLaMA's own rule."""
    assert neox_intermediate_size(neox, h, gated=True, multiple_of=256) == want
    assert neox_intermediate_size(None, h, gated=False) == 4 * h
    if h in (4096, 5120):
        raw = dict(n_embd=h, n_head=32, n_layer=1, n_ctx=8, n_vocab=8, attention_types=[[["global"], 1]],
                   activation_fn="swiglu", mlp_multiple_of=256)
        assert parse_model_config(raw).model.intermediate_expanded == want


def test_export_refuses_what_llama_cannot_represent():
    base = dict(n_embd=32, n_head=4, n_layer=1, n_ctx=16, n_vocab=64, attention_types=[[["global"], 1]],
                pos_emb="rotary", norm="rmsnorm", use_bias_in_norms=False, activation_fn="swiglu",
                scale_attention=True, use_bias_in_attn_linear=False, use_bias_in_mlp=False)
    llama.config_to_hf(parse_model_config(base))  # representable
    for change, words in ((dict(rotary_pct=0.5), "rotary_pct"), (dict(activation_fn="gelu"), "ungated"),
                          (dict(parallel_residual=True), "parallel_residual"),
                          (dict(use_bias_in_norms=True), "use_bias_in_norms"),
                          (dict(pos_emb="alibi"), "pos_emb"),
                          (dict(attention_types=[[["local"], 1]], use_bias_in_mlp=True), "sliding-window")):
        with pytest.raises(NeoError, match=words):
            llama.config_to_hf(parse_model_config({**base, **change}))
