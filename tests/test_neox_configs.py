"""GPT-NeoX's own YAML configs as `--model a.yml,b.yml` (neo/config/neox.py), and the shipped
Pythia / NeoX-20B configs training on a fresh clone."""

import math
import os
import subprocess
import sys

import pytest

from neo.auto_layout import parameter_shapes
from neo.config import CONFIG_DIR, KEY_SECTION, ROOT, load_model_config, resolve_path
from neo.errors import NeoError

NEOX = CONFIG_DIR / "neox"
DATA = f"{NEOX}/tinyshakespeare.yml"  # vocab_file, save/load and neo's datasets
# The released models' parameter counts (HF configs and model cards; GPT-NeoX pads the 50,277-token
# vocabulary to a multiple of 128 x model_parallel_size).
RELEASED = {"70M": (70_426_624, 50304), "160M": (162_322_944, 50304), "1B": (1_011_781_632, 50304),
            "6-9B": (6_857_302_016, 50432), "12B": (11_846_072_320, 50688)}


def count(cfg) -> int:
    return sum(math.prod(shape) for _, shape, _ in parameter_shapes(cfg))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_pythia_yamls_give_the_released_parameter_counts(size):
    cfg = load_model_config(f"{NEOX}/pythia/{size}.yml,{DATA}")
    params, vocab = RELEASED[size]
    assert cfg.model.n_vocab == vocab
    assert count(cfg) == params


def test_pythia_70m_yaml_is_the_shipped_pythia_config():
    """The YAML and configs/pythia_70m.json describe one model and one schedule; they differ where
    GPT-NeoX's YAML says otherwise (the tanh GELU of bias_gelu_fusion, the per-GPU batch,
    activation checkpointing, the logging interval)."""
    yml = load_model_config(f"{NEOX}/pythia/70M.yml,{DATA}")
    ref = load_model_config("pythia_70m")
    assert yml.model.activation_fn == "gelu_tanh" and yml.model.recompute_grad
    assert yml.model == ref.model.__class__(**{**ref.model.__dict__, "activation_fn": "gelu_tanh",
                                               "recompute_grad": True})
    assert yml.optimizer == ref.optimizer.__class__(**{**ref.optimizer.__dict__, "lr_decay_end": 143000})
    assert (yml.optimizer.lr, yml.optimizer.warmup_steps, yml.optimizer.beta2) == (0.001, 1430, 0.95)
    assert (yml.run.train_steps, yml.run.z_loss, yml.run.seed) == (143000, 0.0, 1234)
    assert (yml.data.eos_id, yml.data.padding_id) == (0, 1)
    assert yml.data.datasets[0].id == "tinyshakespeare_neox"
    notes = "\n".join(yml.notes)
    for key in ("zero_optimization", "scaled_upper_triang_masked_softmax_fusion", "partition_activations",
                "init_method", "checkpoint_factor", "fp16", "train_micro_batch_size_per_gpu"):
        assert key in notes


def test_neox_20b_yaml_gives_the_released_parameter_count(tmp_path):
    """GPT-NeoX's 20B.yml names its own tokenizer and data paths; pointed at the shipped tokenizer,
    with the Megatron data path removed, it is NeoX-20B."""
    text = (NEOX / "20B.yml").read_text()
    text = text.replace("./20B_checkpoints/20B_tokenizer.json", str(ROOT / "data" / "20B_tokenizer.json"))
    with pytest.raises(NeoError, match="GPT-NeoX key 'data_path': neo reads tfrecords"):
        load_model_config(write(tmp_path, "20B.yml", text))
    text = "\n".join(line for line in text.splitlines() if '"data_path"' not in line)
    cfg = load_model_config(write(tmp_path, "20B_local.yml", text))
    assert cfg.model.n_vocab == 50432 and cfg.optimizer.lr == 0.97e-4 and cfg.model.parallel_residual
    assert count(cfg) == 20_554_567_680


