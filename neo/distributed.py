"""Multi-host bring-up: JAX's own distributed runtime, started before any device is touched.

neo has no launcher of its own. On a Cloud TPU VM (`--tpu NAME`) and under SLURM,
`jax.distributed.initialize()` finds the other processes by itself; every host runs the same
command (scripts/tpu_run.sh does that for a pod slice; scripts/slurm.sbatch under SLURM).
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
    elif env.get("JAX_COORDINATOR_ADDRESS"):  # any other cluster: set the variables by hand
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
