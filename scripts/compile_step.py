"""Compile neo's real train step without running it, and report what XLA made of it.

    python scripts/compile_step.py --model gpt_neo_1.3B --batch 8 --devices 8 \
        --mesh_shape x:8 --layout batch:x,embd:x --set remat_policy=full --layers 4

Lowers and compiles the train step (neo/train.py) for abstract inputs on `--devices`
simulated CPU devices, so a model far too big to run here can still be measured: compile time
and `compiled.memory_analysis()` per device. Prints one line `RESULT {json}` with `compile_s`,
`temp_bytes`, `argument_bytes`, `output_bytes`, `alias_bytes` and, with `--top N`, the N
largest slices of XLA's memory-usage report (what dominates the temporary memory).
The step is never run. docs/benchmarks.md records the 1.3B numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_neo_1.3B")
    p.add_argument("--batch", type=int, default=8, help="train_batch_size (global)")
    p.add_argument("--seq", type=int, default=None, help="n_ctx (default: the config's)")
    p.add_argument("--layers", type=int, default=None,
                   help="n_layer, keeping the config's first attention_types (default: the config's)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--mesh_shape", default="x:8")
    p.add_argument("--layout", default="batch:x,embd:x")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, VALUE read as JSON when it parses (repeatable)")
    p.add_argument("--top", type=int, default=0, help="list the N largest temporary buffers")
    return p.parse_args()


def overrides(args: argparse.Namespace) -> dict:
    out = {"train_batch_size": args.batch, "mesh_shape": args.mesh_shape, "layout": args.layout}
    if args.seq is not None:
        out["n_ctx"] = args.seq
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def largest_temporaries(dump: Path, n: int) -> list[dict]:
    """The n largest slices of the train step's temporary memory, each with the shapes of the
    values XLA placed in it over the step (its memory-usage report, largest first)."""
    reports = sorted(dump.glob("*jit_step*memory-usage-report.txt"))
    if not reports:
        return []
    rows = re.findall(r"^\s+[\d.]+\w+\(\s*\d+%\);\s+([\d.]+)(\w+);\s+\d+;\s+\d+;\s+(.*)$",
                      reports[-1].read_text(), flags=re.M)
    unit = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
    return [{"mib": round(float(size) * unit[u] / 2 ** 20, 1), "shapes": shapes} for size, u, shapes in rows[:n]]


def main() -> None:
    args = parse_args()
    dump = Path(tempfile.mkdtemp(prefix="neo_compile_"))
    flags = [f"--xla_force_host_platform_device_count={args.devices}"]
    if args.top:
        flags += [f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text"]
    os.environ["XLA_FLAGS"] = " ".join(flags + [os.environ.get("XLA_FLAGS", "")])

    import jax
    import jax.numpy as jnp

    from neo.config import load_model_config
    from neo.mesh import make_layout
    from neo.train import build

    cfg = load_model_config(args.model, overrides(args))
    if args.layers is not None:
        kinds = list(cfg.model.attention_types[:args.layers])
        cfg = load_model_config(args.model, {**overrides(args), "n_layer": args.layers,
                                             "attention_types": [[kinds, 1]]})
    setup = build(cfg, make_layout(cfg.run.mesh_shape, cfg.run.layout))
    state = jax.eval_shape(setup.init)
    batch = jax.ShapeDtypeStruct((cfg.run.train_batch_size, cfg.model.n_ctx + 1), jnp.int32,
                                 sharding=setup.batch_sharding)
    start = time.perf_counter()
    compiled = setup.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    result = {"model": args.model, "n_layer": cfg.model.n_layer, "n_ctx": cfg.model.n_ctx, "batch": args.batch,
              "mesh_shape": args.mesh_shape, "layout": args.layout, "remat": cfg.model.remat,
              "scan_period": cfg.model.scan_period, "attention_impl": cfg.model.attention_impl,
              "precision": cfg.model.precision, "compile_s": round(compile_s, 2),
              "temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
              "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}
    if args.top:
        result["largest_temporaries"] = largest_temporaries(dump, args.top)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
