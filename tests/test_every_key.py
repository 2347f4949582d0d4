"""No key is accepted and ignored. Every key neo accepts (all five sections, the aliases,
`moe_params`' keys and the dataset configs' keys) is walked here: setting it either changes
what neo does, observed at the place that uses it (the network's parameters and outputs, the
compiled program, the optimizer's updates, the batches, the train step, the loop's records and
checkpoints, evaluation, sampling), or is refused with the reason. A key added to neo without an
entry here fails `test_the_walk_covers_every_key`; docs/configs.md must name every key too."""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo.config import KEY_SECTION, DatasetConfig, MoEParams, load_model_config
from neo.config.load import MOE_UNUSED, RUNTIME_KEYS
from neo.errors import NeoError

ROOT = Path(__file__).resolve().parent.parent

MODEL = dict(n_embd=32, n_head=4, n_layer=2, n_ctx=16, n_vocab=64, attention_types=[[["global", "local"], 1]],
             local_attention_radius=4)
MOE = dict(moe_layers=[0], moe_params={"moe_num_experts": 4, "moe_hidden_size": 32, "moe_group_size": 16})
ROTARY = dict(rotary_emb=True)
OPT = dict(lr=1e-2, train_steps=4, opt_name="adam")
ADAFACTOR = dict(OPT, opt_name="adafactor")
MLM = dict(MODEL, mlm_training=True, mlm_mask_id=1, mlm_random_token_prob=0.1, n_vocab=256,
           datasets=[["docs", 2, "documents_fixed", None]])
TEXT = dict(MODEL, n_vocab=256, datasets=[["tinyshakespeare", None, None, None]], train_batch_size=8)
DOCS = dict(MODEL, n_vocab=256, datasets=[["docs", 2, "documents_fixed", None]], train_batch_size=8)
TWO = dict(MODEL, n_vocab=256, datasets=[["docs", 2, "documents_fixed", 3.0], ["chunks", None, "chunks", 1.0]],
           train_batch_size=8)
FIT = dict(TEXT, train_steps=2, iterations=2)
SAMPLE = dict(TEXT, temperature=0.0, predict_max_steps=6, prompt_path="prompt.txt")

