"""Attention kinds beyond global/local: `linear` (causal and not), `none`, bidirectional
attention for masked-LM models, `num_mem_kv` memory slots, and the KV cache of local layers
(a ring of their window)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import parse_model_config
from neo.errors import NeoError
from neo.model import GPT, init_cache, init_params, per_layer
from neo.model.attention import Attention
from neo.model.attention_op import attend, blocked, visible
from neo.model.layers import LayerNorm
from neo.model.linear_attention import causal_linear_attention, linear_attention

RNG = np.random.RandomState(0)


def softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def original_causal_linear(q, k, v):
    """GPT-Neo's causal_linear_attention, literally: cumulative k (x) v for every position."""
    q, k = softmax(q, -1), np.exp(k)
    cum_k = np.cumsum(k, 1)
    cum_ctx = np.cumsum(np.einsum("bthi,bthe->bthie", k, v), 1) / (cum_k[..., None] + 1e-6)
    return np.einsum("bthi,bthie->bthe", q, cum_ctx)


def params_of(cfg, seed=0):
    return init_params(cfg.model, jax.random.PRNGKey(seed))


def unbox(tree):
    return jax.tree.map(lambda x: getattr(x, "value", x), tree, is_leaf=lambda x: hasattr(x, "value"))


@pytest.mark.parametrize("t, chunk", [(37, 8), (64, 64), (5, 64)])
def test_causal_linear_attention_is_the_originals_formula(t, chunk):
    q, k, v = (RNG.randn(2, t, 3, 8).astype(np.float32) for _ in range(3))
    out, _ = causal_linear_attention(q, k, v, chunk=chunk)
    np.testing.assert_allclose(out, original_causal_linear(q, k, v), atol=2e-6)


def test_noncausal_linear_attention_is_the_originals_formula():
    q, k, v = (RNG.randn(2, 19, 3, 8).astype(np.float32) for _ in range(3))
    ref = np.einsum("bthi,bhie->bthe", softmax(q, -1), np.einsum("bthi,bthe->bhie", softmax(k, 1), v))
    np.testing.assert_allclose(linear_attention(q, k, v), ref, atol=2e-6)


def test_linear_attention_never_builds_a_sequence_by_sequence_matrix(tiny_config):
    t = 512
    cfg = parse_model_config(tiny_config(n_ctx=t, attention_types=[[["linear"], 2]]))
    params = params_of(cfg)
    tokens = jnp.zeros((1, t), jnp.int32)
    loss = lambda p: GPT(cfg.model).apply({"params": p}, tokens).mean()
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    shapes = set()

    def walk(jp):
        for eqn in jp.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert not [s for s in shapes if sum(d == t for d in s) >= 2], "a T x T intermediate exists"
    # ...whereas global attention does build one (the check can fail)
    cfg_g = cfg.replace(attention_types=("global", "global"), attention_impl="xla")
    shapes.clear()
    walk(jax.make_jaxpr(jax.grad(lambda p: GPT(cfg_g.model).apply({"params": p}, tokens).mean()))(params_of(cfg_g)).jaxpr)
    assert [s for s in shapes if sum(d == t for d in s) >= 2]


