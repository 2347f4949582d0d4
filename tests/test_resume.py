"""A run killed at any moment and restarted produces exactly the losses of one never killed;
checkpoints restore onto a different mesh; the record (metrics.jsonl) stays consistent."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from neo.config import load_model_config
from neo.loop import fit
from neo.mesh import make_layout
from tests.test_data_pipeline import model  # noqa: F401  (a fixture: tfrecord model configs)

ROOT = Path(__file__).resolve().parent.parent
# dropout on, so the resumed run must also repeat its random numbers
SETTINGS = ["train_steps=14", "iterations=1", "embed_dropout=0.1", "res_dropout=0.1", "attn_dropout=0.1",
            "eval_steps=1"]


def command(model_path: Path) -> list[str]:
    args = [sys.executable, str(ROOT / "main.py"), "--model", "tiny", "--steps_per_checkpoint", "3",
            "--set", f"model_path={json.dumps(str(model_path))}"]
    for s in SETTINGS:
        args += ["--set", s]
    return args


ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}


def losses(model_path: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (model_path / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    steps = [s for s, _ in train]
    assert steps == sorted(set(steps)), f"duplicate or out-of-order steps: {steps}"
    return dict(train)


def test_sigkill_at_any_moment_then_resume_gives_identical_losses(tmp_path):
    reference = tmp_path / "uninterrupted"
    subprocess.run(command(reference), env=ENV, check=True, capture_output=True, timeout=300)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 15))

    run = tmp_path / "killed"
    for kill_after_lines in (4, 9):  # kill twice, at different points between checkpoints
        proc = subprocess.Popen(command(run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_lines:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = subprocess.run(command(run), env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resumed from checkpoint" in out.stdout
    got = losses(run)
    assert got == expected  # bit-for-bit: same batches, same dropout masks, same updates
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [3, 6, 9, 12, 14]
    assert (run / "loss.png").stat().st_size > 1000
    assert list((run / "tensorboard").iterdir())


def test_restore_onto_a_different_mesh(tmp_path):
    def config(path, steps):
        return load_model_config("tiny", {"model_path": str(path), "train_steps": steps, "iterations": 1})

    quiet = lambda _msg: None
    full = fit(config(tmp_path / "a", 8), make_layout("x:8", "batch:x,embd:x"), 4, log=quiet)
    fit(config(tmp_path / "b", 4), make_layout("x:8", "batch:x,embd:x"), 4, log=quiet)  # saved on 8
    resumed = fit(config(tmp_path / "b", 8), make_layout("x:2,y:2", "batch:x,heads:y", jax.devices()[:4]), 4,
                  log=quiet)  # restored on 4 devices with another layout
    assert resumed["loss"] == pytest.approx(full["loss"], abs=1e-5)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Divergence is simulated by poisoning the parameters after step 5: what is tested is
    the loop's reaction, which must not depend on how the NaN arose."""
    import neo.loop
    from neo.checkpoint import Checkpointer
    from neo.errors import NeoError

    real_build = neo.loop.build

    def build_that_diverges(cfg, layout):
        setup = real_build(cfg, layout)
        step = setup.step

        def poisoned(state, batch):
            if int(state.step) == 5:
                state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
            return step(state, batch)

        setup.step = poisoned
        return setup

    monkeypatch.setattr(neo.loop, "build", build_that_diverges)
    cfg = load_model_config("tiny", {"model_path": str(tmp_path), "train_steps": 20, "iterations": 4})
    with pytest.raises(NeoError, match=r"at step 6: training diverged.*last good checkpoint is step 4"):
        fit(cfg, make_layout("", "", jax.devices()[:1]), 2, log=lambda _m: None)
    assert Checkpointer(str(tmp_path)).all_steps() == [2, 4]  # nothing saved after the divergence
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["loss"] == "nan"


def test_resume_with_mixed_tfrecord_datasets_repeats_the_data_exactly(tmp_path, model):
    """The checkpoint carries the tfrecord pipeline's position: stopping at step 5 and resuming
    gives the losses of the run that went straight to step 10 (epochs wrap in between)."""
    from tests.test_data_pipeline import dataset, doc_records

    dataset(tmp_path, "docs", [doc_records(9), doc_records(7, 9)])
    dataset(tmp_path, "chunks", [[list(range(i, i + 9)) for i in range(6)]])
    quiet = lambda _m: None
    layout = make_layout("x:2", "batch:x", jax.devices()[:2])
    entries = [["docs", 3, "documents_random", 2.0], ["chunks", None, "chunks", 1.0]]

    def run(path, steps):
        cfg = model(tmp_path, entries, model_path=str(path), train_steps=steps, iterations=1)
        return fit(cfg, layout, 3, log=quiet)

    run(tmp_path / "straight", 10)
    run(tmp_path / "stopped", 5)
    run(tmp_path / "stopped", 10)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
