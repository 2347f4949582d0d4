"""The training loop: resume, train, log, checkpoint, validate, repeat.

A run restarts from the latest checkpoint in `<model_path>/checkpoints` by itself. Train steps
run several per compiled call (`steps_per_call`: GPT-Neo's `iterations`); the loop
synchronises with the devices once per call, stops on a NaN/Inf loss without saving the bad
state, and on SIGTERM (preemption) saves at the end of the current call and exits. With a
sequence-length curriculum (neo/curriculum.py) a call also ends where the length changes and
its rows are cut to that length; each (steps, length) pair compiles once.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from neo.checkpoint import Checkpointer, abstract_like, check_disk_space, check_writable
from neo.config import Config
from neo.curriculum import active, lengths, next_change, seq_len
from neo.curriculum import summary as curriculum_summary
from neo.errors import NeoError
from neo.mesh import Layout, check_divisible
from neo.flops import mfu
from neo.train import Setup, TrainState, batch_rows, build, global_batches

STACK_BYTES = 256 * 2 ** 20  # the most host memory one call's stack of batches may take


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


MEMORY_FIXES = "lower train_batch_size, set recompute_grad or tokens_per_mb_per_replica, or see --auto_layout."


def describe(setup: Setup, log: Callable[[str], None]) -> Any:
    """What is about to run and what it needs per device, before compiling. Returns the train
    state's shapes (jax.ShapeDtypeStructs)."""
    from neo.memory import bytes_per_device, gib, memory_limit

    cfg, layout = setup.cfg, setup.layout
    devices = list(layout.mesh.devices.flat)
    abstract = jax.eval_shape(setup.init)
    p = bytes_per_device(abstract.params, setup.state_shardings.params)
    o = bytes_per_device(abstract.opt_state, setup.state_shardings.opt_state)
    log(f"neo: {cfg.name}: {setup.param_count:,} parameters; {len(devices)} x {devices[0].device_kind}; "
        f"mesh {dict(layout.mesh.shape)}; layout {', '.join(f'{d}:{a}' for d, a in layout.rules)}; "
        f"{setup.num_microbatches} microbatch(es) of {cfg.run.train_batch_size // setup.num_microbatches} sequences")
    limit, whose = memory_limit(_local_devices(setup))
    need = 2 * p + o  # parameters, their gradients, optimizer state
    activations = _activation_estimate(setup)
    total = need + activations
    log(f"neo: per device: parameters {gib(p)}, gradients {gib(p)}, optimizer state {gib(o)}, "
        f"activations ~{gib(activations)} (estimate{', with remat' if cfg.model.recompute_grad else ''}) = "
        f"~{gib(total)}" + (f" of the {gib(limit)} of {whose}" if limit else ""))
    if limit and need > limit:
        raise NeoError(f"parameters, gradients and optimizer state need {gib(need)} per device, more than the "
                       f"{gib(limit)} of {whose}; shard them (e.g. add 'embd:<axis>' to the layout for FSDP) or "
                       f"use more devices (python main.py --model ... --auto_layout).")
    if limit and total > limit:
        log(f"neo: WARNING: the estimate (~{gib(total)}) exceeds the {gib(limit)} of {whose}; if this run "
            f"runs out of memory, {MEMORY_FIXES}")
    return abstract


def check_compiled_memory(compiled: Any, setup: Setup) -> None:
    """Refuse a compiled call that cannot fit, before it runs: XLA's own count of what it holds
    per device (memory_analysis) against what a device may hold (neo/memory.py memory_limit).
    Run, it would fail allocating with a traceback, or on a CPU host be killed by the kernel. A
    device's limit counts the state it already holds; a CPU host's available memory already
    excludes it, so there only what the call allocates counts."""
    from neo.memory import gib, memory_limit

    try:
        ma = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without XLA's memory analysis: nothing to check
        return
    local = _local_devices(setup)
    limit, whose = memory_limit(local)
    if ma is None or not limit:
        return
    need = ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    if local[0].platform != "cpu":
        need += ma.argument_size_in_bytes
    if need > limit:
        raise NeoError(f"the compiled train step needs {gib(need)} per device (XLA's count: temporaries "
                       f"{gib(ma.temp_size_in_bytes)}), more than the {gib(limit)} of {whose}; {MEMORY_FIXES}")


