"""Test environment: 8 simulated CPU devices (set before jax is imported), no network."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"  # tokenizers and corpora the tests read, shipped in the repository
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


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
