"""The training loss is computed chunk by chunk over the sequence and equals the loss on the
full logits, value and gradients, with and without a mask; it never holds [batch, T, vocab]."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from neo import loss as L
from neo.config import parse_model_config
from neo.model import GPT, init_params

RNG = np.random.RandomState(0)
B, T, D, V = 3, 37, 16, 50  # 37 positions: chunks of 4 leave a ragged last chunk


def inputs(masked: bool):
    hidden = jnp.asarray(RNG.randn(B, T, D).astype(np.float32))
    head = jnp.asarray(RNG.randn(D, V).astype(np.float32))
    targets = jnp.asarray(RNG.randint(0, V, (B, T)))
    mask = jnp.asarray(RNG.rand(B, T) > 0.4) if masked else None
    return hidden, head, targets, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_tokens", [12, 10_000])  # 4 positions x 3 rows per chunk / one chunk
def test_chunked_loss_equals_the_full_logits_loss(masked, chunk_tokens, monkeypatch):
    monkeypatch.setattr(L, "CHUNK_TOKENS", chunk_tokens)
    hidden, head, targets, mask = inputs(masked)
    full = lambda h, w: L.lm_loss(h @ w, targets, 1e-2, mask)
    chunked = lambda h, w: L.chunked_lm_loss(h, w, lambda x, w: x @ w, targets, 1e-2, mask)
    (want, want_aux), want_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, head)
    (got, got_aux), got_grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for k in ("loss", "z_loss"):
        np.testing.assert_allclose(got_aux[k], want_aux[k], rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-6)
    # the gradients taken in the forward pass are scaled by the objective's cotangent
    scaled = jax.grad(lambda h, w: -2.5 * chunked(h, w)[0], argnums=(0, 1))(hidden, head)
    for g, w in zip(scaled, want_grads):
        np.testing.assert_allclose(g, -2.5 * w, atol=1e-5)


def test_chunked_loss_never_holds_every_logit(monkeypatch):
    monkeypatch.setattr(L, "CHUNK_TOKENS", 12)
    hidden, head, targets, _ = inputs(False)
    loss = lambda h, w: L.chunked_lm_loss(h, w, lambda x, w: x @ w, targets, 1e-4)[0]
    shapes = set()

    def walk(jp):
        for eqn in jp.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, head).jaxpr)
    logit_like = [s for s in shapes if s and s[-1] == V and s != (D, V)]  # (D, V): the head's gradient
    assert max(np.prod(s) for s in logit_like) <= B * 4 * V  # one chunk of logits at most


def test_the_models_hidden_state_and_head_give_its_logits(tiny_config):
    cfg = parse_model_config(tiny_config())
    params = meta.unbox(init_params(cfg.model, jax.random.PRNGKey(0)))
    tokens = jnp.asarray(RNG.randint(0, 128, (2, 16)))
    model = GPT(cfg.model)
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    logits = model.apply({"params": params}, hidden, method=GPT.head_logits)
    np.testing.assert_allclose(logits, model.apply({"params": params}, tokens), atol=1e-6)
    assert hidden.shape == (2, 16, cfg.model.n_embd)


@pytest.mark.parametrize("chunk_tokens", [8, 10_000])  # 4 positions x 2 rows per chunk / one chunk
def test_a_head_padded_to_a_multiple_of_the_vocabulary_gives_the_same_loss_and_gradients(
        tiny_config, chunk_tokens, monkeypatch):
    """Training pads the head's product to HEAD_VOCAB_MULTIPLE columns (fast tiles on GPU);
    the padded logits are -inf, so the loss and every gradient, the embedding's included,
    are those of the unpadded head, and the real logits are unchanged."""
    from neo.model.gpt import compute_dtype, project_logits
    from neo.train import HEAD_VOCAB_MULTIPLE

    assert HEAD_VOCAB_MULTIPLE > 1
    cfg = parse_model_config(tiny_config(n_vocab=300)).model  # 300: not a multiple of 128
    params = meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jnp.asarray(RNG.randint(0, 300, (2, 17)))
    model = GPT(cfg)

    def loss(p, multiple):
        hidden = model.apply({"params": p}, tokens[:, :-1], return_hidden=True)
        project = lambda h, w: project_logits(h, w, compute_dtype(cfg), multiple)
        return L.chunked_lm_loss(hidden, model.apply({"params": p}, method=GPT.head), project, tokens[:, 1:], 1e-2)

    monkeypatch.setattr(L, "CHUNK_TOKENS", chunk_tokens)

    (want, want_aux), want_grads = jax.value_and_grad(loss, has_aux=True)(params, 1)
    (got, got_aux), got_grads = jax.value_and_grad(loss, has_aux=True)(params, HEAD_VOCAB_MULTIPLE)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_aux["z_loss"], want_aux["z_loss"], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    padded = model.apply({"params": params}, hidden, HEAD_VOCAB_MULTIPLE, method=GPT.head_logits)
    assert padded.shape[-1] % HEAD_VOCAB_MULTIPLE == 0 and bool(jnp.all(padded[..., 300:] == -jnp.inf))
    np.testing.assert_allclose(padded[..., :300], model.apply({"params": params}, tokens), atol=1e-6)
