"""precision bfloat16: parameters stay float32, every matmul of the forward pass multiplies
bfloat16 operands (q and k included) into float32, and no product anywhere, backward
included, rounds its result to bfloat16 (a bf16 -> bf16 dot loses the accumulation and, on
CPU, runs 6x slower than bf16 -> f32)."""

import jax
import jax.extend
import jax.numpy as jnp

from neo.config import parse_model_config
from neo.loss import lm_loss
from neo.model import GPT, init_params


def dots(fn, *args) -> list[tuple[list, jnp.dtype]]:
    """(operand dtypes, result dtype) of every dot_general fn traces, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(([v.aval.dtype for v in eqn.invars], eqn.outvars[0].aval.dtype))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bfloat16_multiplies_bfloat16_into_float32(tiny_config):
    cfg = parse_model_config(tiny_config(precision="bfloat16")).model  # a global and a local layer
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    tokens = jnp.zeros((2, cfg.n_ctx), jnp.int32)
    forward = lambda p: GPT(cfg).apply({"params": p}, tokens)
    found = dots(forward, params)
    assert len(found) >= 2 * 8 + 1  # q, k, v, scores, probs x v, o, c_fc, c_proj per layer; the head
    assert all(ins == [jnp.bfloat16, jnp.bfloat16] and out == jnp.float32 for ins, out in found), found
    backward = jax.grad(lambda p: lm_loss(forward(p), tokens, 1e-4)[0])
    assert all(out == jnp.float32 for _, out in dots(backward, params))
