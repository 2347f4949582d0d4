"""Where a train step's time goes, op by op: neo's compiled step against the PyTorch references
of scripts/benchmark.py (the nanoGPT-style GPT and transformers' GPTNeo), same model and batch.

    python scripts/profile_step.py --model quickstart --batch 12 --seq 64
    python scripts/profile_step.py --model gpt_neo_125M --batch 4 --seq 256 [--precision bfloat16]

Issue 12 asks, where a speed target is missed, for what limits it measured by a profile rather
than guessed. This script answers that for the train step. Each backend runs in its own process
(their thread pools disturb each other), a few warm-up steps, then `--steps` profiled steps:

- neo: jax.profiler traces the compiled step; every XLA:CPU kernel (thunk) is matched by name to
  its instruction in the compiled HLO, whose metadata names the JAX op that made it.
- torch: each phase (forward, backward, optimizer) is timed without the profiler; then
  torch.profiler records every aten op's own time under record_function ranges for the phases,
  and its split within each phase is scaled to the phase's unprofiled time (the profiler's own
  cost per op is large next to small ops).

Both are sorted into the same table: phase (forward; backward, including what remat recomputes;
optimizer and the rest) x kind:
  matmul      dense products: the q/k/v/o, MLP and vocabulary projections and their gradients
  attention   the attention core: score and value products, softmax (or a fused kernel)
  layout      copies into another layout (transposes) the compiler or framework inserted,
              with whatever elementwise work XLA fused into them
  scan        writing and slicing per-layer buffers of scanned layers (dynamic-update-slice,
              dynamic-slice), zero-filled buffers (broadcasts)
  other       everything else: GELU, layer norms, residual adds, the loss, the optimizer update
Kernel times are wall times of each kernel; XLA may run two kernels at once on two cores, so
its kernel sum can exceed the step's wall time (both are printed). `--top N` lists the N
costliest kernels with the JAX op they came from.

No TensorFlow or lm-eval import (it runs where scripts/benchmark.py runs).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from backend_process import run_backend  # noqa: E402

from neo.host_memory import restart_with_huge_pages  # noqa: E402

KINDS = ("matmul", "attention", "layout", "scan", "other")
PHASES = ("forward", "backward", "optimizer+rest")
MATMUL_CALL = 'custom_call_target="neo_matmul_f32"'  # neo/kernels/matmul.cc, through the XLA FFI
# The attention core's einsums in neo/model/attention.py (heads 'h', queries 'q', keys 'k').
ATTENTION_OP = re.compile(
    r"b\w*[qk]\w*,b\w*[qk]\w*->|/attn/\w*(softmax|blocked|dot_product_attention|logits|scores|ffi_call)")


# ----------------------------------------------------------------------------------------------
# neo: XLA kernels by HLO instruction


def hlo_index(text: str) -> dict:
    """Instruction name -> (opcode, shape, op_name, opcodes inside when it is a fusion, FLOPs of
    the products it computes)."""
    rows, body = {}, collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            current = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+?) ([\w\-]+)\((.*)", line)  # tuples: FFI calls
        if m:
            name, shape, op, rest = m.groups()
            rows[name] = (shape, op, rest)
            body[current].append(name)

    def dims(shape: str) -> list[int]:
        m = re.search(r"\[([\d,]*)\]", shape)
        return [int(d) for d in m.group(1).split(",") if d] if m else []

    def flops(name: str) -> float:
        shape, op, rest = rows[name]
        if op == "dot":
            lhs = re.match(r"\s*%([\w.\-]+)", rest).group(1)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
            k = 1
            for d in contracting.split(","):
                k *= dims(rows[lhs][0])[int(d)] if d else 1
            n = 1
            for d in dims(shape):
                n *= d
            return 2.0 * n * k
        if op == "custom-call" and MATMUL_CALL in rest:  # neo's CPU product: c [M, N], a [M, K] or [K, M]
            lhs = re.match(r"\s*%([\w.\-]+)", rest).group(1)
            out_dims, lhs_dims = dims(shape), dims(rows[lhs][0])
            return 2.0 * math.prod(out_dims) * math.prod(lhs_dims) / out_dims[0]
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        return sum(flops(i) for i in body[calls.group(1)]) if calls and op == "fusion" else 0.0

    out = {}
    for name, (shape, op, rest) in rows.items():
        on = re.search(r'op_name="([^"]+)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        fused = {rows[i][1] for i in body[calls.group(1)]} if calls and op == "fusion" else set()
        kind = "matmul-call" if op == "custom-call" and MATMUL_CALL in rest else op  # neo_kind's "matmul"
        out[name] = (kind, shape, on.group(1) if on else "", fused, flops(name))
    return out


def neo_kind(name: str, op: str, op_name: str, fused: set) -> str:
    """A kernel's kind; XLA names a fusion after its root instruction (copy_bitcast_fusion is a
    copy into a new layout of whatever was fused into it)."""
    if op in ("dot", "convolution", "matmul-call") or "dot" in fused or re.match(r"(ynn|xnn|onednn)_", name):
        return "attention" if ATTENTION_OP.search(op_name) else "matmul"
    if op in ("copy", "transpose") or re.match(r"(copy|transpose)", name):
        return "layout"
    if op.startswith("dynamic") or re.match(r"\w*dynamic|wrapped_broadcast", name) or op == "broadcast":
        return "scan"
    if ATTENTION_OP.search(op_name):
        return "attention"
    return "other"


def neo_phase(op_name: str) -> str:
    if "transpose(jvp" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer+rest"


def profile_neo(args) -> dict:
    import jax
    import numpy as np

    from benchmark import load_cfg, neo_layout
    from neo.train import build, global_batches

    cfg = load_cfg(args)
    setup = build(cfg, neo_layout(cfg, args))
    state = setup.init()
    k = args.steps_per_call
    tokens = np.random.RandomState(0).randint(
        0, cfg.model.n_vocab, (k, cfg.run.train_batch_size, cfg.model.n_ctx + 1)).astype(np.int32)
    stack = global_batches(setup, tokens)
    compiled = setup.steps.lower(state, stack).compile()
    index = hlo_index(compiled.as_text())
    for _ in range(1 + args.warmup):
        state, metrics = compiled(state, stack)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, stack)
    jax.block_until_ready(metrics)
    wall = (time.perf_counter() - t) / (args.steps * k)

    def steps():
        out, last = state, None
        for _ in range(args.steps):
            out, last = compiled(out, stack)
        jax.block_until_ready(last)

    table, kernels, work, kernel_work = (collections.Counter() for _ in range(4))
    n = args.steps * k  # train steps traced; the table is per step
    for name, (op, shape, op_name, fused, flops), ms in traced_kernels(steps, index):
        ms /= n
        kind = neo_kind(name, op, op_name, fused)
        table[(neo_phase(op_name), kind)] += ms
        kernels[(name, shape, short_op_name(op_name))] += ms
        work[kind] += flops / n
        kernel_work[(name, shape, short_op_name(op_name))] += flops / n
    return result("neo (jax)", args, cfg, wall, table, kernels, work, kernel_work)


def traced_kernels(call, index: dict) -> list:
    """[(instruction name, its `hlo_index` row, ms)] for every XLA:CPU kernel (thunk) that ran
    while `call()` ran under jax.profiler, matched by name to the compiled HLO's `index`; host
    events and control flow left out (their bodies' kernels are counted one by one)."""
    import jax

    trace = tempfile.mkdtemp(prefix="neo_profile_")
    with jax.profiler.trace(trace):
        call()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace}/**/*.xplane.pb", recursive=True)[0])
    shutil.rmtree(trace, ignore_errors=True)
    return [(ev.name, index[ev.name], ev.duration_ns / 1e6)
            for plane in data.planes for line in plane.lines for ev in line.events
            if ev.name in index and index[ev.name][0] not in ("while", "call", "conditional")]


