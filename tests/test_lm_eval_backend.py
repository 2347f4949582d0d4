"""neo's lm-eval backend scores requests exactly as lm-eval's own `hf` backend scores the same
GPT-Neo, and works the ways lm-eval users run it: by name, from the command line, from
`main.py --eval`, offline."""

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
pytest.importorskip("accelerate")  # lm-eval's hf backend needs it

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from neo.checkpoint import save_params  # noqa: E402
from neo.config import parse_model_config  # noqa: E402
from neo.data.tokenizer import load_tokenizer  # noqa: E402
from neo.errors import NeoError  # noqa: E402
from neo.evaluate.backend import NeoLM, bucket  # noqa: E402
from neo.evaluate.harness import TASKS_DIR, resolve_tasks  # noqa: E402
from neo.mesh import make_layout  # noqa: E402
from neo.model import init_params  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_CTX = 64  # shorter than most LAMBADA passages in GPT-2 tokens: left truncation is exercised
LAMBADA_DOCS = 40


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir):
    """One random GPT-Neo with GPT-2's vocabulary as a neo checkpoint, and the same model exported
    to a Hugging Face folder (scripts/convert_hf.py export) loaded by lm-eval's hf backend."""
    from neo.convert.hf import export_hf

    root = tmp_path_factory.mktemp("parity")
    raw = {"n_vocab": 50257, "n_ctx": N_CTX, "n_embd": 32, "n_layer": 2, "n_head": 4,
           "attention_types": [[["global", "local"], 1]], "local_attention_radius": 8,
           "tokenizer_path": str(data_dir / "gpt2"), "eos_id": 50256,
           "model_path": str(root / "run")}
    cfg = parse_model_config(raw, "random-gpt-neo")
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: np.asarray(getattr(x, "value", x)), params, is_leaf=lambda x: hasattr(x, "value"))
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map_with_path(  # random norms and biases, not constants
        lambda path, x: x + 0.1 * rng.randn(*x.shape).astype(np.float32)
        if str(path[-1].key) in ("scale", "bias") else x, params)
    params["wte"] = params["wte"] * 40.0  # a peaked, input-dependent distribution instead of a near-uniform one
    save_params(cfg.run.model_path, params)
    hf = HFLM(pretrained=str(export_hf(cfg, str(root / "hf"), log=lambda s: None)), device="cpu",
              dtype="float32", batch_size=16)
    return {"cfg": cfg, "params": params, "hf": hf, "model": hf.model}


def task_manager(**metadata):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def evaluate(lm, task, tm, limit):
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, bootstrap_iters=0,
                                  log_samples=True)
    responses = [s["resps"][0][0] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
    return out["results"][task], responses


def test_lambada_scores_equal_the_hf_backend(models, data_dir):
    tm = task_manager(lambada_path=str(data_dir / "lambada_openai_test.jsonl"))
    neo = NeoLM(models["cfg"], params=models["params"], layout=make_layout("", ""), batch_size=16)
    ours, ours_req = evaluate(neo, "lambada_openai_local", tm, LAMBADA_DOCS)
    ref, ref_req = evaluate(models["hf"], "lambada_openai_local", tm, LAMBADA_DOCS)
    assert len(ours_req) == LAMBADA_DOCS
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours_req, ref_req))
    assert diff < 1e-4, diff
    assert [a[1] for a in ours_req] == [b[1] for b in ref_req]
    assert ours["acc,none"] == ref["acc,none"]
    assert ours["perplexity,none"] == pytest.approx(ref["perplexity,none"], rel=1e-5)
    # the subset really has passages longer than the context (cut from the left)
    tokenizer = load_tokenizer(models["cfg"].data.tokenizer_path)
    texts = [json.loads(line)["text"] for line in (data_dir / "lambada_openai_test.jsonl").open()][:LAMBADA_DOCS]
    assert sum(len(tokenizer.encode(t)) > N_CTX + 1 for t in texts) >= 5


def test_greedy_flags_and_empty_contexts_equal_the_hf_backend(models, data_dir):
    """Continuations that are (or are not) what greedy decoding produces: accuracy is not 0."""
    model = models["model"]
    tokenizer = load_tokenizer(models["cfg"].data.tokenizer_path)
    texts = [json.loads(line)["text"] for line in (data_dir / "lambada_openai_test.jsonl").open()][:12]
    requests = []
    for i, text in enumerate(texts):
        context = " ".join(text.split(" ")[:20])
        ids = tokenizer.encode(context)
        for _ in range(1 + i % 3):  # greedy continuations of 1-3 tokens
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        greedy = tokenizer.decode(ids)[len(context):]
        requests += [(context, greedy), (context, " the"), ("", text[:50])]
    instances = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(requests)]
    neo = NeoLM(models["cfg"], params=models["params"], layout=make_layout("", ""))
    ours = neo.loglikelihood(instances, disable_tqdm=True)
    ref = models["hf"].loglikelihood(instances, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in ref]
    assert 8 <= sum(g for _, g in ours) < len(ours)
    np.testing.assert_allclose([l for l, _ in ours], [l for l, _ in ref], atol=1e-4, rtol=1e-6)


