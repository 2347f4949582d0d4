"""TrainState, the jit-compiled sharded train step, and the training loop.

One `jax.jit` per step with explicit in/out shardings derived from the config's layout,
donated state, gradient accumulation over microbatches inside the step, and no host
synchronisation except at log intervals. Dropout keys are fold_in(seed, step), so a run's
randomness is a function of the step alone and a resumed run repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from neo.config import ModelConfig
from neo.errors import NeoError
from neo.loss import lm_loss
from neo.mesh import Layout, check_divisible, constrain
from neo.model import GPT
from neo.optim import lr_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass
class Setup:
    """Everything compiled for one config on one layout."""

    cfg: ModelConfig
    layout: Layout
    model: GPT
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable[[], TrainState]
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
    num_microbatches: int
    param_count: int


def num_microbatches(cfg: ModelConfig, layout: Layout) -> int:
    """GPT-Neo's rule: sequences per microbatch = tokens_per_mb_per_replica // n_ctx (at least 1),
    lowered until it divides the per-replica batch."""
    replicas = layout.axis_size("batch")
    per_replica = cfg.train_batch_size // replicas
    if not cfg.tokens_per_mb_per_replica:
        return 1
    mb = max(1, cfg.tokens_per_mb_per_replica // cfg.n_ctx)
    mb = min(mb, per_replica)
    while per_replica % mb:
        mb -= 1
    return per_replica // mb


def _logical_to_shardings(layout: Layout, boxed: Any, abstract: Any) -> Any:
    """Mesh shardings for a state whose parameters carry dimension names. Leaves whose names
    do not fit their shape (Adafactor's factored statistics) are replicated."""
    logical = nn.get_partition_spec(boxed)

    def one(spec: P, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        names = tuple(spec)
        if len(names) != leaf.ndim:
            return layout.replicated
        return layout.sharding(names)

    return jax.tree.map(one, logical, abstract, is_leaf=lambda x: isinstance(x, P))


def _check_param_divisibility(layout: Layout, boxed: Any) -> None:
    logical = nn.get_partition_spec(boxed)
    flat, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(flat, specs):
        names = tuple(spec)
        if len(names) != leaf.ndim:
            continue
        sizes = {n: s for n, s in zip(names, leaf.shape) if n}
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        check_divisible(layout, sizes, f" in parameter {name}")


def abstract_params(cfg: ModelConfig, layout: Layout) -> Any:
    """The model's parameters as ShapeDtypeStructs placed per the layout (nothing allocated):
    what checkpoints are restored into for sampling, evaluation and export."""
    model = GPT(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    _check_param_divisibility(layout, boxed)
    abstract = nn.meta.unbox(boxed)
    shardings = _logical_to_shardings(layout, boxed, abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def build(cfg: ModelConfig, layout: Layout) -> Setup:
    """Shardings, initializer and train step for `cfg` on `layout`. Fails before compiling if
    the layout does not fit the shapes."""
    model = GPT(cfg)
    optimizer = make_optimizer(cfg)
    check_divisible(layout, {"batch": cfg.train_batch_size, "sequence": cfg.n_ctx,
                             "memory_length": cfg.n_ctx, "heads": cfg.n_head}, " in the config")
    n_micro = num_microbatches(cfg, layout)
    if (cfg.train_batch_size // n_micro) % layout.axis_size("batch"):
        raise NeoError(f"train_batch_size {cfg.train_batch_size} in {n_micro} microbatches does not split "
                       f"over {layout.axis_size('batch')} batch shards.")

    def init_boxed(rng: jax.Array) -> TrainState:
        params = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    rng = jax.random.PRNGKey(cfg.seed)
    boxed = jax.eval_shape(init_boxed, rng)
    _check_param_divisibility(layout, boxed.params)
    abstract = nn.meta.unbox(boxed)
    shardings = _logical_to_shardings(layout, boxed, abstract)
    # Batches hold n_ctx + 1 tokens per row (inputs and shifted targets), so only rows are split
    # here; the model splits `sequence` after the shift if the layout says so.
    batch_sharding = layout.sharding(("batch", None))
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))

    init = jax.jit(lambda: nn.meta.unbox(init_boxed(rng)), out_shardings=shardings)
    step = jax.jit(_train_step(cfg, model, optimizer, layout, n_micro),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, layout.replicated), donate_argnums=(0,))
    return Setup(cfg, layout, model, optimizer, shardings, batch_sharding, init, step, n_micro, param_count)


def _train_step(cfg: ModelConfig, model: GPT, optimizer: optax.GradientTransformation,
                layout: Layout, n_micro: int) -> Callable:
    dropout = bool(cfg.embed_dropout or cfg.attn_dropout or cfg.res_dropout)
    schedule = lr_schedule(cfg)

    def loss_on(params: Any, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = model.apply({"params": params}, tokens[:, :-1], deterministic=not dropout,
                             rngs={"dropout": rng} if dropout else None)
        return lm_loss(logits, tokens[:, 1:], cfg.z_loss)

    grad_fn = jax.value_and_grad(loss_on, has_aux=True)

    def step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        with layout.active():
            rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.step)
            if n_micro == 1:
                (_, aux), grads = grad_fn(state.params, batch, rng)
            else:
                # Microbatch m takes rows m, m+n, m+2n, ...: every batch shard holds an equal part
                # of every microbatch, so splitting moves no data between devices.
                b, t = batch.shape
                micro = batch.reshape(b // n_micro, n_micro, t).swapaxes(0, 1)
                micro = constrain(micro, (None, "batch", "sequence"))

                def accumulate(carry, xs):
                    mb, i = xs
                    (_, aux), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                    return jax.tree.map(jnp.add, carry, (g, aux)), None

                zeros = jax.tree.map(jnp.zeros_like, (state.params, {"loss": 0.0, "z_loss": 0.0}))
                zeros = (zeros[0], jax.tree.map(lambda x: jnp.zeros((), jnp.float32), zeros[1]))
                (grads, aux), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n_micro)))
                grads, aux = jax.tree.map(lambda x: x / n_micro, (grads, aux))
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {**aux, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
            return TrainState(state.step + 1, params, opt_state), metrics

    return step


def global_batch(setup: Setup, local: np.ndarray) -> jax.Array:
    """This process's rows -> the global, sharded batch array."""
    return jax.make_array_from_process_local_data(setup.batch_sharding, local)

