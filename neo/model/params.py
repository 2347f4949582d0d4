"""The model's parameters for a config: initialised, or only their shapes.

Both keep each parameter boxed with its dimension names (flax nn.Partitioned), which is what
neo.mesh.place turns into shardings; `flax.linen.meta.unbox` gives the plain arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from neo.config import ModelConfig
from neo.model.gpt import GPT


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Freshly initialised parameters of GPT(cfg) (mesh-tensorflow's initialisers, gpt.py)."""
    return GPT(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_init(cfg: ModelConfig) -> Any:
    """init_params' tree as jax.ShapeDtypeStructs, nothing allocated: what shardings, parameter
    counts, checkpoint restores and converters' shape checks are computed from."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
