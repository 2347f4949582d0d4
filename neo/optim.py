"""Optimizers, learning-rate schedules, weight-decay masks and clipping, from the config.

neo does the standard thing where GPT-Neo's optimizer had bugs (docs/differences.md):
Adam has bias correction; weight decay skips every norm and bias (GPT-Neo decayed `ln_f`);
warmup ramps to the peak and decay runs from the end of warmup; Adafactor follows the same
schedule and treats `weight_decay` as weight decay (the original used it as the second-moment
decay rate and ignored the schedule).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from neo.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, train_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine/linear decay to 10% of `lr`
    at `lr_decay_end` (default `train_steps`), flat afterwards; or constant after warmup."""
    peak, warm = cfg.lr, cfg.warmup_steps
    end = max(cfg.lr_decay_end or train_steps, warm + 1)
    floor = 0.1 * peak

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * step / max(warm, 1)
        frac = jnp.clip((step - warm) / (end - warm), 0.0, 1.0)
        if cfg.lr_decay == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif cfg.lr_decay == "linear":
            decayed = peak - (peak - floor) * frac
        else:
            decayed = jnp.full_like(frac, peak)
        return jnp.where(step < warm, warmup, decayed)

    return schedule


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and embeddings, not norms or biases."""
    def decays(path: tuple, _leaf: Any) -> bool:
        # Only dict keys name parameters (flax's metadata boxes add attribute keys).
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        is_norm = any(str(n).startswith(("ln", "norm")) for n in names)
        return not is_norm and names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, train_steps: int) -> optax.GradientTransformation:
    """clip (global norm) -> Adam(W) or Adafactor, driven by `lr_schedule`."""
    schedule = lr_schedule(cfg, train_steps)
    parts = []
    if cfg.gradient_clipping:
        parts.append(optax.clip_by_global_norm(cfg.gradient_clipping))
    if cfg.opt_name.lower() == "adam":
        parts.append(optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    else:
        # mesh-tf's Adafactor: factored second moments (eps1), update clipping at RMS 1,
        # relative step size (scaled by the parameter's RMS, at least eps2), optional momentum.
        parts += [
            optax.scale_by_factored_rms(epsilon=cfg.ada_epsilon1),
            clip_by_layer_rms(1.0),
            scale_by_param_layer_rms(min_scale=cfg.ada_epsilon2),
        ]
        if cfg.beta1:
            parts.append(optax.ema(cfg.beta1, debias=False))
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
        parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


# Adafactor's per-parameter statistics, per layer when the layers are stacked for nn.scan (a
# leading `layers` axis, neo/model/params.py): optax's block RMS would mix the layers.


def _layer_rms(path: tuple, x: jax.Array) -> jax.Array:
    """Root mean square of a parameter (or its update); of each layer of a stacked one."""
    stacked = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][:1] == ["layers"]
    axes = tuple(range(1, x.ndim)) if stacked else None
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=stacked))


def clip_by_layer_rms(threshold: float) -> optax.GradientTransformation:
    """optax.clip_by_block_rms, per layer: u / max(1, rms(u) / threshold)."""
    def update(updates, state, params=None):
        clip = lambda path, u: u / jnp.maximum(1.0, _layer_rms(path, u) / threshold)
        return jax.tree_util.tree_map_with_path(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_param_layer_rms(min_scale: float) -> optax.GradientTransformation:
    """optax.scale_by_param_block_rms, per layer: u * max(rms(param), min_scale)."""
    def update(updates, state, params):
        scale = lambda path, u, p: u * jnp.maximum(_layer_rms(path, p), min_scale)
        return jax.tree_util.tree_map_with_path(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update)
