"""Train-step speed of neo against two PyTorch references on the same model and batch:
transformers' GPTNeo, and a minimal nanoGPT-style GPT (scripts/torch_reference.py).

    python scripts/benchmark.py --model gpt_neo_125M --batch 4 --seq 256 --steps 10 [--precision bfloat16]
    python scripts/benchmark.py --compile_only --model gpt_neo_1.3B --seq 2048 --batch 8 \\
        --mesh_shape x:8 --layout batch:x,embd:x --recompute --precision bfloat16
    python scripts/benchmark.py --quickstart [--quickstart_steps 2000]

Step mode: tokens/s, median step time and MFU of each backend, each in its own process, one
after the other (their thread pools disturb each other), on synthetic token ids (this measures
the step, not the input pipeline). Both PyTorch sides run AdamW and the config's gradient
clipping; in bfloat16 runs they use torch.autocast (on CPU too) with float32 weights, as neo
keeps float32 parameters. MFU = FLOPs per token (neo/flops.py) x tokens/s / peak; the peak is
the data sheet's on GPU/TPU (H100/H200: 989 TFLOP/s bf16 dense) and on CPU the theoretical
peak of the detected CPU (cores x FLOPs per cycle x clock, AMX/AVX512_BF16 for bfloat16;
neo/flops.py `cpu_peak_flops` states the formula), printed with the measured matmul rates of
JAX and PyTorch beside it. The nanoGPT reference attends globally in every layer, and its
MFU counts its own FLOPs.

--compile_only: compile neo's train step (nothing runs) and print one line
`RESULT {json}` with compile_s and the compiled step's memory_analysis() (temp_bytes,
argument_bytes, output_bytes, alias_bytes, generated_code_bytes); on CPU, a --mesh_shape
larger than one device gets that many simulated devices. `--top N` adds the N largest slices
of XLA's memory-usage report of the step (`largest_temporaries`: MiB and the shapes XLA placed
there over the step), which says what dominates the temporary memory.

--quickstart: neo's real training loop (`main.py --model quickstart`, its logged tokens/s,
compilation and evaluation excluded) against nanoGPT's CPU recipe for the same shape
(train_shakespeare_char with 4 layers, 128 wide, context 64, batch 12, no dropout, no
torch.compile: lr 1e-3 cosine to 1e-4, warm-up 100, AdamW betas 0.9/0.99, weight decay 0.1,
clipping 1.0) trained on exactly neo's batches, then both validated on neo's 200 held-out
batches (`--quickstart_eval_steps N`: the first N of them). 2000 steps take minutes.

--profile DIR (neo): after the timed steps, jax.profiler traces two more into DIR, with a
Perfetto trace-event file that scripts/trace_kernels.py sums by kernel. neo's RESULT also
names the custom calls of the compiled step (`custom_calls`: cuDNN's flash attention is
`__cudnn$fmha...`, cuBLAS `__cublas$lt$matmul`). scripts/benchmark_gpu.sh runs the GPU set.

No TensorFlow or lm-eval import (tests/test_benchmark.py checks it with both blocked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from backend_process import run_backend  # noqa: E402

from neo.host_memory import restart_with_huge_pages  # noqa: E402

BACKENDS = ("neo", "transformers", "nanogpt")
NAMES = {"neo": "neo (jax)", "transformers": "transformers GPTNeo", "nanogpt": "nanoGPT-style torch"}


def load_cfg(args):
    from neo.config import load_model_config

    overrides = {"precision": args.precision, "datasets": [], "mesh_shape": args.mesh_shape, "layout": args.layout}
    if args.batch:
        overrides["train_batch_size"] = args.batch
    if args.seq:
        overrides["n_ctx"] = args.seq
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


# ----------------------------------------------------------------------------------------------
# neo


def neo_layout(cfg, args):
    import jax

    from neo.mesh import make_layout

    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    return make_layout(cfg.run.mesh_shape, cfg.run.layout, devices)


def bench_neo(args) -> dict:
    import jax
    import numpy as np

    from neo.flops import device_peak_flops, flops_per_token, measured_matmul_flops
    from neo.train import build, global_batches

    cfg = load_cfg(args)
    layout = neo_layout(cfg, args)
    devices = list(layout.mesh.devices.flat)
    setup = build(cfg, layout)
    state = setup.init()
    k = args.steps_per_call
    stack = global_batches(setup, np.stack([tokens(cfg, i) for i in range(k)]))
    t = time.perf_counter()
    call = setup.steps.lower(state, stack).compile()
    compile_s = time.perf_counter() - t
    for _ in range(1 + args.warmup):
        state, m = call(state, stack)
    jax.block_until_ready(m)
    times = []
    for _ in range(max(1, args.steps // k)):
        t = time.perf_counter()
        state, m = call(state, stack)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / k)
    if args.profile:  # after the timed steps, so tracing costs them nothing
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(2):
                state, m = call(state, stack)
            jax.block_until_ready(m)
    peak, source = device_peak_flops(devices[0], cfg.model.precision)
    total_peak = peak if devices[0].platform == "cpu" else peak * len(devices)
    step = statistics.median(times)
    tps = cfg.run.train_batch_size * cfg.model.n_ctx / step
    out = {"backend": NAMES["neo"], "device": f"{len(devices)} x {devices[0].device_kind}",
           "params": setup.param_count, "step_s": step, "tokens_per_s": tps, "compile_s": compile_s,
           "steps_per_call": k, "flops_per_token": flops_per_token(cfg.model),
           "mfu": flops_per_token(cfg.model) * tps / total_peak, "peak_flops": total_peak, "peak_source": source,
           "loss": float(m["loss"][-1])}
    if devices[0].platform == "cpu":
        out["matmul_flops"] = {d: measured_matmul_flops(d) for d in ("float32", "bfloat16")}
    out["custom_calls"] = custom_calls(call.as_text())  # which kernels: cuDNN's attention is "__cudnn$fmha..."
    return out


def custom_calls(hlo: str) -> dict:
    """{custom-call target: count} in compiled HLO text."""
    import collections
    import re

    return dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def compile_only(args) -> dict:
    """Compile neo's train step for these shapes (nothing runs) and read its memory_analysis()."""
    import jax
    import jax.numpy as jnp

    from neo.train import build

    cfg = load_cfg(args)
    layout = neo_layout(cfg, args)
    t = time.perf_counter()
    setup = build(cfg, layout)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         jax.eval_shape(setup.init), setup.state_shardings)
    batch = jax.ShapeDtypeStruct((cfg.run.train_batch_size, cfg.model.n_ctx + 1), jnp.int32,
                                 sharding=setup.batch_sharding)
    compiled = setup.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    m = compiled.memory_analysis()
    return {"model": args.model, "seq": cfg.model.n_ctx, "batch": cfg.run.train_batch_size,
            "mesh_shape": args.mesh_shape, "layout": args.layout, "recompute": cfg.model.recompute_grad,
            "precision": cfg.model.precision, "set": args.set, "devices": layout.mesh.size,
            "device_kind": layout.mesh.devices.flat[0].device_kind, "params": setup.param_count,
            "compile_s": compile_s, "temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
            "generated_code_bytes": m.generated_code_size_in_bytes,
            **({"largest_temporaries": largest_temporaries(args.dump, args.top)} if args.top else {})}


