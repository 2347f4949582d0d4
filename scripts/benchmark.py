"""Train-step speed of neo against transformers' PyTorch GPT-Neo on the same model and batch.

    python scripts/benchmark.py --model gpt_neo_125M --batch 4 --seq 256 --steps 10

Reports tokens/s, median step time and MFU (neo/flops.py states the FLOP formula; the peak is
the device's data-sheet number, or on CPU a measured float32 matmul rate), then the ratio.
Each backend runs in its own process (their thread pools disturb each other). Batches are
synthetic token ids: this measures the step, not the input pipeline. No TensorFlow import.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_cfg(args):
    from neo.config import load_model_config

    overrides = {"train_batch_size": args.batch, "n_ctx": args.seq, "precision": args.precision,
                 "datasets": [], "mesh_shape": args.mesh_shape, "layout": args.layout}
    if args.recompute:
        overrides["recompute_grad"] = True
    for item in args.set:
        k, _, v = item.partition("=")
        overrides[k] = json.loads(v)
    return load_model_config(args.model, overrides)


def tokens(cfg, seed=0):
    import numpy as np

    shape = (cfg.run.train_batch_size, cfg.model.n_ctx + 1)
    return np.random.RandomState(seed).randint(0, cfg.model.n_vocab, shape).astype(np.int32)


def bench_neo(args) -> dict:
    import jax

    from neo.flops import device_peak_flops, flops_per_token
    from neo.mesh import make_layout
    from neo.train import build, global_batch

    cfg = load_cfg(args)
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    setup = build(cfg, make_layout(cfg.run.mesh_shape, cfg.run.layout, devices))
    state = setup.init()
    batch = global_batch(setup, tokens(cfg))
    t = time.perf_counter()
    state, m = setup.step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        state, m = setup.step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = setup.step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    peak, peak_src = device_peak_flops(devices[0], cfg.model.precision)
    total_peak = peak if devices[0].platform == "cpu" else peak * len(devices)
    step = statistics.median(times)
    tps = cfg.run.train_batch_size * cfg.model.n_ctx / step
    return {"backend": "neo (jax)", "device": f"{len(devices)} x {devices[0].device_kind}",
            "params": setup.param_count, "step_s": step, "tokens_per_s": tps, "compile_s": compile_s,
            "mfu": flops_per_token(cfg.model) * tps / total_peak, "peak_flops": total_peak, "peak_source": peak_src,
            "flops_per_token": flops_per_token(cfg.model), "loss": float(m["loss"])}


def bench_torch(args) -> dict:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from neo.convert.gpt_neo import config_to_hf
    from neo.flops import flops_per_token, measured_matmul_flops

    cfg = load_cfg(args)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTNeoForCausalLM(GPTNeoConfig(**config_to_hf(cfg))).to(device).train()
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    batch = torch.tensor(tokens(cfg), dtype=torch.long, device=device)
    dtype = torch.bfloat16 if cfg.model.precision == "bfloat16" else None

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        if cfg.optimizer.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.gradient_clipping)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    for _ in range(1 + args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    tps = cfg.run.train_batch_size * cfg.model.n_ctx / s
    if device == "cpu":
        peak = measured_matmul_flops()  # the same yardstick as neo's CPU MFU (a JAX matmul)
    else:
        from neo.flops import _PEAKS
        name = torch.cuda.get_device_name().lower()
        peak = next((p for k, p in _PEAKS.items() if k in name), float("nan"))
    return {"backend": "transformers (torch)", "device": device, "step_s": s, "tokens_per_s": tps,
            "mfu": flops_per_token(cfg.model) * tps / peak, "loss": float(loss)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_neo_125M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh_shape", default="")
    p.add_argument("--layout", default="")
    p.add_argument("--devices", type=int, default=1, help="how many devices neo uses (0 = all)")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--set", action="append", default=[], help="config override key=JSON")
    p.add_argument("--backend", choices=["both", "neo", "torch"], default="both")
    p.add_argument("--json", help="append the results as JSON lines to this file")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.backend != "both":
        result = bench_neo(args) if args.backend == "neo" else bench_torch(args)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for backend in ("neo", "torch"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--backend", backend],
                             capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{backend} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[7:]))
    cfg_desc = f"{args.model}, batch {args.batch} x seq {args.seq}, {args.precision}"
    print(f"\n{cfg_desc}")
    print(f"{'backend':24} {'step (s)':>10} {'tokens/s':>12} {'MFU':>8}")
    for r in results:
        print(f"{r['backend']:24} {r['step_s']:10.4f} {r['tokens_per_s']:12,.0f} {100 * r['mfu']:7.2f}%")
    if len(results) == 2:
        print(f"neo / torch throughput: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    if results and "peak_source" in results[0]:
        print(f"peak: {results[0]['peak_flops'] / 1e9:,.0f} GFLOP/s ({results[0]['peak_source']}); "
              f"{results[0]['flops_per_token'] / 1e6:,.1f} MFLOP per token (neo/flops.py)")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({"config": cfg_desc, "date": time.strftime("%Y-%m-%d"), **r}) + "\n")


if __name__ == "__main__":
    main()
