"""precision bfloat16: parameters stay float32, every matmul of the forward pass multiplies
bfloat16 operands (q and k included) and accumulates in float32. On CPU no product anywhere,
backward included, hands back a bfloat16 result (XLA:CPU's bf16 -> bf16 dot runs 6x slower
than bf16 -> f32); on GPU and TPU a dense layer's product does, as the float32 sum rounded
once inside the kernel (layers.product_dtype), which the CPU emulates here."""

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
    # A global and a local layer; attention on the dense path, whose scores and probs x v are
    # products too (on CPU `auto` runs neo's kernel, which takes bfloat16 and computes in float32).
    cfg = parse_model_config(tiny_config(precision="bfloat16", attention_impl="xla")).model
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    tokens = jnp.zeros((2, cfg.n_ctx), jnp.int32)
    forward = lambda p: GPT(cfg).apply({"params": p}, tokens)
    found = dots(forward, params)
    assert len(found) >= 2 * 8 + 1  # q, k, v, scores, probs x v, o, c_fc, c_proj per layer; the head
    assert all(ins == [jnp.bfloat16, jnp.bfloat16] and out == jnp.float32 for ins, out in found), found
    backward = jax.grad(lambda p: lm_loss(forward(p), tokens, 1e-4)[0])
    assert all(out == jnp.float32 for _, out in dots(backward, params))


def test_products_have_the_gradients_of_plain_einsum():
    """neo.model.layers.einsum writes its own backward pass (and takes a dense layer's weight
    gradient with whichever operand is smaller on the left, for speed); in float32 its
    gradients are those of jnp.einsum, for a wide input (the MLP's output projection), a
    narrow one (its input projection) and a batched product (attention's)."""
    import numpy as np

    from neo.model.layers import einsum

    rng = np.random.default_rng(0)
    for eq, a_shape, b_shape in (("abc,cd->abd", (2, 8, 32), (32, 8)), ("abc,cd->abd", (2, 8, 8), (8, 32)),
                                 ("abc,cde->abde", (2, 8, 16), (16, 2, 4)),
                                 ("bhqd,bhkd->bhqk", (2, 2, 8, 4), (2, 2, 6, 4))):
        a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (a_shape, b_shape))
        w = jnp.asarray(rng.normal(size=jnp.einsum(eq, a, b).shape), jnp.float32)
        ours = jax.grad(lambda a, b: jnp.sum(einsum(eq, a, b, jnp.float32) * w), argnums=(0, 1))(a, b)
        plain = jax.grad(lambda a, b: jnp.sum(jnp.einsum(eq, a, b) * w), argnums=(0, 1))(a, b)
        for x, y in zip(ours, plain):
            assert x.shape == y.shape
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_bfloat16_products_equal_float32_products_of_the_rounded_operands():
    """In bfloat16 the products and their gradients multiply bfloat16 operands exactly and
    accumulate in float32, whatever order XLA:CPU needs them copied into (weight gradients
    contract the leading token dimensions; attention's key gradient has its result
    transposed; the tied head's gradient is transposed by its caller): equal to float32
    products of the operands and cotangent rounded to bfloat16, up to summation order."""
    import numpy as np

    from neo.model.layers import einsum

    rng = np.random.default_rng(0)
    bf = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    for eq, a_shape, b_shape in (("abc,cd->abd", (2, 8, 32), (32, 8)), ("abc,cd->abd", (2, 8, 8), (8, 32)),
                                 ("abc,cde->abde", (2, 8, 16), (16, 2, 4)), ("abcd,cde->abe", (2, 8, 2, 4), (2, 4, 16)),
                                 ("bhqd,bhkd->bhqk", (2, 2, 8, 4), (2, 2, 6, 4)),
                                 ("bhqk,bhkd->bhqd", (2, 2, 8, 6), (2, 2, 6, 4)), ("bte,ve->btv", (2, 8, 16), (40, 16))):
        a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (a_shape, b_shape))
        w = jnp.asarray(rng.normal(size=jnp.einsum(eq, a, b).shape), jnp.float32)
        grads = jax.jit(jax.grad(lambda a, b: jnp.sum(einsum(eq, a, b, jnp.bfloat16) * w), argnums=(0, 1)))
        tied = jax.jit(jax.grad(lambda a, bt: jnp.sum(einsum(eq, a, bt.T, jnp.bfloat16) * w), argnums=1))
        plain = jax.grad(lambda a, b: jnp.sum(jnp.einsum(eq, a, b) * bf(w)), argnums=(0, 1))(bf(a), bf(b))
        ours = grads(a, b)
        if b.ndim == 2:
            ours += (tied(a, b.T).T,)
            plain += (plain[1],)
        for x, y in zip(ours, plain):
            assert x.dtype == jnp.float32 and x.shape == y.shape
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_bfloat16_train_step_compiles_every_product_in_bfloat16(tiny_config):
    """XLA's CPU backend quietly turns a 16-bit product into a float32 one (5x slower with
    bfloat16 units) unless its operands and result are in row-major order; neo's products
    and gradients are arranged so that none is. Checked on the compiled backward pass:
    every dot instruction multiplies bfloat16 operands."""
    import re

    cfg = parse_model_config(tiny_config(precision="bfloat16")).model
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((2, cfg.n_ctx), jnp.int32)
    loss = lambda p: lm_loss(GPT(cfg).apply({"params": p}, tokens), tokens, 1e-4)[0]
    step = jax.jit(jax.grad(loss))
    text = step.lower(params).compile().as_text()
    dtypes, dots_found = {}, []
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
        if m:
            dtypes[m.group(1)] = m.group(2)
        d = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if d:
            dots_found.append((d.group(1), d.group(2), line.strip()[:200]))
    assert len(dots_found) >= 3 * 8 + 3  # forward, input and weight gradients of every product
    upcast = [line for lhs, rhs, line in dots_found if (dtypes[lhs], dtypes[rhs]) != ("bf16", "bf16")]
    assert not upcast, upcast
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(step(params)))


