"""A run killed at any moment and restarted produces exactly the losses of one never killed,
also with several steps per compiled call, a SIGTERM, or a kill during an asynchronous save;
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
# 4 steps per compiled call, a checkpoint after every call; the last call runs 2 steps
MULTI = ["iterations=4" if s == "iterations=1" else s for s in SETTINGS]


def command(model_path: Path, settings: list[str] = SETTINGS, every: int = 3) -> list[str]:
    args = [sys.executable, str(ROOT / "main.py"), "--model", "tiny", "--steps_per_checkpoint", str(every),
            "--set", f"model_path={json.dumps(str(model_path))}"]
    for s in settings:
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


@pytest.fixture(scope="module")
def multi_step_reference(tmp_path_factory) -> dict[int, float]:
    path = tmp_path_factory.mktemp("multi") / "uninterrupted"
    subprocess.run(command(path, MULTI, 4), env=ENV, check=True, capture_output=True, timeout=300)
    expected = losses(path)
    assert sorted(expected) == [4, 8, 12, 14]  # logged every `iterations` steps and at the end
    return expected


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step} (exit code {proc.poll()})")


def test_sigterm_in_a_multi_step_run_saves_at_the_end_of_the_call_and_resumes_exactly(tmp_path,
                                                                                       multi_step_reference):
    run = tmp_path / "preempted"
    proc = subprocess.Popen(command(run, MULTI, 4), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    wait_for_step(proc, run / "metrics.jsonl", 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0
    saved = int(out.split("SIGTERM: saved checkpoint ")[1].split(";")[0])
    assert saved in (4, 8, 12)  # a call is never cut: the checkpoint is at a call's end
    # saved and gone: no validation or sample after the last step, while the grace period runs out
    assert "eval |" not in out.split(f"step {saved}/14")[1] and "SAMPLE" not in out.split(f"step {saved}/14")[1]
    out = subprocess.run(command(run, MULTI, 4), env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resumed from checkpoint {saved}" in out.stdout
    assert losses(run) == multi_step_reference


SLOW_SAVE = """
import asyncio, pathlib, runpy, sys
from orbax.checkpoint._src.path import atomicity

commit = atomicity.AtomicRenameTemporaryPath.finalize
marker = pathlib.Path(sys.argv[1], "saving-8")

async def slow_commit(self, *args, **kwargs):
    # the save of step 8: its files are written; hold back the rename that commits them
    if self.get_final().name == "8":
        marker.write_text("")
        await asyncio.sleep(600)
    return await commit(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = slow_commit
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_an_asynchronous_save_keeps_the_previous_checkpoint(tmp_path, multi_step_reference):
    """Checkpoint 8 is still being saved (its commit held back in orbax's background thread)
    while training goes on to step 12; a SIGKILL then leaves checkpoint 4 intact and no
    checkpoint 8, and the rerun resumes from 4 and repeats the uninterrupted run exactly."""
    run = tmp_path / "killed"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(tmp_path), *command(run, MULTI, 4)[1:]],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(proc, run / "metrics.jsonl", 12)  # training went on past step 8...
    deadline = time.time() + 60
    while not (tmp_path / "saving-8").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "saving-8").exists(), "the save of step 8 never reached its commit"
    committed = lambda: sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert committed() == [4]  # ...while checkpoint 8 was still being saved
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed() == [4]
    out = subprocess.run(command(run, MULTI, 4), env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resumed from checkpoint 4" in out.stdout
    assert losses(run) == multi_step_reference


def test_resume_at_a_step_between_calls(tmp_path):
    """A run stopped at step 6 (train_steps 6: its last call runs 2 steps) and continued to 14
    takes calls of 2, 4, 4, 2 steps from there and computes what a run straight to 14 computes."""
    quiet = lambda _m: None
    layout = make_layout("", "", jax.devices()[:1])
    config = lambda path, steps: load_model_config("tiny", {"model_path": str(path), "train_steps": steps,
                                                             "iterations": 4, "res_dropout": 0.1})
    straight = fit(config(tmp_path / "straight", 14), layout, 8, log=quiet)
    fit(config(tmp_path / "stopped", 6), layout, 8, log=quiet)
    lines = []
    resumed = fit(config(tmp_path / "stopped", 14), layout, 8, log=lines.append)
    assert any(l.startswith("neo: resumed from checkpoint 6 ") for l in lines)
    assert [l.split()[2] for l in lines if l.startswith("neo: compiled")] == ["2", "4"]
    assert resumed["step"] == 14 and resumed["loss"] == straight["loss"]
    got = losses(tmp_path / "stopped")
    assert sorted(got) == [4, 6, 8, 12, 14]
    assert {s: got[s] for s in (4, 8, 12, 14)} == losses(tmp_path / "straight")
    assert not any("WARNING" in l for l in lines)


def test_resuming_with_another_seed_says_the_run_is_no_longer_the_same(tmp_path):
    layout = make_layout("", "", jax.devices()[:1])
    config = lambda steps, seed: load_model_config("tiny", {"model_path": str(tmp_path), "train_steps": steps,
                                                            "iterations": 2, "seed": seed})
    fit(config(2, 1), layout, 2, log=lambda _m: None)
    lines = []
    fit(config(4, 7), layout, 2, log=lines.append)
    assert [l for l in lines if "WARNING" in l] == [
        "neo: WARNING: seed 7, but checkpoint 2 was trained with seed 1: from here on the data order (within the "
        "current epoch: examples may repeat or be skipped) and dropout differ from the run being resumed; set "
        "seed 1 to continue it exactly."]


def test_steps_per_call_divides_iterations_and_the_checkpoint_interval():
    from neo.loop import STACK_BYTES, steps_per_call

    cfg = lambda **kw: load_model_config("tiny", {"iterations": 500, **kw})
    assert steps_per_call(cfg(), 5000, 8) == (500, "")
    k, why = steps_per_call(cfg(), 300, 8)
    assert k == 100 and "gcd of iterations 500 and steps_per_checkpoint 300" in why
    big = cfg(train_batch_size=256, n_ctx=2048)  # 2 MiB of tokens per step
    k, why = steps_per_call(big, 5000, 256)
    assert k == 125 and k * 256 * 2049 * 4 <= STACK_BYTES and "MiB" in why  # the largest divisor of 500 that fits
    assert steps_per_call(big, 5000, 256 // 64)[0] == 500  # a host that holds 1/64 of the rows


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
    """Divergence is simulated by poisoning the parameters after step 5, inside the compiled
    multi-step call (2 steps per call here: gcd of iterations 4 and steps_per_checkpoint 2): what
    is tested is the loop's reaction, which must not depend on how the NaN arose."""
    import jax.numpy as jnp

    import neo.train
    from neo.checkpoint import Checkpointer
    from neo.errors import NeoError

    real_train_step = neo.train._train_step

    def train_step_that_diverges(*args):
        step = real_train_step(*args)

        def poisoned(state, batch):
            bad = state.step == 5
            return step(state.replace(params=jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), state.params)),
                        batch)

        return poisoned

    monkeypatch.setattr(neo.train, "_train_step", train_step_that_diverges)
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
