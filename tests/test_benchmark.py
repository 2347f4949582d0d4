"""scripts/benchmark.py runs on a machine without TensorFlow or lm-eval (a GPU box): every mode
is run here with both made unimportable; the CPU peak it divides by follows the CPU's flags."""

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neo import flops
from neo.flops import cpu_peak_flops
from neo.kernels import cpu as cpu_kernels

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = str(ROOT / "scripts" / "benchmark.py")

# Python's path finder stops seeing tensorflow and lm_eval, as if they were not installed;
# sitecustomize runs in every process started with this PYTHONPATH, the backends' too.
HIDE = """
import importlib.machinery
_find = importlib.machinery.PathFinder.find_spec
def _hidden(cls, fullname, path=None, target=None):
    if fullname.partition(".")[0] in ("tensorflow", "lm_eval"):
        return None
    return _find(fullname, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(_hidden)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    hide = tmp_path_factory.mktemp("hide")
    (hide / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{ROOT}", "XLA_FLAGS": ""}
    for module in ("tensorflow", "lm_eval"):  # the hiding works (so this test can fail)
        out = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
        assert "No module named" in out.stderr
    return env


def run(env, *args, timeout=600):
    out = subprocess.run([sys.executable, BENCHMARK, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and "failed" not in out.stderr, out.stderr[-3000:]
    return out.stdout


def test_step_benchmark_runs_all_three_backends_without_tensorflow_or_lm_eval(env, tmp_path):
    """Also: --profile traces two more of neo's steps into a Perfetto file that
    scripts/trace_kernels.py sums by kernel (how docs/benchmarks.md splits the GPU step); neo's
    result names the custom calls of its compiled step (cuDNN's attention on a GPU, neo's
    attention kernel on CPU); the GPU script parses."""
    results = tmp_path / "results.jsonl"
    out = run(env, "--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "0",
              "--steps_per_call", "2", "--precision", "bfloat16", "--profile", str(tmp_path), "--json", str(results))
    for name in ("neo (jax)", "transformers GPTNeo", "nanoGPT-style torch"):
        assert name in out
    assert "neo / nanoGPT-style torch" in out and "GFLOP/s theoretical" in out and "measured 2048^2 matmul" in out
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    (calls,) = [r["custom_calls"] for r in rows if r["backend"] == "neo (jax)"]
    # bfloat16 on CPU: neo's attention kernel where it is built (no product kernel: that one is float32)
    assert set(calls) == ({"neo_attention_forward_bf16", "neo_attention_backward_bf16"} if cpu_kernels.enabled()
                          else set()), calls

    (trace,) = list(tmp_path.glob("plugins/profile/*/perfetto_trace.json.gz"))
    kernels = str(ROOT / "scripts" / "trace_kernels.py")
    summary = subprocess.run([sys.executable, kernels, str(trace), "--device", "CPU"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0 and "per step: span" in summary.stdout, summary.stderr
    missing = subprocess.run([sys.executable, kernels, str(trace)], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode != 0 and "no kernels of a 'GPU' device" in missing.stderr
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "benchmark_gpu.sh")]).returncode == 0


def test_compile_only_reports_compiled_memory_on_simulated_devices(env):
    out = run(env, "--compile_only", "--model", "tiny", "--batch", "8", "--seq", "32", "--mesh_shape", "x:8",
              "--layout", "batch:x,embd:x", "--recompute", "--set", "z_loss=0.0")
    (line,) = [l for l in out.splitlines() if l.startswith("RESULT ")]
    r = json.loads(line[7:])
    assert r["devices"] == 8 and r["recompute"] is True and r["seq"] == 32 and r["set"] == ["z_loss=0.0"]
    assert r["compile_s"] > 0 and r["temp_bytes"] > 0 and r["argument_bytes"] > 0 and r["output_bytes"] > 0
    assert "alias_bytes" in r


def test_quickstart_mode_trains_both_loops_and_validates_them(env):
    out = run(env, "--quickstart", "--quickstart_steps", "6", "--quickstart_eval_steps", "10")
    rows = [l for l in out.splitlines() if l.startswith(("neo main.py", "nanoGPT recipe"))]
    assert len(rows) == 2
    for row in rows:
        val = float(row.split()[-1])
        assert 0 < val < 6  # a byte model starts near ln(256) = 5.5
    assert "neo / nanoGPT throughput" in out


def test_profile_finds_every_matmul_of_both_steps(env, tmp_path):
    """scripts/profile_step.py sorts every kernel of neo's step and every aten op of the
    nanoGPT-style step into the same table; both models do the same dense products, so the
    FLOPs it finds in neo's kernels (from the compiled HLO) and in torch's ops (from its
    profiler) must agree: a kernel the trace misses or a product counted twice shows here."""
    results = tmp_path / "profile.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--model", "tiny", "--batch", "2",
                          "--seq", "16", "--steps", "2", "--warmup", "0", "--backends", "neo,nanogpt",
                          "--json", str(results)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "failed" not in out.stderr, out.stderr[-3000:]
    neo, torch = [json.loads(line) for line in results.read_text().splitlines()]
    assert neo["backend"] == "neo (jax)" and torch["backend"] == "nanoGPT-style torch"
    assert neo["flops"]["matmul"] == pytest.approx(torch["flops"]["matmul"], rel=0.01)
    for r in (neo, torch):
        for phase in ("forward", "backward"):
            assert r["table"][f"{phase}|matmul"] > 0
        assert r["step_ms"] > 0 and r["top"]
    assert "matmul: " in out.stdout and "GFLOP/s" in out.stdout


def test_generation_benchmark_reports_the_weight_read_roofline(env):
    """scripts/benchmark_generate.py: both samplers, and per step the bytes of weights read, the
    bandwidth reached and the roofline that reading them at the measured bandwidth allows; with
    --profile, neo's costliest kernels of a traced call, each matched to its HLO instruction."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_generate.py"), "--model", "tiny",
                          "--batch", "1", "--prompt", "8", "--new", "4", "--reps", "1", "--profile", "3"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "failed" not in out.stderr, out.stderr[-3000:]
    assert "memory read bandwidth" in out.stdout and "neo / transformers" in out.stdout
    rows = {l.split()[0]: l.split() for l in out.stdout.splitlines() if l.startswith(("neo (jax", "transformers"))}
    # tiny, float32, position table excluded: 2 layers of 64 wide (q, k, v, o and o's bias, the
    # MLP's two matrices and biases, two norms), the final norm and the 256 x 64 vocabulary matrix
    params = 2 * (12 * 64 * 64 + 10 * 64) + 2 * 64 + 256 * 64
    assert float(rows["neo"][-3]) == pytest.approx(4 * params / 1e6, abs=0.006)
    assert float(rows["transformers"][-3]) == pytest.approx(4 * params / 1e6, abs=0.006)
    kernels = [l.split() for l in out.stdout.splitlines() if re.match(r"\s+[\d.]+ ms +\d+x ", l)]
    assert len(kernels) == 3 and all(float(k[0]) > 0 and int(k[2][:-1]) >= 1 for k in kernels), out.stdout


