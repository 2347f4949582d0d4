"""Memory per device of a train state under a layout, known before anything is compiled."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax


def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs placed on `shardings`."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def device_memory(device: jax.Device) -> Optional[int]:
    """The memory one device can allocate, if the runtime says (GPU/TPU); None on CPU."""
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices and some runtimes have no memory_stats
        return None
    return (stats or {}).get("bytes_limit")


def memory_limit(local: Sequence[jax.Device]) -> tuple[Optional[int], str]:
    """What one of this process's devices (`local`) may hold, and whose figure that is: the
    runtime's limit on GPU/TPU (`device_memory`); on CPU, where every device of a process lives in
    the host's memory, the host's available memory (MemAvailable) shared evenly among them.
    (None, "") where neither is known."""
    limit = device_memory(local[0])
    if limit:
        return limit, f"a {local[0].device_kind}"
    available = host_available_memory() if local[0].platform == "cpu" else None
    if not available:
        return None, ""
    shared = f" ({gib(available)}) shared by its {len(local)} CPU devices" if len(local) > 1 else ""
    return available // len(local), f"this host's available memory{shared}"


def host_available_memory() -> Optional[int]:
    """The host memory the kernel says can be allocated without swapping (MemAvailable), or
    None where /proc/meminfo does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number readable."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
