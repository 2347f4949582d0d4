"""neo's CPU product for training (neo/kernels/matmul.cc): every transposition of its operands
equals the exact sum as closely as XLA's product does; a dense layer's product and both its
gradients go to it on one CPU device, and everything else stays with XLA (products with a batch
index, weights larger than SMALL_PRODUCT, multi-device layouts, NEO_CPU_KERNELS=0); a model's
loss and gradients equal XLA's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import parse_model_config
from neo.kernels import cpu
from neo.mesh import make_layout
from neo.model import GPT, init_params
from neo.model import layers

pytestmark = pytest.mark.skipif(not cpu.enabled(),
                                reason="neo's CPU kernels are not used here (no C++ compiler, or no AVX-512)")


@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("b_t", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (13, 37, 65), (768, 128, 512), (5, 300, 33), (29, 64, 96),
                                   (150, 70, 230)])
def test_product_equals_the_exact_sum(a_t, b_t, m, k, n):
    """Rows that fill no tile of 12 (13 = 12 + 1, 29 = 2 x 12 + 4 + 1), columns that fill no
    panel of 32 (65, 33, 1), K above the 128-term blocks (300), tiles shared out in runs that
    do not divide them evenly (150 x 230: 104 tiles, runs of 6), either operand transposed: as
    close to the exact sum as XLA's own product, and the same bits at every call."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if a_t else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if b_t else (k, n)).astype(np.float32)
    a2, b2 = (a.T if a_t else a), (b.T if b_t else b)
    run = jax.jit(lambda a, b: cpu.matmul(a, b, a_transposed=a_t, b_transposed=b_t))
    y = np.asarray(run(a, b))
    exact = a2.astype(np.float64) @ b2.astype(np.float64)
    xla = np.asarray(jnp.asarray(a2) @ jnp.asarray(b2))
    assert y.shape == (m, n) and y.dtype == np.float32
    assert np.abs(y - exact).max() <= max(4 * np.abs(xla - exact).max(), 1e-6 * np.abs(exact).max())
    np.testing.assert_array_equal(np.asarray(run(a, b)), y)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (100, 300, 65), (48, 129, 32), (128, 768, 512), (13, 37, 65)])
def test_weight_gradient_path_sums_as_the_others(m, k, n):
    """A transposed a (a weight's gradient) takes its own path, k in blocks of 128 outermost and
    48 rows of a packed at a time (matmul.cc); its outputs are the same float32 sums, in the same
    order, as the in-place tiles give for the same a laid out row-major: the same bits. Shapes
    with several row groups and a short last one (100 = 2 x 48 + 4), K across blocks (300, 129,
    768), columns that fill no panel (65)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    transposed = jax.jit(lambda a, b: cpu.matmul(a, b, a_transposed=True))(np.ascontiguousarray(a.T), b)
    in_place = jax.jit(lambda a, b: cpu.matmul(a, b))(a, b)
    np.testing.assert_array_equal(np.asarray(transposed), np.asarray(in_place))


def test_bad_shapes_are_refused():
    with pytest.raises(Exception, match="training product"):
        jax.block_until_ready(cpu.matmul(jnp.ones((4, 8)), jnp.ones((9, 3))))


def calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count('@neo_matmul_f32(')


@pytest.mark.parametrize("eq,a_shape,b_shape", [
    ("bte,ef->btf", (3, 5, 16), (16, 40)),          # a dense layer
    ("btE,Ehd->bthd", (2, 9, 24), (24, 4, 8)),      # q, k, v: the output split into heads
    ("bthd,hde->bte", (2, 9, 4, 8), (4, 8, 24)),    # the attention's output projection
    ("bte,ve->btv", (2, 7, 33), (65, 33)),          # the tied head, b transposed
])
def test_dense_products_and_both_gradients_use_the_kernel(eq, a_shape, b_shape):
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal(a_shape), jnp.float32)
    b = jnp.asarray(rng.standard_normal(b_shape), jnp.float32)
    loss = lambda a, b: jnp.sum(jnp.sin(layers.einsum(eq, a, b, jnp.float32)))
    reference = lambda a, b: jnp.sum(jnp.sin(jnp.einsum(eq, a, b)))
    assert calls(jax.grad(loss, (0, 1)), a, b) == 3  # the product, a's gradient, b's
    got, want = jax.value_and_grad(loss, (0, 1))(a, b), jax.value_and_grad(reference, (0, 1))(a, b)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_other_products_stay_with_xla(monkeypatch):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 4, 8, 16)), jnp.float32)
    small, large = jnp.ones((64, 64)), jnp.ones((64, layers.SMALL_PRODUCT // 64 + 1))
    product = lambda eq: (lambda a, b: layers.einsum(eq, a, b, jnp.float32))
    assert calls(product("btE,EF->btF"), x, small) == 1
    assert calls(product("btE,EF->btF"), x, large) == 0  # a weight above SMALL_PRODUCT floats
    assert calls(product("bhqd,bhkd->bhqk"), q, q) == 0  # a batch index (attention's scores)
    assert calls(lambda a, b: layers.einsum("btE,EF->btF", a, b, jnp.bfloat16), x, small) == 0
    layout = make_layout("x:8", "batch:x")
    with layout.active():
        assert calls(product("btE,EF->btF"), x, small) == 0  # XLA partitions the product
    monkeypatch.setenv("NEO_CPU_KERNELS", "0")
    assert calls(product("btE,EF->btF"), x, small) == 0


def test_model_loss_and_gradients_equal_xla(tiny_config, monkeypatch):
    """The tiny model's loss and every parameter's gradient with the kernel's products against
    XLA's (NEO_CPU_KERNELS=0 also turns the attention kernel off: pinned to the dense path on
    both sides)."""
    cfg = parse_model_config(tiny_config(attention_impl="xla"))
    params = nn.meta.unbox(init_params(cfg.model, jax.random.PRNGKey(0)))
    model = GPT(cfg.model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, cfg.model.n_ctx), 0, cfg.model.n_vocab)

    def loss(params):
        logits = model.apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    run = lambda: jax.jit(jax.value_and_grad(loss)).lower(params)
    assert run().as_text().count('@neo_matmul_f32(') > 0
    got = run().compile()(params)
    monkeypatch.setenv("NEO_CPU_KERNELS", "0")
    assert run().as_text().count('@neo_matmul_f32(') == 0
    want = run().compile()(params)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
