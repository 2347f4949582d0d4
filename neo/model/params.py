"""The model's parameters for a config: initialised, or only their shapes; and the two forms of
the layers' part of the tree.

Both init functions keep each parameter boxed with its dimension names (flax nn.Partitioned),
which is what neo.mesh.place turns into shardings; `flax.linen.meta.unbox` gives the plain
arrays.

Layers are stored per layer (`h_0`, `h_1`, ..., as Hugging Face names them) when the model runs
them one by one, and stacked when it runs them under nn.scan (gpt.py `LayerGroup`): `layers/j/...`
with a leading axis over the n_layer / period repetitions of the attention pattern, layer
g * period + j at index g of `layers/j`. Checkpoints hold whichever form the model that wrote
them had; `as_model_tree` converts either into the form a config's model needs (checkpoint
restore, Hugging Face import), `per_layer` gives the per-layer form (export, per-layer reading).
Both work on any tree that contains the layers (parameters, Adam's moments, abstract trees of
jax.ShapeDtypeStruct with shardings).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from neo.config import ModelConfig
from neo.model.gpt import GPT

STACKED = "layers"


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Freshly initialised parameters of GPT(cfg) (mesh-tensorflow's initialisers, gpt.py)."""
    return GPT(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_init(cfg: ModelConfig) -> Any:
    """init_params' tree as jax.ShapeDtypeStructs, nothing allocated: what shardings, parameter
    counts, checkpoint restores and converters' shape checks are computed from."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def is_stacked(tree: Any) -> bool:
    """Does this parameter tree (or tree metadata) hold its layers stacked?"""
    return isinstance(tree, dict) and STACKED in tree


def as_model_tree(cfg: ModelConfig, tree: Any) -> Any:
    """`tree` with its layers in the form GPT(cfg) uses, whichever form they are in."""
    return stacked(tree, cfg.scan_period) if cfg.scan_period else per_layer(tree)


def stacked(tree: Any, period: int) -> Any:
    """`tree` with its layers stacked in groups of `period` (a no-op if they already are)."""
    return _map_layer_dicts(tree, lambda node: _stack(node, period), lambda d: "h_0" in d)


def stacked_period(tree: Any) -> int:
    """Layers per group of a tree (or tree metadata) whose layers are stacked."""
    return len(tree[STACKED])


def per_layer(tree: Any) -> Any:
    """`tree` with its layers as h_0 ... h_{n_layer-1}."""
    return _map_layer_dicts(tree, _unstack, lambda d: STACKED in d)


def _map_layer_dicts(tree: Any, fn: Callable[[dict], dict], holds: Callable[[dict], bool]) -> Any:
    """Apply fn to every dict in `tree` that holds the layers, e.g. params and Adam's mu and nu."""
    select = lambda x: isinstance(x, dict) and holds(x)
    return jax.tree.map(lambda x: fn(x) if select(x) else x, tree, is_leaf=select)


def _stack(node: dict, period: int) -> dict:
    n_layer = sum(k.startswith("h_") for k in node)
    out = {k: v for k, v in node.items() if not k.startswith("h_")}
    out[STACKED] = {str(j): jax.tree.map(lambda *xs: _stack_leaves(xs), *[node[f"h_{i}"] for i in range(j, n_layer, period)])
                    for j in range(period)}
    return out


def _unstack(node: dict) -> dict:
    groups = node[STACKED]
    period = len(groups)
    n_groups = jax.tree.leaves(groups)[0].shape[0]
    out = {k: v for k, v in node.items() if k != STACKED}
    for j, group in groups.items():
        for g in range(n_groups):
            out[f"h_{g * period + int(j)}"] = jax.tree.map(lambda x: _index(x, g), group)
    return out


def _stack_leaves(xs: tuple) -> Any:
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs),) + x.shape, x.dtype, sharding=_with_layers_axis(x.sharding, x.ndim))
    return np.stack(xs) if isinstance(x, np.ndarray) else jnp.stack(xs)  # host arrays stay on the host


def _index(x: Any, g: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_without_layers_axis(x.sharding))
    return x[g]


def _with_layers_axis(sharding: Any, ndim: int) -> Any:
    """The sharding of a stacked leaf: its layer's, with the (whole) layers axis in front."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(None, *spec))


def _without_layers_axis(sharding: Any) -> Any:
    if not isinstance(sharding, NamedSharding):
        return sharding
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
