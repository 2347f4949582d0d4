"""TrainState and the jit-compiled sharded train step, one step or several per call.

`step` runs one train step; `steps` runs as many as its stack of batches holds
([n, batch, n_ctx + 1]) in one compiled call, a `lax.scan` over the same step: GPT-Neo's
`iterations` (TPUEstimator's iterations_per_loop), so the host dispatches once per n steps and
every step's metrics come back stacked [n]. Both have explicit in/out shardings derived from
the config's layout, donate the state, and accumulate gradients over microbatches inside the
step. Dropout keys are fold_in(seed, step), so a run's randomness is a function of the step
alone: n steps in one call compute what n one-step calls compute, and a resumed run repeats it.
"""

from __future__ import annotations

import dataclasses
import functools
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
from neo.loss import chunked_lm_loss, shift
from neo.mesh import (
    Layout, assemble_rows, check_divisible, constrain, num_microbatches, parameter_name, place, process_rows,
    shardings_of,
)
from neo.mlm import mask_tokens
from neo.model import GPT, init_params
from neo.model.gpt import compute_dtype, project_logits
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
    stack_sharding: NamedSharding
    init: Callable[[], TrainState]
    step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
    steps: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
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
    one = _train_step(cfg, model, optimizer, layout, n_micro)
    step = jax.jit(one, in_shardings=(shardings, layout.rows),
                   out_shardings=(shardings, layout.replicated), donate_argnums=(0,))

    def scanned(state: TrainState, batches: jax.Array) -> tuple[TrainState, dict]:
        def body(state, batch):
            state, metrics = one(state, batch)
            # the carry keeps the state's layout from step to step (no resharding in the loop)
            return jax.lax.with_sharding_constraint(state, shardings), metrics

        return jax.lax.scan(body, state, batches)

    stack = layout.sharding((None, "batch"))  # [steps, rows, n_ctx + 1]: rows split as `batch`
    steps = jax.jit(scanned, in_shardings=(shardings, stack),
                    out_shardings=(shardings, layout.replicated), donate_argnums=(0,))
    return Setup(cfg, layout, model, optimizer, shardings, layout.rows, stack, init, step, steps, n_micro,
                 param_count)


# Off CPU the head's product in training is padded to a multiple of this many vocabulary
# entries (GPT.head_logits): GPT-2's 50,257 divide into no GEMM tile (gpt_neo_1.3B, bfloat16,
# an H200: 0.333 s per step padded against 0.350; docs/benchmarks.md). On CPU the padding
# gains nothing and its mask costs a pass over the logits (125M bfloat16: 2.82-2.87 s against
# 2.56-2.74 s, alternated), so there the head stays as it is.
HEAD_VOCAB_MULTIPLE = 128


def head_vocab_multiple() -> int:
    return 1 if jax.default_backend() == "cpu" else HEAD_VOCAB_MULTIPLE


def _train_step(cfg: Config, model: GPT, optimizer: optax.GradientTransformation,
                layout: Layout, n_micro: int) -> Callable:
    # Stochastic train mode: dropout, and MoE routing (train capacity, random second expert).
    m = cfg.model
    dropout = bool(m.embed_dropout or m.attn_dropout or m.res_dropout or m.moe_layers)
    schedule = lr_schedule(cfg.optimizer, cfg.run.train_steps)

    def loss_on(params: Any, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
        inputs, targets, mask = shift(tokens, cfg.data.padding_id)  # padded targets masked
        if cfg.model.mlm_training:
            inputs, targets, mask = mask_tokens(cfg, tokens, jax.random.fold_in(rng, MLM_STREAM))
        hidden, extra = model.apply({"params": params}, inputs, deterministic=not dropout, return_hidden=True,
                                    rngs={"dropout": rng} if dropout else None, mutable=["aux_loss"])
        head = model.apply({"params": params}, method=GPT.head)
        project = functools.partial(project_logits, dtype=compute_dtype(cfg.model), vocab_multiple=head_vocab_multiple())
        objective, aux = chunked_lm_loss(hidden, head, project, targets, cfg.run.z_loss, mask)
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
            if cfg.run.log_grads:
                metrics.update(grad_norms(grads))
            return TrainState(state.step + 1, params, opt_state), metrics

    return step


def grad_norms(grads: Any) -> dict[str, jax.Array]:
    """GPT-Neo's `log_grads`: every parameter's gradient norm, named as the parameter tree
    ("grads/norm/h_0/attn/q/kernel"; the original logged "grads/norm" + the variable's name).
    Traced into the step only when the key is on."""
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    return {f"grads/norm/{parameter_name(path)}": jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            for path, g in flat}


def global_batch(setup: Setup, local: np.ndarray) -> jax.Array:
    """This process's rows (`batch_rows(setup)`, in that order) -> the global, sharded batch."""
    n = setup.cfg.run.train_batch_size
    return assemble_rows(setup.batch_sharding, batch_rows(setup), local, n)


def global_batches(setup: Setup, local: np.ndarray) -> jax.Array:
    """This process's rows of a stack of batches [steps, rows, n_ctx + 1] -> the global,
    sharded stack that `Setup.steps` takes."""
    n = setup.cfg.run.train_batch_size
    return assemble_rows(setup.stack_sharding, batch_rows(setup), local, n, axis=1)


def batch_rows(setup: Setup) -> np.ndarray:
    """The rows of each global train batch this process reads (neo/data reads only these)."""
    return process_rows(setup.batch_sharding, setup.cfg.run.train_batch_size)

