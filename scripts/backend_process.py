"""Run one backend of a benchmark in a process of its own and read back its result.

scripts/benchmark.py, benchmark_generate.py and profile_step.py measure each backend (neo,
transformers, the nanoGPT-style torch GPT) in its own process, one after the other: JAX's and
PyTorch's thread pools disturb each other within one process. The child is the same script run
again with `--backend NAME` (and whatever the caller adds); it prints one line `RESULT {json}`.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run_backend(script: str, argv: list[str]) -> dict | None:
    """`python script *argv` in a new process -> its RESULT line's JSON, or None with the child's
    error printed (so one failing backend does not hide the others' numbers)."""
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        name = argv[argv.index("--backend") + 1] if "--backend" in argv else script
        print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[7:])
