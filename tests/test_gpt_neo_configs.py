"""GPT-Neo's own configs, byte for byte (tests/fixtures/gpt-neo/: the repository's configs/ at its
closing commit, three from its history, and the configs its Colab notebook writes), with their
own dataset_configs/ beside them: each loads unchanged, reports its parameter count, plans with
--auto_layout on its own mesh (its own layout evaluated and marked), and trains on 8 CPU devices
with its architecture shrunk (width, depth, context, batch, mesh) and its data pointed at local
GPT-2 tfrecords (its gs:// paths cannot be read here); its layout string, attention pattern,
precision, remat, vocabulary, special ids and sampling mode are kept."""

import json
import math
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from neo.auto_layout import GiB, Target, parameter_count, rank, report
from neo.config import CONFIG_DIR, load_model_config
from neo.mesh import UnknownAxisWarning, make_layout, parse_mesh_shape
from neo.train import build, global_batch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "gpt-neo"
CONFIGS = sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("*/*.json"))
HEAD = sorted(p.name for p in (FIXTURES / "configs").glob("*.json"))
# Released GPT-Neo sizes (Hugging Face's EleutherAI/gpt-neo-1.3B and -2.7B): heads do not change a count
RELEASED = {"configs/gpt3_XL_256_Pile.json": 1_315_575_808, "history/GPT3_XL_pretrained.json": 1_315_575_808,
            "colab/GPT3_XL.json": 1_315_575_808, "configs/gpt3_2-7B_256.json": 2_651_307_520,
            "history/GPT3_2-7B_pretrained.json": 2_651_307_520, "colab/GPT3_2-7B.colab.json": 2_651_307_520}


def load(name, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownAxisWarning)  # colab/GPT3_XL.json's vocab:n_vocab (tested below)
        return load_model_config(str(FIXTURES / name), overrides or None)


def gpt_neo_count(cfg) -> int:
    """GPT-Neo's parameters from its shapes: tied embedding, learned positions, per layer LN1 +
    q/k/v/o (+ o bias) when it has attention, LN2 + MLP with biases, final LN."""
    d, f = cfg.model.n_embd, cfg.model.intermediate_expanded
    attn = 4 * d * d + d + 2 * d
    mlp = 2 * d * f + f + d + 2 * d
    layers = sum((attn if k != "none" else 0) + mlp for k in cfg.model.attention_types)
    return cfg.model.n_vocab * d + cfg.model.n_ctx * d + layers + 2 * d


def test_the_fixtures_are_the_original_files_and_configs_ships_them_unchanged():
    assert len(HEAD) == 10 and len(CONFIGS) == 20
    for name in HEAD:  # neo's configs/ holds the original's closing-commit configs byte for byte
        assert (CONFIG_DIR / name).read_bytes() == (FIXTURES / "configs" / name).read_bytes(), name
    for path in (FIXTURES / "configs" / "dataset_configs").glob("*.json"):
        assert (CONFIG_DIR / "dataset_configs" / path.name).read_bytes() == path.read_bytes(), path.name
    pile = json.loads((CONFIG_DIR / "dataset_configs" / "pile.json").read_text())
    assert (pile["n_vocab"], pile["eos_id"], pile["padding_id"]) == (50257, 50256, 50257)


@pytest.mark.parametrize("name", CONFIGS)
def test_loads_unchanged_and_reports_its_parameter_count(name):
    cfg = load(name)
    raw = json.loads((FIXTURES / name).read_text())
    assert (cfg.model.n_embd, cfg.model.n_layer, cfg.model.n_vocab) == (raw["n_embd"], raw["n_layer"], raw["n_vocab"])
    assert cfg.data.padding_id == 50257 and cfg.data.eos_id == 50256  # padding past the 50,257-token vocabulary
    count = parameter_count(cfg)
    assert count == gpt_neo_count(cfg)
    if name in RELEASED:
        assert count == RELEASED[name]


