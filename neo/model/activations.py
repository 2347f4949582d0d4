"""MLP nonlinearities by their GPT-Neo config names (`activation_fn`).

GPT-Neo's whole list (models/activations.py of the original): the base functions, the custom
ones, and five with learned scalar parameters (`aria`, `prelu`, `parcsinh`, `psoftplus`,
`proottanh`), which `Activation` creates as parameters of the layer that uses them. Three of
the original's definitions were wrong and are fixed here (docs/differences.md): `elish` (its
positive branch divided by 1 + e^x instead of 1 + e^-x), `proottanh` (x to a fractional power
is NaN for x < 0; neo uses |x|) and `rrelu` (a slope drawn once at graph-build time; neo uses
RReLU's evaluation slope, the mean of [1/8, 1/3]).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from neo.model.layers import named, saves_input


def gelu_tanh(x: jax.Array) -> jax.Array:
    """mesh-tf's gelu = HF's gelu_new: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    """The erf GELU: HF's "gelu" (Pythia), 0.5x(1 + erf(x/sqrt(2))), the formula PyTorch's
    exact GELU computes. Not jax.nn.gelu(approximate=False), which writes it with erfc(-x/sqrt(2)):
    XLA:CPU's erfc is piecewise (a polynomial near 0, an exp-based tail elsewhere) where its erf
    is one clamped rational function, and the quickstart's step (four [768, 512] GELUs and their
    gradients) took 54.6 ms with erfc, 52.1 ms with erf (docs/benchmarks.md, "2026-12-02,
    night"). Largest difference from float64's exact value over N(0, 3^2) inputs: 1.1e-6,
    against 3.8e-7 for the erfc form."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


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
    # the original's CUSTOM_FNS without parameters
    "lrelu001": lambda x: jax.nn.leaky_relu(x, 0.01),
    "lrelu020": lambda x: jax.nn.leaky_relu(x, 0.20),
    "id": lambda x: x,
    "triangle_relax": lambda x: jnp.sin(x) - jnp.sin(3 * x) / 9 + jnp.sin(5 * x) / 25 - jnp.sin(7 * x) / 49,
    "square_relax": lambda x: jnp.cos(x) - jnp.cos(3 * x) / 3 + jnp.cos(5 * x) / 5 - jnp.cos(7 * x) / 7,
    "spike": lambda x: 1 / (1 + x ** 2),
    "spike2": lambda x: jnp.exp(-x ** 2),
    "tanhshrink": lambda x: x - jnp.tanh(x),
    "softsign": jax.nn.soft_sign,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "logsoftmax": lambda x: jax.nn.log_softmax(x, axis=-1),
    "bipolarsigmoid": lambda x: 2 * jax.nn.sigmoid(x) - 1,
    "rrelu": lambda x: jax.nn.leaky_relu(x, (1 / 8 + 1 / 3) / 2),
    "elish": lambda x: jnp.where(x >= 0, x, jnp.expm1(jnp.minimum(x, 0))) * jax.nn.sigmoid(x),
    "arcsinh": jnp.arcsinh,
    "maxsig": lambda x: jnp.maximum(x, jax.nn.sigmoid(x)),
    "cosid": lambda x: jnp.cos(x) - x,
    "minsin": lambda x: jnp.minimum(x, jnp.sin(x)),
    "maxtanh": lambda x: jnp.maximum(x, jnp.tanh(x)),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanhexp": lambda x: x * jnp.tanh(jnp.exp(x)),
    "lisht": lambda x: x * jnp.tanh(x),
    "seagull": lambda x: jnp.log1p(x ** 2),
    "snake": lambda x: x + jnp.sin(x) ** 2,
    "roottanh": lambda x: (x ** 2 + 1) ** (1 / 3) * jnp.tanh(x),
    "softplusmone": lambda x: jax.nn.softplus(x) - 1,
}

Param = Callable[[str, float], jax.Array]  # (name, initial value) -> a learned scalar


def _positive(p: Param, name: str, offset: float) -> jax.Array:
    """The original's `_pos_var`: softplus(w) + offset, w initialised to 0."""
    return jax.nn.softplus(p(name, 0.0)) + offset


# The original's CUSTOM_FNS with learned scalars; each call of `_var` there made a new scalar,
# so each occurrence here has its own name.
PARAMETRIC: dict[str, Callable[[jax.Array, Param], jax.Array]] = {
    "aria": lambda x, p: x * (p("a", 0.0) + p("b", 1.0) / (
        _positive(p, "c", 0.0) + p("d", 1.0) * jnp.exp(p("e", -1.0) * x / _positive(p, "f", 1.0)))),
    "prelu": lambda x, p: jnp.where(x >= 0, x, p("alpha", 0.2) * x),
    "parcsinh": lambda x, p: p("a", 1.0) * jnp.arcsinh(x * _positive(p, "b", 1.0)),
    "psoftplus": lambda x, p: p("a", 1.0) * jax.nn.softplus(x * p("b", 1.0)) + p("c", 0.0),
    "proottanh": lambda x, p: (jnp.abs(x) ** _positive(p, "a", 2.0) + _positive(p, "b", 1.0))
    ** (1 / _positive(p, "c", 3.0)) * jnp.tanh(x),
}


class Activation(nn.Module):
    """The activation `fn`, with its learned scalars (if any) as parameters of this module."""

    fn: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """fn(x) in x's dtype; from a 16-bit x computed in float32 and rounded once, as
        layers.saves_input does for the parameter-free ones."""
        if self.fn in PARAMETRIC:
            def p(name: str, init: float) -> jax.Array:
                return self.param(name, named(nn.initializers.constant(init), ()), (), jnp.float32)

            return PARAMETRIC[self.fn](x.astype(jnp.float32), p).astype(x.dtype)
        return saves_input(get_activation(self.fn), x)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """A parameter-free activation by name (names are checked when the config is loaded)."""
    return ACTIVATIONS[name]