def largest_temporaries(dump: str, n: int) -> list[dict]:
    """The n largest slices of the train step's temporary memory from XLA's memory-usage report
    (the biggest report in the dump is the step's), each with the shapes that used it."""
    import re

    reports = sorted(Path(dump).glob("*memory-usage-report.txt"), key=lambda f: f.stat().st_size)
    if not reports:
        return []
    rows = re.findall(r"^\s+[\d.]+\w+\(\s*\d+%\);\s+([\d.]+)(\w+);\s+\d+;\s+\d+;\s+(.*)$",
                      reports[-1].read_text(), flags=re.M)
    unit = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
    return [{"mib": round(float(size) * unit[u] / 2 ** 20, 1), "shapes": shapes} for size, u, shapes in rows[:n]]


# ----------------------------------------------------------------------------------------------
# PyTorch


def torch_setup(cfg):
    """(device, autocast dtype or None, peak FLOP/s, its source, measured matmul rates or None)."""
    import torch

    from neo.flops import accelerator_peak_flops, cpu_peak_flops

    autocast = torch.bfloat16 if cfg.model.precision == "bfloat16" else None
    if torch.cuda.is_available():
        peak, source = accelerator_peak_flops(torch.cuda.get_device_name(), cfg.model.precision)
        return "cuda", autocast, peak, source, None
    peak, source = cpu_peak_flops(cfg.model.precision)
    return "cpu", autocast, peak, source, {d: torch_matmul_flops(d) for d in ("float32", "bfloat16")}


