"""Configs: every shipped config loads; every mistake gets an error naming the key and fix."""

import json

import pytest

from neo.config import CONFIG_DIR, expand_attention_types, load_model_config, parse_model_config
from neo.errors import NeoError


def test_every_shipped_config_loads():
    names = [p.stem for p in CONFIG_DIR.glob("*.json")]
    assert names
    for name in names:
        cfg = load_model_config(name)
        assert len(cfg.attention_types) == cfg.n_layer


def test_attention_types_expand_in_order():
    assert expand_attention_types([[["global", "local"], 2]]) == ("global", "local", "global", "local")
    got = expand_attention_types([[["global", "none", "none"], 5], [["none"], 4]])
    assert len(got) == 19 and got[:3] == ("global", "none", "none") and got[-4:] == ("none",) * 4
    assert expand_attention_types(["local", "global"]) == ("local", "global")


def test_defaults_and_aliases(tiny_config):
    cfg = parse_model_config({**tiny_config(), "activation_function": "gelu"})
    assert cfg.activation_fn == "gelu"
    assert cfg.local_attention_radius == 8 and cfg.z_loss == 1e-4 and cfg.causal
    assert cfg.features_per_head == 8 and cfg.intermediate_expanded == 256
    with pytest.raises(NeoError, match="disagree"):
        parse_model_config({**tiny_config(), "activation_function": "relu", "activation_fn": "gelu"})


def test_config_is_frozen(tiny_config):
    cfg = parse_model_config(tiny_config())
    with pytest.raises(Exception):
        cfg.n_layer = 3


@pytest.mark.parametrize("change, message", [
    ({"n_heads": 8}, r"unknown key 'n_heads'.*Did you mean 'n_head'"),
    ({"lr": "fast"}, r"'lr' must be a number"),
    ({"n_layer": 2.5}, r"'n_layer' must be an integer"),
    ({"recompute_grad": "yes"}, r"'recompute_grad' must be true or false"),
    ({"n_head": 7}, r"n_embd \(64\) is not divisible by n_head \(7\)"),
    ({"n_layer": 3}, r"expands to 2 layers but n_layer is 3"),
    ({"attention_types": [[["global", "locall"], 1]]}, r"unknown attention kind 'locall'.*Did you mean 'local'"),
    ({"attention_types": [["global", 2]]}, r"is not \[\[kinds...\], repeat\]"),
    ({"datasets": [["no_such_data", None, None, None]]}, r"dataset id 'no_such_data' has no config"),
    ({"datasets": [["tinyshakespeare", 4, "documents_randm", 1.0]]}, r"Did you mean 'documents_random'"),
    ({"precision": "bf16"}, r"'precision' must be one of"),
    ({"lr_decay": "cosin"}, r"Did you mean 'cosine'"),
    ({"n_vocab": 100, "datasets": [["tinyshakespeare", None, None, None]]}, r"raise the model's 'n_vocab' to at least 256"),
])
def test_bad_config_errors_name_the_key(change, message, tiny_config):
    with pytest.raises(NeoError, match=message):
        parse_model_config({**tiny_config(), **change}, source="my.json")


def test_missing_required_key(tiny_config):
    raw = tiny_config()
    del raw["n_ctx"]
    with pytest.raises(NeoError, match="required key 'n_ctx' is missing"):
        parse_model_config(raw)


def test_bad_json_and_unknown_model(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_embd": 64,, }')
    with pytest.raises(NeoError, match=r"not valid JSON at line 1"):
        load_model_config(str(bad))
    with pytest.raises(NeoError, match=r"no config named 'tinyy'.*Did you mean 'tiny'"):
        load_model_config("tinyy")


def test_dataset_config_beside_model_config(tmp_path, tiny_config):
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "mine.json").write_text(json.dumps(
        {"n_vocab": 100, "path": "x/*.tfrecords", "eos_id": 3, "padding_id": 4}))
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**tiny_config(), "datasets": [["mine", 10, "documents_random", 2]]}))
    cfg = load_model_config(str(path))
    (entry,) = cfg.datasets
    assert (entry.id, entry.stitch, entry.sampling_mode, entry.weight) == ("mine", 10, "documents_random", 2.0)
    assert cfg.eos_id == 3 and cfg.padding_id == 4  # copied from the last dataset, as GPT-Neo does
    (tmp_path / "dataset_configs" / "bad.json").write_text(json.dumps({"n_vocab": 10, "paht": "x"}))
    path.write_text(json.dumps({**tiny_config(), "datasets": ["bad"]}))
    with pytest.raises(NeoError, match=r"unknown dataset key 'paht'.*Did you mean 'path'"):
        load_model_config(str(path))


def test_runtime_keys_of_saved_configs_are_ignored(tiny_config):
    cfg = parse_model_config({**tiny_config(), "num_cores": 8, "use_tpu": True, "mode": "train"})
    assert cfg.n_layer == 2
