"""The training loop's overhead over the bare train step, and checkpoint save time and size.

    python scripts/benchmark_loop.py --model quickstart --steps 300
    python scripts/benchmark_loop.py --model gpt_neo_125M --checkpoint_only --set n_ctx=256

1. bare: the compiled multi-step call (all --steps in one call) on one fixed device-resident
   stack of batches;
2. loop: neo.loop.fit on the config's real data source for the same steps, one call of
   --steps steps (its tokens/s from metrics.jsonl excludes compilation, checkpoints and
   evaluation, as the log line does);
3. checkpoint: a synchronous save of the full train state (params + Adam moments), timed, and
   its size on disk; then an asynchronous save as the loop makes it: how long `save` blocks
   the loop, how long the background write takes, and the one-step call times before, during
   and after that write (training goes on while the files are written).
Loop overhead = 1 - loop tokens/s / bare tokens/s (target: under 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neo.host_memory import restart_with_huge_pages  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="quickstart")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--checkpoint_only", action="store_true")
    args = p.parse_args()
    restart_with_huge_pages()  # as main.py does
    import jax
    import numpy as np

    from neo.checkpoint import Checkpointer
    from neo.config import load_model_config
    from neo.loop import fit
    from neo.mesh import make_layout
    from neo.train import build, global_batch, global_batches

    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    work = tempfile.mkdtemp(prefix="neo-bench-")
    cfg = load_model_config(args.model, {**overrides, "model_path": work, "train_steps": args.steps,
                                         "iterations": args.steps, "eval_steps": 0, "predict_steps": 0})
    layout = make_layout(cfg.run.mesh_shape, cfg.run.layout, jax.devices()[:1])
    setup = build(cfg, layout)
    state = setup.init()
    print(f"{cfg.name}: {setup.param_count:,} parameters, batch {cfg.run.train_batch_size} x {cfg.model.n_ctx}")

    if not args.checkpoint_only:
        stack = global_batches(setup, np.zeros((args.steps, cfg.run.train_batch_size, cfg.model.n_ctx + 1), np.int32))
        call = setup.steps.lower(state, stack).compile()
        state, m = call(state, stack)
        jax.block_until_ready(m)
        t = time.perf_counter()
        state, m = call(state, stack)
        jax.block_until_ready(m)
        bare = args.steps * cfg.run.train_batch_size * cfg.model.n_ctx / (time.perf_counter() - t)
        record = fit(cfg, layout, steps_per_checkpoint=args.steps, log=lambda _m: None)
        loop = record["tokens_per_sec"]
        print(f"bare step: {bare:,.0f} tok/s | training loop: {loop:,.0f} tok/s | overhead {100 * (1 - loop / bare):.1f}%")

    # one real step, so the Adam moments are not all zeros (they compress)
    batch = np.random.RandomState(0).randint(0, cfg.model.n_vocab, (cfg.run.train_batch_size, cfg.model.n_ctx + 1))
    state, _ = setup.step(state, global_batch(setup, batch.astype(np.int32)))
    ckpt_dir = os.path.join(work, "ckpt")
    times = []
    for i in range(3):
        ckpt = Checkpointer(ckpt_dir, max_to_keep=None, async_save=False)
        t = time.perf_counter()
        ckpt.save(i, state.params, state.opt_state, {"data": {"step": i}})
        ckpt.wait()
        times.append(time.perf_counter() - t)
        ckpt.close()
    size = sum(f.stat().st_size for f in Path(ckpt_dir, "checkpoints", "0").rglob("*") if f.is_file())
    print(f"checkpoint save: {statistics.median(times):.2f} s (median of 3, synchronous), "
          f"{size / 2 ** 20:,.1f} MiB on disk ({size / setup.param_count:.1f} bytes/parameter)")
    async_save(setup, state, global_batch(setup, batch.astype(np.int32)), os.path.join(work, "async"))
    shutil.rmtree(work, ignore_errors=True)


def async_save(setup, state, batch, directory: str) -> None:
    """One asynchronous save between one-step calls, as the training loop makes it."""
    import jax

    from neo.checkpoint import Checkpointer

    def timed_step(state):
        t = time.perf_counter()
        state, m = setup.step(state, batch)
        jax.block_until_ready(m)
        return state, time.perf_counter() - t

    before = []
    for _ in range(3):
        state, dt = timed_step(state)
        before.append(dt)
    ckpt = Checkpointer(directory, max_to_keep=None)
    t = time.perf_counter()
    ckpt.save(1, state.params, state.opt_state, {"data": {"step": 1}})
    blocking = time.perf_counter() - t
    during = []
    while ckpt.manager.is_saving_in_progress():
        state, dt = timed_step(state)
        during.append(dt)
    written = time.perf_counter() - t
    after = []
    for _ in range(3):
        state, dt = timed_step(state)
        after.append(dt)
    ckpt.close()
    ms = lambda xs: f"{1e3 * statistics.median(xs):,.0f} ms" if xs else "-"
    print(f"async save: save() blocked the loop {blocking:.2f} s; the background write took {written:.2f} s, "
          f"during which {len(during)} step(s) ran; step time (median) before {ms(before)}, during the write "
          f"{ms(during)}, after {ms(after)}")


if __name__ == "__main__":
    main()
