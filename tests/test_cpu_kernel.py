"""neo's CPU decode kernels (neo/kernels): their products and attention equal XLA's, a sampler
that uses them gives the tokens and logits XLA gives (every attention kind and cache: global,
local rings, grouped-query, ALiBi, rotary, padding), and where they cannot be built or used (no
compiler, too little memory, too many rows) decoding falls back to XLA with a message."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import parse_model_config
from neo.kernels import cpu
from neo.mesh import make_layout
from neo.model import GPT, init_cache, init_params
from neo.model.attention_op import NEG_INF, attend
from neo.predict import Sampler, SamplingOptions, decode_arch, make_pack

pytestmark = pytest.mark.skipif(not cpu.decode_kernels(),
                                reason="neo's CPU decode kernels are not used here (no C++ compiler, or neither AVX-512 "
                                       "nor AVX2)")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 768, 2304), (8, 3072, 768), (3, 37, 100), (9, 64, 33), (17, 130, 64)])
def test_product_equals_the_exact_sum(dtype, m, k, n):
    """Every row count (one row, 8 at once, 9 as 8 + 1, 17), an odd K (bfloat16 pairs along k
    padded), N not a multiple of the 32-column panel: float32 sums as close to the exact sum as
    XLA's own product, and the same bits at every call."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    run = jax.jit(lambda x, w: cpu.product(x, cpu.pack(w, dtype), n))
    y = np.asarray(run(x, w))
    exact = np.asarray(x, np.float64) @ np.asarray(w.astype(dtype), np.float64)
    xla = np.asarray(jnp.einsum("mk,kn->mn", x, w.astype(dtype), preferred_element_type=jnp.float32))
    scale = np.abs(exact).max()
    assert y.shape == (m, n) and y.dtype == np.float32
    assert np.abs(y - exact).max() <= max(4 * np.abs(xla - exact).max(), 1e-6 * scale)
    np.testing.assert_array_equal(np.asarray(run(x, w)), y)


@pytest.mark.parametrize("read", cpu.READS)
@pytest.mark.parametrize("m,k,n", [(2, 768, 2304), (8, 3072, 768), (9, 37, 100), (13, 130, 48), (16, 64, 40),
                                   (1, 768, 100), (40, 96, 70)])
def test_bfloat16_pairs_read_every_way(read, m, k, n):
    """Rows of bfloat16 pairs read on AMX tiles, with vdpbf16ps or widened to float32 (which one
    runs is measured per CPU: decode_product.cc NeoDecodeBF16Read): each as close to the exact
    sum as XLA's own product, odd K, a last partial panel, the tiles' 16 rows, more rows than a
    tile holds (a prompt pass: 40 = 16 + 16 + 8) and a K the tiles do not take (37, 130: the
    better vector read runs) included."""
    if not cpu._BUILT.get("pairs"):
        pytest.skip("this build reads bfloat16 unpaired (no AVX512_BF16): test_product_equals_the_exact_sum covers it")
    if read == "tiles" and cpu._BUILT["read"] != "tiles":
        pytest.skip("no AMX tiles here (a CPU before Sapphire Rapids, or Linux refused them)")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    run = jax.jit(lambda x, w: cpu.product(x, cpu.pack(w, jnp.bfloat16), n, read=read))
    y = np.asarray(run(x, w))
    exact = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64)
    xla = np.asarray(jnp.einsum("mk,kn->mn", x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32))
    assert np.abs(y - exact).max() <= max(4 * np.abs(xla - exact).max(), 1e-6 * np.abs(exact).max())
    np.testing.assert_array_equal(np.asarray(run(x, w)), y)  # the same bits at every call


# The product kernel of a library built by a child's compiler (CXX) against the exact sums:
# float32 and bfloat16, row counts that fill passes of 6 and 8 rows and leave some over, odd K,
# N not a multiple of a panel. argv: the panel and the bfloat16 pairing the build must have.
PRODUCT_CHECK = """
import sys
import jax, jax.numpy as jnp, numpy as np
from neo.kernels import cpu
panel, pairs = int(sys.argv[1]), sys.argv[2] == "1"
assert cpu.load() is not None and (cpu._BUILT["panel"], cpu._BUILT["pairs"]) == (panel, pairs), cpu._BUILT
rng = np.random.default_rng(1)
for dtype in (jnp.float32, jnp.bfloat16):
    for m, k, n in [(1, 768, 2304), (8, 3072, 768), (3, 37, 100), (9, 64, 33), (13, 130, 48), (16, 40, 17)]:
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        packed = cpu.pack(w, dtype)
        if dtype == jnp.float32 or not pairs:
            assert packed.shape == (-(-n // panel), k, panel), packed.shape
        y = np.asarray(cpu.product(x, packed, n))
        exact = np.asarray(x, np.float64) @ np.asarray(w.astype(dtype), np.float64)
        xla = np.asarray(jnp.einsum("mk,kn->mn", x, w.astype(dtype), preferred_element_type=jnp.float32))
        assert np.abs(y - exact).max() <= max(4 * np.abs(xla - exact).max(), 1e-6 * np.abs(exact).max())
print("products ok")
"""