def torch_matmul_flops(dtype: str, n: int = 2048, reps: int = 10) -> float:
    import torch

    a = torch.ones(n, n, dtype=getattr(torch, dtype))
    a @ a
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def time_torch(step, args, device: str) -> list[float]:
    import torch

    for _ in range(1 + args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def torch_result(backend, cfg, times, device, peak, source, matmul, flops_per_token, loss, params) -> dict:
    s = statistics.median(times)
    tps = cfg.run.train_batch_size * cfg.model.n_ctx / s
    out = {"backend": NAMES[backend], "device": device, "params": params, "step_s": s, "tokens_per_s": tps,
           "flops_per_token": flops_per_token, "mfu": flops_per_token * tps / peak, "peak_flops": peak,
           "peak_source": source, "loss": float(loss.detach() if hasattr(loss, "detach") else loss)}
    if matmul:
        out["matmul_flops"] = matmul
    return out


def bench_transformers(args) -> dict:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from neo.convert.gpt_neo import config_to_hf
    from neo.flops import flops_per_token

    cfg = load_cfg(args)
    device, autocast, peak, source, matmul = torch_setup(cfg)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(**config_to_hf(cfg))).to(device).train()
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    batch = torch.tensor(tokens(cfg), dtype=torch.long, device=device)
    loss = None

    def step():
        nonlocal loss
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(batch[:, :-1], labels=batch[:, :-1]).loss  # transformers shifts the labels itself
        loss.backward()
        if o.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.gradient_clipping)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_torch(step, args, device)
    params = sum(p.numel() for p in model.parameters())
    return torch_result("transformers", cfg, times, device, peak, source, matmul, flops_per_token(cfg.model),
                        loss, params)


def bench_nanogpt(args) -> dict:
    import dataclasses

    import torch

    from neo.flops import flops_per_token
    from torch_reference import NanoGPT, make_optimizer, train_step

    cfg = load_cfg(args)
    m, o = cfg.model, cfg.optimizer
    device, autocast, peak, source, matmul = torch_setup(cfg)
    torch.manual_seed(0)
    model = NanoGPT(m.n_layer, m.n_head, m.n_embd, m.n_ctx, m.n_vocab).to(device).train()
    opt = make_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), device)
    batch = torch.tensor(tokens(cfg), dtype=torch.long, device=device)
    loss = None

    def step():
        nonlocal loss
        loss = train_step(model, opt, batch, o.gradient_clipping, autocast)

    times = time_torch(step, args, device)
    all_global = dataclasses.replace(m, attention_types=("global",) * m.n_layer)
    params = sum(p.numel() for p in model.parameters())
    return torch_result("nanogpt", cfg, times, device, peak, source, matmul, flops_per_token(all_global), loss,
                        params)


# ----------------------------------------------------------------------------------------------
# --quickstart: neo's training loop vs nanoGPT's CPU recipe


def quickstart_overrides(args) -> dict:
    """The quickstart config's overrides, the same for both loops: train_steps, and eval_steps
    where --quickstart_eval_steps is given."""
    evals = {} if args.quickstart_eval_steps is None else {"eval_steps": args.quickstart_eval_steps}
    return {"train_steps": args.quickstart_steps, **evals}