def short_op_name(op_name: str) -> str:
    """The JAX op path without the jit/while/closed_call scaffolding."""
    parts = [p for p in op_name.split("/") if p not in ("while", "body", "closed_call", "cond") and not
             p.startswith("jit(")]
    return "/".join(parts)[-100:]


# ----------------------------------------------------------------------------------------------
# torch: aten ops by record_function phase


def torch_kind(name: str) -> str:
    n = name.lower()
    if "attention" in n or "sdpa" in n or "softmax" in n or "baddbmm" in n or "bmm" in n:
        return "attention"
    if n in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear") or "mkldnn" in n and "linear" in n:
        return "matmul"
    if n in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::t", "aten::transpose",
             "aten::permute", "aten::_reshape_alias"):
        return "layout"
    return "other"


def profile_torch(args, backend: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmark import load_cfg, tokens, torch_setup

    cfg = load_cfg(args)
    m, o = cfg.model, cfg.optimizer
    device, autocast, *_ = torch_setup(cfg)
    torch.manual_seed(0)
    batch = torch.tensor(tokens(cfg), dtype=torch.long, device=device)
    if backend == "nanogpt":
        from torch_reference import NanoGPT, make_optimizer

        model = NanoGPT(m.n_layer, m.n_head, m.n_embd, m.n_ctx, m.n_vocab).to(device).train()
        opt = make_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), device)
        forward = lambda: model(batch[:, :-1], batch[:, 1:])  # noqa: E731
        label = "nanoGPT-style torch"
    else:
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        from neo.convert.gpt_neo import config_to_hf

        model = GPTNeoForCausalLM(GPTNeoConfig(**config_to_hf(cfg))).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        forward = lambda: model(batch[:, :-1], labels=batch[:, :-1]).loss  # noqa: E731
        label = "transformers GPTNeo"

    phase_s = collections.Counter()

    def step():
        marks = [time.perf_counter()]
        with record_function("forward"), torch.autocast(device, dtype=autocast or torch.float32,
                                                         enabled=autocast is not None):
            loss = forward()
        marks.append(time.perf_counter())
        with record_function("backward"):
            loss.backward()
        marks.append(time.perf_counter())
        with record_function("optimizer+rest"):
            if o.gradient_clipping:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.gradient_clipping)
            opt.step()
            opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for p, a, b in zip(PHASES, marks, marks[1:]):
            phase_s[p] += b - a

    for _ in range(1 + args.warmup):
        step()
    phase_s.clear()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - t) / args.steps
    timed = dict(phase_s)  # before the profiled steps add to phase_s
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    table, kernels, work, kernel_work = (collections.Counter() for _ in range(4))
    for ev in prof.events():
        if ev.name in PHASES or ev.name.startswith("autograd::engine") or ev.name.startswith("ProfilerStep"):
            continue
        phase = ev.cpu_parent
        while phase is not None and phase.name not in PHASES:
            phase = phase.cpu_parent
        if phase is None:
            continue
        ms = ev.self_cpu_time_total / 1e3 / args.steps
        kind = torch_kind(ev.name)
        table[(phase.name, kind)] += ms
        shapes = "x".join(str(list(s)) for s in (ev.input_shapes or [])[:2] if s) if ev.flops else ""
        kernels[(ev.name, shapes, phase.name)] += ms
        work[kind] += (ev.flops or 0) / args.steps
        kernel_work[(ev.name, shapes, phase.name)] += (ev.flops or 0) / args.steps
    # The profiler's own cost per op is large next to small ops: keep its split within each
    # phase, scaled to the phase's time measured without it.
    scale = {p: timed[p] * 1e3 / args.steps / max(sum(v for (q, _), v in table.items() if q == p), 1e-9)
             for p in PHASES}
    table = collections.Counter({(p, k): v * scale[p] for (p, k), v in table.items()})
    kernels = collections.Counter({(n, s, p): v * scale[p] for (n, s, p), v in kernels.items()})
    return result(label, args, cfg, wall, table, kernels, work, kernel_work)