def _local_devices(setup: Setup) -> list:
    return [d for d in setup.layout.mesh.devices.flat if d.process_index == jax.process_index()]


def _activation_estimate(setup: Setup) -> float:
    """Activation bytes per device from neo/auto_layout.py's estimator (fitted to XLA)."""
    from neo.auto_layout import estimate

    layout = setup.layout
    mesh_shape = ",".join(f"{a}:{n}" for a, n in layout.mesh.shape.items())
    rules = ",".join(f"{d}:{a}" for d, a in layout.rules)
    e = estimate(setup.cfg, mesh_shape, rules, layout.mesh.size)
    return e.activations_remat if setup.cfg.model.recompute_grad else e.activations


def restore_or_init(setup: Setup, ckpt: Checkpointer, log: Callable[[str], None]) -> tuple[TrainState, dict]:
    """The latest checkpoint read straight into this layout's shardings, or a fresh state. A
    parameters-only checkpoint (an imported model) gets a fresh optimizer: finetuning."""
    step = ckpt.latest_step()
    if step is None:
        return setup.init(), {}
    abstract = jax.eval_shape(setup.init)
    params_abs = abstract_like(abstract.params, setup.state_shardings.params)
    if ckpt.has_opt_state(step):
        opt_abs = abstract_like(abstract.opt_state, setup.state_shardings.opt_state)
        params, opt_state, meta = ckpt.restore(step, params_abs, opt_abs)
        log(f"neo: resumed from checkpoint {step} in {ckpt.directory}")
    else:
        params, _, meta = ckpt.restore(step, params_abs)
        opt_state = jax.jit(setup.optimizer.init, out_shardings=setup.state_shardings.opt_state)(params)
        log(f"neo: loaded parameters from checkpoint {step} (no optimizer state: finetuning from it)")
    state = TrainState(jax.device_put(jnp.asarray(step, jnp.int32), setup.state_shardings.step), params, opt_state)
    return state, meta


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. in a notebook worker)
            self._old = None

    def _handle(self, *_: object) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def steps_per_call(cfg: Config, steps_per_checkpoint: int, rows: int) -> tuple[int, str]:
    """(train steps per compiled call, why it is not `iterations`, or ""). GPT-Neo ran
    `iterations` steps per TPU loop and logged once per loop; here a call ends at every
    checkpoint too, so it runs gcd(iterations, steps_per_checkpoint) steps, cut to the largest
    divisor of that whose stack of batches (`rows` rows per step on this host) stays within
    STACK_BYTES."""
    k = math.gcd(cfg.run.iterations, steps_per_checkpoint)
    why = f"gcd of iterations {cfg.run.iterations} and steps_per_checkpoint {steps_per_checkpoint}" \
        if k < cfg.run.iterations else ""
    per_step = rows * (cfg.model.n_ctx + 1) * 4  # int32 tokens
    fits = max(d for d in range(1, k + 1) if k % d == 0 and (d == 1 or d * per_step <= STACK_BYTES))
    if fits < k:
        why = (why + "; " if why else "") + f"{k} steps of batches would take {k * per_step / 2 ** 20:,.0f} MiB " \
            f"of host memory (at most {STACK_BYTES // 2 ** 20} MiB)"
    return fits, why