@pytest.mark.parametrize("name", CONFIGS)
def test_plans_on_its_own_mesh_with_its_own_layout_first_and_marked(name):
    cfg = load(name)
    n = math.prod(s for _, s in parse_mesh_shape(cfg.run.mesh_shape, 1))
    target = Target(n, 16 * GiB, f"{n} x 16 GiB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownAxisWarning)
        ranked = rank(cfg, target, cfg.run.mesh_shape)
    own = [e for e in ranked if e.own]
    assert len(own) == 1 and (own[0].mesh_shape, own[0].layout) == (cfg.run.mesh_shape, cfg.run.layout)
    text = report(cfg, target, ranked, mesh_shape=cfg.run.mesh_shape)
    assert "* the config's own mesh_shape and layout" in text and f"  {cfg.run.layout}  " in text


def test_the_13B_config_plans_and_a_layout_that_cannot_split_names_the_dimension_and_axis():
    """The issue's case: 40 heads do not split 16 ways, yet the config's own layout (which
    leaves heads whole) is valid and is ranked; a layout that splits heads is refused naming
    heads and mesh axis y."""
    cfg = load("configs/gpt3_13B_256.json")
    target = Target(256, 16 * GiB, "v3-256")
    ranked = rank(cfg, target, cfg.run.mesh_shape)
    assert ranked[0].own or any(e.own for e in ranked)
    bad = cfg.replace(layout="batch:x,heads:y")
    text = report(bad, target, [e for e in rank(bad, target, bad.run.mesh_shape) if e.own], mesh_shape="x:16,y:16")
    assert "heads (40) does not split over mesh axis 'y' (16)" in text


def shrink(cfg, dataset_json: str) -> dict:
    """Overrides that keep the config's kind of model on 8 CPU devices: 64 wide, 4 heads, one
    repeat of its attention pattern, 64 tokens of context, batch 8, its mesh axes shrunk to
    8 devices (the first axis takes what the others leave), microbatches of the same number of
    sequences, its data replaced by local tfrecords (its datasets entry's stitch, sampling mode
    and weight kept)."""
    axes = parse_mesh_shape(cfg.run.mesh_shape, 1)
    rest = [min(s, 4) for _, s in axes[1:]]
    if math.prod(rest) > 4:
        rest = [2] * len(rest)
    mesh = ",".join(f"{a}:{s}" for (a, _), s in zip(axes, [8 // math.prod(rest)] + rest))
    raw = json.loads(Path(cfg.source).read_text())
    pattern = [[kinds, 1] for kinds, _ in raw["attention_types"]]
    entry = cfg.data.datasets[0]
    out = {"n_embd": 64, "n_head": 4, "n_ctx": 64, "local_attention_radius": 16, "attention_types": pattern,
           "n_layer": sum(len(k) for k, _ in pattern), "train_batch_size": 8, "mesh_shape": mesh,
           "datasets": [[dataset_json, entry.stitch, entry.sampling_mode, entry.weight]]}
    if cfg.run.tokens_per_mb_per_replica:
        out["tokens_per_mb_per_replica"] = cfg.run.tokens_per_mb_per_replica // cfg.model.n_ctx * 64
    return out


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """tinyshakespeare's speeches as GPT-2 tfrecords: documents (for documents_*) and chunks of
    65 tokens (for chunks), made by create_tfrecords with GPT-2's BPE."""
    from neo.data.prep.create_tfrecords import Options, create_tfrecords

    tmp = tmp_path_factory.mktemp("gpt2data")
    speeches = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:150_000].split("\n\n")
    (tmp / "in").mkdir()
    (tmp / "in" / "speeches.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    for mode in ("documents", "chunks"):
        create_tfrecords(Options(input_dir=str(tmp / "in"), output_dir=str(tmp / mode), name=mode, mode=mode,
                                 chunk_size=64, minimum_size=1, processes=1, progress=False), log=lambda *a: None)
    return tmp


# What a shrunk run depends on: configs that agree on these train the same way, so one of each
# group trains (the Colab variants differ only in datasets and evaluation; 2.7B and 6.7B only in width).
SETUP_KEYS = ("attention_types", "mesh_shape", "layout", "precision", "recompute_grad", "tokens_per_mb_per_replica",
              "n_ctx", "n_vocab", "embed_dropout", "attn_dropout", "res_dropout", "activation_function",
              "scale_by_depth", "scale_by_in", "opt_name")


def setup_key(name: str) -> str:
    raw = json.loads((FIXTURES / name).read_text())
    entry = raw["datasets"][0]
    entry = [entry, None, None, None] if isinstance(entry, str) else entry
    return json.dumps([{k: raw.get(k) for k in SETUP_KEYS}, entry[1:]], sort_keys=True)


GROUPS: dict[str, list[str]] = {}
for _name in CONFIGS:
    GROUPS.setdefault(setup_key(_name), []).append(_name)


@pytest.mark.parametrize("group", list(GROUPS.values()), ids=lambda g: " = ".join(g))
def test_trains_with_its_architecture_shrunk_to_cpu_size(group, local_data, tmp_path):
    from neo.data import make_source

    name = group[0]
    cfg = load(name)
    ds = json.loads((Path(cfg.data.datasets[0].config.source) / f"{cfg.data.datasets[0].id}.json").read_text())
    kind = "documents" if (cfg.data.datasets[0].sampling_mode or "chunks") != "chunks" else "chunks"
    ds.update(path=str(local_data / kind / "*.tfrecords"), eval_path="")  # its own ids and tokenizer kept
    (tmp_path / "data.json").write_text(json.dumps(ds))
    small = load(name, **shrink(cfg, str(tmp_path / "data.json")))
    assert small.model.precision == cfg.model.precision and small.model.recompute_grad == cfg.model.recompute_grad
    assert small.run.layout == cfg.run.layout and small.data.padding_id == 50257
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownAxisWarning)
        setup = build(small, make_layout(small.run.mesh_shape, small.run.layout))
    source = make_source(small)
    state = setup.init()
    losses = []
    for _ in range(2):
        state, metrics = setup.step(state, global_batch(setup, next(source)))
        losses.append(float(jax.device_get(metrics["loss"])))
    assert int(state.step) == 2 and all(np.isfinite(losses)) and abs(losses[0] - math.log(small.model.n_vocab)) < 1.0
