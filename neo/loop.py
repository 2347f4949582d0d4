"""The training loop: resume, train, log, checkpoint, validate, repeat.

A run restarts from the latest checkpoint in `<model_path>/checkpoints` by itself. The loop
synchronises with the devices only at log steps and checkpoints, stops on a NaN/Inf loss
without saving the bad state, and on SIGTERM (preemption) saves and exits.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from neo.checkpoint import Checkpointer, abstract_like, check_writable
from neo.config import Config
from neo.errors import NeoError
from neo.mesh import Layout
from neo.flops import mfu
from neo.train import Setup, TrainState, batch_rows, build, global_batch


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def describe(setup: Setup, log: Callable[[str], None]) -> None:
    """What is about to run and what it needs per device, before compiling."""
    from neo.memory import bytes_per_device, device_memory, gib

    cfg, layout = setup.cfg, setup.layout
    devices = list(layout.mesh.devices.flat)
    abstract = jax.eval_shape(setup.init)
    p = bytes_per_device(abstract.params, setup.state_shardings.params)
    o = bytes_per_device(abstract.opt_state, setup.state_shardings.opt_state)
    log(f"neo: {cfg.name}: {setup.param_count:,} parameters; {len(devices)} x {devices[0].device_kind}; "
        f"mesh {dict(layout.mesh.shape)}; layout {', '.join(f'{d}:{a}' for d, a in layout.rules)}; "
        f"{setup.num_microbatches} microbatch(es) of {cfg.run.train_batch_size // setup.num_microbatches} sequences")
    local = next(d for d in devices if d.process_index == jax.process_index())
    limit = device_memory(local)
    need = 2 * p + o  # parameters, their gradients, optimizer state
    activations = _activation_estimate(setup)
    total = need + activations
    log(f"neo: per device: parameters {gib(p)}, gradients {gib(p)}, optimizer state {gib(o)}, "
        f"activations ~{gib(activations)} (estimate{', with remat' if cfg.model.recompute_grad else ''}) = "
        f"~{gib(total)}" + (f" of {gib(limit)} on a {devices[0].device_kind}" if limit else ""))
    if limit and need > limit:
        raise NeoError(f"parameters, gradients and optimizer state need {gib(need)} per device but a "
                       f"{devices[0].device_kind} has {gib(limit)}; shard them (e.g. add 'embd:<axis>' to "
                       f"the layout for FSDP) or use more devices (python main.py --model ... --auto_layout).")
    if limit and total > limit:
        log(f"neo: WARNING: the estimate (~{gib(total)}) exceeds the device's {gib(limit)}; if this run "
            f"runs out of memory, set recompute_grad, tokens_per_mb_per_replica, or see --auto_layout.")


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


def fit(cfg: Config, layout: Layout, steps_per_checkpoint: int = 5000,
        log: Callable[[str], None] = print, prompt_path: str = "") -> dict:
    """Train to `train_steps` from wherever model_path's checkpoints left off; with
    `predict_steps` > 0, print samples (prompts from `prompt_path`) after every checkpoint.
    Returns the last logged train record."""
    from neo.data import make_source
    from neo.evaluate.validation import Validation, summary
    from neo.tracking import Tracker

    if not cfg.run.model_path:
        raise NeoError(f"{cfg.source}: 'model_path' is required (where checkpoints and logs go).")
    if steps_per_checkpoint < 1:
        raise NeoError(f"--steps_per_checkpoint {steps_per_checkpoint}: save every N >= 1 steps.")
    check_writable(cfg.run.model_path)
    setup = build(cfg, layout)
    describe(setup, log)
    source = make_source(cfg, "train", batch_rows(setup))
    validation = Validation(cfg, layout, setup.state_shardings.params, log) if cfg.run.eval_steps > 0 else None
    samples = _Samples(cfg, setup, prompt_path) if cfg.sampling.predict_steps > 0 else None

    t0 = time.perf_counter()
    ckpt = Checkpointer(cfg.run.model_path, max_to_keep=cfg.run.keep_checkpoints)
    state, meta = restore_or_init(setup, ckpt, log)
    start = int(jax.device_get(state.step))
    if "data" in meta:
        source.restore(meta["data"])
    tracker = Tracker(cfg, start, log)
    if start >= cfg.run.train_steps:
        log(f"neo: already trained to step {start} (train_steps {cfg.run.train_steps}); nothing to do")
    devices = list(layout.mesh.devices.flat)
    tokens_per_step = cfg.run.train_batch_size * cfg.model.n_ctx
    preemption = _Preemption()
    last: dict = {}
    interval_start: Optional[float] = None
    interval_steps = 0
    try:
        for step in range(start, cfg.run.train_steps):
            state, metrics = setup.step(state, global_batch(setup, next(source)))
            if interval_start is None:  # the first step includes compilation: time it apart
                jax.block_until_ready(metrics)
                log(f"neo: first step (compile + run) took {time.perf_counter() - t0:.1f}s")
                interval_start, interval_steps = time.perf_counter(), 0
            else:
                interval_steps += 1
            done = step + 1
            checkpoint_now = done % steps_per_checkpoint == 0 or done == cfg.run.train_steps or preemption.requested
            if done % cfg.run.iterations == 0 or checkpoint_now:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    tracker.log({"kind": "train", "step": done, **m, "time": time.time()})
                    _stop_diverged(m, done, ckpt)
                if done % cfg.run.iterations == 0 or done == cfg.run.train_steps:
                    elapsed = time.perf_counter() - interval_start
                    last = _log_train(cfg, tracker, log, done, m, interval_steps, elapsed, tokens_per_step, devices)
                    interval_start, interval_steps = time.perf_counter(), 0
            if checkpoint_now:
                pause = time.perf_counter()
                ckpt.save(done, state.params, state.opt_state, {"data": source.state(), "seed": cfg.run.seed})
                if validation is not None:
                    out = validation.run(state.params)
                    log(f"eval | {summary(out)}")
                    tracker.log({"kind": "eval", "step": done, **out, "time": time.time()})
                tracker.plot()
                if samples is not None:
                    samples.run(state.params, done, log)
                tracker.sync()
                interval_start += time.perf_counter() - pause  # saving and evaluating is not training time
            if preemption.requested:
                log(f"neo: SIGTERM: saved checkpoint {done}; exiting (rerun the same command to resume)")
                break
    finally:
        ckpt.close()
        tracker.close()
        preemption.restore()
    return last


def _stop_diverged(m: dict, step: int, ckpt: Checkpointer) -> None:
    ckpt.wait()
    good = ckpt.latest_step()
    keep = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was written"
    raise NeoError(f"loss {m['loss']} / gradient norm {m['grad_norm']} at step {step}: training diverged; "
                   f"stopping without saving ({keep}). Lower 'lr', raise 'warmup_steps', set "
                   f"'gradient_clipping', or check the data; rerun to resume from the checkpoint.")


def _log_train(cfg, tracker, log, done, m, interval_steps, elapsed, tokens_per_step, devices) -> dict:
    record = {"kind": "train", "step": done, **m, "time": time.time()}
    speed = ""
    if interval_steps:  # no rate for an interval that held only the compiling step
        tps = interval_steps * tokens_per_step / elapsed
        record.update(tokens_per_sec=tps, mfu=mfu(cfg.model, tps, devices))
        speed = f" | {tps:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%"
    eta = (cfg.run.train_steps - done) * elapsed / interval_steps if interval_steps else float("nan")
    log(f"step {done}/{cfg.run.train_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
        f"grad_norm {m['grad_norm']:.3f}{speed} | ETA {format_eta(eta)}")
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
