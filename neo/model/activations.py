"""MLP nonlinearities by their GPT-Neo config names (`activation_fn`)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from neo.errors import NeoError


def gelu_tanh(x: jax.Array) -> jax.Array:
    """mesh-tf's gelu = HF's gelu_new: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    """The erf GELU: HF's "gelu" (Pythia)."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_tanh,  # GPT-Neo's "gelu" is the tanh form
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu_exact": gelu_exact,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "selu": jax.nn.selu,
    "elu": jax.nn.elu,
    "abs": jnp.abs,
    "sin": jnp.sin,
    "cos": jnp.cos,
    "sign": jnp.sign,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "softplus": jax.nn.softplus,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        import difflib

        m = difflib.get_close_matches(name, list(ACTIVATIONS), n=1)
        hint = f" Did you mean '{m[0]}'?" if m else ""
        raise NeoError(f"unknown activation_fn {name!r}.{hint} Known: {', '.join(sorted(ACTIVATIONS))}.") from None
