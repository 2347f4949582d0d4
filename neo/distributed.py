"""Multi-host bring-up: JAX's own distributed runtime, started before any device is touched.

neo has no launcher of its own. On a Cloud TPU VM (`--tpu NAME`) and under SLURM,
`jax.distributed.initialize()` finds the other processes by itself; every host runs the same
command (scripts/tpu_run.sh does that for a pod slice; scripts/slurm.sbatch under SLURM).
Anywhere else every process is given three variables (docs/training.md): JAX_COORDINATOR_ADDRESS
(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; on CPU the processes exchange
data over gloo (JAX's default CPU collectives), which the multi-process tests use.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shlex
import sys
from typing import Mapping, Optional

from neo.errors import NeoError


def on_tpu_vm(env: Mapping[str, str] = os.environ) -> bool:
    """Is this process on a Cloud TPU VM (TPU chips attached)?"""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or env.get("TPU_ACCELERATOR_TYPE"))


def slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """A SLURM job step with more than one task (one process per task)."""
    return "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1


def how_to_launch(tpu: str, argv: Optional[list[str]] = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    command = " ".join(shlex.quote(a) for a in ["python", *argv])
    return (
        f"--tpu {tpu}: this machine is not a Cloud TPU VM, and neo runs on the TPU VM itself (on a pod "
        f"slice, every worker runs the same command). From this machine:\n"
        f"    scripts/tpu_run.sh {tpu} --zone ZONE -- {command}\n"
        f"which runs it on every worker, like\n"
        f"    gcloud compute tpus tpu-vm ssh {tpu} --zone ZONE --worker=all --command 'cd neo && {command}'\n"
        f"(scripts/tpu_run.sh --setup clones neo and installs jax[tpu] on the workers first.)"
    )


def initialize(tpu: Optional[str] = None, env: Mapping[str, str] = os.environ) -> None:
    """Start the distributed runtime where a multi-process job is detected; refuse `--tpu` off a
    TPU VM with the command that would work."""
    import jax

    if tpu:
        if not on_tpu_vm(env):
            raise NeoError(how_to_launch(tpu))
        if importlib.util.find_spec("libtpu") is None:
            raise NeoError("this is a TPU VM but JAX's TPU runtime is missing: pip install 'jax[tpu]'.")
        if tpu != "colab":  # a pod slice (or a single host: initialize is then a no-op handshake)
            jax.distributed.initialize()
    elif slurm_job(env):
        jax.distributed.initialize()
    else:  # any other cluster: the three variables, set by hand or by a launcher
        manual = manual_settings(env)
        if manual is not None:
            jax.distributed.initialize(*manual)


MANUAL = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def manual_settings(env: Mapping[str, str] = os.environ) -> Optional[tuple[str, int, int]]:
    """(address, process count, process id) from the three variables, None when none is set;
    some but not all of them, or values that cannot be right, are an error saying what to set."""
    given = {k: env[k] for k in MANUAL if env.get(k, "").strip()}
    if not given:
        return None
    example = ("JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 (1 on the second "
               "host), the same address and count on every host")
    missing = [k for k in MANUAL if k not in given]
    if missing:
        raise NeoError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not: a multi-process run needs all three, e.g. "
                       f"{example} (docs/training.md); unset them for a single-process run.")
    address = given["JAX_COORDINATOR_ADDRESS"].strip()
    host, _, port = address.rpartition(":")
    try:
        count, index = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
    except ValueError:
        count = index = -1
    if not host or not port.isdigit() or count < 1 or not 0 <= index < count:
        raise NeoError(f"JAX_COORDINATOR_ADDRESS={address!r} JAX_NUM_PROCESSES={given['JAX_NUM_PROCESSES']!r} "
                       f"JAX_PROCESS_ID={given['JAX_PROCESS_ID']!r}: need host:port, a count >= 1 and an id "
                       f"in 0..count-1, e.g. {example}.")
    return address, count, index