# ----------------------------------------------------------------------------------------------


def result(backend: str, args, cfg, wall: float, table, kernels, work, kernel_work) -> dict:
    """ms per step by (phase, kind), FLOPs per step by kind, and the costliest kernels."""
    return {"backend": backend, "step_ms": wall * 1e3,
            "tokens_per_s": cfg.run.train_batch_size * cfg.model.n_ctx / wall,
            "table": {f"{p}|{k}": v for (p, k), v in table.items()}, "flops": dict(work),
            "top": [[n, s, on, ms, kernel_work[(n, s, on)]] for (n, s, on), ms in kernels.most_common(args.top)]}


def print_result(r: dict) -> None:
    table = {tuple(k.split("|")): v for k, v in r["table"].items()}
    total = sum(table.values())
    print(f"\n{r['backend']}: step {r['step_ms']:.1f} ms wall ({r['tokens_per_s']:,.0f} tok/s), "
          f"kernels sum {total:.1f} ms")
    print(f"  {'phase':15}" + "".join(f"{k:>11}" for k in KINDS) + f"{'total':>11}")
    for p in PHASES:
        row = [table.get((p, k), 0.0) for k in KINDS]
        print(f"  {p:15}" + "".join(f"{v:11.2f}" for v in row) + f"{sum(row):11.2f}")
    cols = [sum(table.get((p, k), 0.0) for p in PHASES) for k in KINDS]
    print(f"  {'total':15}" + "".join(f"{v:11.2f}" for v in cols) + f"{total:11.2f}")
    for kind in ("matmul", "attention"):
        ms = sum(table.get((p, kind), 0.0) for p in PHASES)
        gflop = r["flops"].get(kind, 0.0) / 1e9
        if gflop:
            print(f"  {kind}: {gflop:,.2f} GFLOP per step in {ms:.1f} ms of kernels = {gflop / ms * 1e3:,.1f} GFLOP/s")
    for name, shape, op_name, ms, flops in r["top"]:
        rate = f"{flops / ms / 1e6:7.1f} GFLOP/s" if flops else " " * 15
        print(f"    {ms:8.2f} ms {rate}  {name[:30]:30} {shape[:34]:34} {op_name}")


