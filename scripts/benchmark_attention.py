"""Training speed of one attention layer by kind (global vs local vs linear) and by kernel
(`attention_impl`), across lengths.

    python scripts/benchmark_attention.py --seq 512 2048 8192 --reps 5
    python scripts/benchmark_attention.py --seq 64 256 2048 --impls xla blocked cpu --kinds global local

Times forward + backward of neo's Attention module (jit-compiled, float32, batch 1, n_embd
512, 8 heads of 64, local window 256 as in GPT-Neo) on synthetic inputs; reports tokens/s
(median of --reps after a warm-up) and the compiled step's temporary memory. Each length runs
every kind and kernel back to back in one process, so their ratios are comparable ("vs first":
against the first kind, or the first kernel of the same kind when --impls names several).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bench(kind: str, impl: str, seq: int, args) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    from neo.config import parse_model_config
    from neo.model.attention import Attention
    from neo.model.linear_attention import LinearAttention

    cfg = parse_model_config(dict(n_embd=args.embd, n_head=args.heads, n_layer=1, n_ctx=seq, n_vocab=256,
                                  attention_types=[[[kind], 1]], local_attention_radius=args.window,
                                  attention_impl=impl))
    layer = LinearAttention(cfg.model) if kind == "linear" else Attention(cfg.model, kind)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, seq, args.embd), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(seq), (args.batch, seq))
    params = layer.init(jax.random.PRNGKey(1), x, pos)["params"]

    def loss(p, x):
        out, _ = layer.apply({"params": p}, x, pos)
        return jnp.mean(out ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(params, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t)
    return args.batch * seq / statistics.median(times), temp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--kinds", nargs="+", default=["global", "local", "linear"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--impls", nargs="+", default=["auto"], help="attention_impl values to compare")
    args = parser.parse_args()
    print("| seq | kind | attention_impl | tokens/s | vs first | temp memory |")
    print("|---|---|---|---|---|---|")
    for seq in args.seq:
        base = None
        for kind in args.kinds:
            impls = ["auto"] if kind == "linear" else args.impls  # linear attention has no kernels
            for impl in impls:
                tps, temp = bench(kind, impl, seq, args)
                if base is None or (len(args.impls) > 1 and impl == impls[0]):
                    base = tps
                print(f"| {seq} | {kind} | {impl} | {tps:,.0f} | {tps / base:.2f}x | {temp / 2 ** 20:,.0f} MiB |",
                      flush=True)


if __name__ == "__main__":
    main()