def gxx_targeting(tmp_path, march: str, *extra: str) -> str:
    """A g++ that compiles for `march` (and `extra` flags) where asked for -march=native, as on
    a CPU of that kind; this CPU runs the code (it has every instruction set asked for here)."""
    import shutil

    gxx = shutil.which("g++") or shutil.which("c++")
    wrapper = tmp_path / f"g++-{march}"
    wrapper.write_text('#!/bin/bash\nargs=()\nfor a in "$@"; do [ "$a" = -march=native ] && a=-march=' + march +
                       f'; args+=("$a"); done\nexec {gxx} "${{args[@]}}" {" ".join(extra)}\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def check_products(tmp_path, compiler: str, panel: int, pairs: bool) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, CXX=compiler, NEO_KERNEL_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", PRODUCT_CHECK, str(panel), str(int(pairs))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "products ok" in out.stdout, out.stderr[-2000:]


def test_bfloat16_without_the_dot_product_instruction(tmp_path):
    """A CPU without AVX512_BF16 widens bfloat16 weights to float32 in the kernel instead of
    reading them in pairs: built here without that instruction set, the same products."""
    import platform
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() != "x86_64" or "avx512_bf16" not in flags:
        pytest.skip("this CPU has no AVX512_BF16: the tests above already run the widening path")
    check_products(tmp_path, gxx_targeting(tmp_path, "native", "-mno-avx512bf16"), panel=32, pairs=False)


def test_leading_dimensions_and_bad_shapes():
    x = jnp.ones((2, 1, 48), jnp.float32)
    packed = cpu.pack(jnp.ones((48, 40), jnp.float32), jnp.float32)
    assert packed.shape == (2, 48, 32)
    np.testing.assert_array_equal(np.asarray(cpu.product(x, packed, 40)), np.full((2, 1, 40), 48.0))
    with pytest.raises(Exception, match="packed weights have fewer columns"):
        jax.block_until_ready(cpu.product(x, packed, 65))


def reference_attention(q, k, v, cache, slot, bias, scale):
    """attention_op.attend (XLA's dense path) on the cache after XLA's dynamic-update-slice."""
    write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x[:, :, None], slot, 2)
    kc, vc = write(cache["k"], k), write(cache["v"], v)
    r = q.shape[1] // k.shape[1]
    keys, values = (jnp.repeat(c.swapaxes(1, 2), r, axis=2) for c in (kc, vc))
    out = attend(q[:, None], keys, values, jnp.ones((1, 1, 1, 1), bool), scale, bias=bias[:, :, None, :])
    return out[:, 0], {"k": kc, "v": vc}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,h,g,s,d,per_head", [
    (3, 4, 4, 37, 32, False),  # a head of 2 vectors, slots not a multiple of 16
    (2, 8, 2, 21, 80, True),  # grouped-query (4 query heads per kv head), ALiBi-like bias per head
    (1, 4, 1, 19, 7, False),  # multi-query, a head size of no whole vector
    (2, 2, 2, 96, 128, True),  # the largest head held in registers
])
def test_attention_equals_xla(dtype, b, h, g, s, d, per_head):
    """The decode step's attention: the cache written in place exactly as XLA's update writes
    it, and the output as close to XLA's dense attention as its own rounding (float32 to 1e-6;
    bfloat16 to one rounding of the output), with masked slots, a row that sees no key (the mean
    of the values, as XLA gives) and scaled scores; the same bits at every call."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, g, d)), dtype) for _ in range(2))
    cache = {n: jnp.asarray(rng.standard_normal((b, g, s, d)), dtype) for n in ("k", "v")}
    visible = rng.random((b, s)) > 0.3
    visible[0] = False  # a row that sees nothing
    bias = np.where(visible, 0.0, NEG_INF)[:, None] + (rng.standard_normal((1, h, s)) if per_head else 0.0)
    bias = jnp.asarray(bias, jnp.float32)
    run = jax.jit(lambda q, k, v, c, slot: cpu.attention(q, k, v, c, slot, bias, 0.3))
    for slot in (s // 2, s + 5):  # past the end: clamped to the last slot, as XLA's update does
        out, written = run(q, k, v, cache, jnp.int32(slot))
        ref, ref_written = jax.jit(lambda q, k, v, c: reference_attention(q, k, v, c, slot, bias, 0.3))(q, k, v, cache)
        for n in ("k", "v"):
            np.testing.assert_array_equal(np.asarray(written[n]), np.asarray(ref_written[n]))
        assert out.shape == (b, h, d) and out.dtype == dtype
        ours, xla = np.asarray(out, np.float32), np.asarray(ref, np.float32)
        tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
        np.testing.assert_allclose(ours, xla, atol=tol * np.abs(xla).max(), rtol=0)
        np.testing.assert_array_equal(np.asarray(run(q, k, v, cache, jnp.int32(slot))[0], np.float32), ours)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_reads_only_the_blocks_of_visible_slots(dtype):
    """A sampler's cache has room for every token still to come, so a step reads only the
    blocks of 16 slots (8 with AVX2) that hold its visible ones, here after a left-padded prompt
    and before the slots not yet written. The masked slots outside them, NaN here, do not reach
    the output, which is to the bit the output of a cache of those blocks alone (masked slots'
    probabilities are exactly 0)."""
    rng = np.random.default_rng(1)
    b, h, g, s, d, slot = 2, 4, 2, 80, 32, 36
    q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, g, d)), dtype) for _ in range(2))
    cache = {n: rng.standard_normal((b, g, s, d)) for n in ("k", "v")}
    visible = np.zeros((b, s), bool)
    visible[0, 16:slot + 1], visible[1, 21:slot + 1] = True, True
    visible[1, 30] = False  # a masked slot among the visible ones is read, and weighs nothing
    bias = np.where(visible, 0.0, NEG_INF)[:, None] - 0.1 * np.arange(h)[None, :, None] * (slot - np.arange(s))
    run = lambda c, bias, slot: cpu.attention(q, k, v, {n: jnp.asarray(x, dtype) for n, x in c.items()},
                                              jnp.int32(slot), jnp.asarray(bias, jnp.float32), 0.3)[0]
    clean = np.asarray(run(cache, bias, slot), np.float32)
    poisoned = {n: x.copy() for n, x in cache.items()}
    for x in poisoned.values():
        x[:, :, :16] = x[:, :, 48:] = np.nan
    assert np.isfinite(clean).all()
    np.testing.assert_array_equal(np.asarray(run(poisoned, bias, slot), np.float32), clean)
    blocks = {n: x[:, :, 16:48] for n, x in cache.items()}
    np.testing.assert_array_equal(np.asarray(run(blocks, bias[:, :, 16:48], slot - 16), np.float32), clean)


def test_attention_bad_shapes():
    q, kv = jnp.ones((2, 4, 16)), jnp.ones((2, 3, 16))
    cache = {"k": jnp.ones((2, 3, 8, 16)), "v": jnp.ones((2, 3, 8, 16))}
    with pytest.raises(Exception, match="shapes do not agree"):  # 3 kv heads do not divide 4
        jax.block_until_ready(cpu.attention(q, kv, kv, cache, 0, jnp.zeros((2, 1, 8)), 1.0))


def model_and_params(tiny_config, precision):
    cfg = parse_model_config(tiny_config(precision=precision, n_vocab=203, no_weight_tie=precision == "bfloat16"))
    params = jax.tree.map(lambda x: getattr(x, "value", x), init_params(cfg.model, jax.random.PRNGKey(3)),
                          is_leaf=lambda x: hasattr(x, "value"))
    return cfg, params


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_decode_step_logits_equal_xla_products(tiny_config, precision):
    """One decode step after a prompt (global and local layers, tied and untied heads), with the
    weights packed and without: the same logits to float32 rounding (bfloat16: each layer's
    outputs are rounded to bfloat16, so a last-bit difference in a sum can move one by an ulp)."""
    cfg, params = model_and_params(tiny_config, precision)
    layout = make_layout("", "", jax.devices()[:1])
    packed = make_pack(cfg, layout)(params)
    assert set(packed) >= {"h_0", "h_1", "head"}
    arch = decode_arch(cfg)
    model = GPT(arch)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 203, (3, 12)), jnp.int32)

    @jax.jit
    def logits(variables):
        cache = init_cache(arch, 3, 16)
        pos = jnp.broadcast_to(jnp.arange(12), (3, 12))
        _, cache = model.apply(variables, tokens, pos, cache=cache, cache_index=jnp.int32(0), last_only=True)
        out, _ = model.apply(variables, tokens[:, -1:], pos[:, -1:] + 1, cache=cache, cache_index=jnp.int32(12))
        return out

    with_kernel = {"params": params, "decode": packed}
    hlo = logits.lower(with_kernel).compile().as_text()  # compiled: every call inlined, counted once each
    calls = lambda target: hlo.count(f'custom_call_target="{target}"')
    # The decode step's 2 x (4 + 2) products and its head; of the prompt pass, what its cache
    # needs (layer 0's 6 products, layer 1's k and v), on XLA's products (more than MAX_ROWS
    # rows) unless AMX tiles read bfloat16 (cpu.takes).
    prompt_too = cpu.takes(3 * 12, arch.n_embd, jnp.dtype(arch.precision))
    assert calls(cpu.TARGETS[jnp.dtype(arch.precision)]) == 2 * (4 + 2) + 1 + (6 + 2) * prompt_too
    assert calls(cpu.ATTENTION_TARGETS[jnp.dtype(arch.precision)]) == 2  # and the decode step's attention
    ours, xla = np.asarray(logits(with_kernel)), np.asarray(logits({"params": params}))
    tol = 1e-5 if precision == "float32" else 3e-2
    np.testing.assert_allclose(ours, xla, atol=tol * np.abs(xla).max(), rtol=0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["gpt_neo", "neox_gqa_rotary", "alibi_scaled"])
def test_decode_steps_equal_xla_attention(tiny_config, precision, family):
    """Twelve decode steps after a left-padded prompt, past the local layers' window (their
    ring of 4 slots wraps around three times), kernels against XLA's products and attention:
    the same logits at every step (float32 to rounding; bfloat16 to a few of its ulps, each
    layer's output being rounded), for GPT-Neo's layers, grouped-query attention with rotary
    embeddings, and ALiBi with scaled scores."""
    extra = {"gpt_neo": {}, "neox_gqa_rotary": dict(num_kv_heads=2, rotary_emb=True, scale_attention=True),
             "alibi_scaled": dict(pos_emb="alibi", scale_attention=True)}[family]
    cfg = parse_model_config(tiny_config(precision=precision, n_vocab=203, local_attention_radius=4, **extra))
    params = jax.tree.map(lambda x: getattr(x, "value", x), init_params(cfg.model, jax.random.PRNGKey(5)),
                          is_leaf=lambda x: hasattr(x, "value"))
    packed = make_pack(cfg, make_layout("", "", jax.devices()[:1]))(params)
    arch = decode_arch(cfg)
    model = GPT(arch)
    b, p, steps = 2, 6, 12
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 203, (b, p)), jnp.int32)
    key_valid = jnp.ones((b, p + steps), bool).at[1, :2].set(False)  # row 1: two slots of padding

    @jax.jit
    def run(variables):
        cache = init_cache(arch, b, p + steps)
        pos = jnp.maximum(jnp.arange(p)[None] - jnp.array([[0], [2]]), 0)
        logits, cache = model.apply(variables, tokens, pos, cache=cache, cache_index=jnp.int32(0),
                                    key_valid=key_valid, last_only=True)

        def step(carry, i):  # the sampler's loop body: one token in, its logits out
            cache, token = carry
            logits, cache = model.apply(variables, token[:, None], pos[:, -1:] + 1 + i, cache=cache,
                                        cache_index=p + i, key_valid=key_valid)
            return (cache, jnp.argmax(logits[:, -1], -1)), logits[:, -1]

        _, out = jax.lax.scan(step, (cache, jnp.argmax(logits[:, -1], -1)), jnp.arange(steps - 1))
        return jnp.concatenate([logits[:, -1:], out.swapaxes(0, 1)], 1)

    kernels = {"params": params, "decode": packed}
    assert run.lower(kernels).as_text().count(cpu.ATTENTION_TARGETS[jnp.dtype(arch.precision)]) == 2  # per step
    ours, xla = np.asarray(run(kernels), np.float32), np.asarray(run({"params": params}), np.float32)
    tol = 1e-5 if precision == "float32" else 3e-2
    np.testing.assert_allclose(ours, xla, atol=tol * np.abs(xla).max(), rtol=0)


def test_sampler_tokens_equal_xla_products(tiny_config, monkeypatch):
    cfg, params = model_and_params(tiny_config, "float32")
    layout = make_layout("", "", jax.devices()[:1])
    prompts = [[5, 17, 33, 2, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13]]
    opts = SamplingOptions(temperature=0, max_new_tokens=20)
    with_kernel = Sampler(cfg, params, layout)
    assert with_kernel.packed(3)
    ours = with_kernel.generate(prompts, opts)
    monkeypatch.setenv("NEO_CPU_KERNELS", "0")
    without = Sampler(cfg, params, layout)
    assert without.packed(3) == {}
    assert ours == without.generate(prompts, opts)


def test_new_parameters_are_packed_afresh(tiny_config):
    """The training loop keeps one Sampler and hands it each checkpoint's parameters: samples
    must come from the new ones, not from weights packed from the old."""
    cfg, params = model_and_params(tiny_config, "float32")
    other = jax.tree.map(lambda x: x * 1.5, params)
    layout = make_layout("", "", jax.devices()[:1])
    prompts, opts = [[5, 17, 33], [100, 3]], SamplingOptions(temperature=0, max_new_tokens=12)
    sampler = Sampler(cfg, params, layout)
    first = sampler.generate(prompts, opts)
    sampler.params = other
    assert sampler.generate(prompts, opts) == Sampler(cfg, other, layout).generate(prompts, opts) != first


def test_more_rows_than_the_kernel_takes_use_xla(tiny_config):
    cfg, params = model_and_params(tiny_config, "float32")
    sampler = Sampler(cfg, params, make_layout("", "", jax.devices()[:1]))
    assert sampler.packed(cpu.MAX_ROWS) and sampler.packed(cpu.MAX_ROWS + 1) == {}
    rows = sampler.generate([[1, 2, 3]] * (cpu.MAX_ROWS + 1), SamplingOptions(temperature=0, max_new_tokens=4))
    assert len(set(map(tuple, rows))) == 1 and len(rows[0]) == 4


def test_too_little_memory_falls_back(tiny_config, monkeypatch, caplog):
    import neo.predict

    cfg, params = model_and_params(tiny_config, "float32")
    monkeypatch.setattr(neo.predict, "host_available_memory", lambda: 1000)
    sampler = Sampler(cfg, params, make_layout("", "", jax.devices()[:1]))
    with caplog.at_level(logging.WARNING):
        assert sampler.packed(1) == {}
    assert "more than half of the" in caplog.text and "XLA's products" in caplog.text
    assert len(sampler.generate([[1, 2]], SamplingOptions(temperature=0, max_new_tokens=3))[0]) == 3


def test_no_compiler_falls_back_with_a_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("NEO_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert cpu.load.__wrapped__() is None
    assert "did not build" in caplog.text and "XLA's products" in caplog.text


# A training step's and a sampler's use of the kernels, as a child process sees them: how many
# kernel calls the training step's lowering has, how many weights the sampler packs for the
# decode product and how many attention layers it marks for the decode attention kernel, and
# whether its greedy tokens equal those of a sampler that uses no kernel.
KERNEL_USE = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO)
import jax, jax.numpy as jnp
from flax import linen as nn
from neo.config import parse_model_config
from neo.kernels import cpu
from neo.mesh import make_layout
from neo.model import GPT, init_params
from neo.predict import Sampler, SamplingOptions
cfg = parse_model_config(json.loads(sys.argv[1]))
params = nn.meta.unbox(init_params(cfg.model, jax.random.PRNGKey(0)))
tokens = jnp.zeros((2, cfg.model.n_ctx), jnp.int32)
loss = lambda p: GPT(cfg.model).apply({"params": p}, tokens).mean()
hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
layout = make_layout("", "", jax.devices()[:1])
sampler, plain = Sampler(cfg, params, layout), Sampler(cfg, params, layout)
plain._pack = None
leaves = jax.tree.leaves(sampler.packed(1))
prompts, opts = [[5, 17, 33, 2, 9], [100, 3], [7, 8, 9]], SamplingOptions(temperature=0, max_new_tokens=12)
print(json.dumps({"enabled": cpu.enabled(), "decode_kernels": cpu.decode_kernels(), "neo_calls": hlo.count("@neo_"),
                  "packed": sum(x.ndim >= 3 for x in leaves), "marks": sum(x.ndim == 0 for x in leaves),
                  "same_tokens": sampler.generate(prompts, opts) == plain.generate(prompts, opts)}))
"""


def kernel_use(tiny_config, env: dict) -> tuple[dict, str]:
    """The child's report (KERNEL_USE) and its log."""
    import json
    import os
    import subprocess
    import sys

    raw = tiny_config(attention_impl="auto")
    out = subprocess.run([sys.executable, "-c", KERNEL_USE, json.dumps(raw)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **env))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


x86_only = pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="targets x86-64 CPUs")