def test_linear_layers_decode_with_a_running_state(tiny_config):
    cfg = parse_model_config(tiny_config(attention_types=[[["linear", "global"], 1]]))
    params = params_of(cfg)
    tokens = jnp.asarray(RNG.randint(0, cfg.model.n_vocab, (2, 12)))
    full = GPT(cfg.model).apply({"params": params}, tokens)
    decode = jax.jit(lambda tok, pos, cache, i: GPT(cfg.model).apply({"params": params}, tok, pos, cache=cache,
                                                             cache_index=i))
    logits, cache = decode(tokens[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)), init_cache(cfg.model, 2, 12), 0)
    steps = [logits]
    for i in range(7, 12):
        logits, cache = decode(tokens[:, i:i + 1], jnp.full((2, 1), i), cache, i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def test_local_layers_cache_only_their_window_and_decode_as_the_full_pass(tiny_config):
    """A local layer's cache is a ring of `local_attention_radius` slots; prompt blocks longer
    and shorter than the window and single tokens, written over and over around the ring, give
    the logits of one pass over the whole sequence."""
    cfg = parse_model_config(tiny_config(local_attention_radius=4))  # global, local
    params = params_of(cfg)
    tokens = jnp.asarray(RNG.randint(0, cfg.model.n_vocab, (2, 20)))
    full = GPT(cfg.model).apply({"params": params}, tokens)
    cache = init_cache(cfg.model, 2, 20)
    assert cache[0]["k"].shape == (2, 8, 20, 8) and cache[1]["k"].shape == (2, 8, 4, 8)  # [b, heads, slots, d]
    assert init_cache(cfg.model, 2, 3)[1]["k"].shape == (2, 8, 3, 8)  # never more than the length
    every_slot = jnp.ones((2, 20), bool)  # key_valid as the sampler passes it (no padding here)
    decode = jax.jit(lambda tok, pos, cache, i: GPT(cfg.model).apply({"params": params}, tok, pos, cache=cache,
                                                                    cache_index=i, key_valid=every_slot))
    steps, start = [], 0
    for length in (1, 1, 6, 1, 1, 3, 1, 1, 1, 1, 2, 1):  # 6 and 3 tokens at once: longer / shorter than 4
        pos = jnp.broadcast_to(jnp.arange(start, start + length), (2, length))
        logits, cache = decode(tokens[:, start:start + length], pos, cache, jnp.int32(start))
        steps.append(logits)
        start += length
    assert start == 20
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def test_none_layer_is_feed_forward_only(tiny_config):
    cfg = parse_model_config(tiny_config(attention_types=[[["none"], 2]], n_layer=2))
    params = unbox(params_of(cfg))
    tokens = jnp.asarray(RNG.randint(0, cfg.model.n_vocab, (2, 16)))
    logits = GPT(cfg.model).apply({"params": params}, tokens)
    params = per_layer(params)  # two `none` layers run under nn.scan; read them one by one
    assert "attn" not in params["h_0"] and "ln_1" not in params["h_0"]
    # by hand: x <- x + MLP(LN2(x)) per layer (the original's x <- x + x would double x first)
    from neo.model.gpt import MLP

    x = params["wte"][tokens] + params["wpe"][jnp.arange(16)]
    for i in range(2):
        h = LayerNorm().apply({"params": params[f"h_{i}"]["ln_2"]}, x)
        x = x + MLP(cfg.model).apply({"params": params[f"h_{i}"]["mlp"]}, h, deterministic=True)
    ref = LayerNorm().apply({"params": params["ln_f"]}, x) @ params["wte"].T
    np.testing.assert_allclose(logits, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["global", "local", "linear"])
def test_masked_lm_attention_is_bidirectional(kind, tiny_config):
    raw = tiny_config(attention_types=[[[kind], 2]], local_attention_radius=4)
    tokens = jnp.asarray(RNG.randint(0, 128, (1, 32)))
    changed = tokens.at[0, 20].set((tokens[0, 20] + 1) % 128)
    for mlm in (False, True):
        cfg = parse_model_config({**raw, "mlm_training": mlm, "mlm_mask_id": 1})
        params = params_of(cfg)
        a, b = (GPT(cfg.model).apply({"params": params}, x) for x in (tokens, changed))
        moved = np.abs(np.asarray(a - b)).max(-1)[0]
        assert moved[20] > 0
        if not mlm:
            assert moved[:20].max() == 0  # causal: the past does not see the future
        else:
            # bidirectional: earlier positions see the change (local: only within the window)
            near = moved[17:20] if kind == "local" else moved[:20]
            assert near.min() > 0
            if kind == "local":
                assert moved[:13].max() == 0  # 20 - 13 >= 2 layers x (radius - 1)


def test_bidirectional_blocked_local_attention_equals_the_dense_mask():
    q, k, v = (jnp.asarray(RNG.randn(2, 37, 3, 8).astype(np.float32)) for _ in range(3))
    slots = jnp.arange(37)
    dense = attend(q, k, v, visible(slots, slots, causal=False, window=6)[None, None], 1.0)
    np.testing.assert_allclose(blocked(q, k, v, causal=False, window=6, scale=1.0), dense, atol=1e-6)


def test_memory_key_values_are_prepended_in_global_layers_only(tiny_config):
    cfg = parse_model_config(tiny_config(num_mem_kv=3))
    params = unbox(params_of(cfg))
    attn = params["h_0"]["attn"]
    assert attn["mem_k"].shape == (3, cfg.model.n_head, cfg.model.features_per_head)
    assert "mem_k" not in params["h_1"]["attn"]  # h_1 is local
    assert float(np.std(attn["mem_k"])) == pytest.approx(cfg.model.features_per_head ** -0.5, rel=0.3)
    x = jnp.asarray(RNG.randn(2, 10, cfg.model.n_embd).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    out, _ = Attention(cfg.model, "global").apply({"params": attn}, x, pos)
    # by hand: keys = [mem_k; k], memory always visible, the sequence causally
    proj = lambda n: jnp.einsum("btd,dhf->bthf", x, attn[n]["kernel"])
    k = jnp.concatenate([jnp.broadcast_to(attn["mem_k"], (2,) + attn["mem_k"].shape), proj("k")], 1)
    v = jnp.concatenate([jnp.broadcast_to(attn["mem_v"], (2,) + attn["mem_v"].shape), proj("v")], 1)
    mask = np.concatenate([np.ones((10, 3), bool), np.tril(np.ones((10, 10), bool))], 1)
    a = attend(proj("q"), k, v, jnp.asarray(mask)[None, None], 1.0)
    ref = jnp.einsum("bthf,hfd->btd", a, attn["o"]["kernel"]) + attn["o"]["bias"]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_masked_lm_model_refuses_a_kv_cache(tiny_config):
    cfg = parse_model_config(tiny_config(mlm_training=True, mlm_mask_id=1))
    with pytest.raises(NeoError, match="masked-LM"):
        GPT(cfg.model).apply({"params": params_of(cfg)}, jnp.zeros((1, 4), jnp.int32),
                       cache=init_cache(cfg.model, 1, 8), cache_index=jnp.int32(0))
