"""Masked-LM training the way BERT defines it: which tokens are masked and how, labels, CLS,
ignore ids, and a train step whose loss covers the masked positions only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import parse_model_config
from neo.errors import NeoError
from neo.loss import lm_loss
from neo.mesh import make_layout
from neo.mlm import mask_tokens
from neo.model import GPT
from neo.train import MLM_STREAM, build, global_batch

MASK, CLS = 5, 6


@pytest.fixture
def mlm_config(tiny_config):
    def make(**kw):
        raw = dict(mlm_training=True, mlm_mask_id=MASK, mlm_mask_prob=0.15, mlm_same_token_prob=0.1,
                   mlm_random_token_prob=0.1, mlm_mask_ignore_ids=[7, 8])
        raw.update(kw)
        return parse_model_config(tiny_config(**raw))

    return make


def test_masking_follows_bert(mlm_config):
    cfg = mlm_config()
    batch = jnp.asarray(np.random.RandomState(0).randint(0, 128, (512, 33)))
    inputs, labels, selected = (np.asarray(a) for a in mask_tokens(cfg, batch, jax.random.PRNGKey(0)))
    tokens = np.asarray(batch[:, :32])
    np.testing.assert_array_equal(labels, tokens)  # labels are the original tokens (not 0 as in GPT-Neo)
    maskable = ~np.isin(tokens, [MASK, 7, 8])
    assert not selected[~maskable].any()
    assert selected[maskable].mean() == pytest.approx(0.15, abs=0.01)
    sel_in, sel_tok = inputs[selected], tokens[selected]
    as_mask = sel_in == MASK
    unchanged = sel_in == sel_tok
    assert as_mask.mean() == pytest.approx(0.8, abs=0.03)
    # 10% kept, 10% random (a random draw equals the original 1/123 of the time)
    assert unchanged.mean() == pytest.approx(0.1 + 0.1 / 123, abs=0.02)
    randomized = ~as_mask & ~unchanged
    assert randomized.mean() == pytest.approx(0.1, abs=0.02)
    assert not np.isin(sel_in[randomized], [MASK, 7, 8]).any()
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])  # the rest untouched


def test_cls_is_prepended_and_never_masked(mlm_config):
    cfg = mlm_config(mlm_cls_token_id=CLS, mlm_mask_prob=0.5)
    batch = jnp.asarray(np.random.RandomState(1).randint(10, 128, (64, 33)))
    inputs, labels, selected = mask_tokens(cfg, batch, jax.random.PRNGKey(1))
    assert inputs.shape == (64, 32)
    assert (np.asarray(inputs[:, 0]) == CLS).all() and not np.asarray(selected[:, 0]).any()
    np.testing.assert_array_equal(labels[:, 1:], batch[:, :31])


def test_shares_above_one_are_refused_when_the_config_loads(mlm_config):
    with pytest.raises(NeoError, match="exceed 1"):
        mlm_config(mlm_same_token_prob=0.6, mlm_random_token_prob=0.5)
    with pytest.raises(NeoError, match="nothing could be masked"):
        mlm_config(mlm_mask_ignore_ids=list(range(128)))


def test_train_step_loss_is_on_the_masked_positions_only(mlm_config):
    # global layers: the original crashed here (undefined bias for non-causal global attention)
    cfg = mlm_config(attention_types=[[["global", "local"], 1]])
    batch = np.random.RandomState(2).randint(10, 128, (8, 33)).astype(np.int32)
    setup = build(cfg, make_layout("x:2", "batch:x", jax.devices()[:2]))
    state = setup.init()
    params = jax.device_get(state.params)
    _, metrics = setup.step(state, global_batch(setup, batch))

    rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.run.seed), 0), MLM_STREAM)
    inputs, labels, selected = mask_tokens(cfg, jnp.asarray(batch), rng)
    logits = GPT(cfg.model).apply({"params": params}, inputs)
    _, ref = lm_loss(logits, labels, cfg.run.z_loss, selected)
    assert float(metrics["loss"]) == pytest.approx(float(ref["loss"]), abs=1e-5)
    _, everywhere = lm_loss(logits, labels, cfg.run.z_loss)
    assert abs(float(everywhere["loss"]) - float(ref["loss"])) > 1e-3  # the mask matters