@x86_only
def test_an_avx2_cpu_decodes_with_its_own_vectors(tmp_path, tiny_config):
    """The training kernels compute on 16-float vectors; built for AVX2 they ran several times
    slower than XLA (docs/benchmarks.md). The decode kernels compute on the CPU's own vectors,
    8 floats on AVX2 (16-column panels), and beat XLA's there. So a compiler whose -march=native
    is AVX2 without AVX-512 (g++ told to target Haswell) builds the library, the sampler packs
    its weights and marks its attention layers for the decode kernels and gets XLA's tokens,
    and the training step is XLA's; the log says why. That build's products equal the exact
    sums (PRODUCT_CHECK, 16-column panels), and it passes this module's tests of the decode
    attention (every head grouping, with and without ALiBi's per-head bias) and of decode
    steps' logits (GPT-Neo's global and local layers, in float32 and bfloat16). The same child
    with this machine's own compiler uses every kernel, so the check is not vacuous."""
    import os
    import shutil
    import subprocess
    import sys

    haswell, cache = gxx_targeting(tmp_path, "haswell"), tmp_path / "cache"
    got, log = kernel_use(tiny_config, {"CXX": haswell, "NEO_KERNEL_CACHE": str(cache)})
    assert got["packed"] > 0 and got["marks"] > 0, got
    assert got == {"enabled": False, "decode_kernels": True, "neo_calls": 0, "packed": got["packed"],
                   "marks": got["marks"], "same_tokens": True}, got
    assert "AVX2 but not AVX-512" in log and list(cache.glob("*.so"))
    check_products(tmp_path, haswell, panel=16, pairs=False)
    tests = "attention_equals or decode_step_logits or (decode_steps_equal and gpt_neo-float32)"  # products: above
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", __file__, "-k", tests], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, CXX=haswell, NEO_KERNEL_CACHE=str(cache)))
    assert out.returncode == 0 and "11 passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]
    if cpu.enabled():  # this CPU has AVX-512
        native, _ = kernel_use(tiny_config, {"CXX": shutil.which("g++") or shutil.which("c++")})
        assert native["enabled"] and native["neo_calls"] > 0, native
        assert (native["packed"], native["marks"], native["same_tokens"]) == (got["packed"], got["marks"], True), native


