"""Generation speed of neo's KV-cache sampler against transformers' generate() on the same model.

    python scripts/benchmark_generate.py --model gpt_neo_125M --batch 1 8 --prompt 32 --new 64 [--precision bfloat16]

Greedy decoding of exactly `--new` tokens (no EOS stop) after a random `--prompt`-token
prompt, random weights; bfloat16: neo's compute dtype (its KV cache in bfloat16, parameters
kept in float32) and transformers' model in bfloat16. Reports new tokens per second (batch x new / median wall time of a
whole generate call, prompt pass included) and, for neo, the one-off compile time apart (with,
on CPU, the one-off packing of the weights for neo's decode kernel, neo/kernels/cpu.py).
Each backend and batch runs in its own process, one after the other (thread pools of JAX
and PyTorch disturb each other).

Where the time goes: each decode step reads every weight matrix once (the vocabulary matrix
too, for the logits), so at small batch a step cannot be faster than reading those bytes. The
script measures the memory read bandwidth (a compiled sum over 512 MiB, best of 5) and prints,
per backend, the bytes of weights read per step (parameters in the dtype the step reads them,
less the position table, of which a step reads one row), the bandwidth a step reached and the
tok/s that reading the weights at the measured bandwidth would allow (the roofline).

--profile N traces one of neo's calls after the timed ones and lists its N costliest kernels
(ms in the call, times run, the HLO opcode and shape, the JAX op), as scripts/profile_step.py
does for a train step: where a generation target is missed, what limits it.

--steps_only times the decode steps alone: each backend also generates 2 x `--new` tokens, and
the rate is batch x new / (the longer call's best time - the shorter's), so the prompt pass and
a call's fixed costs drop out (a long prompt's pass can be most of a call). Best times, not
medians: a difference magnifies the noise, and noise on a shared machine only adds time. The steps then attend
to prompt + new .. prompt + 2 x new cached tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from backend_process import run_backend  # noqa: E402

from neo.host_memory import restart_with_huge_pages  # noqa: E402


def prompts(cfg, batch: int, length: int):
    import numpy as np

    return np.random.RandomState(0).randint(0, cfg.model.n_vocab, (batch, length)).tolist()


def bench_neo(args, batch: int) -> dict:
    import jax

    from neo.config import load_model_config
    from neo.mesh import make_layout
    from neo.model import init_params
    from neo.predict import Sampler, SamplingOptions

    cfg = load_model_config(args.model, {"precision": args.precision})
    init = jax.jit(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda x: getattr(x, "value", x), init(), is_leaf=lambda x: hasattr(x, "value"))
    sampler = Sampler(cfg, params, make_layout("", "", jax.devices()[:1]))
    rows = prompts(cfg, batch, args.prompt)

    def run(new: int) -> list:
        out = sampler.generate(rows, SamplingOptions(temperature=0, max_new_tokens=new))
        assert all(len(r) == new for r in out)
        return out

    calls = []  # the compiled sampler's arguments, for --profile
    generate = sampler._generate
    sampler._generate = lambda *a, **k: calls.append((a, k)) or generate(*a, **k)
    t = time.perf_counter()
    run(args.new)
    first = time.perf_counter() - t
    s = timed(args, run)
    profile = kernel_profile(generate.lower(*calls[-1][0], **calls[-1][1]).compile().as_text(),
                             lambda: run(args.new), args.profile) if args.profile else []
    packed = sampler.packed(len(rows))
    if packed:  # neo's CPU decode kernel reads its packed copies of the matrices (compute dtype)
        read = sum(x.nbytes for x in jax.tree.leaves(packed)) + sum(x.nbytes for x in jax.tree.leaves(params)
                                                                     if x.ndim <= 1)
    else:  # neo keeps float32 parameters and casts them to the compute dtype where they are used
        read = sum(x.nbytes for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                   if "wpe" not in jax.tree_util.keystr(path))
    return {"backend": "neo (jax, KV cache" + (", CPU kernel)" if packed else ")"), "batch": batch, "s": s,
            "tokens_per_s": batch * args.new / s, "compile_s": first - s, "weight_bytes": read, "profile": profile}


def kernel_profile(hlo: str, call, top: int) -> list:
    """The `top` costliest kernels of one traced call: [ms in the call, times run, opcode, shape,
    the JAX op that made it], XLA:CPU's kernels matched to the compiled HLO by
    scripts/profile_step.py's `traced_kernels`. Kernels of the two threads add up, so the sum can
    exceed the call's wall time."""
    import collections

    from profile_step import hlo_index, traced_kernels

    ms, runs = collections.Counter(), collections.Counter()
    for _, (op, shape, op_name, _, _), t in traced_kernels(call, hlo_index(hlo)):
        key = (op, shape, op_name.split("/")[-1])
        ms[key] += t
        runs[key] += 1
    return [[round(t, 2), runs[k], *k] for k, t in ms.most_common(top)]


