"""`--predict --interactive`: prompts from stdin round after round, continuations equal to the
sampler's, the compiled sampler reused for prompts of the same length bucket, unconditional
samples from an empty line, a clean exit at EOF and at Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from neo.checkpoint import load_for_inference
from neo.config import load_model_config
from neo.data.tokenizer import load_tokenizer
from neo.loop import fit
from neo.mesh import make_layout
from neo.predict import Sampler, SamplingOptions, format_samples

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
COMPILING = "neo: compiling the sampler"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A tiny model trained for 2 steps (bytes tokenizer, eos_id 0)."""
    path = tmp_path_factory.mktemp("tiny")
    cfg = load_model_config("tiny", {"model_path": str(path), "train_steps": 2, "iterations": 1})
    fit(cfg, make_layout("", "", jax.devices()[:1]), 2, log=lambda _m: None)
    return path


def command(model_path: Path, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--model", "tiny", "--set",
            f"model_path={json.dumps(str(model_path))}", "--predict", "--interactive", *flags]


def expected(model_path: Path, prompts: list[str], opts: SamplingOptions) -> list[str]:
    """What the sampler gives each prompt (round r with seed + r), in this process."""
    cfg = load_model_config("tiny", {"model_path": str(model_path)})
    layout = make_layout("", "", jax.devices()[:1])
    params, _ = load_for_inference(cfg, layout)
    tok, sampler = load_tokenizer(cfg.data.tokenizer_path), Sampler(cfg, params, layout)
    out = []
    for r, p in enumerate(prompts):
        ids = tok.encode(p) if p else [cfg.data.eos_id]  # an empty prompt starts from eos
        new = sampler.generate([ids] * opts.num_samples, SamplingOptions(**{**opts.__dict__, "seed": opts.seed + r}),
                               cfg.data.eos_id)
        out.append(format_samples([tok.decode(c) for c in new]))
    return out


def test_rounds_until_eof_reuse_the_compiled_sampler(model_path):
    # "hello", "world!" and the empty prompt (1 token: eos) share the 8-token bucket; the last
    # prompt (20 bytes) needs the 32-token one: two compilations for four rounds
    prompts = ["hello", "world!", "", "a longer prompt here"]
    out = subprocess.run(command(model_path, "--temperature", "0", "--max_new_tokens", "8"),
                         input="\n".join(prompts) + "\n", env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == "".join(expected(model_path, prompts, SamplingOptions(temperature=0, max_new_tokens=8)))
    assert out.stderr.count(COMPILING) == 2


def test_sampling_flags_apply_and_each_round_draws_anew(model_path):
    prompts = ["hello", "hello"]
    flags = ["--temperature", "1.0", "--top_k", "20", "--num_samples", "2", "--max_new_tokens", "6", "--seed", "7"]
    out = subprocess.run(command(model_path, *flags), input="hello\nhello", env=ENV, capture_output=True,
                         text=True, timeout=300)  # the last line needs no newline
    assert out.returncode == 0, out.stderr
    rounds = expected(model_path, prompts, SamplingOptions(temperature=1.0, top_k=20, num_samples=2,
                                                           max_new_tokens=6, seed=7))
    assert out.stdout == "".join(rounds) and rounds[0] != rounds[1]
    assert out.stdout.count(" SAMPLE 1 ") == 2 and out.stderr.count(COMPILING) == 1


def test_ctrl_c_ends_the_session_cleanly(model_path):
    proc = subprocess.Popen(command(model_path, "--temperature", "0", "--max_new_tokens", "4"), env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("hello\n")
    proc.stdin.flush()
    lines = [proc.stdout.readline() for _ in range(3)]  # header, text, closing rule: the round is done
    assert lines[0].startswith("=" * 40 + " SAMPLE 0 ") and lines[2] == "=" * 80 + "\n"
    proc.send_signal(signal.SIGINT)  # while it waits for the next prompt
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_interactive_needs_predict_and_no_prompt_file(model_path):
    out = subprocess.run(command(model_path)[:-2] + ["--interactive"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--interactive is a way of sampling: use it with --predict" in out.stderr
    out = subprocess.run(command(model_path, "--prompt", "p.txt"), env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--interactive reads prompts from stdin; drop --prompt" in out.stderr