def quickstart_neo(args) -> dict:
    """`main.py --model quickstart` in its own process; tokens/s as its log reports them."""
    with tempfile.TemporaryDirectory(prefix="neo-quickstart-") as work:  # its checkpoints: 9 MB a run
        sets = {"model_path": work, "predict_steps": 0, **quickstart_overrides(args)}
        cmd = [sys.executable, str(ROOT / "main.py"), "--model", "quickstart",
               *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        if out.returncode:
            raise SystemExit(f"neo quickstart failed:\n{out.stderr[-3000:]}")
        records = [json.loads(l) for l in Path(work, "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    tokens_per_step = 12 * 64
    steps = seconds = 0.0
    previous = 0
    for r in train:  # each record's rate covers the steps since the previous record
        if "tokens_per_sec" in r:
            n = r["step"] - previous
            steps, seconds = steps + n, seconds + n * tokens_per_step / r["tokens_per_sec"]
        previous = r["step"]
    evals = [r for r in records if r["kind"] == "eval"]
    return {"backend": "neo main.py --model quickstart", "tokens_per_s": steps * tokens_per_step / seconds,
            "train_s": seconds, "wall_s": wall, "steps": train[-1]["step"], "train_loss": train[-1]["loss"],
            "val_loss": evals[-1]["eval_loss"] if evals else float("nan")}


def quickstart_torch(args) -> dict:
    """nanoGPT's train_shakespeare_char CPU recipe, on neo's quickstart batches."""
    import numpy as np
    import torch

    from neo.config import load_model_config
    from neo.data import make_source
    from torch_reference import NanoGPT, evaluate, make_optimizer, nanogpt_lr, train_step

    start = time.perf_counter()
    cfg = load_model_config("quickstart", quickstart_overrides(args))
    m, steps = cfg.model, args.quickstart_steps
    source = make_source(cfg, "train")
    held_out = make_source(cfg, "eval")
    eval_batches = [next(held_out) for _ in range(cfg.run.eval_steps)]
    torch.manual_seed(1337)
    model = NanoGPT(m.n_layer, m.n_head, m.n_embd, m.n_ctx, m.n_vocab).train()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "cpu")
    t = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(step, 1e-3, 1e-4, 100, steps)
        loss = train_step(model, opt, torch.from_numpy(next(source).astype(np.int64)), 1.0, None)
    train_s = time.perf_counter() - t
    val = evaluate(model, eval_batches, "cpu")
    return {"backend": "nanoGPT recipe (torch)", "tokens_per_s": steps * cfg.run.train_batch_size * m.n_ctx / train_s,
            "train_s": train_s, "wall_s": time.perf_counter() - start, "steps": steps, "train_loss": float(loss),
            "val_loss": val}


# ----------------------------------------------------------------------------------------------


def simulated_devices(mesh_shape: str) -> int:
    """How many devices --mesh_shape asks for ("x:2,y:4" -> 8; a -1 size counts as 8 in all)."""
    sizes = [int(part.split(":")[1]) for part in mesh_shape.split(",") if ":" in part]
    if any(s < 0 for s in sizes):
        return 8
    n = 1
    for s in sizes:
        n *= s
    return n


def runnable(args, backends: list[str]) -> list[str]:
    """`backends` less transformers where HF's GPTNeo cannot hold the config (the quickstart's
    scaled attention), said in one line rather than as the child's traceback."""
    from neo.convert.gpt_neo import config_to_hf
    from neo.errors import NeoError

    if "transformers" in backends:
        try:
            config_to_hf(load_cfg(args))
        except NeoError as e:
            print(f"{NAMES['transformers']}: skipped, {e}")
            return [b for b in backends if b != "transformers"]
    return backends


def child(args, backend: str) -> dict | None:
    """Run one backend in its own process; its RESULT line, or None (and the error printed)."""
    return run_backend(__file__, [a for a in sys.argv[1:] if a != "--quickstart"] + ["--backend", backend])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_neo_125M")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (0: the config's)")
    p.add_argument("--seq", type=int, default=256, help="n_ctx (0: the config's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps_per_call", type=int, default=1, help="neo: train steps per compiled call")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh_shape", default="")
    p.add_argument("--layout", default="")
    p.add_argument("--devices", type=int, default=1, help="how many devices neo uses (0 = all)")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--set", action="append", default=[], help="config override key=JSON")
    p.add_argument("--backend", choices=["all", *BACKENDS, "quickstart_neo", "quickstart_torch"], default="all")
    p.add_argument("--compile_only", action="store_true")
    p.add_argument("--top", type=int, default=0, help="--compile_only: the N largest temporary slices")
    p.add_argument("--quickstart", action="store_true")
    p.add_argument("--quickstart_steps", type=int, default=2000)
    p.add_argument("--quickstart_eval_steps", type=int, help="validation batches (default: the config's 200)")
    p.add_argument("--json", help="append the results as JSON lines to this file")
    p.add_argument("--profile", help="neo: trace two more steps into this folder (jax.profiler, with a Perfetto "
                   "trace_events file: perfetto_trace.json.gz)")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.compile_only:
        n = simulated_devices(args.mesh_shape)
        if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
        args.devices = 0 if args.mesh_shape else args.devices
        if args.top:  # XLA writes its memory-usage report with the dump
            args.dump = tempfile.mkdtemp(prefix="neo_compile_")
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.dump}"
        try:
            print("RESULT " + json.dumps(compile_only(args)))
        finally:
            if args.top:
                shutil.rmtree(args.dump, ignore_errors=True)
        return
    if args.backend != "all":
        if args.backend == "neo":  # as main.py does (quickstart_neo runs main.py itself)
            restart_with_huge_pages()
        fn = {"neo": bench_neo, "transformers": bench_transformers, "nanogpt": bench_nanogpt,
              "quickstart_neo": quickstart_neo, "quickstart_torch": quickstart_torch}[args.backend]
        print("RESULT " + json.dumps(fn(args)))
        return
    date = time.strftime("%Y-%m-%d %H:%M")
    if args.quickstart:
        results = [r for r in (child(args, "quickstart_neo"), child(args, "quickstart_torch")) if r]
        print(f"\nquickstart shape (4 layers, 128 wide, ctx 64, batch 12, float32), {args.quickstart_steps} steps, {date}")
        print(f"{'backend':34} {'tokens/s':>10} {'train s':>8} {'wall s':>8} {'train loss':>11} {'val loss':>9}")
        for r in results:
            print(f"{r['backend']:34} {r['tokens_per_s']:10,.0f} {r['train_s']:8.1f} {r['wall_s']:8.1f} "
                  f"{r['train_loss']:11.4f} {r['val_loss']:9.4f}")
        if len(results) == 2:
            print(f"neo / nanoGPT throughput: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x; "
                  f"validation loss {results[0]['val_loss']:.4f} vs {results[1]['val_loss']:.4f}")
        desc = f"quickstart, {args.quickstart_steps} steps"
    else:
        results = [r for r in (child(args, b) for b in runnable(args, list(BACKENDS))) if r]
        desc = f"{args.model}, batch {args.batch} x seq {args.seq}, {args.precision}"
        print(f"\n{desc}, {date}")
        print(f"{'backend':22} {'step (s)':>10} {'tokens/s':>12} {'MFU':>8}")
        for r in results:
            print(f"{r['backend']:22} {r['step_s']:10.4f} {r['tokens_per_s']:12,.0f} {100 * r['mfu']:7.2f}%")
        neo = next((r for r in results if r["backend"] == NAMES["neo"]), None)
        for r in results:
            if neo and r is not neo:
                print(f"neo / {r['backend']}: {neo['tokens_per_s'] / r['tokens_per_s']:.2f}x")
        if results:
            print(f"peak: {results[0]['peak_source']}")
        for r in results:
            if "matmul_flops" in r:
                rates = ", ".join(f"{d} {v / 1e9:,.0f}" for d, v in r["matmul_flops"].items())
                print(f"measured 2048^2 matmul, {r['backend']}: {rates} GFLOP/s")
        if neo:
            print(f"{neo['flops_per_token'] / 1e6:,.1f} MFLOP per token (neo/flops.py)")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({"config": desc, "date": date, **r}) + "\n")


if __name__ == "__main__":
    main()
