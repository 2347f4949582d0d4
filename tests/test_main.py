"""`python main.py` as a user runs it: trains, prints, records; mistakes get one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_main(*args, cwd=ROOT, env_extra=None):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_main_trains_the_tiny_config_and_writes_metrics(tmp_path):
    out = run_main("--model", "tiny", "--set", f"model_path={json.dumps(str(tmp_path / 'run'))}",
                   "--set", "train_steps=10", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "120,192 parameters" in text
    assert "step 10/10 | loss" in text and "tok/s" in text and "MFU" in text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    assert all(r["loss"] > 0 for r in records) and "tokens_per_sec" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"] + 0.5


def test_user_mistakes_exit_with_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_embd": 64, "n_head": 5, "n_layer": 1, "n_ctx": 8, "n_vocab": 10,
                               "attention_types": [[["global"], 1]]}))
    for args, message in [
        (["--model", str(bad)], "n_embd (64) is not divisible by n_head (5)"),
        (["--model", "tiny", "--set", "mesh_shape=\"x:3\""], "needs 3 devices but 1 are available"),
        (["--model", "tiny", "--gpu_ids", "0", "1"], "JAX sees no GPUs"),
        (["--model", "nope"], "no config named 'nope'"),
    ]:
        out = run_main(*args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_run_settings_that_would_fail_later_are_refused_before_training(tmp_path):
    """Each of these once failed after the training time was spent, or with a traceback."""
    import jax
    import pytest

    from neo.config import load_model_config
    from neo.errors import NeoError
    from neo.loop import fit
    from neo.mesh import make_layout

    def attempt(steps_per_checkpoint=5, **keys):
        cfg = load_model_config("tiny", {"model_path": str(tmp_path / "run"), "train_steps": 2, **keys})
        fit(cfg, make_layout("x:4", "batch:x", jax.devices()[:4]), steps_per_checkpoint, log=lambda _m: None)

    with pytest.raises(NeoError, match=r"eval_batch_size 6 does not split over the layout's 4 batch shards; "
                                       r"make it a multiple of 4"):
        attempt(eval_steps=1, eval_batch_size=6)
    with pytest.raises(NeoError, match=r"--steps_per_checkpoint 0: save every N >= 1 steps"):
        attempt(0)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(NeoError, match=r"model_path .*file: .*file is a file, but neo needs a folder there"):
        attempt(model_path=str(tmp_path / "file"))
    with pytest.raises(NeoError, match=r"model_path .*file/run: .*file is a file, so the folder cannot be created"):
        attempt(model_path=str(tmp_path / "file" / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    with pytest.raises(NeoError, match=r"run/checkpoints is a file, but neo needs a folder there"):
        attempt()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]  # nothing was created
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoints"]


def test_a_model_path_without_write_permission_is_refused(tmp_path):
    """Checked in a process without the privilege to write anywhere (when the tests run as root,
    the child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, then execs the check): a folder
    it cannot write in."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    check = ("from neo.checkpoint import check_writable\nfrom neo.errors import NeoError\n"
             f"try:\n    check_writable({str(locked / 'run')!r})\nexcept NeoError as e:\n    print(e)\n")
    unprivileged = ("import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    "for capability in (1, 2):  # PR_CAPBSET_DROP: not in the permitted set after exec\n"
                    "    assert libc.prctl(24, capability, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())\n"
                    "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])\n")
    args = ["-c", unprivileged, check] if os.geteuid() == 0 else ["-c", check]
    out = subprocess.run([sys.executable, *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"model_path {locked / 'run'}: no permission to write in {locked}" in out.stdout
    assert not (locked / "run").exists()


def test_a_step_that_cannot_fit_in_memory_is_refused_before_it_runs(tmp_path, monkeypatch):
    """On CPU a device's memory is the host's. Parameters, gradients and optimizer state larger
    than what the host has available are refused before anything compiles; a compiled step that
    XLA counts larger than what is available then is refused before it runs (run, it fails
    allocating with a traceback, or the kernel kills the process). One line each, with the fix;
    no checkpoint is written."""
    import jax
    import pytest

    from neo import memory
    from neo.config import load_model_config
    from neo.errors import NeoError
    from neo.loop import fit
    from neo.mesh import make_layout

    cfg = load_model_config("tiny", {"model_path": str(tmp_path / "run"), "train_steps": 2, "iterations": 1,
                                     "predict_steps": 0, "eval_steps": 0})
    layout = make_layout("", "", jax.devices()[:1])
    monkeypatch.setattr(memory, "host_available_memory", lambda: 1 << 20)
    with pytest.raises(NeoError, match=r"parameters, gradients and optimizer state need [\d.]+ MiB per device, more "
                                       r"than the 1.00 MiB of this host's available memory; shard them"):
        fit(cfg, layout, log=lambda _: None)
    available = iter([1 << 30])  # at the start; by the time the step is compiled another process took it
    monkeypatch.setattr(memory, "host_available_memory", lambda: next(available, 1 << 10))
    lines = []
    with pytest.raises(NeoError, match=r"the compiled train step needs [\d.]+ [KM]iB per device \(XLA's count: "
                                       r"temporaries .*\), more than the 1.00 KiB of this host's available memory; "
                                       r"lower train_batch_size"):
        fit(cfg, layout, log=lines.append)
    assert any("of the 1.00 GiB of this host's available memory" in line for line in lines), lines
    assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))

    class WithoutMemoryAnalysis:  # a backend whose compiled programs cannot count their memory
        def memory_analysis(self):
            raise NotImplementedError

    from neo.loop import check_compiled_memory
    from neo.train import build

    check_compiled_memory(WithoutMemoryAnalysis(), build(cfg, layout))  # nothing to check: training goes on