def test_yamls_merge_left_to_right_and_a_repeated_key_is_refused(tmp_path):
    model = write(tmp_path, "model.yml", """
# comments, True, dashes and trailing commas, as GPT-NeoX writes its configs
{
  "num-layers": 2, "hidden_size": 64, "num_attention_heads": 4,   # dashed or not
  "seq_length": 32, "max_position_embeddings": 32, "pos_emb": "rotary",
  "no_weight_tying": True, "gpt_j_residual": True,
  "optimizer": {"type": "Adam", "params": {"lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8,},},
  "min_lr": 6.0e-5, "lr_decay_style": "cosine", "train_iters": 200, "warmup": 0.1,
  "tokenizer_type": "HFTokenizer",
}
""")
    cfg = load_model_config(f"{model},{DATA}")
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.rotary_emb, cfg.model.no_weight_tie) == (2, 64, True, True)
    assert (cfg.optimizer.lr, cfg.optimizer.warmup_steps, cfg.optimizer.lr_decay) == (6e-4, 20, "cosine")
    assert cfg.model.n_vocab == 50304 and cfg.run.model_path == "runs/neox"  # from the second file
    assert load_model_config(f"{DATA},{model}").model == cfg.model

    again = write(tmp_path, "again.yml", '{"num_layers": 4}')  # num-layers in model.yml: the same key
    with pytest.raises(NeoError, match=r"'num_layers' is already set by .*model.yml"):
        load_model_config(f"{model},{DATA},{again}")
    twice = write(tmp_path, "twice.yml", '{"num_layers": 2,\n "num-layers": 4}')
    with pytest.raises(NeoError, match=r"twice.yml: 'num_layers' is set twice \(lines 1 and 2\)"):
        load_model_config(twice)


def test_unknown_and_unhonoured_neox_keys_are_refused_by_name(tmp_path):
    base = ('{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, '
            '"pos_emb": "rotary", "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}, "min_lr": 1.0e-4, '
            '"train_iters": 10, "tokenizer_type": "HFTokenizer", %s}')

    vocab = write(tmp_path, "vocab.yml", f'{{"vocab_file": "{ROOT}/data/20B_tokenizer.json"}}')

    def load(extra):
        return load_model_config(f"{write(tmp_path, 'm.yml', base % extra)},{vocab}")

    assert load('"bias_gelu_fusion": false').model.activation_fn == "gelu_exact"
    assert load('"eval_steps": 3').run.eval_steps == 3  # one of neo's own keys
    with pytest.raises(NeoError, match=r"m.yml: GPT-NeoX key 'tokenizer_type': GPT2BPETokenizer .* needs vocab_file"):
        no_type = (base % '').replace(', "tokenizer_type": "HFTokenizer"', '')
        load_model_config(f"{write(tmp_path, 'm.yml', no_type)},{vocab}")
    cases = {
        '"num_layer": 3': r"unknown key 'num_layer'\. Did you mean 'num_layers'\?",
        '"data_path": "data/x_text_document"': r"'data_path': neo reads tfrecords or text",
        '"lr_decay_style": "exponential"': r"'lr_decay_style': 'exponential'",
        '"lr_decay_style": "cosine", "warmup": 0.0, "optimizer_x": 1': r"unknown key 'optimizer_x'",
        '"mlp_type": "llama"': r"'mlp_type': 'llama' is GPT-NeoX's old Llama dialect",
        '"attention_config": [[["local"], 2]]': r"'attention_config': kind 'local'",
        '"gpt_j_tied": true': r"'gpt_j_tied'",
        '"load": "elsewhere"': r"'load': 'elsewhere'",
        '"max_position_embeddings": 16': r"'max_position_embeddings': 16 is below seq_length 32",
        '"n_layer": 4': r"'n_layer' sets neo's 'n_layer', which other keys of these files set too",
        '"weight_decay": 0.0, "optimizer_": 0': r"unknown key 'optimizer_'\. Did you mean 'optimizer'\?",
        '"fp16": true': r"'fp16': must be a mapping",
    }
    for extra, message in cases.items():
        with pytest.raises(NeoError, match=message):
            load(extra)
    with pytest.raises(NeoError, match=r"'min_lr': 0.0002: neo's schedule .* decays to 10% of lr"):
        load_model_config(f"{write(tmp_path, 'm.yml', (base % '').replace('1.0e-4', '2.0e-4'))},{vocab}")
    no_layers = (base % '').replace('"num_layers": 2, ', '')
    with pytest.raises(NeoError, match=r"'num_layers': is required, a positive integer \(got None\)"):
        load_model_config(f"{write(tmp_path, 'm.yml', no_layers)},{vocab}")
    with pytest.raises(NeoError, match=r"'optimizer': type 'SGD'"):
        load_model_config(f"{write(tmp_path, 'm.yml', (base % '').replace('Adam', 'SGD'))},{vocab}")


@pytest.mark.parametrize("key,value", [("pos_emb", '"alibi"'), ("norm", '"rmsnorm"'), ("activation", '"swiglu"'),
                                       ("num_kv_heads", "2"), ("use_bias_in_attn_linear", "false")])
