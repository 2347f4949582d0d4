"""Validation's bits per byte say where they come from: the evaluated text's real bytes when a
tokenizer is configured (one that does not load is an error), GPT-Neo's constant only without
one, and the log says which."""

import json
import math

import jax
import pytest

from neo.config import CONFIG_DIR, load_model_config
from neo.errors import NeoError
from neo.evaluate.validation import PILE_TOKENS_PER_BYTE, Validation
from neo.mesh import make_layout, place, shardings_of
from neo.model import abstract_init, init_params


def validate(cfg):
    layout = make_layout("x:2", "batch:x", jax.devices()[:2])
    shardings = shardings_of(place(layout, abstract_init(cfg.model)))
    messages = []
    validation = Validation(cfg, layout, shardings, messages.append)
    params = jax.device_put(init_params(cfg.model, jax.random.PRNGKey(0)), shardings)
    return validation.run(params), " ".join(messages)


def tiny(**keys):
    return load_model_config("tiny", {"eval_steps": 2, "eval_batch_size": 4, **keys})


def test_bits_per_byte_count_the_evaluated_bytes(tmp_path):
    out, log = validate(tiny())  # tinyshakespeare with the byte tokenizer: one byte per token
    assert out["eval_bits_per_byte"] == pytest.approx(out["eval_loss"] / math.log(2), rel=1e-6)
    assert "bits per byte from the UTF-8 bytes of the evaluated tokens (decoded with bytes)" in log


def test_without_a_tokenizer_the_constant_is_named(tmp_path):
    from tests.test_data_pipeline import chunk_records, write_records

    write_records(tmp_path / "val", chunk_records(8, length=65))
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "plain.json").write_text(json.dumps(
        {"n_vocab": 1000, "path": str(tmp_path / "val_*.tfrecords"), "eval_path": str(tmp_path / "val_*.tfrecords")}))
    model = tmp_path / "m.json"
    model.write_text(json.dumps({**json.loads((CONFIG_DIR / "tiny.json").read_text()), "n_vocab": 1000,
                                 "datasets": [["plain", None, "chunks", None]]}))
    cfg = load_model_config(str(model), {"eval_steps": 1, "eval_batch_size": 4})
    assert cfg.data.tokenizer_path is None
    out, log = validate(cfg)
    assert out["eval_bits_per_byte"] == pytest.approx(out["eval_loss"] * PILE_TOKENS_PER_BYTE / math.log(2))
    assert f"no tokenizer configured, so bits per byte assumes GPT-Neo's {PILE_TOKENS_PER_BYTE} tokens per byte" in log


def test_a_configured_tokenizer_that_does_not_load_is_an_error(tmp_path):
    cfg = tiny(tokenizer_path=str(tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(NeoError, match=r"tokenizer '.*missing/tokenizer.json': no such file or folder"):
        validate(cfg)