def test_bfloat16_activation_is_the_float32_one_rounded_once():
    """A bfloat16 MLP activation and its gradient are computed in float32 and rounded to
    bfloat16 once (as PyTorch's opmath does), not with every intermediate rounded: equal to the
    float32 GELU of the same input, rounded, and differing from an all-bfloat16 evaluation."""
    import numpy as np

    from neo.model.activations import gelu_tanh
    from neo.model.layers import saves_input

    x = jnp.asarray(np.random.default_rng(0).normal(size=4096) * 3, jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(1).normal(size=4096), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: saves_input(gelu_tanh, x), x)
    y32, vjp32 = jax.vjp(gelu_tanh, x.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16 and vjp(g)[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(vjp32(g.astype(jnp.float32))[0].astype(jnp.bfloat16)))
    assert not np.array_equal(np.asarray(y), np.asarray(gelu_tanh(x)))  # the rounded-everywhere form differs


def test_bfloat16_parametric_activation_is_the_float32_one_rounded_once():
    """The activations with learned scalars (aria, prelu, ...) follow the same rule: computed in
    float32 with their float32 parameters, rounded to bfloat16 once."""
    import numpy as np

    from neo.model.activations import Activation

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 1024)) * 3, jnp.bfloat16)
    for fn in ("aria", "psoftplus", "prelu"):
        act = Activation(fn)
        params = act.init(jax.random.PRNGKey(0), x)
        y = act.apply(params, x)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(y), np.asarray(act.apply(params, x.astype(jnp.float32)).astype(jnp.bfloat16)))
        grads = jax.grad(lambda p: jnp.sum(act.apply(p, x).astype(jnp.float32)))(params)
        assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g)) for g in jax.tree.leaves(grads)), fn


def test_products_handed_back_in_bfloat16_are_the_float32_sum_rounded_once(monkeypatch):
    """Where layers.product_dtype asks for it (GPU, TPU), a dense layer's product, and the
    gradient of its bfloat16 input, come back in bfloat16: each is the float32 accumulation
    rounded once, the weight's gradient stays the float32 one, and the bias is added in
    float32 to the rounded product. The CPU emulates the GPU's choice (monkeypatched)."""
    import numpy as np
    from flax.linen import meta

    from neo.model import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 8, 48)), jnp.bfloat16)
    eq = "btd,df->btf"
    as_gpu = lambda d: jnp.dtype(d)
    monkeypatch.setattr(layers, "product_dtype", as_gpu)
    y16, vjp16 = jax.vjp(lambda x, w: layers.einsum(eq, x, w, jnp.bfloat16, jnp.bfloat16), x, w)
    dx16, dw16 = vjp16(g)
    monkeypatch.undo()
    y32 = layers.einsum(eq, x, w, jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))
    f32 = lambda eq, a, b: jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
    assert dx16.dtype == jnp.bfloat16 and dw16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dx16), np.asarray(f32("btf,df->btd", g, w.astype(jnp.bfloat16))
                                                              .astype(jnp.bfloat16)))
    np.testing.assert_allclose(np.asarray(dw16), np.asarray(f32("btd,btf->df", x, g)), rtol=1e-6)

    dense = layers.Dense((48,), ("embd", "intermediate"), layers.normal(0.5), dtype=jnp.bfloat16)
    params = {"kernel": meta.unbox(dense.init(jax.random.PRNGKey(0), x)["params"]["kernel"]),
              "bias": jnp.asarray(rng.normal(size=48), jnp.float32)}
    product = jnp.einsum(eq, x, params["kernel"].astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    monkeypatch.setattr(layers, "product_dtype", as_gpu)
    on_gpu = dense.apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(on_gpu),
                                  np.asarray((product.astype(jnp.bfloat16).astype(jnp.float32) + params["bias"])
                                             .astype(jnp.bfloat16)))
    monkeypatch.undo()  # the CPU's own choice: the float32 product, the bias, one rounding
    np.testing.assert_array_equal(np.asarray(dense.apply({"params": params}, x)),
                                  np.asarray((product + params["bias"]).astype(jnp.bfloat16)))

    # Off CPU (layers.rounded_bias_gradient) the bias's gradient is summed from the bfloat16
    # output gradient as stored: the same values, the other gradients untouched.
    monkeypatch.setattr(layers, "product_dtype", as_gpu)
    grads = lambda: jax.vjp(lambda p, x: dense.apply({"params": p}, x), params, x)[1](g)
    (plain, dx_plain) = grads()
    monkeypatch.setattr(layers, "rounded_bias_gradient", lambda dtype: True)
    (stored, dx_stored) = grads()
    assert stored["bias"].dtype == jnp.float32 and dx_stored.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(stored["bias"]), np.asarray(g.astype(jnp.float32).sum((0, 1))), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stored["bias"]), np.asarray(plain["bias"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stored["kernel"]), np.asarray(plain["kernel"]))
    np.testing.assert_array_equal(np.asarray(dx_stored), np.asarray(dx_plain))
