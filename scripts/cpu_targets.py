"""Every CPU target of issue 12 in one command, each with its verdict.

    python scripts/cpu_targets.py [--json results.jsonl] [--only quickstart,train,generate,memory]

The targets are measured on whatever CPU this is, and they have been missed on some CPUs and met
on others (docs/benchmarks.md: a 2-vCPU Xeon with AMX against a 2-vCPU AMD EPYC). This script
runs the documented commands 1-4 of docs/benchmarks.md, each backend in its own process, one
after the other (about 14 minutes on 2 cores), and prints one table:

    quickstart (command 2)   neo's main.py against nanoGPT's CPU recipe, 2000 steps: tok/s >= 1.0x,
                             validation loss no worse
    train (command 1)        gpt_neo_125M step, batch 4 x 256, float32 and bfloat16: neo >= 1.0x
                             transformers' GPTNeo (the nanoGPT-style GPT runs beside it)
    generate (command 4)     gpt_neo_125M, 32 + 64 tokens, float32 and bfloat16, batch 1 and 8:
                             neo >= 2x transformers' generate()
    memory (command 3)       gpt_neo_1.3B, n_ctx 2048, 8 simulated devices, batch:x,embd:x, full
                             remat, bfloat16: temporary memory <= 4 GiB per device, 24 layers
                             compile in <= 1.5x the time of 4 (both looping: scan_unroll 1)

A ratio counts only from a quiet machine: before each run the script samples /proc/stat for a
second and prints how busy the CPUs were with nothing of ours running; a run that started on a
busy machine is marked in the table. A missed target says by how much; what limits it is
command 6's profile (scripts/profile_step.py). No TensorFlow or lm-eval import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from backend_process import run_backend  # noqa: E402

BENCHMARK = str(ROOT / "scripts" / "benchmark.py")
GENERATE = str(ROOT / "scripts" / "benchmark_generate.py")
GROUPS = ("quickstart", "train", "generate", "memory")
BUSY = 0.10  # CPU time taken by others, over the second before a run, above which a run is marked
GiB = 1 << 30


def cpu_busy(seconds: float = 1.0, stat: str = "/proc/stat") -> float | None:
    """The fraction of all CPUs' time spent outside idle and iowait over `seconds` (None where
    /proc/stat is missing): with none of our runs going, what others are using."""
    def sample():
        with open(stat) as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields[3:5]), sum(fields[:8])  # (idle + iowait, all but guest time)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def measure(script: str, argv: list[str], label: str, log: list[dict]) -> dict | None:
    """One child process; its RESULT with the time it started, how busy the CPUs were just
    before, and `label` (also appended to `log`)."""
    busy = cpu_busy()
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} {label}: {' '.join(argv)} (others busy {'?' if busy is None else f'{100 * busy:.0f}%'})",
          flush=True)
    r = run_backend(script, argv)
    if r is not None:
        r = {"label": label, "started": stamp, "others_busy": busy, **r}
        log.append(r)
        shown = (f"{r['tokens_per_s']:,.1f} tok/s" if "tokens_per_s" in r else
                 f"temp {r['temp_bytes'] / GiB:.2f} GiB, compiled in {r['compile_s']:.2f} s")
        print(f"    {shown}", flush=True)
    return r


def run_all(groups: set[str], args) -> list[dict]:
    log: list[dict] = []
    if "quickstart" in groups:
        for side in ("quickstart_neo", "quickstart_torch"):
            measure(BENCHMARK, ["--backend", side, "--quickstart_steps", str(args.quickstart_steps)], side, log)
    if "train" in groups:
        for precision in ("float32", "bfloat16"):
            for backend in ("neo", "transformers", "nanogpt"):
                measure(BENCHMARK, ["--model", "gpt_neo_125M", "--batch", "4", "--seq", "256", "--steps",
                                    str(args.steps), "--precision", precision, "--backend", backend],
                        f"train {precision} {backend}", log)
    if "generate" in groups:
        for precision in ("float32", "bfloat16"):
            for batch in (1, 8):
                for backend in ("neo", "torch"):
                    measure(GENERATE, ["--model", "gpt_neo_125M", "--prompt", "32", "--new", "64", "--reps",
                                       str(args.reps), "--precision", precision, "--batch", str(batch),
                                       "--backend", backend], f"generate {precision} b{batch} {backend}", log)
    if "memory" in groups:
        common = ["--compile_only", "--model", "gpt_neo_1.3B", "--seq", "2048", "--batch", "8", "--mesh_shape",
                  "x:8", "--layout", "batch:x,embd:x", "--recompute", "--precision", "bfloat16"]
        measure(BENCHMARK, common, "memory 24 layers", log)
        # scan_unroll 1: four layers alone would be unrolled (docs/configs.md), and the target is
        # about the loop's compile time at depth, so both programs loop
        measure(BENCHMARK, common + ["--set", "n_layer=4", "--set", 'attention_types=[[["global","local"],2]]',
                                     "--set", "scan_unroll=1"], "memory 4 layers", log)
    return log


def verdicts(log: list[dict]) -> list[dict]:
    """The targets from the runs in `log` (by label): one row each, with neo's figure, the
    competitor's, the ratio (or the figure itself), the verdict, and whether either run started
    on a busy machine. A target whose runs are missing or failed is absent."""
    by = {r["label"]: r for r in log}
    rows = []

    def row(target, neo, other, value, limit, higher_is_better, unit, runs):
        """limit None: a figure shown beside the targets, with no verdict."""
        met = None if limit is None else value >= limit if higher_is_better else value <= limit
        by_how_much = None if met is not False else (limit - value) / limit if higher_is_better else (
            value - limit) / limit
        rows.append({"target": target, "neo": neo, "other": other, "value": value, "limit": limit, "unit": unit,
                     "met": met, "missed_by": by_how_much,
                     "busy": any((by[l].get("others_busy") or 0) > BUSY for l in runs)})

    q = [by.get(l) for l in ("quickstart_neo", "quickstart_torch")]
    if all(q):
        row("quickstart tok/s, neo / nanoGPT", q[0]["tokens_per_s"], q[1]["tokens_per_s"],
            q[0]["tokens_per_s"] / q[1]["tokens_per_s"], 1.0, True, "x", ["quickstart_neo", "quickstart_torch"])
        row("quickstart validation loss, neo (<= nanoGPT's)", q[0]["val_loss"], q[1]["val_loss"],
            q[0]["val_loss"], q[1]["val_loss"], False, "", ["quickstart_neo", "quickstart_torch"])
    for precision in ("float32", "bfloat16"):
        labels = [f"train {precision} neo", f"train {precision} transformers"]
        if all(l in by for l in labels):
            neo, hf = (by[l]["tokens_per_s"] for l in labels)
            row(f"125M step {precision}, neo / transformers", neo, hf, neo / hf, 1.0, True, "x", labels)
            if f"train {precision} nanogpt" in by:
                nano = by[f"train {precision} nanogpt"]["tokens_per_s"]
                row(f"125M step {precision}, neo / nanoGPT-style (no target)", neo, nano, neo / nano, None, True,
                    "x", [labels[0], f"train {precision} nanogpt"])
    for precision in ("float32", "bfloat16"):
        for batch in (1, 8):
            labels = [f"generate {precision} b{batch} neo", f"generate {precision} b{batch} torch"]
            if all(l in by for l in labels):
                neo, hf = (by[l]["tokens_per_s"] for l in labels)
                row(f"generation {precision} b{batch}, neo / generate()", neo, hf, neo / hf, 2.0, True, "x",
                    labels)
    labels = ["memory 24 layers", "memory 4 layers"]
    if labels[0] in by:
        temp = by[labels[0]]["temp_bytes"] / GiB
        row("1.3B temporary memory per device, GiB", temp, None, temp, 4.0, False, "GiB", labels[:1])
    if all(l in by for l in labels):
        deep, shallow = (by[l]["compile_s"] for l in labels)
        row("1.3B compile time, 24 / 4 layers", deep, shallow, deep / shallow, 1.5, False, "x", labels)
    return rows


def describe_cpu() -> str:
    from neo.flops import cpu_peak_flops

    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        present = set(next(l for l in text.splitlines() if l.startswith("flags")).split(":", 1)[1].split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in present)
    except (OSError, StopIteration):
        pass
    return (f"{cpu_peak_flops('float32')[1]}; bfloat16 peak: {cpu_peak_flops('bfloat16')[1]}; "
            f"flags: {flags or '?'}; {len(os.sched_getaffinity(0))} usable CPU(s)")


def print_table(rows: list[dict]) -> None:
    figure = lambda x: "" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"
    print(f"\n{'target':55} {'neo':>9} {'other':>9} {'value':>7} {'limit':>7}  verdict")
    for r in rows:
        verdict = {True: "met", None: "-"}.get(r["met"]) or f"MISSED by {100 * r['missed_by']:.1f}%"
        print(f"{r['target']:55} {figure(r['neo']):>9} {figure(r['other']):>9} {r['value']:7.3f} "
              f"{figure(r['limit']):>7}  {verdict}" + ("  (started on a busy machine: measure again)" if r["busy"] else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {', '.join(GROUPS)}")
    p.add_argument("--quickstart_steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=10, help="timed train steps per backend")
    p.add_argument("--reps", type=int, default=5, help="generation repetitions per backend (median)")
    p.add_argument("--json", help="append every run's result and every verdict as JSON lines to this file")
    args = p.parse_args()
    groups = set(args.only.split(","))
    if groups - set(GROUPS):
        p.error(f"--only: unknown {', '.join(sorted(groups - set(GROUPS)))}; choose from {', '.join(GROUPS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    date = time.strftime("%Y-%m-%d %H:%M")
    print(f"{date}; {describe_cpu()}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    log = run_all(groups, args)
    rows = verdicts(log)
    print_table(rows)
    if args.json:
        with open(args.json, "a") as f:
            for r in log + rows:
                f.write(json.dumps({"date": date, **r}) + "\n")
    if not rows:
        raise SystemExit("no target could be measured (see the errors above)")


if __name__ == "__main__":
    main()
