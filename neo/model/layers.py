"""Building blocks shared by the network: named parameters, matmuls, dense layers, norms.

Every parameter is created through `named`, which attaches GPT-Neo's dimension names so the
config's layout decides its sharding (see neo/mesh.py).

Precision (docs/DESIGN.md, "Speed and memory"): parameters are float32; every matmul multiplies
in the compute dtype and accumulates in float32 (`einsum` below), in the backward pass too.
"""

from __future__ import annotations

import functools
import math
import string
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from neo.kernels import cpu as cpu_kernels
from neo.mesh import active_layout

Initializer = Callable[..., jax.Array]


def named(init: Initializer, names: Sequence[str]) -> Initializer:
    """Attach dimension names to an initializer (flax logical partitioning metadata)."""
    return nn.with_logical_partitioning(init, tuple(names))


def normal(std: float) -> Initializer:
    """N(0, std): GPT-Neo initialises every matrix with an untruncated normal."""
    return nn.initializers.normal(stddev=std)


def einsum(eq: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype, out: jnp.dtype = jnp.float32) -> jax.Array:
    """jnp.einsum(eq, a, b) with both operands in `dtype` and float32 accumulation; the result
    is float32, or `out` (the float32 sum rounded once; see product_dtype). Its gradients are
    the two transposed products, also taken in `dtype` with float32 accumulation, and come
    back in a's and b's own dtypes (a float32 weight gets a float32 gradient; a 16-bit
    activation's is produced in 16 bits where product_dtype says so). Plain autodiff of
    `preferred_element_type` would multiply the float32 cotangent by a bfloat16 operand, which
    XLA runs as a float32 matmul (on a CPU with bfloat16 units, 5x slower). Every index of an
    operand must appear in the other operand or the output (true of every product in the
    network)."""
    return _einsum(eq, jnp.dtype(dtype), jnp.dtype(a.dtype), jnp.dtype(b.dtype), jnp.dtype(out), a, b)


def product_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype a product of `dtype` operands should hand back for a result that is rounded
    to `dtype` anyway. On CPU float32: XLA:CPU runs a 16-bit product fast only with a float32
    result (a 16-bit one: 253 against 1,543 GFLOP/s), and the caller rounds. Elsewhere `dtype`
    itself: GPU and TPU matrix units accumulate in float32 inside the kernel and round once on
    the way out, the same value without writing the float32 result and reading it back. On an
    H200 (gpt_neo_1.3B, bfloat16, layers unrolled) the step took 0.278 s against 0.294 s with
    float32 results, XLA then running every product in cuBLAS rather than in its own Triton
    kernels (docs/benchmarks.md)."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(dtype)


def _product(eq: str, dtype: jnp.dtype, a: jax.Array, b: jax.Array, out: jnp.dtype = jnp.float32) -> jax.Array:
    a, b = a.astype(dtype), b.astype(dtype)
    if not _needs_row_major(dtype):
        small = _small_cpu_product(eq, a, b) if jnp.dtype(out) == jnp.float32 else None
        return small if small is not None else jnp.einsum(eq, a, b, preferred_element_type=out)
    # The barrier keeps a caller's transpose of the result (the tied head's gradient is the
    # transpose of [embd, vocab]) from being folded into the product by swapping its operands.
    return jax.lax.optimization_barrier(
        jnp.einsum(eq, a, b, preferred_element_type=jnp.float32) if _row_major(eq) else _row_major_product(eq, a, b)
    ).astype(out)


SMALL_PRODUCT = 1 << 17  # floats in a product's weight-sized side up to which neo's CPU kernel runs it


