"""--auto_layout: the memory estimate agrees with XLA's compiled train step, the ranking
prefers what fits and communicates least, and the command line prints a table and the lines
to paste, also when planning for devices that are not here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from neo.auto_layout import GiB, TOLERANCE, Target, candidates, estimate, rank, report
from neo.config import load_model_config, parse_model_config
from neo.mesh import make_layout
from neo.train import build

ROOT = Path(__file__).resolve().parent.parent

# scan_unroll 1: the layers loop as a deep model's do (two layers alone would be unrolled)
BASE = dict(n_embd=256, n_head=8, n_layer=2, n_ctx=256, n_vocab=2048, attention_types=[[["global"], 2]],
            train_batch_size=16, scan_unroll=1)
CASES = {
    "data": ({}, "x:8", "batch:x"),
    "data, loop unrolled": ({"scan_unroll": "full"}, "x:8", "batch:x"),
    "fsdp+microbatches": ({"tokens_per_mb_per_replica": 256}, "x:8", "batch:x,embd:x"),
    "fsdp+tensor": ({}, "x:4,y:2", "batch:x,embd:x,heads:y,intermediate_expanded:y,vocab:y"),
    "original embd split": ({}, "x:2,y:4", "batch:x,embd:y"),
    "data, remat full": ({"remat_policy": "full"}, "x:8", "batch:x"),
    "fsdp+tensor, remat save_dots": ({"remat_policy": "save_dots"}, "x:4,y:2",
                                     "batch:x,embd:x,heads:y,intermediate_expanded:y,vocab:y"),
    "experts+local+linear": ({"attention_types": ["local", "linear"], "local_attention_radius": 64, "moe_layers": [1],
                              "moe_params": {"moe_num_experts": 8, "moe_hidden_size": 512}, "scan_unroll": None}, "x:8",
                             "experts:x,batch:x"),
}


def compiled_bytes(cfg, mesh_shape, layout):
    """Peak bytes of one device in neo's real train step, from XLA's buffer assignment."""
    setup = build(cfg, make_layout(mesh_shape, layout))
    state = jax.eval_shape(setup.init)
    batch = jax.ShapeDtypeStruct((cfg.run.train_batch_size, cfg.model.n_ctx + 1), jnp.int32, sharding=setup.batch_sharding)
    m = setup.step.lower(state, batch).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_matches_the_compiled_train_step(name):
    extra, mesh_shape, layout = CASES[name]
    cfg = parse_model_config({**BASE, **extra})
    got = estimate(cfg, mesh_shape, layout, 8).memory
    want = compiled_bytes(cfg, mesh_shape, layout)
    assert abs(got / want - 1) <= TOLERANCE, f"estimate {got / 1e6:.1f} MB, compiled {want / 1e6:.1f} MB"


def test_estimate_parts_follow_the_layout():
    cfg = parse_model_config(BASE)
    data = estimate(cfg, "x:8", "batch:x", 8)
    fsdp = estimate(cfg, "x:8", "batch:x,embd:x", 8)
    assert data.params == pytest.approx(8 * fsdp.params, rel=0.01)  # every parameter has an embd dimension
    assert data.optimizer == 2 * data.params  # Adam's two moments
    assert fsdp.communication > data.communication  # gathering weights costs more than reducing grads
    assert data.activations_remat < data.activations
    one = estimate(cfg, "x:1", "batch:x", 1)
    assert one.activations == pytest.approx(8 * data.activations, rel=0.01)  # 8x the tokens per device


def test_ranking_prefers_what_fits_then_least_communication():
    cfg = load_model_config("gpt_neo_1.3B")
    ranked = rank(cfg, Target(8, 16 * GiB, "v3-8"))
    assert ranked[0].fits and all(e.memory <= 16 * GiB for e in ranked if e.fits)
    fitting = [e for e in ranked if e.fits]
    assert [e.communication for e in fitting] == sorted(e.communication for e in fitting)
    # 1.3B with Adam does not fit 16 GiB replicated: the winner shards the weights
    assert "embd:x" in ranked[0].layout or "heads:y" in ranked[0].layout
    # planning for a pod: data parallelism across 256 cores needs no weight sharding
    pod = rank(load_model_config("gpt_neo_125M"), Target(256, 16 * GiB, "v3-256"))
    assert pod[0].fits and pod[0].layout == "batch:x" and pod[0].mesh_shape == "x:256"


def test_mesh_search_covers_every_data_by_model_split():
    cfg = load_model_config("gpt_neo_125M")
    meshes = {m for m, _ in candidates(cfg, 8, None)}
    assert meshes == {"x:8", "x:4,y:2", "x:2,y:4"}  # 12 heads do not split 8 ways: no x:1,y:8
    assert {m for m, _ in candidates(cfg, 8, "x:2,y:4")} == {"x:2,y:4"}


def test_nothing_fits_is_said_plainly():
    cfg = load_model_config("gpt3_13B_256")
    text = report(cfg, Target(8, 16 * GiB, "v3-8"), rank(cfg, Target(8, 16 * GiB, "v3-8")))
    assert "Nothing fits" in text and "Paste" not in text


def run_main(*args):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_command_line_plans_a_pod_from_a_laptop():
    out = run_main("--model", "gpt3_XL_256_Pile", "--auto_layout_and_mesh_shape",
                   "--num_devices", "256", "--device_memory_gb", "16")
    assert out.returncode == 0, out.stderr
    assert "256 devices x 16.00 GiB" in out.stdout and "mesh_shape  layout" in out.stdout
    paste = out.stdout.split("Paste into the config:")[1]
    settings = json.loads("{" + paste.replace("\n", " ") + "}")
    assert settings["mesh_shape"].startswith("x:")
    # --auto_layout keeps the config's mesh (x:128,y:2)
    out = run_main("--model", "gpt3_XL_256_Pile", "--auto_layout", "--auto_layout_target", "tpu-v3-256")
    assert out.returncode == 0, out.stderr
    assert "x:128,y:2" in out.stdout
    out = run_main("--model", "gpt3_XL_256_Pile", "--auto_layout", "--auto_layout_target", "tpu-v3-8")
    assert out.returncode == 2 and "uses 256 devices but 8 are planned" in out.stderr
