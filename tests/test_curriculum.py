"""Sequence-length curriculum (GPT-NeoX's `curriculum_learning`): DeepSpeed's schedule, rows cut
from the unchanged data stream, one compilation per length, exact resume, bad values refused."""

import json
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import neo.loop
from neo.config import load_model_config, parse_model_config, to_json_dict
from neo.curriculum import lengths, seq_len, summary
from neo.errors import NeoError
from neo.loop import fit
from neo.mesh import make_layout
from tests.test_resume import ENV, command, losses


def curriculum(min_difficulty=16, total=8, step=16, **extra) -> dict:
    schedule = {"total_curriculum_step": total, "difficulty_step": step, **extra.pop("schedule", {})}
    return {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": min_difficulty, "max_difficulty": 64,
            "schedule_type": "fixed_linear", "schedule_config": schedule, **extra}


def tiny(**keys):
    return load_model_config("tiny", {"iterations": 1, "train_steps": 10, **keys})


def test_schedule_is_deepspeeds_fixed_linear_and_fixed_root():
    # fixed_linear, min 16, max 64, 8 steps, multiples of 16: step s trains at
    # floor(16 + 48 (s + 1) / 8) rounded down to 16: 22 28 34 40 46 52 58 64 -> 16 16 32 32 32 48 48 64
    cfg = tiny(curriculum_learning=curriculum())
    assert [seq_len(cfg, s) for s in range(10)] == [16, 16, 32, 32, 32, 48, 48, 64, 64, 64]
    assert lengths(cfg) == [16, 32, 48, 64]
    # the length changes only at multiples of iterations: a block trains at its first step's length
    blocks = tiny(curriculum_learning=curriculum(), iterations=3, train_steps=12)
    assert [seq_len(blocks, s) for s in range(12)] == [16] * 3 + [32] * 3 + [48] * 3 + [64] * 3
    # fixed_root, degree 2, 16 steps, min 8, step 8: floor(8 + 56 sqrt((s + 1) / 16)) -> 22 36 50 64
    root = tiny(n_ctx=64, train_steps=20, curriculum_learning=curriculum(
        8, 16, 8, schedule_type="fixed_root", schedule={"root_degree": 2}))
    assert [seq_len(root, s) for s in (0, 3, 8, 15)] == [16, 32, 48, 64]
    long = tiny(n_ctx=2048, train_steps=30000, curriculum_learning=curriculum(
        64, 20000, 8, max_difficulty=2048))
    assert len(lengths(long)) == 249 and lengths(long)[-1] == 2048  # 64, 72, ..., 2048
    assert summary(long, 0) == ("neo: curriculum: rows cut to 64 tokens at step 0; lengths 64, 72, 80, ..., 2048 "
                                "(249 lengths) (n_ctx from step 19999)")
    off = tiny(curriculum_learning=curriculum(enabled=False))
    assert {seq_len(off, s) for s in range(10)} == {64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 8 steps (2 per call) with and without a curriculum: the stacks of rows each
    call trained on, the log and the metrics."""
    out = {}
    layout = make_layout("", "", jax.devices()[:1])
    real = neo.loop.global_batches
    # 2 steps per call, 6 steps of curriculum: steps 0, 2, 4, 6 train at 16, 32, 48, 64 (t = 1, 3, 5, 7)
    for name, keys in (("full", {}), ("curriculum", {"curriculum_learning": curriculum(total=6)})):
        path = tmp_path_factory.mktemp(name)
        stacks, lines = [], []

        def capture(setup, local):
            stacks.append(np.array(local))
            return real(setup, local)

        neo.loop.global_batches = capture
        try:
            fit(tiny(model_path=str(path), train_steps=8, iterations=2, **keys), layout, 4, log=lines.append)
        finally:
            neo.loop.global_batches = real
        records = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
        out[name] = stacks, lines, [r for r in records if r["kind"] == "train"]
    return out


def test_rows_at_a_short_length_are_the_full_rows_cut(runs):
    full, _, _ = runs["full"]
    cut, _, records = runs["curriculum"]
    assert [s.shape[2] - 1 for s in cut] == [16, 32, 48, 64]  # n_ctx + 1 tokens -> length + 1
    assert len(cut) == len(full)
    for short, whole in zip(cut, full):
        np.testing.assert_array_equal(short, whole[:, :, :short.shape[2]])
    assert [r["seq_len"] for r in records] == [16, 32, 48, 64]
    assert all(r["tokens_per_sec"] > 0 for r in records[1:])


def test_each_length_compiles_once(runs):
    _, lines, _ = runs["curriculum"]
    compiled = [l for l in lines if l.startswith("neo: compiled")]
    assert [l.split(" of ")[1].split()[0] for l in compiled] == ["16", "32", "48", "64"]
    assert any("seq_len 16 |" in l for l in lines) and any("seq_len 64 |" in l for l in lines)
    assert "neo: curriculum: rows cut to 16 tokens at step 0; lengths 16, 32, 48, 64 (n_ctx from step 6)" in lines


def test_killed_mid_curriculum_and_resumed_gives_identical_losses(tmp_path):
    schedule = curriculum(min_difficulty=32, step=32)  # two lengths (three processes compile each)
    settings = ["train_steps=10", "iterations=1", "res_dropout=0.1", f"curriculum_learning={json.dumps(schedule)}"]
    reference = tmp_path / "uninterrupted"
    subprocess.run(command(reference, settings, 2), env=ENV, check=True, capture_output=True, timeout=300)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 11))

    run = tmp_path / "killed"
    proc = subprocess.Popen(command(run, settings, 2), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    committed = lambda: [p for p in (run / "checkpoints").glob("*") if p.name.isdigit()]
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill once checkpoint 2 is committed
        if (run / "checkpoints").exists() and committed():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(command(run, settings, 2), env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resumed = int(out.stdout.split("resumed from checkpoint ")[1].split()[0])
    assert resumed < 7  # inside the curriculum (n_ctx from step 7)
    assert f"rows cut to 32 tokens at step {resumed}" in out.stdout
    assert seq_len(tiny(curriculum_learning=schedule), resumed) == 32
    assert losses(run) == expected  # bit for bit


def test_a_curriculum_splitting_batch_and_sequence_equals_one_device(tmp_path):
    """Cut rows keep the layout's placement: batch over one mesh axis, sequence over another."""
    keys = dict(train_steps=6, iterations=2, curriculum_learning=curriculum(min_difficulty=32, step=32, total=6))
    quiet = lambda _m: None
    fit(tiny(model_path=str(tmp_path / "one"), **keys), make_layout("", "", jax.devices()[:1]), 6, log=quiet)
    fit(tiny(model_path=str(tmp_path / "four"), **keys),
        make_layout("x:2,y:2", "batch:x,sequence:y", jax.devices()[:4]), 6, log=quiet)
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert sorted(one) == [2, 4, 6]
    np.testing.assert_allclose([four[s] for s in one], [one[s] for s in one], atol=1e-5)


def test_saved_config_reloads_with_its_curriculum():
    cfg = tiny(curriculum_learning=curriculum(schedule_type="fixed_root", schedule={"root_degree": 3}))
    flat = json.loads(json.dumps(to_json_dict(cfg)))
    assert flat["curriculum_learning"]["schedule_config"]["root_degree"] == 3
    assert parse_model_config(flat, source=cfg.source) == cfg


@pytest.mark.parametrize("change, message", [
    ({"min_difficulty": 128}, r"'min_difficulty' must be in 1..n_ctx \(64\)"),
    ({"min_difficulty": 0}, r"'min_difficulty' must be in 1"),
    ({"max_difficulty": 32}, r"'max_difficulty' \(32\) must equal n_ctx \(64\)"),
    ({"schedule_config": {"total_curriculum_step": 8, "difficulty_step": 12}},
     r"'difficulty_step' \(12\) must be >= 1 and divide both min_difficulty \(16\) and n_ctx \(64\)"),
    ({"schedule_config": {"total_curriculum_step": 0, "difficulty_step": 16}}, r"'total_curriculum_step' must be >= 1"),
    ({"schedule_config": {"difficulty_step": 16}}, r"'total_curriculum_step' is required"),
    ({"schedule_config": {"total_curriculum_step": 8, "difficulty_stp": 16}},
     r"unknown schedule_config key 'difficulty_stp'.*Did you mean 'difficulty_step'"),
    ({"min_dificulty": 16}, r"unknown key 'min_dificulty'.*Did you mean 'min_difficulty'"),
    ({"min_difficulty": "16"}, r"'curriculum_learning min_difficulty' must be an integer"),
    ({"curriculum_type": "vocabularyrarity"}, r"'curriculum_type' must be \"seqlen\""),
    ({"schedule_type": "fixed_discrete"}, r"'schedule_type' must be one of fixed_linear, fixed_root"),
    ({"schedule_type": "fixed_root"}, r"fixed_root needs schedule_config 'root_degree' >= 1"),
    ({"schedule_config": {"total_curriculum_step": 8, "difficulty_step": 16, "root_degree": 2}},
     r"'root_degree' belongs to schedule_type fixed_root"),
    ({"enabled": False, "min_difficulty": 100}, r"'min_difficulty' must be in 1"),  # checked even when off
])
def test_bad_curriculum_values_are_refused_at_load(change, message):
    with pytest.raises(NeoError, match=message) as e:
        tiny(curriculum_learning={**curriculum(), **change})
    assert "\n" not in str(e.value) and "curriculum_learning" in str(e.value)
    with pytest.raises(NeoError, match=r"'curriculum_learning' must be an object|curriculum_learning must be"):
        tiny(curriculum_learning=[16, 64])


def test_masked_lm_training_is_refused():
    with pytest.raises(NeoError, match=r"curriculum_learning: GPT-NeoX's sequence-length warmup is for causal"):
        tiny(curriculum_learning=curriculum(), mlm_training=True, mlm_mask_id=1)


def test_a_disabled_curriculum_trains_at_n_ctx(tmp_path):
    lines = []
    fit(tiny(model_path=str(tmp_path), train_steps=2, curriculum_learning=curriculum(enabled=False)),
        make_layout("", "", jax.devices()[:1]), 2, log=lines.append)
    assert not any("curriculum" in l or "seq_len" in l or " of 64 tokens" in l for l in lines)


def test_a_length_the_sequence_axis_does_not_divide_is_refused_before_compiling(tmp_path):
    cfg = tiny(model_path=str(tmp_path), curriculum_learning=curriculum(4, 64, 4))
    with pytest.raises(NeoError, match=r"layout maps 'sequence' \(size 4 at a curriculum length\) to mesh axis"):
        fit(cfg, make_layout("x:8", "sequence:x"), 4, log=lambda _m: None)
