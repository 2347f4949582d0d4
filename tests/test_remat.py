"""`remat_policy` (and GPT-Neo's `recompute_grad`) changes what the compiled train step keeps
for the backward pass: XLA's own memory analysis of the compiled step shows the temporary
memory drop as each policy says (full keeps least, `none` most, the two partial policies in
between)."""

import jax
import jax.numpy as jnp

from neo.config import parse_model_config
from neo.mesh import make_layout
from neo.train import build

# Activations large against the weights, so what the policy keeps dominates the temporaries.
SHAPE = dict(n_embd=64, n_head=4, n_layer=4, n_ctx=256, n_vocab=128, attention_types=[[["global", "local"], 2]],
             local_attention_radius=64, train_batch_size=4, precision="bfloat16")


def temp_bytes(tiny_config, **kw) -> int:
    """Temporary bytes of the compiled (never run) train step on one device."""
    cfg = parse_model_config(tiny_config(**SHAPE, **kw))
    setup = build(cfg, make_layout("", "", jax.devices()[:1]))
    rows = jax.ShapeDtypeStruct((cfg.run.train_batch_size, cfg.model.n_ctx + 1), jnp.int32)
    return setup.step.lower(jax.eval_shape(setup.init), rows).compile().memory_analysis().temp_size_in_bytes


def test_remat_policies_cut_the_compiled_temporary_memory(tiny_config):
    temp = {p: temp_bytes(tiny_config, remat_policy=p) for p in ("none", "full", "save_dots", "save_attention_out")}
    assert temp["full"] < 0.5 * temp["none"], temp
    assert temp["full"] < temp["save_attention_out"] < temp["none"], temp
    assert temp["full"] < temp["save_dots"] < temp["none"], temp
    assert temp_bytes(tiny_config, recompute_grad=True) == temp["full"]  # GPT-Neo's key means full
