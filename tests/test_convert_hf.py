"""Hugging Face interop: GPT-NeoX logits parity, lossless import/export of both families through
real HF folders, and weight loading that never unpickles code."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from neo.config import load_model_config, parse_model_config  # noqa: E402
from neo.convert import gpt_neox  # noqa: E402
from neo.convert.hf import export_hf, import_hf, read_hf_weights, read_safetensors, write_safetensors  # noqa: E402
from neo.errors import NeoError  # noqa: E402
from neo.model import GPT, abstract_init, as_model_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def randomise(model, seed=0):
    """HF initialises biases and norms to constants; randomise them so every weight is tested."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_neox(parallel=True, act="gelu", tie=False, bias=True, vocab=203, seed=0):
    torch.manual_seed(seed)
    hfc = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        hidden_act=act, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=64,
        use_parallel_residual=parallel, tie_word_embeddings=tie, attention_bias=bias, initializer_range=0.1,
        bos_token_id=0, eos_token_id=0)
    return hfc, randomise(transformers.GPTNeoXForCausalLM(hfc), seed)


def hf_gpt_neo(seed=0):
    torch.manual_seed(seed)
    hfc = transformers.GPTNeoConfig(
        vocab_size=211, max_position_embeddings=64, hidden_size=48, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=0, eos_token_id=0)
    return hfc, randomise(transformers.GPTNeoForCausalLM(hfc), seed)


def state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("parallel,act", [(True, "gelu"), (False, "gelu_fast"), (True, "gelu_fast")])
def test_gpt_neox_logits_match_transformers(parallel, act):
    hfc, model = hf_neox(parallel, act)
    cfg = parse_model_config(gpt_neox.config_from_hf(hfc.to_dict()), "hf")
    assert cfg.model.rotary_pct == 0.25 and cfg.model.parallel_residual == parallel
    assert cfg.model.activation_fn == ("gelu_exact" if act == "gelu" else "gelu")
    params = as_model_tree(cfg.model, gpt_neox.params_from_hf(state_dict(model), cfg.model))
    tokens = np.random.RandomState(1).randint(0, 203, (2, 40))
    ref = logits(model, tokens)
    out = np.asarray(GPT(cfg.model).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(ref).max() > 1  # a test that could fail: logits are not all ~0
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_gpt_neox_tied_head_without_attention_bias():
    hfc, model = hf_neox(tie=True, bias=False)
    cfg = parse_model_config(gpt_neox.config_from_hf(hfc.to_dict()), "hf")
    assert not cfg.model.no_weight_tie and not cfg.model.qkv_bias
    params = gpt_neox.params_from_hf(state_dict(model), cfg.model)
    tokens = np.random.RandomState(2).randint(0, 203, (2, 17))
    out = np.asarray(GPT(cfg.model).apply({"params": as_model_tree(cfg.model, params)}, jnp.asarray(tokens)))
    np.testing.assert_allclose(out, logits(model, tokens), atol=2e-5, rtol=0)
    assert gpt_neox.config_to_hf(cfg, params)["attention_bias"] is False  # all output biases still zero


def run_convert(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("family", ["gpt_neo", "gpt_neox"])
def test_import_then_export_is_lossless_and_loads_in_transformers(tmp_path, family):
    hfc, model = hf_gpt_neo() if family == "gpt_neo" else hf_neox()
    model.save_pretrained(tmp_path / "hf")
    out = run_convert("import", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "neo"))
    assert out.returncode == 0, out.stderr
    cfg = load_model_config(str(tmp_path / "neo" / "config.json"))
    assert Path(cfg.run.model_path) == tmp_path / "neo"
    out = run_convert("export", "--model", str(tmp_path / "neo" / "config.json"), "--output", str(tmp_path / "back"))
    assert out.returncode == 0, out.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(model)
    original, exported = model.state_dict(), back.state_dict()
    assert set(original) == set(exported)
    for k in original:
        assert torch.equal(original[k], exported[k]), k  # bit-exact round trip
    tokens = np.random.RandomState(3).randint(0, hfc.vocab_size, (2, 12))
    np.testing.assert_array_equal(logits(back, tokens), logits(model, tokens))


def test_import_refuses_to_overwrite_and_names_unknown_families(tmp_path):
    hfc, model = hf_neox()
    model.save_pretrained(tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "neo"), log=lambda s: None)
    with pytest.raises(NeoError, match="already holds checkpoints"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "neo"), log=lambda s: None)
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "bloom"}))
    with pytest.raises(NeoError, match="not one neo converts"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "other"), log=lambda s: None)
    with pytest.raises(NeoError, match="not a folder, and not a hub id"):
        import_hf(str(tmp_path / "missing"), str(tmp_path / "other"), log=lambda s: None)


def test_bfloat16_safetensors_and_pytorch_bin_weights_read(tmp_path):
    hfc, model = hf_neox()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    sd = read_hf_weights(tmp_path / "bf16")
    ref = {k: v.float().numpy() for k, v in model.state_dict().items()}
    ref["embed_out.weight"] = ref["lm_head.weight"]  # the name on disk (transformers 5 renames it)
    assert set(sd) <= set(ref) and len(sd) == len(ref) - 1
    assert all(np.array_equal(np.asarray(sd[k], np.float32), ref[k]) for k in sd)
    (tmp_path / "bin").mkdir()
    torch.save(model.float().state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    sd = read_hf_weights(tmp_path / "bin")
    assert all(np.array_equal(sd[k], ref[k]) for k in sd)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pytorch_files_are_never_unpickled_as_code(tmp_path):
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Exploit()}, f)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(NeoError, match="weights-only"):
            read_hf_weights(tmp_path / "evil")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "pwned").exists()


def test_large_exports_are_sharded_with_an_index(tmp_path):
    rng = np.random.RandomState(0)
    sd = {f"w{i}": rng.randn(64, 64).astype(np.float32) for i in range(5)}
    write_safetensors(sd, tmp_path, max_shard_bytes=3 * 64 * 64 * 4)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    back = read_hf_weights(tmp_path)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
    assert set(read_safetensors(tmp_path / "model-00002-of-00002.safetensors")) == {"w3", "w4"}


def test_export_refuses_what_hf_cannot_represent(tmp_path):
    cfg = parse_model_config(dict(n_embd=32, n_head=4, n_layer=1, n_ctx=16, n_vocab=64,
                                  attention_types=[[["global"], 1]], rotary_emb=True, model_path=str(tmp_path)))
    with pytest.raises(NeoError, match="scale_attention"):
        gpt_neox.config_to_hf(cfg, {})
    with pytest.raises(NeoError, match="no checkpoint"):
        export_hf(cfg, str(tmp_path / "out"), log=lambda s: None)


@pytest.mark.parametrize("name,count", [("pythia_70m", 70_426_624), ("pythia_1b", 1_011_781_632),
                                        ("pythia_12b", 11_846_072_320), ("gpt_neox_20b", 20_554_567_680)])
def test_shipped_gpt_neox_configs_have_the_released_sizes(name, count):
    import jax

    cfg = load_model_config(name)
    shapes = abstract_init(cfg.model)
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "value"))
    assert sum(int(np.prod(getattr(x, "value", x).shape)) for x in leaves) == count
    hf = gpt_neox.config_to_hf(cfg, {})  # no parameters needed: q/k/v biases decide attention_bias
    assert hf["hidden_act"] == ("gelu_fast" if name == "gpt_neox_20b" else "gelu") and hf["rotary_pct"] == 0.25
