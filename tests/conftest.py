"""Test environment: 8 simulated CPU devices (set before jax is imported), no network."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# XLA:CPU's earlier emitters for fused loops compile the tests' programs in about half the time
# (a tiny model's train step: 0.69-0.89 s against 1.46-1.85 s), which took the suite from 23 to
# 18 minutes on 2 cores (docs/benchmarks.md, 2026-12-02 "the suite's compile time"). The program
# XLA compiles is the same (HLO passes, fusions, shardings, memory plan); only how each fused
# loop becomes machine code differs. Those emitters are not bit-identical across different
# programs (4 steps in one call against 4 one-step calls: 2e-6 apart, where XLA's own are
# exact), so a test of that exactness runs in a child with XLA's defaults
# (`rerun_with_xla_default_emitters`); the processes the tests start (main.py) run XLA's defaults.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the session and every process it starts: tests compile the same
# small programs again and again (each fit() traces afresh, each main.py launch starts cold), and
# a program loaded from the cache is the executable a compile would produce, so what the tests
# check is unchanged; only the waiting goes (the suite must fit CI's time on 2 cores). Only
# compiles of a second or more are written: the thousands of one-op programs cost more to store.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="neo-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# The tests' programs are tiny: compiling them is most of the suite's time, running them almost
# none. JAX's own switch for that case skips LLVM's optimisation of the generated CPU code (XLA's
# HLO passes, the programs' shardings, fusions and memory plan are unchanged, and XLA:CPU does
# no fast-math either way), which takes a quarter off compile-bound tests on CI's 2 cores.
# Every main.py a test starts inherits it. JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests fully
# optimised code; benchmarks and users' runs never set it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The suite runs in parallel workers (pytest-xdist, `addopts` in pyproject.toml) that share the
# cache: a size limit is what makes JAX lock it, so no worker reads an entry another is writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The test workers (started after this file is read) and every main.py the tests run get what
# main.py would restart itself with: malloc on transparent huge pages (neo/host_memory.py).
from neo.host_memory import huge_pages_available, tunables_with_huge_pages  # noqa: E402

_tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES"))
if _tunables and huge_pages_available():
    os.environ["GLIBC_TUNABLES"] = _tunables

DATA = ROOT / "data"  # tokenizers and corpora the tests read, shipped in the repository

import pytest  # noqa: E402


@pytest.fixture
def rerun_with_xla_default_emitters(request) -> bool:
    """For a test that two different programs agree more closely than the suite's emitters
    (TEST_XLA_FLAGS) let them, as they do with the emitters users run: under the suite's flags
    the test runs again in a child process with XLA's defaults, and this is True (the caller
    then returns, the child having passed)."""
    import subprocess

    if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        return False
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(TEST_XLA_FLAGS, "").strip())
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                          request.node.nodeid], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:]
    return True

# Memory one test worker may need at its peak (8 simulated devices, a two-process run it starts,
# transformers' reference models): measured under 4.5 GiB per worker with 2 workers.
GIB_PER_WORKER = 6


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, as many as memory allows (each worker compiles programs
    for 8 simulated devices); CI's 2 cores get 2."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        available = 2 * GIB_PER_WORKER << 30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, available // (GIB_PER_WORKER << 30)))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's data/ folder (data/README.md): the only data the tests read."""
    return DATA


def _tiny_config(**overrides) -> dict:
    raw = dict(n_embd=64, n_head=8, n_layer=2, n_ctx=32, n_vocab=128,
               attention_types=[[["global", "local"], 1]], local_attention_radius=8,
               train_batch_size=8, train_steps=4, lr=1e-4, weight_decay=0.1, gradient_clipping=1.0,
               iterations=1)
    raw.update(overrides)
    return raw


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(**overrides) -> a small GPT-Neo config dict (global + local layers, window
    shorter than n_ctx), with the given keys changed."""
    return _tiny_config