def test_cpu_peak_follows_the_flags(tmp_path):
    cores = len(os.sched_getaffinity(0))

    def info(model, vendor, flags, siblings=1, per_socket=1):
        path = tmp_path / f"{model[:5]}{siblings}"
        path.write_text(f"vendor_id\t: {vendor}\nmodel name\t: {model}\ncpu MHz\t\t: 2600.000\n"
                        f"siblings\t: {siblings}\ncpu cores\t: {per_socket}\nflags\t\t: {flags}\n\n")
        return str(path)

    xeon = info("Intel(R) Xeon(R) Platinum 8480C @ 2.00GHz", "GenuineIntel", "fma avx2 avx512f avx512_bf16 amx_bf16")
    # the nominal clock, not cpu MHz (this machine's own measured clock left out)
    assert cpu_peak_flops("float32", xeon, measure_clock=False)[0] == cores * 64 * 2.0e9
    assert cpu_peak_flops("bfloat16", xeon, measure_clock=False)[0] == cores * 1024 * 2.0e9
    epyc = info("AMD EPYC 7B13", "AuthenticAMD", "fma avx2", siblings=2, per_socket=1)  # 2 threads per core
    peak, formula = cpu_peak_flops("bfloat16", epyc, measure_clock=False)
    assert peak == max(1, cores // 2) * 32 * 2.6e9 and "AVX2" in formula and "2.60 GHz" in formula
    zen4 = info("AMD EPYC 9B14", "AuthenticAMD", "fma avx2 avx512f avx512_bf16")
    # 256-bit data paths, bf16 pairs
    assert cpu_peak_flops("bfloat16", zen4, measure_clock=False)[0] == cores * 64 * 2.6e9


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="the clock loop is x86-64 code")
def test_measured_clock_raises_a_peak_whose_clock_cpuinfo_understates(tmp_path, monkeypatch):
    """A virtual machine's cpuinfo gives its host's base clock; cores running above it made a
    matmul beat the "peak". The measured clock is a real core clock and replaces a lower one."""
    hz = flops.measured_clock_hz()
    assert 0.5e9 < hz < 7e9  # a real core clock, whatever this machine is
    path = tmp_path / "cpuinfo"
    path.write_text("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2600.000\n"
                    "flags\t\t: fma avx2 avx512f avx512_bf16\n\n")
    cores = len(os.sched_getaffinity(0))
    for measured, clock in ((3.66e9, 3.66e9), (2.1e9, 2.6e9)):  # above cpuinfo's clock, then below it
        monkeypatch.setattr(flops, "measured_clock_hz", lambda: measured)
        flops.cpu_peak_flops.cache_clear()
        peak, formula = flops.cpu_peak_flops("float32", str(path))
        assert peak == cores * 32 * clock
        assert ("3.66 GHz (measured; cpuinfo says 2.60)" in formula) == (measured > 2.6e9), formula
    flops.cpu_peak_flops.cache_clear()


