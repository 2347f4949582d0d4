"""Padding is never a target and never counted: in every sampling mode that pads, the train
step's loss and the validation loss are the cross-entropy of the real targets only, also when
padding_id equals eos_id (a real eos is still a target) and when padding_id lies outside the
vocabulary (GPT-Neo's GPT-2 datasets: 50257 of 50257 ids; it embeds as zeros)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import load_model_config
from neo.data import PAD, make_source
from neo.mesh import make_layout
from neo.model import GPT, init_params
from neo.train import build, global_batch

N_CTX, VOCAB, EOS = 16, 64, 63
# short documents, some ending in eos, so that rows hold real eos targets and padding
DOCS = [[1, 2, 3, EOS], [4, 5, 6, 7, 8], [9, 10, EOS], [11, 12, 13, 14], [15, EOS], [16, 17, 18, 19, 20, 21]]


def write_dataset(tmp_path, padding_id, mode, stitch):
    from neo.data.tfrecords import RecordWriter

    (tmp_path / "d").mkdir(exist_ok=True)
    w = RecordWriter(str(tmp_path / "d" / "docs_0"))
    for d in DOCS * 4:
        w.write(np.asarray(d))
    w.close()
    (tmp_path / "dataset_configs").mkdir(exist_ok=True)
    (tmp_path / "dataset_configs" / "docs.json").write_text(json.dumps(
        {"n_vocab": VOCAB, "path": str(tmp_path / "d" / "*.tfrecords"), "eval_path": str(tmp_path / "d" / "*.tfrecords"),
         "eos_id": EOS, "padding_id": padding_id}))
    raw = {"n_embd": 32, "n_head": 4, "n_layer": 2, "n_ctx": N_CTX, "n_vocab": VOCAB,
           "attention_types": [[["global", "local"], 1]], "local_attention_radius": 4, "train_batch_size": 8,
           "eval_batch_size": 8, "eval_steps": 2, "z_loss": 0.0, "datasets": [["docs", stitch, mode, None]]}
    (tmp_path / "m.json").write_text(json.dumps(raw))
    return load_model_config(str(tmp_path / "m.json"))


def reference_loss(cfg, params, rows):
    """Mean cross-entropy over the real targets, from the model's logits (padded inputs as
    token 0: causal attention never lets them reach a real position)."""
    inputs = np.where(rows[:, :-1] < 0, 0, rows[:, :-1])
    logits = GPT(cfg.model).apply({"params": params}, jnp.asarray(inputs))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets, real = rows[:, 1:], rows[:, 1:] >= 0
    ce = -np.take_along_axis(np.asarray(logp), np.where(real, targets, 0)[..., None], axis=-1)[..., 0]
    return float(ce[real].mean()), int(real.sum())


CASES = {  # (padding_id, sampling mode, stitch)
    "padding_id == eos_id, documents_fixed": (EOS, "documents_fixed", 2),
    "padding_id outside the vocabulary, documents_fixed": (VOCAB, "documents_fixed", 2),
    "padding_id == eos_id, documents_random": (EOS, "documents_random", 1),
    "padding_id outside the vocabulary, random_sample": (VOCAB, "random_sample", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_loss_counts_real_targets_only(case, tmp_path):
    padding_id, mode, stitch = CASES[case]
    cfg = write_dataset(tmp_path, padding_id, mode, stitch)
    assert cfg.data.padding_id == padding_id
    rows = next(make_source(cfg))
    targets = rows[:, 1:]
    assert (targets == PAD).any() and (targets == EOS).any()  # both padding and real eos targets
    setup = build(cfg, make_layout("x:8", "batch:x"))
    state = setup.init()
    params = jax.device_get(state.params)
    want, n_real = reference_loss(cfg, params, rows)
    _, metrics = setup.step(state, global_batch(setup, rows))
    assert abs(float(metrics["loss"]) - want) < 1e-5
    # counting padding as targets (GPT-Neo's loss) would give another number
    everything = reference_loss(cfg, params, np.where(rows < 0, padding_id % VOCAB, rows))[0]
    assert abs(everything - want) > 1e-3 and n_real < targets.size


@pytest.mark.parametrize("padding_id", [EOS, VOCAB])
def test_validation_loss_and_perplexity_count_real_targets_only(padding_id, tmp_path):
    from neo.evaluate.validation import Validation

    cfg = write_dataset(tmp_path, padding_id, "documents_fixed", 2)
    layout = make_layout("x:8", "batch:x")
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    validation = Validation(cfg, layout, jax.tree.map(lambda _: layout.replicated, params))
    out = validation.run(params)
    rows = np.concatenate(validation.batches)
    want, _ = reference_loss(cfg, params, rows)
    assert abs(out["eval_loss"] - want) < 1e-5 and abs(out["eval_perplexity"] - np.exp(want)) < 1e-3


def test_padding_past_the_vocabulary_embeds_as_zeros_not_nan():
    """mesh-tf's gather gave zeros for an out-of-range id; JAX's default fill would give NaN,
    which attention would spread to every real position of the row."""
    from neo.config import parse_model_config

    cfg = parse_model_config({"n_embd": 16, "n_head": 2, "n_layer": 1, "n_ctx": 8, "n_vocab": 32,
                              "attention_types": [[["global"], 1]], "padding_id": 32})
    params = nn.meta.unbox(init_params(cfg.model, jax.random.PRNGKey(0)))
    tokens = jnp.asarray([[1, 2, 3, 32, 32, 32, 32, 32]])
    logits = GPT(cfg.model).apply({"params": params}, tokens)
    assert np.isfinite(np.asarray(logits)).all()
    # exactly a token whose embedding row is zero: zero row 0, then id 32 and id 0 give the same logits
    zeroed = {**params, "wte": params["wte"].at[0].set(0.0)}
    apply = lambda ids: np.asarray(GPT(cfg.model).apply({"params": zeroed}, ids))
    np.testing.assert_allclose(apply(tokens), apply(jnp.where(tokens == 32, 0, tokens)), atol=1e-6)


def test_masked_lm_never_selects_padding(tmp_path):
    from neo.mlm import mask_tokens

    cfg = write_dataset(tmp_path, EOS, "documents_fixed", 2).replace(mlm_training=True, mlm_mask_id=0, mlm_mask_prob=0.9)
    rows = next(make_source(cfg))
    inputs, labels, selected = jax.device_get(mask_tokens(cfg, jnp.asarray(rows), jax.random.PRNGKey(0)))
    padded = rows[:, :N_CTX] < 0
    assert padded.any() and not selected[padded].any() and (inputs[padded] == EOS).all()
    assert selected[~padded & (rows[:, :N_CTX] != EOS)].mean() > 0.7


def test_masked_lm_trains_with_padding_past_the_vocabulary(tmp_path):
    """GPT-Neo's GPT-2 padding_id (one past the vocabulary) in a masked-LM run: padded inputs
    embed as zeros, and every label is an id of the vocabulary, so gathering the label logits
    never gives NaN (which a zero loss weight would not cancel: NaN x 0 is NaN)."""
    from neo.loss import lm_loss
    from neo.mlm import mask_tokens

    cfg = write_dataset(tmp_path, VOCAB, "documents_fixed", 2).replace(mlm_training=True, mlm_mask_id=0,
                                                                       mlm_mask_prob=0.5)
    rows = next(make_source(cfg))
    assert (rows[:, :N_CTX] == PAD).any()
    inputs, labels, selected = mask_tokens(cfg, jnp.asarray(rows), jax.random.PRNGKey(0))
    assert 0 <= int(labels.min()) and int(labels.max()) < VOCAB
    assert np.isfinite(float(lm_loss(jnp.zeros((*labels.shape, VOCAB)), labels, 1e-4, selected)[0]))
    setup = build(cfg, make_layout("x:8", "batch:x"))
    _, metrics = setup.step(setup.init(), global_batch(setup, rows))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