def test_generations_equal_the_hf_backend(models, data_dir):
    """generate_until: greedy continuations cut at the `until` strings, as the hf backend's."""
    texts = [json.loads(line)["text"] for line in (data_dir / "lambada_openai_test.jsonl").open()][:10]
    kwargs = [{"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False},
              {"until": [" the"], "max_gen_toks": 6}]
    requests = [(" ".join(t.split(" ")[:5 + 3 * i]), kwargs[i % 2]) for i, t in enumerate(texts)]
    requests.append((texts[0] * 3, kwargs[0]))  # longer than the context: cut from the left
    instances = [Instance("generate_until", {}, args, i) for i, args in enumerate(requests)]
    neo = NeoLM(models["cfg"], params=models["params"], layout=make_layout("", ""), batch_size=4)
    ours = neo.generate_until(instances, disable_tqdm=True)
    ref = models["hf"].generate_until(instances, disable_tqdm=True)
    assert ours == ref
    assert sum(len(o) > 0 for o in ours) >= 6


def test_rolling_perplexity_equals_the_hf_backend(models, data_dir, tmp_path):
    text = (data_dir / "tinyshakespeare.txt").read_text()
    docs = [text[:40], text[1000:1900], text[5000:5300], text[9000:11500]]  # 1 to ~12 windows of 64 tokens
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tm = task_manager(text_path=str(path))
    neo = NeoLM(models["cfg"], params=models["params"], layout=make_layout("", ""), batch_size=8)
    ours, ours_req = evaluate(neo, "text_perplexity_local", tm, None)
    ref, ref_req = evaluate(models["hf"], "text_perplexity_local", tm, None)
    assert len(ours_req) == 4
    np.testing.assert_allclose(ours_req, ref_req, rtol=1e-6, atol=1e-4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours[metric] == pytest.approx(ref[metric], rel=1e-5)


def test_batches_are_padded_to_a_few_shapes():
    assert [bucket(n, 2048) for n in (1, 16, 17, 64, 65, 100, 129, 1500, 3000)] == [16, 16, 32, 64, 80, 112, 160, 1536, 2048]
    assert bucket(100, 64) == 64 and bucket(20, 64, multiple=3) == 33


# ----------------------------------------------------------------------------------------------
# A neo checkpoint evaluated by name, from lm-eval's command line and from main.py


@pytest.fixture
def checkpoint(tmp_path, tiny_config):
    """A byte-level tiny model saved as a neo checkpoint, and its config file."""
    raw = tiny_config(n_vocab=256, n_ctx=64, tokenizer_path="bytes", eos_id=10,
                      model_path=str(tmp_path / "run"), eval_tasks=["lambada"])
    cfg = parse_model_config(raw, "tiny")
    params = init_params(cfg.model, jax.random.PRNGKey(3))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    save_params(cfg.run.model_path, params, step=7)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(raw))
    return path


def test_registered_as_neo_and_loads_the_checkpoint(checkpoint, data_dir):
    assert lm_eval.api.registry.get_model("neo") is NeoLM
    from neo.evaluate import NeoLM as from_evaluate

    assert from_evaluate is NeoLM
    tm = task_manager(lambada_path=str(data_dir / "lambada_openai_test.jsonl"))
    out = lm_eval.simple_evaluate(model="neo", model_args=f"model={checkpoint}", tasks=["lambada_openai_local"],
                                  task_manager=tm, limit=4, bootstrap_iters=0, log_samples=False)
    assert out["results"]["lambada_openai_local"]["perplexity,none"] > 1
    assert out["config"]["model_revision"] == "step 7"


def test_scores_do_not_depend_on_batching_or_the_mesh(checkpoint, data_dir):
    texts = [json.loads(line)["text"] for line in (data_dir / "lambada_openai_test.jsonl").open()][:20]
    instances = [Instance("loglikelihood", {}, (t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]), i)
                 for i, t in enumerate(texts)]
    single = NeoLM(str(checkpoint), layout=make_layout("", "", jax.devices()[:1]),
                   batch_size=1).loglikelihood(instances, disable_tqdm=True)
    for mesh, layout, batch in [("x:8", "batch:x", 3), ("x:2,y:4", "batch:x,heads:y,vocab:y", None)]:
        lm = NeoLM(str(checkpoint), layout=make_layout(mesh, layout), batch_size=batch)
        sharded = lm.loglikelihood(instances, disable_tqdm=True)
        np.testing.assert_allclose([s[0] for s in sharded], [s[0] for s in single], atol=2e-5, rtol=0)
        assert [s[1] for s in sharded] == [s[1] for s in single]