@x86_only
def test_a_cpu_without_avx2_uses_xla(tmp_path, tiny_config):
    """Below AVX2 and FMA (here g++ told to target x86-64-v2: SSE4.2) no kernel was ever
    measured faster than XLA: nothing is built, the log says why, and XLA does everything."""
    cache = tmp_path / "cache"
    got, log = kernel_use(tiny_config, {"CXX": gxx_targeting(tmp_path, "x86-64-v2"), "NEO_KERNEL_CACHE": str(cache)})
    assert got == {"enabled": False, "decode_kernels": False, "neo_calls": 0, "packed": 0, "marks": 0,
                   "same_tokens": True}, got
    assert "AVX2 and FMA" in log and not list(cache.glob("*.so"))


def test_builds_are_cached_per_cpu(tmp_path, monkeypatch):
    """A second process finds the library built (nothing is compiled again); a CPU with other
    flags gets its own build, since -march=native code may not run on it."""
    import shutil

    compiler = shutil.which("g++") or shutil.which("c++")
    built = cpu._build(compiler)  # the session's build, in the cache every process uses
    stamp = built.stat().st_mtime_ns
    assert cpu._build(compiler) == built and built.stat().st_mtime_ns == stamp
    monkeypatch.setattr(cpu, "_cpu_identity", lambda: "model name: another CPU\nflags: sse2")
    assert cpu.build_key(compiler) not in built.name
