"""TrainState, the jit-compiled sharded train step, and the training loop.

One `jax.jit` per step with explicit in/out shardings derived from the config's layout,
donated state, gradient accumulation over microbatches inside the step, and no host
synchronisation except at log intervals. Dropout keys are fold_in(seed, step), so a run's
randomness is a function of the step alone and a resumed run repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from neo.config import Config
from neo.errors import NeoError
from neo.loss import chunked_lm_loss
from neo.mesh import (
    Layout, assemble_rows, check_divisible, constrain, num_microbatches, place, process_rows, shardings_of,
)
from neo.mlm import mask_tokens
from neo.model import GPT, init_params
from neo.optim import lr_schedule, make_optimizer


MLM_STREAM = 0x6D6C6D  # folded into the step's key for masked-LM masking, apart from dropout's


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass
class Setup:
    """Everything compiled for one config on one layout."""

    cfg: Config
    layout: Layout
    model: GPT
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable[[], TrainState]
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
    num_microbatches: int
    param_count: int


def build(cfg: Config, layout: Layout) -> Setup:
    """Shardings, initializer and train step for `cfg` on `layout`. Fails before compiling if
    the layout does not fit the shapes."""
    model = GPT(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, cfg.run.train_steps)
    check_divisible(layout, {"batch": cfg.run.train_batch_size, "sequence": cfg.model.n_ctx,
                             "memory_length": cfg.model.n_ctx, "heads": cfg.model.kv_heads}, " in the config")
    n_micro = num_microbatches(cfg.run.train_batch_size, cfg.model.n_ctx, cfg.run.tokens_per_mb_per_replica,
                               layout.axis_size("batch"))
    if (cfg.run.train_batch_size // n_micro) % layout.axis_size("batch"):
        raise NeoError(f"train_batch_size {cfg.run.train_batch_size} in {n_micro} microbatches does not split "
                       f"over {layout.axis_size('batch')} batch shards.")

    def init_boxed(rng: jax.Array) -> TrainState:
        params = init_params(cfg.model, rng)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    rng = jax.random.PRNGKey(cfg.run.seed)
    abstract = place(layout, jax.eval_shape(init_boxed, rng))
    shardings = shardings_of(abstract)
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    init = jax.jit(lambda: nn.meta.unbox(init_boxed(rng)), out_shardings=shardings)
    # Batches hold n_ctx + 1 tokens per row (inputs and shifted targets), so only rows are split
    # here; the model splits `sequence` after the shift if the layout says so.
    step = jax.jit(_train_step(cfg, model, optimizer, layout, n_micro),
                   in_shardings=(shardings, layout.rows),
                   out_shardings=(shardings, layout.replicated), donate_argnums=(0,))
    return Setup(cfg, layout, model, optimizer, shardings, layout.rows, init, step, n_micro, param_count)


def _train_step(cfg: Config, model: GPT, optimizer: optax.GradientTransformation,
                layout: Layout, n_micro: int) -> Callable:
    # Stochastic train mode: dropout, and MoE routing (train capacity, random second expert).
    m = cfg.model
    dropout = bool(m.embed_dropout or m.attn_dropout or m.res_dropout or m.moe_layers)
    schedule = lr_schedule(cfg.optimizer, cfg.run.train_steps)

    def loss_on(params: Any, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
        inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], None
        if cfg.model.mlm_training:
            inputs, targets, mask = mask_tokens(cfg, tokens, jax.random.fold_in(rng, MLM_STREAM))
        hidden, extra = model.apply({"params": params}, inputs, deterministic=not dropout, return_hidden=True,
                                    rngs={"dropout": rng} if dropout else None, mutable=["aux_loss"])
        project = lambda h: model.apply({"params": params}, h, method=GPT.head_logits)
        objective, aux = chunked_lm_loss(hidden, project, targets, cfg.run.z_loss, mask)
        if cfg.model.moe_layers:  # MoE load-balancing losses, sown by each MoE layer
            aux["moe_loss"] = sum(jnp.sum(x) for x in jax.tree.leaves(extra))
            objective = objective + aux["moe_loss"]
        return objective, aux

    grad_fn = jax.value_and_grad(loss_on, has_aux=True)

    def step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        with layout.active():
            rng = jax.random.fold_in(jax.random.PRNGKey(cfg.run.seed), state.step)
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

                aux_shape = jax.eval_shape(grad_fn, state.params, micro[0], rng)[0][1]
                zeros = (jax.tree.map(jnp.zeros_like, state.params),
                         jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape))
                (grads, aux), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n_micro)))
                grads, aux = jax.tree.map(lambda x: x / n_micro, (grads, aux))
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {**aux, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
            return TrainState(state.step + 1, params, opt_state), metrics

    return step


def global_batch(setup: Setup, local: np.ndarray) -> jax.Array:
    """This process's rows (`batch_rows(setup)`, in that order) -> the global, sharded batch."""
    n = setup.cfg.run.train_batch_size
    return assemble_rows(setup.batch_sharding, batch_rows(setup), local, n)


def batch_rows(setup: Setup) -> np.ndarray:
    """The rows of each global train batch this process reads (neo/data reads only these)."""
    return process_rows(setup.batch_sharding, setup.cfg.run.train_batch_size)

