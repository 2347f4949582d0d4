"""Building blocks shared by the network: named parameters, dense layers, norms, activations.

Every parameter is created through `named`, which attaches GPT-Neo's dimension names so the
config's layout decides its sharding (see neo/mesh.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def named(init: Initializer, names: Sequence[str]) -> Initializer:
    """Attach dimension names to an initializer (flax logical partitioning metadata)."""
    return nn.with_logical_partitioning(init, tuple(names))


def normal(std: float) -> Initializer:
    """N(0, std): GPT-Neo initialises every matrix with an untruncated normal."""
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """x @ kernel (+ bias) with named kernel dimensions; `features` may be a tuple (e.g. heads,
    features_per_head) and `axes` how many trailing input dimensions are contracted."""

    features: tuple[int, ...]
    names: tuple[str, ...]  # kernel dims: contracted input dims, then output dims
    kernel_init: Initializer
    use_bias: bool = True
    axes: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.axes:]
        kernel = self.param("kernel", named(self.kernel_init, self.names), (*in_shape, *self.features), jnp.float32)
        x = x.astype(self.dtype)
        n_in = len(in_shape)
        y = jax.lax.dot_general(x, kernel.astype(self.dtype),
                                ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", named(nn.initializers.zeros, self.names[n_in:]), self.features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """GPT-Neo's LayerNorm: biased variance of the centred input, eps 1e-5, gain and bias.
    Statistics in float32 whatever the compute dtype."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", named(nn.initializers.ones, ("embd",)), (d,), jnp.float32)
        bias = self.param("bias", named(nn.initializers.zeros, ("embd",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class ScaleNorm(nn.Module):
    """GPT-Neo's `scalenorm`: the same centring and normalising as LayerNorm (eps 1e-5), then
    one learned scalar gain `scale` (init 1) instead of a per-feature gain and bias."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", named(nn.initializers.ones, ()), (), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale).astype(self.dtype)
