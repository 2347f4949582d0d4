"""Huge pages for host memory: neo's entry points restart themselves once with glibc's malloc
asked to back its large blocks with transparent huge pages.

Why: XLA:CPU allocates a step's temporaries afresh at every execution (1.8 GiB for the
gpt_neo_125M step at batch 4 x 256), and glibc serves a block that large with a new mmap and
unmaps it when freed. Every 4 KiB page of it is then faulted in and zeroed by the kernel at
every step: 500,000 page faults per 125M step, a sixth of its time on a 2-core CPU (measured
in docs/benchmarks.md, "2026-11-29, night"). With `glibc.malloc.hugetlb=1` malloc marks those
blocks for transparent huge pages, which fault in 2 MiB at a time (5,000 faults per step).

The setting is one of glibc's tunables, read only when a process starts, hence the restart:
`restart_with_huge_pages()` re-executes the same command line, with the same process id, before
anything heavy is imported. It does nothing where it cannot help: outside Linux/glibc 2.35+,
when the kernel's transparent huge pages are `never`, or when GLIBC_TUNABLES already says
anything about `glibc.malloc.hugetlb` (set `glibc.malloc.hugetlb=0` to keep glibc's default).
On GPU and TPU hosts the device's memory is not malloc's, so only host-side buffers change.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def huge_pages_available(thp_setting: str = THP_SETTING) -> bool:
    """Can malloc ask for transparent huge pages here? Linux with glibc 2.35+ (the first with
    the `hugetlb` tunable) and the kernel's THP mode `always` or `madvise`."""
    if platform.system() != "Linux" or (_glibc_version() or (0, 0)) < (2, 35):
        return False
    try:
        with open(thp_setting) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tunables_with_huge_pages(current: str | None) -> str | None:
    """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added, or None where the variable already
    sets it (to anything: the user's choice stands)."""
    entries = [e for e in (current or "").split(":") if e]
    if any(e.split("=", 1)[0] == TUNABLE for e in entries):
        return None
    return ":".join(entries + [f"{TUNABLE}=1"])


def restart_with_huge_pages() -> None:
    """Re-execute this process's command line with huge pages for malloc, once (see the module
    docstring); return without doing anything where that cannot help or was already done."""
    tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES"))
    if tunables is None or not huge_pages_available():
        return
    sys.stdout.flush()
    sys.stderr.flush()  # execve drops what Python has not written yet
    # sys.orig_argv: the command line as given, interpreter options and `-m module` included.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