def fit(cfg: Config, layout: Layout, steps_per_checkpoint: int = 5000,
        log: Callable[[str], None] = print, prompt_path: str = "") -> dict:
    """Train to `train_steps` from wherever model_path's checkpoints left off; with
    `predict_steps` > 0, print samples (prompts from `prompt_path`) after every checkpoint.
    Returns the last logged train record.

    Steps run `steps_per_call` at a time in one compiled call (a call also ends at train_steps,
    so a last, shorter call compiles once more); everything else happens between calls: the
    log line every `iterations` steps (with that step's own values), the NaN/Inf check of
    every step, checkpoints, validation, samples and SIGTERM."""
    from neo.data import make_source, take
    from neo.evaluate.validation import Validation, summary
    from neo.tracking import Tracker

    if not cfg.run.model_path:
        raise NeoError(f"{cfg.source}: 'model_path' is required (where checkpoints and logs go).")
    if steps_per_checkpoint < 1:
        raise NeoError(f"--steps_per_checkpoint {steps_per_checkpoint}: save every N >= 1 steps.")
    check_writable(cfg.run.model_path)
    setup = build(cfg, layout)
    buckets = lengths(cfg) if active(cfg) else []
    for n_tokens in buckets:
        check_divisible(layout, {"sequence": n_tokens}, " at a curriculum length")
    abstract = describe(setup, log)
    rows = batch_rows(setup)
    per_call, why = steps_per_call(cfg, steps_per_checkpoint, len(rows))
    if why:
        log(f"neo: {per_call} train step(s) per compiled call instead of iterations = {cfg.run.iterations}: {why}")
    source = make_source(cfg, "train", rows)
    validation = Validation(cfg, layout, setup.state_shardings.params, log) if cfg.run.eval_steps > 0 else None
    samples = _Samples(cfg, setup, prompt_path) if cfg.sampling.predict_steps > 0 else None

    ckpt = Checkpointer(cfg.run.model_path, max_to_keep=cfg.run.keep_checkpoints)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((abstract.params, abstract.opt_state)))
    saves = -(-(cfg.run.train_steps - (ckpt.latest_step() or 0)) // steps_per_checkpoint)
    check_disk_space(cfg.run.model_path, state_bytes, saves, cfg.run.keep_checkpoints, log)
    state, meta = restore_or_init(setup, ckpt, log)
    step = int(jax.device_get(state.step))
    if meta.get("seed", cfg.run.seed) != cfg.run.seed:  # allowed (a way past a loss spike), but said
        log(f"neo: WARNING: seed {cfg.run.seed}, but checkpoint {step} was trained with seed {meta['seed']}: from "
            f"here on the data order (within the current epoch: examples may repeat or be skipped) and dropout "
            f"differ from the run being resumed; set seed {meta['seed']} to continue it exactly.")
    if "data" in meta:
        for note in source.restore(meta["data"]):
            log(f"neo: WARNING: data: {note}")
    tracker = Tracker(cfg, step, log)
    if step >= cfg.run.train_steps:
        log(f"neo: already trained to step {step} (train_steps {cfg.run.train_steps}); nothing to do")
    devices = list(layout.mesh.devices.flat)
    if buckets and step < cfg.run.train_steps:
        log(curriculum_summary(cfg, step))
    # calls end at multiples of per_call, at train_steps, and where the curriculum's length changes
    call_end = lambda s: min((s // per_call + 1) * per_call, cfg.run.train_steps, next_change(cfg, s))
    calls: dict[tuple[int, int], Callable] = {}  # (steps per call, tokens per row) -> compiled call
    preemption = _Preemption()
    last: dict = {}
    interval_start, interval_steps, interval_tokens = time.perf_counter(), 0, 0
    if step < cfg.run.train_steps:
        batches = take(source, call_end(step) - step)
        position = source.state()  # the source's position after these batches
    try:
        while step < cfg.run.train_steps:
            n, length = len(batches), seq_len(cfg, step)
            stack = global_batches(setup, batches[:, :, :length + 1])  # the same rows, cut (curriculum)
            if (n, length) not in calls:  # compiled apart, so that compilation is not counted as training time
                t = time.perf_counter()
                calls[n, length] = setup.steps.lower(state, stack).compile()
                check_compiled_memory(calls[n, length], setup)
                at = f" of {length} tokens" if buckets else ""
                log(f"neo: compiled {n} train step(s) per call{at} in {time.perf_counter() - t:.1f}s")
                interval_start += time.perf_counter() - t
            state, metrics = calls[n, length](state, stack)
            done, done_position = step + n, position
            if done < cfg.run.train_steps:  # the host reads the next batches while the devices compute
                batches = take(source, call_end(done) - done)
                position = source.state()
            m = jax.device_get(metrics)  # {name: [n]}: waits for the call
            interval_steps += n
            interval_tokens += n * cfg.run.train_batch_size * length
            finite = np.isfinite(m["loss"]) & np.isfinite(m["grad_norm"])
            if not finite.all():
                bad = int(np.argmin(finite))
                tracker.log({"kind": "train", "step": step + bad + 1, **_at(m, bad), "time": time.time()})
                _stop_diverged(_at(m, bad), step + bad + 1, ckpt)
            step = done
            if step % cfg.run.iterations == 0 or step == cfg.run.train_steps:
                elapsed = time.perf_counter() - interval_start
                last = _log_train(cfg, tracker, log, step, _at(m, n - 1), interval_steps, elapsed, interval_tokens,
                                  devices, length if buckets else None)
                interval_start, interval_steps, interval_tokens = time.perf_counter(), 0, 0
            if step % steps_per_checkpoint == 0 or step == cfg.run.train_steps or preemption.requested:
                pause = time.perf_counter()
                ckpt.save(step, state.params, state.opt_state, {"data": done_position, "seed": cfg.run.seed})
                if preemption.requested:  # the save first, within the grace period; validation and samples
                    ckpt.wait()  # are for the rerun, not for the seconds before SIGKILL
                    log(f"neo: SIGTERM: saved checkpoint {step}; exiting (rerun the same command to resume)")
                    break
                if validation is not None:
                    out = validation.run(state.params)
                    log(f"eval | {summary(out)}")
                    tracker.log({"kind": "eval", "step": step, **out, "time": time.time()})
                tracker.plot()
                if samples is not None:
                    samples.run(state.params, step, log)
                tracker.sync()
                interval_start += time.perf_counter() - pause  # saving and evaluating is not training time
    finally:
        ckpt.close()
        tracker.close()
        preemption.restore()
    return last


def _at(metrics: dict, i: int) -> dict:
    """Step i's values of stacked metrics, as floats."""
    return {k: float(v[i]) for k, v in metrics.items()}


def _stop_diverged(m: dict, step: int, ckpt: Checkpointer) -> None:
    ckpt.wait()
    good = ckpt.latest_step()
    keep = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was written"
    raise NeoError(f"loss {m['loss']} / gradient norm {m['grad_norm']} at step {step}: training diverged; "
                   f"stopping without saving ({keep}). Lower 'lr', raise 'warmup_steps', set "
                   f"'gradient_clipping', or check the data; rerun to resume from the checkpoint.")


def _log_train(cfg, tracker, log, done, m, interval_steps, elapsed, interval_tokens, devices,
               length: Optional[int]) -> dict:
    """The log line and record of step `done`; `length`: the curriculum's tokens per row."""
    record = {"kind": "train", "step": done, **m, "time": time.time()}
    speed = at = ""
    if length is not None:
        record["seq_len"] = length
        at = f" | seq_len {length}"
    if interval_steps:  # no rate for an interval that held only the compiling step
        tps = interval_tokens / elapsed
        record.update(tokens_per_sec=tps, mfu=mfu(cfg.model, tps, devices, length))
        speed = f" | {tps:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%"
    eta = (cfg.run.train_steps - done) * elapsed / interval_steps if interval_steps else float("nan")
    log(f"step {done}/{cfg.run.train_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
        f"grad_norm {m['grad_norm']:.3f}{at}{speed} | ETA {format_eta(eta)}")
    tracker.log(record)
    return record


class _Samples:
    """GPT-Neo's `predict_steps`: sample from the model after every checkpoint (compiled once)."""

    def __init__(self, cfg: Config, setup: Setup, prompt_path: str):
        from neo.predict import Sampler, SamplingOptions

        if cfg.data.tokenizer_path is None:
            raise NeoError(f"{cfg.source}: predict_steps > 0 samples during training, which needs a tokenizer: "
                           f"set 'tokenizer_path' (or the dataset config's).")
        from neo.predict import prompt_file

        self.cfg, self.layout, self.prompt_path = cfg, setup.layout, prompt_file(prompt_path, cfg)
        self.opts = SamplingOptions.from_config(cfg)
        self.sampler: Optional[Sampler] = None

    def run(self, params, step: int, log: Callable[[str], None]) -> None:
        from neo.predict import Sampler, write_samples

        if self.sampler is None:
            self.sampler = Sampler(self.cfg, params, self.layout)
        write_samples(self.cfg, self.layout, params, step, self.prompt_path, self.opts, log=log,
                      sampler=self.sampler)
