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
