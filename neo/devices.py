"""Which devices a run uses: `--gpu_ids`, `--tpu`, or everything JAX sees."""

from __future__ import annotations

import re
from typing import Sequence

import jax

from neo.errors import NeoError


def parse_gpu_ids(values: Sequence[str]) -> list[int]:
    """GPT-Neo's "device:GPU:0" strings and plain integers ("0", "1", "0,1") -> [0, 1]."""
    ids = []
    for v in values:
        for part in re.split(r"[,\s]+", v.strip()):
            if not part:
                continue
            m = re.fullmatch(r"(?:/?device:)?(?:GPU:)?(\d+)", part, flags=re.IGNORECASE)
            if not m:
                raise NeoError(f"--gpu_ids: cannot read {part!r}; use integers (0 1) or device:GPU:0.")
            ids.append(int(m.group(1)))
    if len(set(ids)) != len(ids):
        raise NeoError(f"--gpu_ids lists a GPU twice: {ids}.")
    return ids


def select_devices(gpu_ids: Sequence[str] = ()) -> list:
    """All devices, or the GPUs named by `--gpu_ids` (by their id on this host)."""
    devices = jax.devices()
    ids = parse_gpu_ids(gpu_ids)
    if not ids:
        return devices
    if devices[0].platform != "gpu":
        raise NeoError(f"--gpu_ids {' '.join(map(str, ids))} given, but JAX sees no GPUs here "
                       f"(platform '{devices[0].platform}'); drop --gpu_ids or install jax[cuda].")
    local_id = lambda d: d.local_hardware_id if d.local_hardware_id is not None else d.id
    local = {local_id(d) for d in jax.local_devices()}
    missing = [i for i in ids if i not in local]
    if missing:
        raise NeoError(f"--gpu_ids: GPU(s) {missing} do not exist; this host has GPUs {sorted(local)}.")
    # The same ids on every host of a multi-process run, in process order.
    return [d for d in devices if local_id(d) in ids]