def _small_cpu_product(eq: str, a: jax.Array, b: jax.Array) -> Optional[jax.Array]:
    """jnp.einsum(eq, a, b) of two float32 operands by neo's CPU kernel (matmul.cc), or None
    where it does not apply. It applies on jax's CPU backend with the kernels built, on one
    device (under a multi-device layout XLA partitions the product), to a plain product (no
    batch index; each operand's indices grouped as rows then contraction or the reverse, the
    result rows then columns of either operand) whose weight holds at most SMALL_PRODUCT floats:
    b, or the result when the product contracts a's leading indices (a weight's gradient).

    Why: XLA:CPU runs such small products at 90-190 GFLOP/s on two cores (the quickstart's
    [768, 128] x [128, 512] and its gradients), the kernel at 180-220; from a weight of
    [768, 768] (gpt_neo_125M) XLA's run at 185-215 and the kernel is no faster, so those stay
    with XLA (docs/benchmarks.md, 2026-11-30 "evening")."""
    if jnp.dtype(a.dtype) != jnp.float32 or jnp.dtype(b.dtype) != jnp.float32 or not cpu_kernels.enabled():
        return None
    layout = active_layout()
    if layout is not None and layout.mesh.size > 1:
        return None
    (x, y), z = eq.split("->")[0].split(","), eq.split("->")[1]
    batch, m, n, contract = _split(x, y, z)
    if batch or len(set(x)) != len(x) or len(set(y)) != len(y) or set(x) != set(m + contract) \
            or set(y) != set(n + contract):
        return None
    sizes = dict(zip(x, a.shape)) | dict(zip(y, b.shape))
    if z == m + n:
        (l, lx, lm), (r, ry, rn) = (a, x, m), (b, y, n)
    elif z == n + m:  # c^T = b^T a^T: the same kernel with the operands swapped
        (l, lx, lm), (r, ry, rn) = (b, y, n), (a, x, m)
    else:
        return None
    lc, rc = ("".join(c for c in operand if c in contract) for operand in (lx, ry))
    if lc != rc or lx not in (lm + lc, lc + lm) or ry not in (rc + rn, rn + rc):
        return None
    rows, inner, cols = (math.prod(sizes[c] for c in part) for part in (lm, lc, rn))
    a_t, b_t = lx != lm + lc, ry != rc + rn
    weight = rows * cols if a_t else inner * cols  # a^T g (over the tokens) is a weight's gradient
    if weight > SMALL_PRODUCT or not rows * inner * cols:
        return None
    c = cpu_kernels.matmul(l.reshape((inner, rows) if a_t else (rows, inner)),
                           r.reshape((cols, inner) if b_t else (inner, cols)), a_transposed=a_t, b_transposed=b_t)
    return c.reshape([sizes[i] for i in z])


def _needs_row_major(dtype: jnp.dtype) -> bool:
    """16-bit products on XLA's CPU backend run fast only in row-major order (_row_major)."""
    return dtype != jnp.float32 and jax.default_backend() == "cpu"


def _split(x: str, y: str, z: str) -> tuple[str, str, str, str]:
    """x,y->z's batch, x-only and y-only indices in z's order, and its contracted indices in
    y's order."""
    batch = "".join(c for c in z if c in x and c in y)
    m, n = "".join(c for c in z if c in x and c not in y), "".join(c for c in z if c in y and c not in x)
    return batch, m, n, "".join(c for c in y if c in x and c not in z)


def _row_major(eq: str) -> bool:
    """Is `eq` a plain batched matmul, a [batch, M, K] @ b [batch, K, N] (or [batch, N, K]) ->
    [batch, M, N], with no operand or result to transpose? XLA's CPU backend runs a 16-bit
    product with a float32 result in its matmul library only in this order: its operand
    upcaster, early in compilation, turns any other product into a float32 one, 5x slower on
    a CPU with bfloat16 units (a [768, 1024] x [1024, 3072] weight gradient: 255 against 1,207
    GFLOP/s; attention's key gradient 7x). A transpose counts even when hidden: XLA gives it a
    transposed layout, which passes through bitcasts, converts and optimization barriers, and
    if that layout reaches the product only later, the product fails at run time instead
    ("Unsupported element type for DotThunk"). Weight gradients, which contract the leading
    token dimensions, and attention's key and value gradients are such products;
    _row_major_product rewrites them."""
    (x, y), z = eq.split("->")[0].split(","), eq.split("->")[1]
    batch, m, n, contract = _split(x, y, z)
    return z == batch + m + n and x == batch + m + contract and y in (batch + contract + n, batch + n + contract)


