"""Mesh/layout examples for the shipped configs on a TPU v3-8, a v3-256 pod slice and one node
of 8 x 80 GB GPUs, chosen by neo's auto layout (neo/auto_layout.py).

    python scripts/layout_examples.py            # rewrite configs/layouts/examples.json, print the table
    python scripts/layout_examples.py --check    # fail if the stored examples differ

The stored file is what docs/layouts.md shows and what tests/test_configs.py re-checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "configs" / "layouts" / "examples.json"
TARGETS = ("tpu-v3-8", "tpu-v3-256", "gpu-8x80g")


def shipped() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.json"))
    return [n for n in names if n.startswith(("gpt_neo_", "gpt3_"))]


def examples() -> dict:
    from neo.auto_layout import TARGETS as PRESETS, GiB, Target, config_lines, rank
    from neo.config import load_model_config

    out: dict = {}
    for name in shipped():
        cfg = load_model_config(name)
        out[name] = {}
        for key in TARGETS:
            n, mem, label = PRESETS[key]
            ranked = rank(cfg, Target(n, mem, label))
            best = ranked[0] if ranked else None
            if best is None or not best.fits:
                need = best.memory / GiB if best else float("nan")
                out[name][key] = {"fits": False,
                                  "note": f"does not fit: the best candidate needs {need:.1f} GiB per device"}
                continue
            settings = json.loads("{" + "".join(config_lines(cfg, best)) + "}")
            out[name][key] = {"fits": True, **settings, "memory_gib": round(best.memory / GiB, 2),
                              "comm_gb_per_step": round(best.communication / 1e9, 2)}
    return out


def markdown(data: dict) -> str:
    lines = ["| config | target | mesh_shape | layout | other settings | GiB/device | comm/step |",
             "|---|---|---|---|---|---|---|"]
    for name, per in data.items():
        for key, e in per.items():
            if not e["fits"]:
                lines.append(f"| {name} | {key} | | | {e['note']} | | |")
                continue
            other = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in e.items()
                              if k in ("tokens_per_mb_per_replica", "recompute_grad"))
            lines.append(f"| {name} | {key} | `{e['mesh_shape']}` | `{e['layout']}` | {other} | "
                         f"{e['memory_gib']} | {e['comm_gb_per_step']} GB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    data = examples()
    if args.check:
        stored = json.loads(OUT.read_text())
        if stored != data:
            sys.exit(f"{OUT} is out of date; run python scripts/layout_examples.py")
        print("examples up to date")
        return
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(data))


if __name__ == "__main__":
    main()
