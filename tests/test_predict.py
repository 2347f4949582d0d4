"""Sampling with the KV cache: greedy tokens equal transformers' generate(), one compilation
serves many prompts and settings, sharded sampling equals unsharded, and `main.py --predict`
works on an imported Hugging Face model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from neo.convert.hf import hf_to_neo  # noqa: E402
from neo.errors import NeoError  # noqa: E402
from neo.mesh import make_layout, place, shardings_of  # noqa: E402
from neo.predict import PROMPT_SEPARATOR, Sampler, SamplingOptions, filter_logits, read_prompts  # noqa: E402
from neo.model import abstract_init  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 17, 33, 2, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def hf_model(family, parallel=True):
    torch.manual_seed(0)
    if family == "gpt_neo":  # window 8 < the 30+ tokens generated: local layers slide
        hfc = transformers.GPTNeoConfig(
            vocab_size=211, max_position_embeddings=64, hidden_size=48, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], window_size=8, initializer_range=0.2,
            bos_token_id=0, eos_token_id=0)
        model = transformers.GPTNeoForCausalLM(hfc)
    else:
        hfc = transformers.GPTNeoXConfig(
            vocab_size=203, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            rotary_pct=0.25, max_position_embeddings=64, use_parallel_residual=parallel,
            tie_word_embeddings=False, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        model = transformers.GPTNeoXForCausalLM(hfc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hfc, model.eval()


def neo_sampler(hfc, model, layout=None, on_trace=None):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    _, cfg, params = hf_to_neo(hfc.to_dict(), sd)
    layout = layout or make_layout("", "", jax.devices()[:1])
    shardings = shardings_of(place(layout, abstract_init(cfg.model)))
    return cfg, Sampler(cfg, jax.device_put(params, shardings), layout, on_trace)


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingOptions(temperature=0, max_new_tokens=30)


@pytest.mark.parametrize("family,parallel", [("gpt_neo", False), ("gpt_neox", True), ("gpt_neox", False)])
def test_greedy_batch_equals_transformers_generate_per_prompt(family, parallel):
    hfc, model = hf_model(family, parallel)
    _, sampler = neo_sampler(hfc, model)
    ours = sampler.generate(PROMPTS, GREEDY, eos_id=None)  # left-padded batch of three lengths
    for prompt, row in zip(PROMPTS, ours):
        assert row == hf_greedy(model, prompt, 30)


def test_rows_stop_at_eos_and_at_the_context_end():
    hfc, model = hf_model("gpt_neox")
    cfg, sampler = neo_sampler(hfc, model)
    ref = hf_greedy(model, PROMPTS[0], 30)
    k = next(i for i in range(3, 30) if ref[i] not in ref[:i])  # a token first produced at step k
    rows = sampler.generate(PROMPTS, GREEDY, eos_id=ref[k])
    assert rows[0] == ref[:k]  # EOS itself is not returned
    for prompt, row in zip(PROMPTS[1:], rows[1:]):
        full = hf_greedy(model, prompt, 30)
        assert row == (full[:full.index(ref[k])] if ref[k] in full else full)
    long = list(np.random.RandomState(0).randint(0, 203, cfg.model.n_ctx + 6))
    (row,) = sampler.generate([long], GREEDY)
    assert row == hf_greedy(model, long[-(cfg.model.n_ctx - 1):], 1)  # last n_ctx-1 tokens kept, room for one


def test_one_compilation_serves_prompt_lengths_and_settings():
    hfc, model = hf_model("gpt_neo")
    traces = []
    _, sampler = neo_sampler(hfc, model, on_trace=lambda: traces.append(1))
    sampler.generate([[1, 2, 3], [4, 5, 6, 7, 8]], SamplingOptions(temperature=0, max_new_tokens=10))
    sampler.generate([[9] * 7, [3, 1]], SamplingOptions(temperature=0.8, max_new_tokens=13, seed=4))
    sampler.generate([[2, 2], [6]], SamplingOptions(temperature=1.5, max_new_tokens=16, seed=5), eos_id=3)
    assert len(traces) == 1
    sampler.generate([[1] * 20, [2]], SamplingOptions(temperature=0, max_new_tokens=10))  # next bucket
    assert len(traces) == 2


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    hfc, model = hf_model("gpt_neox")
    _, sampler = neo_sampler(hfc, model)
    draw = lambda **kw: sampler.generate(PROMPTS, SamplingOptions(**{"max_new_tokens": 20, **kw}))
    a, b, c = draw(temperature=1.0, seed=1), draw(temperature=1.0, seed=1), draw(temperature=1.0, seed=2)
    assert a == b and a != c
    assert draw(temperature=1.0, top_k=1, seed=3) == draw(temperature=0)
    assert draw(temperature=1.0, top_p=1e-6, seed=3) == draw(temperature=0)


def test_top_k_and_top_p_keep_what_transformers_keeps():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.RandomState(0).randn(4, 300).astype(np.float32) * 3
    t = torch.tensor(logits)
    for k, p in [(5, 1.0), (0, 0.8), (0, 0.3), (40, 0.9)]:
        ref = t
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        ours = np.asarray(filter_logits(logits, np.int32(k), np.float32(p), k > 0, p < 1))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()))


def test_sharded_sampling_equals_one_device():
    assert len(jax.devices()) == 8
    hfc, model = hf_model("gpt_neox")
    _, single = neo_sampler(hfc, model)
    layout = make_layout("x:2,y:4", "batch:x,heads:y", jax.devices())
    _, sharded = neo_sampler(hfc, model, layout)
    opts = SamplingOptions(temperature=0, max_new_tokens=12)
    assert sharded.generate(PROMPTS, opts) == single.generate(PROMPTS, opts)  # 3 rows padded to 4


def test_prompt_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(f"First line\nsecond line\n{PROMPT_SEPARATOR}\nAnother prompt\n")
    assert read_prompts(str(f)) == ["First line\nsecond line", "Another prompt\n"]
    f.write_text("no separator: the whole file is one prompt <|endofprompt|> inside a line\n")
    assert len(read_prompts(str(f))) == 1
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b\nc"}) + "\n")
    assert read_prompts(str(j)) == ["a", "b\nc"]
    j.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(NeoError, match="line 1"):
        read_prompts(str(j))
    with pytest.raises(NeoError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(NeoError, match="top_p"):
        SamplingOptions(top_p=0).check()


def test_predict_command_on_an_imported_pythia_style_model(tmp_path, data_dir):
    hfc, model = hf_model("gpt_neox")
    hfc = transformers.GPTNeoXConfig(**{**hfc.to_dict(), "vocab_size": 50304, "hidden_size": 32,
                                        "intermediate_size": 64})
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(hfc).eval()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes((data_dir / "20B_tokenizer.json").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, env=env, timeout=300,
                                    cwd=tmp_path)
    out = run(str(ROOT / "scripts" / "convert_hf.py"), "import", "--input", "hf", "--output", "neo")
    assert out.returncode == 0, out.stderr
    prompts = ["The quick brown fox", "Once upon a time, in a land far away,"]
    (tmp_path / "prompts.txt").write_text(f"\n{PROMPT_SEPARATOR}\n".join(prompts))
    out = run(str(ROOT / "main.py"), "--model", "neo/config.json", "--predict", "--prompt", "prompts.txt",
              "--temperature", "0", "--max_new_tokens", "8")
    assert out.returncode == 0, out.stderr
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_dir / "20B_tokenizer.json"))
    for prompt in prompts:
        ids = tok.encode(prompt).ids
        ref = hf_greedy(model, ids, 8)
        ref = ref[:ref.index(0)] if 0 in ref else ref  # eos_id 0 ends a sample
        assert tok.decode(ids + ref) in out.stdout
    written = (tmp_path / "neo" / "predictions_nosacred_0.txt").read_text()
    assert written.count(" SAMPLE ") == 2 and written in out.stdout


def test_predict_explains_what_is_missing(tmp_path):
    from neo.config import parse_model_config
    from neo.predict import predict

    layout = make_layout("", "", jax.devices()[:1])
    raw = dict(n_embd=32, n_head=4, n_layer=1, n_ctx=16, n_vocab=256, attention_types=[[["global"], 1]])
    opts = SamplingOptions()
    with pytest.raises(NeoError, match="no tokenizer for --predict"):
        predict(parse_model_config({**raw, "model_path": str(tmp_path)}), layout, "", opts)
    with pytest.raises(NeoError, match="no checkpoint in"):
        predict(parse_model_config({**raw, "model_path": str(tmp_path), "tokenizer_path": "bytes"}), layout, "", opts)