def test_architecture_keys_go_to_neos_key_of_the_same_name(tmp_path, key, value):
    """GPT-NeoX architecture options neo names as GPT-NeoX does: taken under that name, or, where
    this neo lacks the key, refused naming it."""
    path = write(tmp_path, "m.yml", '{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, '
                                    '"seq_length": 32, "optimizer": {"params": {"lr": 1.0e-3}}, "min_lr": 1.0e-4, '
                                    f'"train_iters": 10, "tokenizer_type": "HFTokenizer", "{key}": {value}}}')
    name = {"activation": "activation_fn"}.get(key, key)  # GPT-NeoX's activation is neo's activation_fn
    if name in KEY_SECTION:
        cfg = load_model_config(f"{path},{DATA}")
        section = getattr(cfg, KEY_SECTION[name])
        assert str(getattr(section, name)).lower() == value.strip('"')
    else:
        with pytest.raises(NeoError, match=f"GPT-NeoX key '{key}'.*needs neo's '{key}' config key"):
            load_model_config(f"{path},{DATA}")


def test_a_yaml_without_a_vocabulary_says_where_to_get_one():
    with pytest.raises(NeoError, match=r"no vocabulary: add a YAML file with vocab_file"):
        load_model_config(f"{NEOX}/pythia/70M.yml")


def _main(tmp_path, model, *extra):
    # 70M parameters: initialising and running them unoptimised takes longer than optimising does
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
    sets = ["train_steps=2", "n_ctx=32", "train_batch_size=2", "iterations=1", "precision=\"float32\"",
            "recompute_grad=false", f"model_path=\"{tmp_path}\"", *extra]
    cmd = [sys.executable, str(ROOT / "main.py"), "--model", model, *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_shipped_pythia_and_neox_configs_name_data_that_ships():
    for name in [p.stem for p in CONFIG_DIR.glob("*.json") if p.stem.startswith(("pythia_", "gpt_neox_"))]:
        cfg = load_model_config(name)
        (entry,) = cfg.data.datasets
        assert os.path.exists(resolve_path(entry.config.path, entry.config.source))
        assert cfg.data.tokenizer_path == "data/20B_tokenizer.json" and entry.config.n_vocab <= cfg.model.n_vocab


def test_pythia_70m_trains_out_of_the_box(tmp_path):
    run = _main(tmp_path, "pythia_70m")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "70,426,624 parameters" in run.stdout and "step 2/2 | loss" in run.stdout


def test_a_neox_yaml_trains_and_lists_the_keys_it_ignores(tmp_path):
    run = _main(tmp_path, f"{NEOX}/pythia/70M.yml,{DATA}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 2/2 | loss" in run.stdout
    assert "ignored (DeepSpeed/launcher setting): zero_optimization" in run.stdout
    assert "not applied 'init_method' ('small_init')" in run.stdout


def test_llama2_and_mistral_yamls_build_their_architecture(tmp_path):
    """GPT-NeoX's llama2/7B.yml: SwiGLU whose GPT-NeoX intermediate_size 32768 is Llama's 11008,
    RMSNorm without biases, no attention biases, untied head; as GPT-NeoX builds it, its MLP
    keeps biases (use_bias_in_mlp defaults to true there), so with a vocabulary V it has
    Llama-2-7B's 6,738,415,616 parameters - 2 x 32,000 x 4096 + 2 x V x 4096 + 32 x (2 x 11008 + 4096).
    A sliding_window_width w makes every layer local with radius w + 1 (Mistral's window)."""
    import jax
    import numpy as np

    from neo.model.params import abstract_init

    extra = write(tmp_path, "hf.yml", '{"tokenizer_type": "HFTokenizer", "optimizer": {"type": "Adam", "params": '
                                      '{"lr": 3.0e-4}}, "min_lr": 3.0e-5, "train_iters": 10}')
    cfg = load_model_config(f"{NEOX}/llama2/7B.yml,{DATA},{extra}")
    m = cfg.model
    assert (m.activation_fn, m.intermediate_size, m.norm, m.n_vocab) == ("swiglu", 11008, "rmsnorm", 50277)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_init(m)))
    assert count == 6_738_415_616 - 2 * 32_000 * 4096 + 2 * 50277 * 4096 + 32 * (2 * 11008 + 4096)
    window = write(tmp_path, "w.yml", '{"sliding_window_width": 4095}')
    m = load_model_config(f"{NEOX}/llama2/7B.yml,{DATA},{extra},{window}").model
    assert set(m.attention_types) == {"local"} and m.local_attention_radius == 4096