# (key, value, probe, base): setting `key` to `value` on `base` must change what `probe` sees.
# A "dataset:" key is set in the dataset config "docs" (or "text" for the text source's keys).
WALK = [
    # architecture: the network's parameters and outputs (eval and train mode, MoE losses)
    ("n_embd", 64, "model", MODEL), ("n_head", 2, "model", MODEL),
    ("n_layer", {"n_layer": 4, "attention_types": [[["global", "local"], 2]]}, "model", MODEL),
    ("n_ctx", 32, "model", MODEL), ("n_vocab", 128, "model", MODEL),
    ("attention_types", [[["global"], 2]], "model", MODEL), ("local_attention_radius", 2, "model", MODEL),
    ("activation_fn", "relu", "model", MODEL), ("activation_function", "relu", "model", MODEL),
    ("scale_by_depth", True, "model", MODEL), ("scale_by_in", True, "model", MODEL),
    ("no_weight_tie", True, "model", MODEL), ("share_parameters", True, "model", MODEL),
    ("rotary_emb", True, "model", MODEL), ("axial_pos_emb", [4, 4], "model", MODEL),
    ("axial_pos_emb_", [4, 4], "model", MODEL), ("mlp_glu", True, "model", MODEL),
    ("scalenorm", True, "model", MODEL), ("rezero", True, "model", MODEL), ("num_mem_kv", 2, "model", MODEL),
    ("macaron", True, "model", MODEL), ("moe_layers", [1], "model", MODEL),
    ("moe_activation", "gelu", "model", dict(MODEL, **MOE)), ("precision", "bfloat16", "model", MODEL),
    ("recompute_grad", True, "program", MODEL), ("embed_dropout", 0.5, "train_model", MODEL),
    # speed and memory (same numbers, another program)
    ("attention_impl", "blocked", "program", MODEL), ("remat_policy", "full", "program", MODEL),
    ("scan_layers", False, "program", dict(MODEL, n_layer=4, attention_types=[[["global", "local"], 2]])),
    ("scan_unroll", 1, "program", dict(MODEL, n_layer=4, attention_types=[[["global", "local"], 2]])),
    # GPT-NeoX's architecture options
    ("pos_emb", "alibi", "model", MODEL), ("norm", "rmsnorm", "model", MODEL),
    ("rms_norm_epsilon", 0.5, "model", dict(MODEL, norm="rmsnorm")),
    ("scalenorm_epsilon", 0.5, "model", dict(MODEL, norm="scalenorm")),
    ("use_bias_in_norms", False, "model", MODEL), ("use_bias_in_attn_linear", False, "model", MODEL),
    ("use_bias_in_mlp", False, "model", MODEL), ("num_kv_heads", 2, "model", MODEL),
    ("mlp_multiple_of", 64, "model", dict(MODEL, activation_fn="swiglu")),
    ("attn_dropout", 0.5, "train_model", MODEL), ("res_dropout", 0.5, "train_model", MODEL),
    ("mlm_training", True, "model", dict(MODEL, mlm_mask_id=1)), ("rotary_pct", 0.5, "model", dict(MODEL, **ROTARY)),
    ("rotary_emb_base", 100.0, "model", dict(MODEL, **ROTARY)), ("parallel_residual", True, "model", MODEL),
    ("gpt_j_residual", True, "model", MODEL), ("scale_attention", True, "model", MODEL),
    ("qkv_bias", True, "model", MODEL), ("intermediate_size", 48, "model", MODEL),
    ("layer_norm_epsilon", 0.5, "model", MODEL), ("moe_params", {"moe_num_experts": 2}, "model", dict(MODEL, **MOE)),
    # mesh-tf's MoE hyperparameters (each also without its moe_ prefix: see test_moe_keys_without_prefix)
    ("moe:moe_num_experts", 2, "model", dict(MODEL, **MOE)), ("moe:moe_gating", "top_1", "model", dict(MODEL, **MOE)),
    ("moe:moe_loss_coef", 0.5, "model", dict(MODEL, **MOE)), ("moe:moe_hidden_size", 16, "model", dict(MODEL, **MOE)),
    ("moe:moe_group_size", 4, "model", dict(MODEL, **MOE)),
    ("moe:moe_capacity_factor_train", 0.5, "train_model", dict(MODEL, **MOE)),
    ("moe:moe_capacity_factor_eval", 0.5, "model", dict(MODEL, **MOE)),
    ("moe:moe_min_expert_capacity", 4, "model",
     dict(MODEL, moe_layers=[0], moe_params={**MOE["moe_params"], "moe_capacity_factor_eval": 0.25,
                                             "moe_capacity_factor_train": 0.25})),
    ("moe:moe_second_policy_train", "none", "train_model", dict(MODEL, **MOE)),
    ("moe:moe_second_policy_eval", "none", "model", dict(MODEL, **MOE)),
    ("moe:moe_second_threshold_train", 0.9, "train_model", dict(MODEL, **MOE)),
    ("moe:moe_second_threshold_eval", 0.9, "model", dict(MODEL, **MOE)),
    ("moe:moe_use_second_place_loss", True, "model", dict(MODEL, **MOE)),
    ("moe:moe_dropout_rate", 0.5, "train_model", dict(MODEL, **MOE)),
    # optimizer: parameters after four updates from fixed gradients
    ("lr", 1e-3, "optimizer", dict(MODEL, **OPT)), ("warmup_steps", 2, "optimizer", dict(MODEL, **OPT)),
    ("lr_decay", "cosine", "optimizer", dict(MODEL, **OPT)),
    ("lr_decay_end", 2, "optimizer", dict(MODEL, **OPT, lr_decay="cosine")),
    ("opt_name", "adafactor", "optimizer", dict(MODEL, **OPT)), ("beta1", 0.5, "optimizer", dict(MODEL, **OPT)),
    ("beta2", 0.5, "optimizer", dict(MODEL, **OPT)), ("epsilon", 1.0, "optimizer", dict(MODEL, **OPT)),
    ("ada_epsilon1", 1.0, "optimizer", dict(MODEL, **ADAFACTOR)),
    ("ada_epsilon2", 1.0, "optimizer", dict(MODEL, **ADAFACTOR)),
    ("weight_decay", 0.5, "optimizer", dict(MODEL, **OPT)), ("gradient_clipping", 1e-3, "optimizer", dict(MODEL, **OPT)),
    ("train_steps", 2, "optimizer", dict(MODEL, **OPT, lr_decay="cosine")),
    # run
    ("train_batch_size", 16, "batch", TEXT), ("tokens_per_mb_per_replica", 16, "microbatches", TEXT),
    ("iterations", 1, "fit", FIT), ("eval_batch_size", 16, "eval_batch", dict(TEXT, eval_batch_size=8)),
    ("eval_steps", 3, "validation", dict(TEXT, eval_steps=1)), ("eval_tasks", ["lambada"], "evaluate", TEXT),
    ("z_loss", 1.0, "step", TEXT), ("entmax_loss", True, "refused:entmax_loss not supported", MODEL),
    ("mlm_mask_id", 2, "mlm", MLM), ("mlm_cls_token_id", 3, "mlm", MLM), ("mlm_mask_prob", 0.5, "mlm", MLM),
    ("mlm_same_token_prob", 0.5, "mlm", MLM), ("mlm_random_token_prob", 0.5, "mlm", MLM),
    ("mlm_mask_ignore_ids", list(range(4, 200)), "mlm", MLM), ("model_path", "elsewhere", "tracker", TEXT),
    ("mesh_shape", "x:2,y:4", "mesh", MODEL), ("layout", "batch:x,embd:x", "mesh", MODEL),
    ("seed", 7, "batch", TEXT), ("keep_checkpoints", 1, "fit", FIT), ("wandb_project", "neo", "tracker", TEXT),
    ("curriculum_learning", {"min_difficulty": 8, "schedule_config": {"total_curriculum_step": 2, "difficulty_step": 8}},
     "trained_lengths", dict(FIT, iterations=1)),
    ("log_grads", True, "step", TEXT),
    # data
    ("datasets", [["tinyshakespeare", None, None, None]], "batch", dict(TEXT, datasets=[])),
    ("no_dataset", True, "batch", dict(TEXT, datasets=[])), ("input_fn", "sequential_input", "batch", TWO),
    ("shuffle_input_filenames", False, "batch", TWO), ("eos_id", "first sampled token", "sample", SAMPLE),
    ("padding_id", 7, "mlm", MLM), ("tokenizer_path", "gpt2", "bytes", TEXT),
    # sampling (--predict, and predict_steps while training)
    ("predict_steps", 1, "fit", FIT), ("predict_batch_size", 2, "sample", SAMPLE),
    ("predict_max_steps", 3, "sample", SAMPLE), ("remove_partial_sequences", True, "sample", SAMPLE),
    ("temperature", 0.9, "sample", SAMPLE), ("top_k", 1, "sample", dict(SAMPLE, temperature=5.0)),
    ("top_p", 0.01, "sample", dict(SAMPLE, temperature=5.0)), ("prompt_path", "other_prompt.txt", "sample", SAMPLE),
    ("model", "BERT", "refused:'model' must be \"GPT\"", MODEL),
    # dataset configs (configs/dataset_configs/<id>.json)
    ("dataset:n_vocab", 512, "refused:raise the model's 'n_vocab' to at least 512", DOCS),
    ("dataset:path", "chunks", "batch", DOCS), ("dataset:eval_path", "chunks", "eval_batch", DOCS),
    ("hub:tokenizer_is_pretrained", True, "batch", dict(TEXT, datasets=[["hub", None, None, None]])),
    ("text:tokenizer_path", "gpt2", "batch", dict(TEXT, n_vocab=50304, datasets=[["text", None, None, None]])),
    ("dataset:eos_id", 5, "batch", DOCS), ("dataset:padding_id", 7, "mlm", MLM),
    ("dataset:lambada_tokens_path", "lambada.jsonl", "lambada", DOCS),
    ("text:holdout", 0.5, "eval_batch", dict(TEXT, datasets=[["text", None, None, None]])),
    ("dataset:minimum_size", 2, "refused:stitch x minimum_size >= n_ctx \\+ 1",
     dict(DOCS, datasets=[["docs", 2, "documents_random", None]])),
]
# Keys GPT-Neo's main.py wrote at run time, and mesh-tf MoE keys its v1 layer never read: refused.
REFUSED = [(key, 1, f"refused:'{key}' is not a config key", MODEL) for key in RUNTIME_KEYS] + [
    (f"moe:{key}", 1.0, "refused:never reads", dict(MODEL, **MOE)) for key in sorted(MOE_UNUSED)]