def test_generation_steps_only_leaves_out_the_prompt_pass(monkeypatch):
    """--steps_only: the time of `new` decode steps is the 2 x new call's median less the
    new call's, so a fixed cost per call (the prompt pass) drops out; a longer call that was
    not slower is an error that says what to raise, not a negative rate."""
    import argparse
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("benchmark_generate", ROOT / "scripts" / "benchmark_generate.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec.loader.exec_module(bench)
    calls = []
    run = lambda new: calls.append(new) or time.sleep(0.05 + 0.002 * new)  # 50 ms of prompt pass per call
    args = argparse.Namespace(new=20, reps=3, steps_only=True)
    assert bench.timed(args, run) == pytest.approx(0.002 * 20, abs=0.015)
    assert calls == [20] * 3 + [40] * 4
    assert bench.timed(argparse.Namespace(new=20, reps=3, steps_only=False), run) == pytest.approx(0.09, abs=0.015)
    with pytest.raises(SystemExit, match="raise --new or --reps"):
        bench.timed(args, lambda new: time.sleep(0.01 if new == 40 else 0.03))


def test_a_config_transformers_cannot_hold_skips_it_in_one_line(monkeypatch, capsys):
    """The quickstart's scaled attention has no GPTNeo equivalent: the step benchmark and the
    profile (command 6 runs it by default) leave transformers out with the reason in one line
    rather than printing its child's traceback; a config it can hold keeps all three."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec.loader.exec_module(bench)
    args = lambda model: argparse.Namespace(model=model, precision="float32", mesh_shape="", layout="", batch=0,
                                            seq=0, recompute=False, set=[])
    assert bench.runnable(args("quickstart"), list(bench.BACKENDS)) == ["neo", "nanogpt"]
    assert capsys.readouterr().out.strip() == ("transformers GPTNeo: skipped, HF GPTNeoForCausalLM cannot "
                                               "represent scale_attention; export as GPT-NeoX instead.")
    assert bench.runnable(args("tiny"), list(bench.BACKENDS)) == list(bench.BACKENDS)
    assert capsys.readouterr().out == ""


def load_script(name, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_targets_give_each_target_its_verdict(monkeypatch, tmp_path):
    """scripts/cpu_targets.py: each target from its runs, met or missed by how much, a run that
    started on a busy machine marked; a target whose run failed is left out, not guessed."""
    targets = load_script("cpu_targets", monkeypatch)
    log = [{"label": "quickstart_neo", "tokens_per_s": 22000.0, "val_loss": 1.85},
           {"label": "quickstart_torch", "tokens_per_s": 20000.0, "val_loss": 1.90},
           {"label": "train float32 neo", "tokens_per_s": 900.0, "others_busy": 0.4},
           {"label": "train float32 transformers", "tokens_per_s": 1000.0},
           {"label": "train float32 nanogpt", "tokens_per_s": 800.0},
           {"label": "generate float32 b1 neo", "tokens_per_s": 80.0},
           {"label": "generate float32 b1 torch", "tokens_per_s": 20.0},
           {"label": "generate bfloat16 b8 neo", "tokens_per_s": 100.0},
           {"label": "generate bfloat16 b8 torch", "tokens_per_s": 100.0},
           {"label": "memory 24 layers", "temp_bytes": 5 * 2 ** 30, "compile_s": 4.0},
           {"label": "memory 4 layers", "temp_bytes": 2 ** 30, "compile_s": 4.0}]
    rows = {r["target"]: r for r in targets.verdicts(log)}
    assert len(rows) == 8  # no bfloat16 step: its runs are missing
    beside = rows["125M step float32, neo / nanoGPT-style (no target)"]  # shown, no verdict
    assert beside["value"] == pytest.approx(1.125) and beside["met"] is None and beside["missed_by"] is None
    assert rows["quickstart tok/s, neo / nanoGPT"]["value"] == pytest.approx(1.1) and rows[
        "quickstart tok/s, neo / nanoGPT"]["met"]
    assert rows["quickstart validation loss, neo (<= nanoGPT's)"]["met"]
    step = rows["125M step float32, neo / transformers"]
    assert not step["met"] and step["missed_by"] == pytest.approx(0.1) and step["busy"]
    assert rows["generation float32 b1, neo / generate()"]["met"]
    assert rows["generation bfloat16 b8, neo / generate()"]["missed_by"] == pytest.approx(0.5)
    memory = rows["1.3B temporary memory per device, GiB"]
    assert memory["value"] == 5 and memory["missed_by"] == pytest.approx(0.25) and not memory["busy"]
    assert rows["1.3B compile time, 24 / 4 layers"]["met"]

    stat = tmp_path / "stat"  # user nice system idle iowait irq softirq steal
    ticks = iter([(100, 0, 100, 800, 0), (175, 0, 125, 875, 25)])
    monkeypatch.setattr(targets.time, "sleep", lambda s: stat.write_text("cpu  %d %d %d %d %d 0 0 0 0 0\n"
                                                                         % next(ticks)))
    stat.write_text("cpu  %d %d %d %d %d 0 0 0 0 0\n" % next(ticks))
    assert targets.cpu_busy(stat=str(stat)) == pytest.approx(0.5)  # 100 of 200 ticks busy


def test_cpu_targets_runs_the_memory_target_without_tensorflow_or_lm_eval(env, tmp_path):
    results = tmp_path / "targets.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cpu_targets.py"), "--only", "memory", "--json",
                          str(results)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "failed" not in out.stderr, out.stderr[-3000:]
    assert "GFLOP/s theoretical" in out.stdout and "others busy" in out.stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    runs, verdicts = [r for r in rows if "label" in r], [r for r in rows if "target" in r]
    assert [r["label"] for r in runs] == ["memory 24 layers", "memory 4 layers"]
    assert [r["devices"] for r in runs] == [8, 8] and runs[1]["temp_bytes"] < runs[0]["temp_bytes"]
    assert [v["target"] for v in verdicts] == ["1.3B temporary memory per device, GiB",
                                               "1.3B compile time, 24 / 4 layers"]
    assert all(v["target"] in out.stdout for v in verdicts)
