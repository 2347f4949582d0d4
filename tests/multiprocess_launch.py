"""Run neo as several processes on this machine, the way a cluster without SLURM or TPU runs it:
every process gets JAX_COORDINATOR_ADDRESS (process 0's host:port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID (docs/training.md), and its own simulated CPU devices; JAX's CPU backend runs the
collectives between the processes over gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int = 2, devices: int = 4, cwd: Path = ROOT, timeout: float = 400,
           env: dict | None = None) -> list[Result]:
    """`python ARGS` as `processes` processes of `devices` CPU devices each (one process without
    the three variables when processes == 1). When one fails the others are stopped, since they
    would wait for it until the coordinator's timeout."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            **(env or {})}
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        base.pop(key, None)
    address = f"localhost:{free_port()}"
    procs, files = [], []
    for i in range(processes):
        env_i = dict(base)
        if processes > 1:
            env_i.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env_i, stdout=out, stderr=err))
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    results = []
    for p, (out, err) in zip(procs, files):
        out.seek(0)
        err.seek(0)
        results.append(Result(p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results