def test_the_entry_point_and_package_data_name_what_exists():
    import importlib
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, name = meta["project"]["entry-points"]["lm_eval.models"]["neo"].split(":")
    assert getattr(importlib.import_module(module), name) is NeoLM
    for pattern in meta["tool"]["setuptools"]["package-data"]["neo"]:
        assert list((ROOT / "neo").glob(pattern)), pattern


def test_mistakes_are_explained(checkpoint):
    with pytest.raises(NeoError, match="needs a model"):
        NeoLM()
    with pytest.raises(NeoError, match="unknown key 'n_layers'"):
        NeoLM(str(checkpoint), n_layers=3)
    with pytest.raises(NeoError, match="batch_size 'big'"):
        NeoLM(str(checkpoint), batch_size="big")
    with pytest.raises(NeoError, match="did you mean lambada_openai_local"):
        resolve_tasks(["lambada_openai_locl"], log=lambda s: None)


def run(args, cwd, **env):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_lm_eval_command_line(checkpoint, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "To be, or not to be, that is the question."}\n{"text": "Words, words, words."}\n')
    out = run(["-m", "neo.lm_eval", "--model", "neo", "--model_args", f"model={checkpoint}",
               "--tasks", "text_perplexity_local", "--batch_size", "4", "--metadata", json.dumps({"text_path": str(docs)}),
               "--output_path", str(tmp_path / "results")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|text_perplexity_local|" in out.stdout and "bits_per_byte" in out.stdout
    (written,) = list((tmp_path / "results").rglob("results_*.json"))
    result = json.loads(written.read_text())["results"]["text_perplexity_local"]
    assert result["sample_len"] == 2 and 4 < result["bits_per_byte,none"] < 20  # ~8 for a random byte model


def test_main_eval_runs_the_configs_tasks_and_writes_results(checkpoint, tmp_path):
    out = run([str(ROOT / "main.py"), "--model", str(checkpoint), "--eval", "--eval_limit", "3"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|lambada_openai_local|" in out.stdout and "|acc" in out.stdout
    results = json.loads((tmp_path / "run" / "eval_nosacred_7.json").read_text())
    assert results["results"]["lambada_openai_local"]["acc,none"] >= 0

    out = run([str(ROOT / "main.py"), "--model", str(checkpoint), "--eval", "--eval_include_path", "nope"], tmp_path)
    assert out.returncode == 2 and "--eval_include_path nope: no such folder" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_builtin_task_reads_a_local_copy_of_its_data(checkpoint, data_dir, tmp_path):
    """docs/evaluation.md's recipe: include lm-eval's own task YAML, point its dataset at files."""
    from lm_eval.tasks import TaskManager

    builtin = Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lambada_openai_copy.yaml").write_text(
        f"include: {builtin}\ntask: lambada_openai_copy\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_dir / 'lambada_openai_test.jsonl'}\n")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    lm = NeoLM(str(checkpoint), batch_size=4)
    ours = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai_copy"], task_manager=tm, limit=6,
                                   bootstrap_iters=0, log_samples=False)["results"]["lambada_openai_copy"]
    local = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai_local"], task_manager=task_manager(
        lambada_path=str(data_dir / "lambada_openai_test.jsonl")), limit=6, bootstrap_iters=0,
        log_samples=False)["results"]["lambada_openai_local"]
    assert ours["perplexity,none"] == pytest.approx(local["perplexity,none"], rel=1e-9)


def test_registering_neo_keeps_lm_evals_own_backends(tmp_path):
    """lm-eval loads its built-in backends only into an empty registry: importing neo's backend
    first (as `python -m neo.lm_eval` and any script using NeoLM do) must leave `hf` there."""
    code = ("import neo.evaluate.backend\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('neo').__name__, get_model('hf').__name__, get_model('dummy').__name__)\n")
    out = run(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["NeoLM", "HFLM", "DummyLM"]