def test_the_walk_covers_every_key():
    walked = {k for k, *_ in WALK + REFUSED}
    aliases = {"activation_function", "gpt_j_residual", "axial_pos_emb_"}
    moe = {f"moe:{f.name}" for f in dataclasses.fields(MoEParams)} | {f"moe:{k}" for k in MOE_UNUSED}
    dataset = {f.name for f in dataclasses.fields(DatasetConfig)} - {"id", "source"}
    walked_dataset = {k.split(":")[1] for k in walked if k.startswith(("dataset:", "text:", "hub:"))}
    assert walked - moe - aliases - {k for k in walked if ":" in k} == set(KEY_SECTION) | {"model"} | set(RUNTIME_KEYS)
    assert moe <= walked and aliases <= walked and walked_dataset == dataset


def test_docs_say_what_neo_does_with_every_key():
    doc = (ROOT / "docs" / "configs.md").read_text()
    keys = set(KEY_SECTION) | {"model"} | set(RUNTIME_KEYS) | {f.name for f in dataclasses.fields(MoEParams)} \
        | set(MOE_UNUSED) | {f.name for f in dataclasses.fields(DatasetConfig)} - {"id", "source"}
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing


# ------------------------------------------------------------------------------------------------
# Building the configs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with dataset configs: "docs" (documents, tfrecords), "chunks" (tfrecords),
    "text" (tinyshakespeare as bytes), and the prompt files."""
    from neo.data.tfrecords import RecordWriter

    tmp = tmp_path_factory.mktemp("walk")
    rng = np.random.default_rng(0)
    for name, lengths in (("docs", [5, 9, 3, 12, 7, 4] * 8), ("chunks", [17] * 48)):
        (tmp / name).mkdir()
        for f in range(3):
            w = RecordWriter(str(tmp / name / f"{name}_{f}"))
            for n in lengths[f::3]:
                w.write(rng.integers(10, 250, n))
            w.close()
    write_dataset(tmp, "docs", {})
    write_dataset(tmp, "chunks", {"path": str(tmp / "chunks" / "*.tfrecords")})
    write_dataset(tmp, "text", {})
    (tmp / "prompt.txt").write_text("ROMEO:\n")
    (tmp / "other_prompt.txt").write_text("JULIET: O\n")
    (tmp / "dataset_configs" / "lambada.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")  # beside "docs"
    return tmp


def write_dataset(tmp: Path, name: str, change: dict) -> None:
    base = {"docs": {"n_vocab": 256, "path": str(tmp / "docs" / "*.tfrecords"), "eval_path": str(tmp / "docs" / "*.tfrecords"),
                     "eos_id": 255, "padding_id": 0, "tokenizer_path": "bytes"},
            "chunks": {"n_vocab": 256, "path": str(tmp / "chunks" / "*.tfrecords"), "eos_id": 255},
            "text": {"n_vocab": 256, "path": str(ROOT / "data" / "tinyshakespeare.txt"), "holdout": 0.1,
                     "tokenizer_path": "bytes", "eos_id": 0, "padding_id": 0},
            # a tokenizer named like a hub repository: a local path, unless tokenizer_is_pretrained
            "hub": {"n_vocab": 256, "path": str(ROOT / "data" / "tinyshakespeare.txt"),
                    "tokenizer_path": "EleutherAI/gpt-neox-20b", "eos_id": 0}}[name]
    if "path" in change and not str(change["path"]).startswith("/"):
        change = {**change, "path": base["path"].replace(name, change["path"])}
    if "eval_path" in change:
        change = {**change, "eval_path": str(tmp / change["eval_path"] / "*.tfrecords")}
    (tmp / "dataset_configs").mkdir(exist_ok=True)
    (tmp / "dataset_configs" / f"{name}.json").write_text(json.dumps({**base, **change}))


def config(world: Path, base: dict, key: str = None, value=None, tag: str = "base"):
    """The config `base` with `key` set (in the model config, in moe_params, or in a dataset
    config; a dict value sets several keys that must change together), loaded from a file as a
    user's would be. Its model_path depends on the base only."""
    raw = json.loads(json.dumps(base))
    raw.setdefault("model_path", str(world / "runs" / f"{abs(hash(json.dumps(base, sort_keys=True))):x}"))
    for name in ("docs", "chunks", "text", "hub"):
        write_dataset(world, name, {})
    if key is not None:
        if key.startswith("moe:"):
            raw["moe_params"] = {**raw.get("moe_params", {}), key[4:]: value}
        elif key.startswith(("dataset:", "text:", "hub:")):  # a key of dataset config "docs", "text" or "hub"
            name, field = key.split(":")
            write_dataset(world, {"dataset": "docs"}.get(name, name), {field: value})
        elif isinstance(value, dict) and key not in ("moe_params", "curriculum_learning"):  # a dict: several keys
            raw.update(value)
        elif key == "model_path":  # a different folder, inside this test's world (not the cwd)
            raw[key] = str(world / value)
        else:
            raw[key] = value
    path = world / f"{tag}.json"
    path.write_text(json.dumps(raw))
    return load_model_config(str(path))


