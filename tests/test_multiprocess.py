"""Real multi-process runs (2 processes x 4 CPU devices, gloo between them) against one process
with 8 devices: the same losses from tfrecords under a data-parallel and a mixed data/tensor
parallel layout, checkpoints that move between process counts and continue the uninterrupted
run, and --eval (lm-eval tasks + validation) and --predict with only process 0 writing and
printing; --new clears the run once. Partial launch settings are refused with the fix."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from neo.distributed import initialize, manual_settings
from neo.errors import NeoError
from tests.multiprocess_launch import ROOT, launch
from tests.test_data_pipeline import write_records

STEPS = 6
DP = ("x:8", "batch:x")
# The heads split over y, whose two halves are the two processes: each process holds every row.
MIXED = ("y:2,x:4", "batch:x,heads:y,vocab:y")


def byte_docs(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(32, 127, size=int(rng.integers(6, 20))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny byte-level model trained from a mixture of tfrecord datasets (chunks, and
    documents_random with stitch), with an eval split, dropout on."""
    root = tmp_path_factory.mktemp("multiprocess")
    (root / "dataset_configs").mkdir()
    for name, records in (("chunks", [np.arange(i, i + 17) % 95 + 32 for i in range(40)]),
                          ("docs", byte_docs(60, 0))):
        (root / name).mkdir()
        write_records(root / name / f"{name}_0", records[:len(records) // 2])
        write_records(root / name / f"{name}_1", records[len(records) // 2:])
        write_records(root / name / "val_0", byte_docs(8, 1) if name == "docs" else [np.arange(17) + 40] * 8)
        (root / "dataset_configs" / f"{name}.json").write_text(json.dumps({
            "n_vocab": 256, "path": str(root / name / f"{name}_*.tfrecords"),
            "eval_path": str(root / name / "val_*.tfrecords"), "eos_id": 10, "padding_id": 0,
            "tokenizer_path": "bytes", "minimum_size": 6}))
    (root / "model.json").write_text(json.dumps({
        "n_embd": 64, "n_head": 8, "n_layer": 2, "n_ctx": 16, "n_vocab": 256,
        "attention_types": [[["global", "local"], 1]], "local_attention_radius": 8,
        "train_batch_size": 8, "train_steps": STEPS, "iterations": 1, "lr": 1e-3, "warmup_steps": 2,
        "res_dropout": 0.1, "eval_steps": 1, "eval_batch_size": 8, "temperature": 0.0,
        "datasets": [["chunks", None, "chunks", 2.0], ["docs", 3, "documents_random", 1.0]]}))
    (root / "story.txt").write_text("Once upon a time there was a tiny model that learnt to count.\n")
    return root


def train(workdir, model_path, layout, processes, steps=STEPS, extra=()):
    args = [str(ROOT / "main.py"), "--model", str(workdir / "model.json"), "--steps_per_checkpoint", "3", *extra,
            "--set", f"model_path={json.dumps(str(model_path))}", "--set", f"train_steps={steps}",
            "--set", f"mesh_shape={json.dumps(layout[0])}", "--set", f"layout={json.dumps(layout[1])}"]
    results = launch(args, processes=processes, devices=8 // processes, cwd=workdir)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def records(model_path, kind="train"):
    lines = (Path(model_path) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def losses(model_path, steps):
    train = records(model_path)
    return [train[s]["loss"] for s in steps]


@pytest.fixture(scope="module")
def one_process(workdir):
    """The reference: one process with 8 devices, data parallel, straight to STEPS."""
    train(workdir, workdir / "one", DP, processes=1)
    return workdir / "one"


@pytest.fixture(scope="module")
def two_processes(workdir):
    """Two processes, data parallel (each reads half of every batch), to step 3."""
    results = train(workdir, workdir / "two", DP, processes=2, steps=3)
    return workdir / "two", results


def test_two_processes_give_the_losses_of_one(one_process, two_processes):
    path, results = two_processes
    np.testing.assert_allclose(losses(path, [1, 2, 3]), losses(one_process, [1, 2, 3]), rtol=2e-5, atol=0)
    for key in ("eval_loss", "eval_bits_per_byte"):  # bytes counted once per row, whoever holds it
        assert records(path, "eval")[3][key] == pytest.approx(records(one_process, "eval")[3][key], rel=2e-5)
    assert "step 3/3" in results[0].stdout and "step 3/3" not in results[1].stdout  # process 0 reports


def test_a_checkpoint_of_two_processes_continues_on_one(one_process, two_processes, workdir):
    resumed = workdir / "two_then_one"
    shutil.copytree(two_processes[0], resumed)
    train(workdir, resumed, DP, processes=1)
    np.testing.assert_allclose(losses(resumed, [4, 5, 6]), losses(one_process, [4, 5, 6]), rtol=2e-5, atol=0)


def test_a_checkpoint_of_one_process_continues_on_two_with_a_mixed_layout(one_process, workdir):
    """Saved by one process (data parallel), continued by two under data + tensor parallelism
    across the processes: the steps after the checkpoint give the uninterrupted run's losses."""
    resumed = workdir / "one_then_two"
    shutil.copytree(one_process, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    results = train(workdir, resumed, MIXED, processes=2)
    assert "resumed from checkpoint 3" in results[0].stdout
    np.testing.assert_allclose(losses(resumed, [4, 5, 6]), losses(one_process, [4, 5, 6]), rtol=2e-5, atol=0)
    assert records(resumed, "eval")[6]["eval_loss"] == pytest.approx(records(one_process, "eval")[6]["eval_loss"],
                                                                     rel=2e-5)


def test_new_under_two_processes_clears_once_and_starts_over(one_process, workdir):
    """--new on 2 processes sharing model_path: process 0 removes the old run while the other
    waits, then both train from scratch (the first loss of a fresh run, no resume)."""
    again = workdir / "again"
    shutil.copytree(one_process, again)
    results = train(workdir, again, DP, processes=2, steps=1, extra=("--new",))
    assert "removed 2 training checkpoint(s)" in results[0].stdout
    assert "removed" not in results[1].stdout and "resumed" not in results[0].stdout
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["1"]
    assert sorted(records(again)) == [1]
    np.testing.assert_allclose(losses(again, [1]), losses(one_process, [1]), rtol=2e-5, atol=0)


def test_eval_and_predict_under_two_processes(one_process, workdir):
    """--eval (an lm-eval task through neo's backend, then validation) and --predict: every
    process computes, process 0 alone prints and writes."""
    model = str(workdir / "model.json")
    path = json.dumps(str(one_process))
    results = launch([str(ROOT / "main.py"), "--model", model, "--set", f"model_path={path}", "--eval",
                      "--eval_tasks", "text_perplexity_local", "--eval_limit", "1"], cwd=workdir,
                     env={"NEO_TEXT_PATH": str(workdir / "story.txt")})
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "|text_perplexity_local|" in results[0].stdout and "eval at step 6: loss" in results[0].stdout
    assert "|text_perplexity_local|" not in results[1].stdout and "eval at step" not in results[1].stdout
    written = json.loads((one_process / "eval_nosacred_6.json").read_text())
    assert written["results"]["text_perplexity_local"]["bits_per_byte,none"] > 0
    validation = float(results[0].stdout.split("eval at step 6: loss ")[1].split()[0])
    assert validation == pytest.approx(records(one_process, "eval")[6]["eval_loss"], abs=1e-4)  # printed to 4 places

    results = launch([str(ROOT / "main.py"), "--model", model, "--set", f"model_path={path}", "--predict",
                      "--prompt", str(workdir / "story.txt"), "--max_new_tokens", "8"], cwd=workdir)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    samples = (one_process / "predictions_nosacred_6.txt").read_text()
    assert "SAMPLE 0" in samples and samples in results[0].stdout
    assert "SAMPLE" not in results[1].stdout


def test_partial_launch_settings_are_refused():
    env = {"JAX_COORDINATOR_ADDRESS": "host0:1234"}
    with pytest.raises(NeoError, match=r"JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                                       r"are not: a multi-process run needs all three"):
        initialize(env=env)
    with pytest.raises(NeoError, match="JAX_COORDINATOR_ADDRESS is not"):
        initialize(env={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(NeoError, match="an id in 0..count-1"):
        initialize(env={**env, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(NeoError, match="need host:port"):
        initialize(env={"JAX_COORDINATOR_ADDRESS": "host0", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    assert manual_settings({}) is None
    assert manual_settings({**env, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == ("host0:1234", 2, 1)