def _row_major_product(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(eq, a, b) (float32 result) as a row-major product (see _row_major): the
    operands, taken in whichever order copies the fewest elements, are copied into row-major
    order, and the result, if it is not in the order asked for, is transposed after an
    optimization barrier (else XLA folds the transpose back into the product). The copy is a
    pad by one element and a slice: a plain transpose's layout would reach the product, a
    pad's result is laid out row-major; XLA fuses the transpose, pad and slice into one copy.
    Only for CPU; other backends take the operands as they are."""
    (x, y), z = eq.split("->")[0].split(","), eq.split("->")[1]
    sizes = dict(zip(x, a.shape)) | dict(zip(y, b.shape))
    orders = []
    for (l, lx), (r, ry) in (((a, x), (b, y)), ((b, y), (a, x))):
        batch, m, n, contract = _split(lx, ry, z)
        lo, zo = batch + m + contract, batch + m + n
        ro = ry if ry in (batch + contract + n, batch + n + contract) else batch + contract + n
        cost = (lo != lx) * l.size + (ro != ry) * r.size + (zo != z) * 2 * math.prod(sizes[c] for c in z)
        orders.append((cost, len(orders), l, lx, lo, r, ry, ro, zo))
    _, _, l, lx, lo, r, ry, ro, zo = min(orders, key=lambda o: o[:2])  # the first order on a tie
    out = jnp.einsum(f"{lo},{ro}->{zo}", _row_major_copy(l, lx, lo), _row_major_copy(r, ry, ro),
                     preferred_element_type=jnp.float32)
    return out if zo == z else jnp.transpose(jax.lax.optimization_barrier(out), [zo.index(c) for c in z])


def _row_major_copy(t: jax.Array, order: str, new_order: str) -> jax.Array:
    if order == new_order:
        return t
    t = jnp.transpose(t, [order.index(c) for c in new_order])
    return jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, 1)])[..., :t.shape[-1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _einsum(eq, dtype, a_dtype, b_dtype, out, a, b):
    return _product(eq, dtype, a, b, out)


def _einsum_fwd(eq, dtype, a_dtype, b_dtype, out, a, b):
    a, b = a.astype(dtype), b.astype(dtype)  # the residuals are kept in the compute dtype
    return _product(eq, dtype, a, b, out), (_stored(a), _stored(b))


def _einsum_bwd(eq, dtype, a_dtype, b_dtype, out, residuals, g):
    a, b = (_loaded(r, dtype) for r in residuals)
    (x, y), z = eq.split("->")[0].split(","), eq.split("->")[1]
    g = g.astype(dtype)
    a_grad = _product(f"{z},{y}->{x}", dtype, g, b, product_dtype(a_dtype)).astype(a_dtype)
    return a_grad, _b_grad(x, y, z, dtype, a, g).astype(b_dtype)


def _stored(x: jax.Array) -> jax.Array:
    """A 16-bit residual as the integers of its bits, on CPU. Under scanned layers every
    residual is written into a per-layer stack, and XLA:CPU has no 16-bit float
    dynamic-update-slice: it converts the whole stack to float32 and back for each layer's
    write (125M, bfloat16, remat_policy none: 3.6-4.0 s per step against 2.9-3.3 s with the
    bits stored, back to back). Integers it writes in place; the bitcasts cost nothing."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _needs_row_major(x.dtype) else x


def _loaded(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def saves_input(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """fn(x), whose backward pass keeps only x and recomputes fn's own intermediates from it,
    as PyTorch's GELU does. Plain autodiff of a tanh GELU keeps its intermediates, each a
    [tokens, 4d] array per layer; under scanned layers in bfloat16 on CPU each became a
    per-layer stack converted to float32 and back at every layer's write (_stored; 125M,
    remat_policy none: 3.3 s per step before, 2.8 s after). fn: elementwise, parameter-free.

    fn and its gradient are computed in float32 from a 16-bit x, and only the results are
    rounded to x's dtype, as PyTorch computes its 16-bit GELU ("opmath"). Computed in
    bfloat16, XLA:CPU rounded each of the tanh GELU's ~20 intermediates to bfloat16 and back:
    its backward took 208 ms of kernel time per 125M step (12 layers), 59 ms now
    (scripts/profile_step.py)."""
    dtype = x.dtype
    opmath = (lambda x: fn(x.astype(jnp.float32)).astype(dtype)) if jnp.dtype(dtype).itemsize < 4 else fn

    @jax.custom_vjp
    def call(x):
        return opmath(x)

    def call_fwd(x):
        return opmath(x), _stored(x)

    def call_bwd(residual, g):
        return jax.vjp(opmath, _loaded(residual, dtype))[1](g)

    call.defvjp(call_fwd, call_bwd)
    return call(x)


def _b_grad(x: str, y: str, z: str, dtype: jnp.dtype, a: jax.Array, g: jax.Array) -> jax.Array:
    """b's gradient, a^T g over the dimensions a and g share (for a dense layer, the tokens).
    XLA:CPU's matmul library takes its left operand with the contraction last and its right
    one with it first, so XLA copies the left one into a transposed layout, fusing into that
    copy whatever made it (a GELU written column by column). Make the smaller of a and g the
    left one: for the MLP's output projection that is g [tokens, d], not a [tokens, 4d]
    (quickstart: 4 transposed [768, 512] copies of 5 ms each per step; scripts/profile_step.py)."""
    if a.size <= g.size or any(c in x and c in z for c in y):
        # batched products keep their order; 16-bit CPU products choose their own
        return _product(f"{x},{z}->{y}", dtype, a, g)
    yt = "".join(c for c in y if c in z) + "".join(c for c in y if c not in z)
    return jnp.transpose(_product(f"{z},{x}->{yt}", dtype, g, a), [yt.index(c) for c in y])


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def add_bias(y: jax.Array, bias: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """(y + bias) in float32, rounded to `dtype`: the bias's gradient is the float32 sum of the
    output's gradient over the tokens, as for a kernel whose input is a constant 1.

    Where rounded_bias_gradient says so (GPU, TPU; 16-bit dtype), that gradient is summed from
    the 16-bit output gradient held in memory, which is its value anyway (the gradient of a
    16-bit output is 16-bit). Plain autodiff let XLA skip the round trip through 16 bits
    (xla_allow_excess_precision) and write the MLP's activation gradient in float32 between
    two fusions instead, [tokens, 4d] x 4 bytes written and read again per layer for the
    bias's reduction, beside the 16-bit copy the products need (gpt_neo_1.3B on an H200, batch
    8 x 2048, layers unrolled: 13.3 ms of kernels per step in those two fusions, 9.7 after; the
    step 0.2761 -> 0.2717 s and 0.2781 -> 0.2743 s in two calls; docs/benchmarks.md)."""
    def plain(y, bias):
        return (y.astype(jnp.float32) + bias).astype(dtype)

    if not rounded_bias_gradient(dtype):
        return plain(y, bias)
    lead = tuple(range(y.ndim - bias.ndim))
    y_dtype = y.dtype
    call = jax.custom_vjp(plain)

    def call_fwd(y, bias):
        return plain(y, bias), None

    def call_bwd(_, g):  # g: the output's gradient, in `dtype`
        g = jax.lax.optimization_barrier(g)  # kept as the 16-bit array it is
        return g.astype(y_dtype), jnp.sum(g, axis=lead, dtype=jnp.float32)

    call.defvjp(call_fwd, call_bwd)
    return call(y, bias)


def rounded_bias_gradient(dtype: jnp.dtype) -> bool:
    """add_bias sums a 16-bit gradient as stored: for a 16-bit compute dtype, off CPU, where it
    was measured (docs/benchmarks.md); the CPU keeps plain autodiff, its step as it was."""
    return jnp.dtype(dtype).itemsize < 4 and jax.default_backend() != "cpu"


def packs_for_decoding(module: nn.Module) -> bool:
    """Is `module` applied to fill the "decode" collection (neo/predict.py make_pack)? Not at
    init, where flax makes every collection mutable."""
    return module.is_mutable_collection("decode") and not module.is_initializing()


class Dense(nn.Module):
    """x @ kernel (+ bias) with named kernel dimensions; `features` may be a tuple (e.g. heads,
    features_per_head) and `axes` how many trailing input dimensions are contracted.

    Applied with the "decode" collection mutable, it also stores its kernel packed for neo's
    CPU decode kernel (neo/kernels/cpu.py); applied with that collection, a product of at most
    MAX_ROWS rows (a decode step; a prompt pass too, cpu.takes) goes to the kernel: the
    same sums, 1.2-3.6x faster than XLA:CPU's products (docs/benchmarks.md)."""

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
        n_in, n_out, n_lead = len(in_shape), len(self.features), x.ndim - len(in_shape)
        letters = iter(string.ascii_letters)
        lead, ins, outs = ("".join(next(letters) for _ in range(n)) for n in (n_lead, n_in, n_out))
        rows, k, n = math.prod(x.shape[:n_lead]), math.prod(in_shape), math.prod(self.features)
        if packs_for_decoding(self) and not self.has_variable("decode", "kernel"):
            self.put_variable("decode", "kernel", cpu_kernels.pack(kernel.reshape(k, n), self.dtype))
        if self.has_variable("decode", "kernel") and cpu_kernels.takes(rows, k, self.dtype):
            # A decode step on CPU (neo/predict.py packs the weights): neo's own kernel.
            y = cpu_kernels.product(x.reshape(*x.shape[:n_lead], k), self.get_variable("decode", "kernel"), n)
            y = y.reshape(*x.shape[:n_lead], *self.features).astype(product_dtype(self.dtype))
        else:
            y = einsum(f"{lead}{ins},{ins}{outs}->{lead}{outs}", x, kernel, self.dtype, product_dtype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", named(nn.initializers.zeros, self.names[n_in:]), self.features, jnp.float32)
            y = add_bias(y, bias, self.dtype)
        return checkpoint_name(y.astype(self.dtype), "dense")  # what remat_policy save_dots keeps


def recomputed_norm(norm: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`norm(x, *params)` whose backward pass keeps only its arguments and recomputes the rest.

    Plain autodiff of a norm keeps its float32 intermediates (the centred and the normalised
    input, [tokens, embd] each) for the backward pass. Under scanned layers (nn.scan) XLA cannot
    recompute them across the loop, so each became a float32 stack per norm: six [tokens, embd]
    float32 stacks per layer of gpt_neo_1.3B in the H200's scanned step, written in the forward
    loop and read back in the backward one (docs/benchmarks.md, 2026-12-01). Checkpointed, the
    norm keeps its input in the compute dtype, and the backward pass recomputes the statistics
    in the fusions that take the norm's gradient. `prevent_cse=False`: where the forward and
    backward passes meet in one program (unrolled layers), XLA may still reuse the forward's
    values, as it did before. gpt_neo_125M's compiled step, batch 4 x 256 on CPU, holds 144 MiB
    less temporary memory (1,450 -> 1,306 MiB in float32). The counterpart of `saves_input`
    for functions with parameters, whose gradients jax.checkpoint derives without a rule."""
    return jax.checkpoint(norm, prevent_cse=False)


class LayerNorm(nn.Module):
    """GPT-Neo's LayerNorm: biased variance of the centred input, eps 1e-5, gain and bias
    (GPT-NeoX's `use_bias_in_norms: false` drops the bias). Statistics in float32 whatever the
    compute dtype; recomputed in the backward pass (`recomputed_norm`)."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", named(nn.initializers.ones, ("embd",)), (d,), jnp.float32)
        bias = (self.param("bias", named(nn.initializers.zeros, ("embd",)), (d,), jnp.float32)
                if self.use_bias else None)

        def norm(x, scale, bias):
            x32 = x.astype(jnp.float32)
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
            return (y if bias is None else y + bias).astype(self.dtype)

        return recomputed_norm(norm)(x, scale, bias)


class RMSNorm(nn.Module):
    """GPT-NeoX's `rmsnorm` (Zhang & Sennrich 2019; LLaMA): x / RMS(x) * scale, no centring,
    optional bias (`use_bias_in_norms`). eps sits inside the root, x * rsqrt(mean(x^2) + eps), as
    in LLaMA and Hugging Face's LlamaRMSNorm, which the released LLaMA/Mistral weights were
    trained with; GPT-NeoX adds eps to the RMS instead (docs/differences.md)."""

    epsilon: float = 1e-8
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", named(nn.initializers.ones, ("embd",)), (d,), jnp.float32)
        bias = (self.param("bias", named(nn.initializers.zeros, ("embd",)), (d,), jnp.float32)
                if self.use_bias else None)

        def norm(x, scale, bias):
            x32 = x.astype(jnp.float32)
            y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon) * scale
            return (y if bias is None else y + bias).astype(self.dtype)

        return recomputed_norm(norm)(x, scale, bias)


class ScaleNorm(nn.Module):
    """GPT-Neo's `scalenorm`: the same centring and normalising as LayerNorm (eps 1e-5), then
    one learned scalar gain `scale` (init 1) instead of a per-feature gain and bias."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", named(nn.initializers.ones, ()), (), jnp.float32)

        def norm(x, scale):
            x32 = x.astype(jnp.float32)
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale).astype(self.dtype)

        return recomputed_norm(norm)(x, scale)


class L2ScaleNorm(nn.Module):
    """GPT-NeoX's `norm: scalenorm` (Nguyen & Salazar 2019, megatron/model/norms.py): the input
    divided by its L2 norm (at least eps), times one learned scalar `scale` (init 1). Unlike
    GPT-Neo's scalenorm it neither centres nor divides by sqrt(n_embd)."""

    epsilon: float = 1e-8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", named(nn.initializers.ones, ()), (), jnp.float32)

        def norm(x, scale):
            x32 = x.astype(jnp.float32)
            l2 = jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), self.epsilon)
            return (x32 / l2 * scale).astype(self.dtype)

        return recomputed_norm(norm)(x, scale)