# ------------------------------------------------------------------------------------------------
# Probes: what a key is seen to change


TOKENS = (np.arange(32).reshape(2, 16) * 7 % 60 + 2).astype(np.int32)


def one_device():
    """Compiled probes run on one device: what they observe does not depend on the mesh."""
    from neo.mesh import make_layout

    return make_layout("", "", jax.devices()[:1])


def probe_model(cfg, world, deterministic=True):
    """The parameters (shapes and initial values) and the outputs: logits and MoE losses, in
    evaluation mode (or in train mode: dropout, MoE train routing)."""
    from neo.model import GPT, init_params

    params = nn.meta.unbox(init_params(cfg.model, jax.random.PRNGKey(0)))
    shapes = str(jax.tree.map(lambda x: x.shape, params))
    out = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]).astype(np.float32)]
    logits, aux = GPT(cfg.model).apply({"params": params}, jnp.asarray(TOKENS), deterministic=deterministic,
                                       rngs=None if deterministic else {"dropout": jax.random.PRNGKey(1)},
                                       mutable=["aux_loss"])
    return shapes, out + [np.asarray(logits, np.float32).ravel()] + [np.asarray(x, np.float32).ravel()
                                                                     for x in jax.tree.leaves(aux)]


def probe_train_model(cfg, world):
    return probe_model(cfg, world, deterministic=False)


