"""The kernels of a device, summed from a Perfetto trace that jax.profiler wrote
(`scripts/benchmark.py --profile DIR` writes DIR/plugins/profile/*/perfetto_trace.json.gz):

    python scripts/trace_kernels.py /tmp/neo_gpu/profile_b8.json.gz [--device GPU] [--steps 2] [--top 25]

Prints per traced step the device's busy time and the kernel time by kind (matmul: cuBLAS's
nvjet/cutlass kernels and XLA's gemm fusions; attention: cuDNN's flash attention; copies:
memcpy kernels; other: XLA's elementwise and reduction fusions, the optimizer), then the `--top`
costliest kernels. This is how docs/benchmarks.md splits the H200 step. Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def kind(name: str) -> str:
    n = name.lower()
    if "cudnn" in n or "fmha" in n or "flash" in n:
        return "attention"
    if n.startswith(("nvjet", "cutlass", "sm90_xmma", "ampere_", "sm80_")) or "gemm" in n:
        return "matmul"
    if n.startswith("memcpy") or "copy" in n:
        return "copies"
    return "other"


def summarize(path: str, device: str = "GPU") -> tuple[float, collections.Counter, collections.Counter]:
    """(busy span in ms, ms per kernel name, ms per kind) of the trace's `device` processes."""
    data = json.load(gzip.open(path) if path.endswith(".gz") else open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    per_kernel, per_kind = collections.Counter(), collections.Counter()
    start, end = float("inf"), 0.0
    for e in events:
        if e.get("ph") != "X" or device not in names.get(e["pid"], ""):
            continue
        ms = e.get("dur", 0) / 1e3
        per_kernel[e["name"]] += ms
        per_kind[kind(e["name"])] += ms
        start, end = min(start, e["ts"]), max(end, e["ts"] + e.get("dur", 0))
    if not per_kernel:
        raise SystemExit(f"{path}: no kernels of a '{device}' device in this trace "
                         f"(processes: {sorted(set(names.values()))}); pass --device")
    return (end - start) / 1e3, per_kernel, per_kind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--device", default="GPU", help="a substring of the device's process name (GPU, TPU, CPU)")
    p.add_argument("--steps", type=int, default=2, help="how many steps the trace holds (benchmark.py traces 2)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    span, per_kernel, per_kind = summarize(args.trace, args.device)
    s = args.steps
    total = sum(per_kind.values())
    print(f"per step: span {span / s:.1f} ms, kernels {total / s:.1f} ms")
    for k, ms in per_kind.most_common():
        print(f"  {k:10} {ms / s:8.1f} ms  {100 * ms / total:5.1f}%")
    print(f"\n{args.top} costliest kernels (ms per step):")
    for name, ms in per_kernel.most_common(args.top):
        print(f"  {ms / s:8.2f}  {name[:110]}")


if __name__ == "__main__":
    main()