def child(backend: str) -> dict | None:
    return run_backend(__file__, [*sys.argv[1:], "--backend", backend])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="quickstart")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (0: the config's)")
    p.add_argument("--seq", type=int, default=0, help="n_ctx (0: the config's)")
    p.add_argument("--steps", type=int, default=5, help="profiled calls (after the warm-up; torch: steps)")
    p.add_argument("--steps_per_call", type=int, default=1,
                   help="neo: train steps per compiled call, as `iterations` runs them (main.py's quickstart: "
                        "100). A call allocates its temporaries afresh, so with 1 the step's first writes to "
                        "them include the kernel's page faults, which a long call pays once")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--set", action="append", default=[], help="neo config override key=JSON")
    p.add_argument("--top", type=int, default=12, help="list the N costliest kernels")
    p.add_argument("--backends", default="neo,nanogpt,transformers")
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--json", help="append the results as JSON lines to this file")
    args = p.parse_args()
    args.mesh_shape, args.layout, args.devices = "", "", 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.backend == "neo":  # as main.py does
        restart_with_huge_pages()
    if args.backend:
        r = profile_neo(args) if args.backend == "neo" else profile_torch(args, args.backend)
        print("RESULT " + json.dumps(r))
        return
    print(f"{args.model}, batch {args.batch or 'config'} x seq {args.seq or 'config'}, {args.precision}, "
          f"{args.steps_per_call} step(s) per neo call, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load {os.getloadavg()[0]:.2f}; ms per step")
    from benchmark import runnable

    results = [r for r in (child(b) for b in runnable(args, args.backends.split(","))) if r]
    for r in results:
        print_result(r)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({"model": args.model, "precision": args.precision, **r}) + "\n")


if __name__ == "__main__":
    main()