def probe_program(cfg, world):
    from neo.model import GPT, init_params

    params = nn.meta.unbox(init_params(cfg.model, jax.random.PRNGKey(0)))
    loss = lambda p: GPT(cfg.model).apply({"params": p}, jnp.asarray(TOKENS)).sum()
    # a checkpoint is named with its policy: every norm is one without (layers.recomputed_norm);
    # a scan with its unrolling
    detail = lambda e: getattr(e.params.get("policy"), "__name__", "") + str(e.params.get("unroll", ""))
    return sorted({f"{e.primitive.name} {detail(e)}" for e in jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns})


def probe_optimizer(cfg, world):
    import optax

    from neo.optim import make_optimizer

    params = {"dense": {"kernel": jnp.full((4, 4), 0.5), "bias": jnp.full((4,), 0.1)}, "ln_1": {"scale": jnp.ones(4)}}
    opt = make_optimizer(cfg.optimizer, cfg.run.train_steps)
    state = opt.init(params)
    for step in range(4):  # gradients that change from step to step, so that the moments matter
        grads = jax.tree.map(lambda p: p * (3.0 - 2 * step) + 0.25, params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def probe_batch(cfg, world, split="train"):
    from neo.data import make_source

    return next(make_source(cfg, split))


def probe_eval_batch(cfg, world):
    return probe_batch(cfg, world, "eval")


def probe_microbatches(cfg, world):
    from neo.mesh import make_layout
    from neo.train import build

    return build(cfg, one_device()).num_microbatches


def probe_validation(cfg, world):
    from neo.evaluate.validation import Validation
    from neo.mesh import make_layout

    return len(Validation(cfg, one_device(), None, log=lambda *a: None).batches)


def probe_evaluate(cfg, world):
    from neo.evaluate.harness import HarnessOptions, evaluate_checkpoint

    evaluate_checkpoint(cfg, one_device(), HarnessOptions(), log=lambda *a: None)


def probe_step(cfg, world):
    from neo.data import make_source
    from neo.mesh import make_layout
    from neo.train import build, global_batch

    setup = build(cfg, one_device())
    state, metrics = setup.step(setup.init(), global_batch(setup, next(make_source(cfg))))
    return sorted(metrics), [np.asarray(x) for x in jax.tree.leaves(state.params)]


def probe_mlm(cfg, world):
    from neo.data import make_source
    from neo.mlm import mask_tokens

    rows = next(make_source(cfg))
    rows[0, :4] = 7  # real tokens equal to the padding_id the walk sets: then not maskable
    return [np.asarray(x) for x in mask_tokens(cfg, jnp.asarray(rows), jax.random.PRNGKey(0))]


def probe_tracker(cfg, world):
    from neo.tracking import Tracker

    said = []
    tracker = Tracker(cfg, 0, said.append)
    tracker.close()
    return tracker.metrics.path, said


def probe_mesh(cfg, world):
    from neo.mesh import make_layout

    layout = make_layout(cfg.run.mesh_shape, cfg.run.layout)
    return dict(layout.mesh.shape), layout.rules


def probe_bytes(cfg, world):
    from neo.evaluate.validation import byte_tokenizer

    return type(byte_tokenizer(cfg, lambda *a: None)).__name__


def probe_lambada(cfg, world):
    from neo.evaluate.harness import lambada_metadata

    return lambada_metadata(cfg, log=lambda *a: None)


def probe_fit(cfg, world):
    from neo.loop import fit
    from neo.mesh import make_layout

    run = Path(cfg.run.model_path)
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (a second one would resume)
    fit(cfg, one_device(), steps_per_checkpoint=1, log=lambda *a: None, prompt_path=str(world / "prompt.txt"))
    records = [(r["kind"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    return records, sorted(p.name for p in (run / "checkpoints").iterdir()), sorted(p.name for p in run.glob("predictions_*"))


def probe_trained_lengths(cfg, world):
    """The context length of each logged train step, and its loss."""
    from neo.loop import fit

    run = Path(cfg.run.model_path)
    shutil.rmtree(run, ignore_errors=True)
    fit(cfg, one_device(), steps_per_checkpoint=10, log=lambda *a: None, prompt_path=str(world / "prompt.txt"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("seq_len", cfg.model.n_ctx), round(r["loss"], 6)) for r in records if r["kind"] == "train"]


_SAMPLER = {}


def probe_sample(cfg, world):
    from neo.mesh import make_layout
    from neo.model import init_params
    from neo.predict import Sampler, SamplingOptions, prompt_file, write_samples

    layout = one_device()
    if "sampler" not in _SAMPLER:  # one compiled sampler: the sampling keys are traced values, not constants
        params = nn.meta.unbox(init_params(cfg.model, jax.random.PRNGKey(0)))
        _SAMPLER.update(sampler=Sampler(cfg, params, layout), params=params)
    Path(cfg.run.model_path).mkdir(parents=True, exist_ok=True)
    out = write_samples(cfg, layout, _SAMPLER["params"], 0, prompt_file("", cfg), SamplingOptions.from_config(cfg),
                        log=lambda *a: None, sampler=_SAMPLER["sampler"])
    return out.read_text()


def greedy_first_token(cfg) -> int:
    """The token greedy sampling puts first after the prompt: as eos_id it must stop the sample."""
    from neo.data.tokenizer import load_tokenizer
    from neo.model import GPT
    from neo.predict import prompt_file, read_prompts

    prompt = read_prompts(prompt_file("", cfg))[0]
    ids = load_tokenizer(cfg.data.tokenizer_path).encode(prompt)[-(cfg.model.n_ctx - 1):]
    logits = GPT(cfg.model).apply({"params": _SAMPLER["params"]}, jnp.asarray([ids]))
    return int(jnp.argmax(logits[0, -1]))


def observe(probe: str, cfg, world):
    """What `probe` sees of `cfg`; an error is an observation too (its message)."""
    try:
        return globals()[f"probe_{probe}"](cfg, world)
    except NeoError as e:
        return ("NeoError", re.sub(r"/\S+", "<path>", str(e)))


def same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


_BEFORE: dict = {}
# Probes not observed twice, to save compiling: the train step's determinism is tested by
# test_resume.py and test_train_sharding.py, and `fit` is observed by names (records, checkpoints).
SELF_EVIDENT = ("step", "fit")


def unchanged(probe: str, base: dict, world):
    """What `probe` sees of `base`, observed twice (once per probe and base): the two must agree,
    or a difference after setting a key would mean nothing."""
    k = (probe, json.dumps(base, sort_keys=True))
    if k not in _BEFORE:
        before = observe(probe, config(world, base), world)
        if probe not in SELF_EVIDENT:
            again = observe(probe, config(world, base, tag="again"), world)
            assert same(before, again), f"{probe} is not deterministic"
        _BEFORE[k] = before
    return _BEFORE[k]


@pytest.mark.parametrize("key, value, probe, base", WALK, ids=[w[0] for w in WALK])
def test_setting_the_key_changes_what_neo_does(key, value, probe, base, world):
    if probe.startswith("refused:"):
        with pytest.raises(NeoError, match=probe.split(":", 1)[1]):
            config(world, base, key, value, tag=key.replace(":", "_"))
        return
    before = unchanged(probe, base, world)
    if value == "first sampled token":  # eos_id: stop where the sample would have continued
        value = greedy_first_token(config(world, base))
    after = observe(probe, config(world, base, key, value, tag=key.replace(":", "_")), world)
    assert not same(before, after), f"{key} = {value!r} changed nothing that {probe} observes"


@pytest.mark.parametrize("key, value, probe, base", REFUSED, ids=[w[0] for w in REFUSED])
def test_keys_neo_does_not_take_are_refused_with_the_reason(key, value, probe, base, world):
    with pytest.raises(NeoError, match=probe.split(":", 1)[1]):
        config(world, base, key, value, tag=key.replace(":", "_"))


def test_moe_keys_without_prefix_are_the_same_keys(world):
    a = config(world, dict(MODEL, moe_layers=[0], moe_params={"moe_num_experts": 2, "moe_gating": "top_1"}))
    b = config(world, dict(MODEL, moe_layers=[0], moe_params={"num_experts": 2, "gating": "top_1"}), tag="b")
    assert a.model.moe_params == b.model.moe_params != MoEParams()


# ------------------------------------------------------------------------------------------------
# The meaning of GPT-Neo's reader keys, beyond "it changes something"


def test_sequential_input_reads_every_datasets_files_in_order_as_chunks(world):
    """GPT-Neo's sequential_input: one stream over all datasets' files (natural order without
    shuffle_input_filenames), each file's records in order, n_ctx + 1 tokens each; the
    entries' stitch, sampling mode and weight are not used."""
    from neo.data import make_source
    from neo.data.tfrecords import natural_key, read_records

    cfg = config(world, dict(MODEL, n_vocab=256, n_ctx=16, train_batch_size=8, input_fn="sequential_input",
                             shuffle_input_filenames=False, datasets=[["chunks", 5, "documents_random", 9.0]]),
                 tag="sequential")
    files = sorted((world / "chunks").glob("*.tfrecords"), key=lambda p: natural_key(str(p)))
    records = [r for f in files for r in read_records(str(f))]
    rows = np.concatenate([next(make_source(cfg)) for _ in range(1)])
    assert [r.tolist() for r in rows] == [r.tolist() for r in records[:8]]


def test_lambada_tokens_path_reads_gpt_neos_token_cache(world, tmp_path):
    """GPT-Neo cached LAMBADA as a JSON list of token lists (tasks.py); neo decodes it with the
    dataset's tokenizer into the text lm-eval's task reads."""
    from neo.data.tokenizer import load_tokenizer
    from neo.evaluate.harness import lambada_metadata

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "lambada_openai_test.jsonl").open()][:5]
    gpt2 = load_tokenizer("gpt2")
    (world / "dataset_configs" / "lambada.json").write_text(json.dumps([gpt2.encode(t) for t in texts]))
    cfg = config(world, dict(MODEL, n_vocab=50257, datasets=[["docs", 2, "documents_fixed", None]]),
                 "dataset:lambada_tokens_path", "lambada.json", tag="lambada_cache")
    write_dataset(world, "docs", {"lambada_tokens_path": "lambada.json", "tokenizer_path": "gpt2"})
    cfg = load_model_config(cfg.source)
    path = lambada_metadata(cfg, log=lambda *a: None)["lambada_path"]
    assert [json.loads(line)["text"] for line in open(path)] == texts
    # every evaluation (one per eval interval, one per process) reads the same file: none left behind
    before = set(os.listdir(os.path.dirname(path)))
    assert lambada_metadata(cfg, log=lambda *a: None)["lambada_path"] == path
    assert set(os.listdir(os.path.dirname(path))) == before
    write_dataset(world, "docs", {"lambada_tokens_path": "missing.json"})
    with pytest.raises(NeoError, match="does not exist: GPT-Neo downloaded LAMBADA there"):
        lambada_metadata(load_model_config(cfg.source), log=lambda *a: None)


def test_log_grads_logs_each_parameters_gradient_norm_under_its_name(world):
    """At a log step metrics.jsonl (and TensorBoard) hold grads/norm/<path> for every parameter,
    the norm of that parameter's gradient (checked against jax.grad of the same loss)."""
    from neo.data import make_source
    from neo.loop import fit
    from neo.loss import lm_loss, shift
    from neo.mesh import parameter_name
    from neo.model import GPT
    from neo.train import build

    cfg = config(world, dict(FIT, train_steps=1, iterations=1, log_grads=True), tag="log_grads")
    shutil.rmtree(cfg.run.model_path, ignore_errors=True)
    fit(cfg, one_device(), steps_per_checkpoint=1, log=lambda *a: None)
    (record,) = [json.loads(line) for line in (Path(cfg.run.model_path) / "metrics.jsonl").read_text().splitlines()]
    params = build(cfg, one_device()).init().params
    batch = jnp.asarray(next(make_source(cfg)))

    def objective(p):
        inputs, targets, mask = shift(batch, cfg.data.padding_id)
        return lm_loss(GPT(cfg.model).apply({"params": p}, inputs), targets, cfg.run.z_loss, mask)[0]

    flat, _ = jax.tree_util.tree_flatten_with_path(jax.jit(jax.grad(objective))(params))
    want = {f"grads/norm/{parameter_name(path)}": float(jnp.linalg.norm(g.ravel())) for path, g in flat}
    assert "grads/norm/h_0/attn/q/kernel" in want and {k for k in record if k.startswith("grads/")} == set(want)
    for name, norm in want.items():
        assert abs(record[name] - norm) <= 1e-4 * norm + 1e-7, name
    events = b"".join(p.read_bytes() for p in (Path(cfg.run.model_path) / "tensorboard").rglob("*"))
    assert b"train/grads/norm/h_0/attn/q/kernel" in events