def bench_torch(args, batch: int) -> dict:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from neo.config import load_model_config
    from neo.convert.gpt_neo import config_to_hf

    cfg = load_model_config(args.model)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(**config_to_hf(cfg))).eval()
    if args.precision == "bfloat16":
        model = model.to(torch.bfloat16)
    ids = torch.tensor(prompts(cfg, batch, args.prompt))

    def run(new: int):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert out.shape[1] == args.prompt + new
        return out

    run(args.new)
    s = timed(args, run)
    read = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "wpe" not in n)
    return {"backend": "transformers generate()", "batch": batch, "s": s, "tokens_per_s": batch * args.new / s,
            "weight_bytes": read}


def timed(args, run) -> float:
    """Median seconds of `run(args.new)` over --reps calls; with --steps_only, the best time of
    `run(2 * args.new)` less the best of `run(args.new)`: the time of `args.new` decode steps
    alone."""
    def seconds(new: int) -> float:
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            run(new)
            times.append(time.perf_counter() - t)
        return min(times) if args.steps_only else statistics.median(times)

    s = seconds(args.new)
    if args.steps_only:
        run(2 * args.new)  # neo compiles the longer call's bucket here
        longer = seconds(2 * args.new)
        if longer <= s:
            raise SystemExit(f"--steps_only: {2 * args.new} new tokens took no longer than {args.new} ({longer:.4f} "
                             f"vs {s:.4f} s): too few steps to time apart from the noise; raise --new or --reps.")
        s = longer - s
    return s


def read_bandwidth() -> dict:
    """Bytes per second a compiled sum reads from memory (512 MiB, best of 5)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return {"read_bytes_per_s": x.nbytes / best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_neo_125M")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cores", type=int, default=0,
                   help="pin each backend to this many cores (0 = all); 1 is steadier on a busy machine")
    p.add_argument("--steps_only", action="store_true",
                   help="time the decode steps alone, without the prompt pass (see above)")
    p.add_argument("--backend", choices=["both", "neo", "torch", "bandwidth"], default="both")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also trace one of neo's calls and list its N costliest kernels (jax.profiler)")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.cores and args.backend != "both":  # before JAX or torch start their thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
        if args.backend == "torch":
            import torch

            torch.set_num_threads(args.cores)

    if args.backend == "bandwidth":
        print("RESULT " + json.dumps(read_bandwidth()))
        return
    if args.backend == "neo":  # as main.py does
        restart_with_huge_pages()
    if args.backend != "both":
        fn = bench_neo if args.backend == "neo" else bench_torch
        print("RESULT " + json.dumps(fn(args, args.batch[0])))
        return
    bandwidth = child("bandwidth", 1)
    bw = bandwidth["read_bytes_per_s"] if bandwidth else None
    print(f"{args.model}: prompt {args.prompt} tokens, {args.new} new tokens"
          + (f" (decode steps alone: {2 * args.new} new less {args.new})" if args.steps_only else "")
          + f", greedy, {args.precision}, "
          f"{args.reps} reps (median), {args.cores or os.cpu_count()} core(s)"
          + (f"; memory read bandwidth {bw / 1e9:.1f} GB/s" if bw else ""))
    print(f"{'backend':34} {'batch':>5} {'time (s)':>9} {'new tok/s':>10} {'compile (s)':>12} "
          f"{'weights MB':>10} {'GB/s':>6} {'roofline tok/s':>15}")
    for batch in args.batch:
        results = {}
        for backend in ("neo", "torch"):
            r = child(backend, batch)
            if r is None:
                continue
            results[backend] = r
            compile_s = f"{r['compile_s']:12.1f}" if "compile_s" in r else f"{'-':>12}"
            steps_per_s = r["tokens_per_s"] / batch  # decode steps/s (the prompt pass in, unless --steps_only)
            roof = f"{batch * bw / r['weight_bytes']:15.1f}" if bw else ""
            print(f"{r['backend']:34} {batch:5d} {r['s']:9.2f} {r['tokens_per_s']:10.1f} {compile_s} "
                  f"{r['weight_bytes'] / 1e6:10.2f} {steps_per_s * r['weight_bytes'] / 1e9:6.1f} {roof}")
        for ms, runs, op, shape, op_name in results.get("neo", {}).get("profile", []):
            print(f"{'':34} {ms:9.1f} ms {runs:6d}x  {op} {shape[:60]} {op_name}")
        if len(results) == 2:
            print(f"{'':34} batch {batch}: neo / transformers = "
                  f"{results['neo']['tokens_per_s'] / results['torch']['tokens_per_s']:.2f}x")


def child(backend: str, batch: int) -> dict | None:
    return run_backend(__file__, [*sys.argv[1:], "--backend", backend, "--batch", str(batch)])


if __name__ == "__main__":
    main()
