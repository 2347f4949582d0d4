"""Host memory on huge pages (neo/host_memory.py): neo's entry points restart once with glibc's
malloc on transparent huge pages, so the buffers XLA:CPU allocates afresh at every execution
stop costing a page fault per 4 KiB."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neo.host_memory import _glibc_version, huge_pages_available, tunables_with_huge_pages

ROOT = Path(__file__).resolve().parent.parent

# A child that restarts as main.py does, then times a compiled call whose 256 MiB result is a
# new buffer at every call, and reports the page faults per call.
CHILD = textwrap.dedent("""
    import os, resource, sys
    sys.path.insert(0, {root!r})
    from neo.host_memory import restart_with_huge_pages
    print("start", os.getpid(), sys.argv[1:], flush=True)
    restart_with_huge_pages()
    import jax, jax.numpy as jnp
    x = jnp.ones((64, 1024, 1024), jnp.float32)
    f = jax.jit(lambda x: x * 2)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), faults / (x.nbytes // 4096))
""")


def run_child(tmp_path, tunables):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_tunables_add_huge_pages_and_keep_what_the_user_set():
    assert tunables_with_huge_pages(None) == "glibc.malloc.hugetlb=1"
    assert tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert tunables_with_huge_pages("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert tunables_with_huge_pages("glibc.malloc.hugetlb=0") is None  # the user's choice stands
    assert tunables_with_huge_pages("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2") is None


def test_huge_pages_follow_the_kernels_setting(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    assert not huge_pages_available(str(setting))
    assert not huge_pages_available(str(tmp_path / "missing"))
    if sys.platform.startswith("linux") and (_glibc_version() or (0, 0)) >= (2, 35):
        setting.write_text("always [madvise] never\n")
        assert huge_pages_available(str(setting))


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages for malloc here")
def test_restart_is_once_same_process_same_arguments_and_new_buffers_stop_faulting(tmp_path):
    lines = run_child(tmp_path, None)
    starts = [l for l in lines if l.startswith("start")]
    after = [l for l in lines if l.startswith("after")]
    assert len(starts) == 2 and len(after) == 1, lines  # restarted exactly once
    assert starts[0] == starts[1]  # the same process id, the same arguments
    assert starts[0].split()[1] == after[0].split()[1]
    assert starts[0].endswith("['--flag', 'a b']")
    assert after[0].split()[2] == "glibc.malloc.hugetlb=1"
    faults_per_page = float(after[0].split()[3])
    # glibc's default: every 4 KiB page of the new buffer faults at every call.
    default = run_child(tmp_path, "glibc.malloc.hugetlb=0")
    assert [l for l in default if l.startswith("start")][1:] == []  # the user's setting: no restart
    assert float(default[-1].split()[3]) > 0.9
    assert faults_per_page < 0.25, after  # measured 0.01: 2 MiB pages fault in 512 at a time
