"""GPT-Neo JSON configs -> frozen, validated dataclasses.

Every key of the original GPT-Neo model config is accepted with its original meaning
(reference: docs/configs.md). Where the original had no usable default (it read absent keys as
None and crashed later) neo picks the value the shipped configs use and documents it. Mistakes
are reported here, before anything is compiled, naming the key, the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from neo.errors import NeoError, did_you_mean

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"

ATTENTION_KINDS = ("global", "local", "linear", "none")
SAMPLING_MODES = ("chunks", "documents_fixed", "documents_random")
PRECISIONS = ("float32", "bfloat16")
LR_DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adam", "adafactor")

# Keys the original main.py wrote into the params dict at run time. Saved configs (the released
# checkpoints' config.json) may contain them; they are command-line matters in neo, so ignored.
RUNTIME_KEYS = frozenset({
    "num_cores", "auto_layout", "auto_layout_and_mesh_shape", "use_tpu", "gpu_ids",
    "steps_per_checkpoint", "predict", "export", "sampling_use_entmax", "slow_sampling",
    "mode", "num_microbatches", "causal", "dataset_configs", "attention_layers",
})


@dataclass(frozen=True)
class DatasetConfig:
    """One `configs/dataset_configs/<id>.json`: where the tokens are and how they were made."""

    id: str
    n_vocab: int
    path: str = ""
    eval_path: str = ""
    tokenizer_is_pretrained: bool = False
    tokenizer_path: Optional[str] = None
    eos_id: int = 1
    padding_id: int = 0
    lambada_tokens_path: Optional[str] = None
    # neo: for a plain-text `path`, the last `holdout` fraction of its tokens is the eval split.
    holdout: float = 0.0
    # neo: the fewest tokens of any document (create_tfrecords.py --minimum_size), so that
    # documents_random's `stitch` can be checked before training.
    minimum_size: Optional[int] = None
    # neo: where relative paths in this file are resolved from (see resolve_path).
    source: str = ""


@dataclass(frozen=True)
class DatasetEntry:
    """A model config's `datasets` element `[id, stitch, sampling_mode, weight]`."""

    id: str
    stitch: Optional[int]
    sampling_mode: Optional[str]
    weight: Optional[float]
    config: DatasetConfig


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-Neo model config. Field names are the original JSON keys."""

    # --- architecture (required) ---
    n_embd: int
    n_head: int
    n_layer: int
    n_ctx: int
    n_vocab: int
    attention_types: tuple[str, ...]  # expanded: one kind per layer
    # --- architecture (optional) ---
    local_attention_radius: int = 256
    activation_fn: str = "gelu"
    scale_by_depth: bool = False
    scale_by_in: bool = False
    no_weight_tie: bool = False
    share_parameters: bool = False
    rotary_emb: bool = False
    axial_pos_emb: Optional[tuple[int, ...]] = None
    mlp_glu: bool = False
    scalenorm: bool = False
    rezero: bool = False
    num_mem_kv: int = 0
    macaron: bool = False
    moe_layers: Optional[tuple[int, ...]] = None
    moe_params: dict = field(default_factory=dict)
    moe_activation: str = "relu"
    model: str = "GPT"
    precision: str = "float32"
    z_loss: float = 1e-4
    entmax_loss: bool = False
    mlm_training: bool = False
    mlm_mask_id: Optional[int] = None
    mlm_cls_token_id: Optional[int] = None
    mlm_mask_prob: float = 0.15
    mlm_same_token_prob: float = 0.10
    mlm_random_token_prob: float = 0.0
    mlm_mask_ignore_ids: tuple[int, ...] = ()
    # --- neo extensions for the GPT-NeoX / Pythia family (docs/configs.md) ---
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    parallel_residual: bool = False
    scale_attention: bool = False
    qkv_bias: bool = False
    intermediate_size: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    # --- optimisation ---
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_decay: str = "constant"
    lr_decay_end: Optional[int] = None
    opt_name: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.95
    epsilon: float = 1e-8
    ada_epsilon1: float = 1e-30
    ada_epsilon2: float = 1e-3
    weight_decay: float = 0.0
    gradient_clipping: Optional[float] = None
    tokens_per_mb_per_replica: Optional[int] = None
    recompute_grad: bool = False
    log_grads: bool = False
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    res_dropout: float = 0.0
    # --- training loop / IO ---
    train_batch_size: int = 8
    train_steps: int = 1000
    eval_batch_size: Optional[int] = None
    eval_steps: int = 0
    predict_steps: int = 0
    predict_batch_size: int = 1
    predict_max_steps: Optional[int] = None
    remove_partial_sequences: bool = False
    temperature: float = 0.9
    prompt_path: str = ""  # neo: prompt file used when --prompt is not given
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    iterations: int = 500
    model_path: str = ""
    datasets: tuple[DatasetEntry, ...] = ()
    no_dataset: bool = False
    input_fn: str = "sequential_input"
    shuffle_input_filenames: bool = True
    seed: int = 1
    eval_tasks: tuple[str, ...] = ()
    mesh_shape: str = ""
    layout: str = ""
    eos_id: Optional[int] = None
    padding_id: Optional[int] = None
    tokenizer_path: Optional[str] = None
    # --- neo: checkpoints and tracking (docs/configs.md) ---
    keep_checkpoints: int = 5
    wandb_project: Optional[str] = None
    # --- provenance ---
    source: str = ""

    # Derived values: properties so they can never disagree with the fields.
    @property
    def features_per_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_expanded(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def causal(self) -> bool:
        return not self.mlm_training

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "model"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed, validated like a loaded config."""
        return _validate(dataclasses.replace(self, **changes), self.source or "<config>")


# ----------------------------------------------------------------------------------------------
# Loading


def resolve_path(path: str, base: str | os.PathLike = "") -> str:
    """Resolve a config path: URLs and absolute paths as they are; relative ones against the
    current directory first, then `base` (a config file's directory), then neo's own root, so
    the shipped configs work from any directory."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    candidates = [Path.cwd(), Path(base) if base else None, ROOT]
    for where in candidates:
        if where is None:
            continue
        p = where / path
        if p.exists() or _glob_nonempty(str(p)):
            return str(p)
    return str(Path.cwd() / path)


def _glob_nonempty(pattern: str) -> bool:
    if not any(c in pattern for c in "*?["):
        return False
    import glob

    return bool(glob.glob(pattern))


def find_model_config(model: str) -> Path:
    """`--model NAME` -> configs/NAME.json; a path ending in .json (or an existing file) as is."""
    if not model:
        raise NeoError("--model is required: a config name from configs/ or a path to a .json file.")
    p = Path(model)
    if p.suffix == ".json" or p.exists():
        if p.is_dir() and (p / "config.json").exists():
            return p / "config.json"
        if not p.exists():
            raise NeoError(f"--model {model}: no such file.")
        return p
    candidate = CONFIG_DIR / f"{model}.json"
    if candidate.exists():
        return candidate
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.json"))
    hint = did_you_mean(model, names)
    raise NeoError(
        f"--model {model}: no config named '{model}' in {CONFIG_DIR}.{hint} "
        f"Available: {', '.join(names) or '(none)'}; or pass a path to a .json file."
    )


def load_model_config(model: str, overrides: Optional[dict] = None) -> ModelConfig:
    """Load, check and freeze a model config (and the dataset configs it names)."""
    path = find_model_config(model)
    raw = _read_json(path)
    if overrides:
        raw.update(overrides)
    return parse_model_config(raw, source=str(path))


def parse_model_config(raw: dict, source: str = "<dict>") -> ModelConfig:
    """Turn a JSON dict into a validated ModelConfig. Errors name the key and `source`."""
    if not isinstance(raw, dict):
        raise NeoError(f"{source}: a model config must be a JSON object, got {type(raw).__name__}.")
    raw = dict(raw)
    where = source

    # Aliases: the README's and the shipped configs' spellings.
    if "activation_function" in raw:
        alias = raw.pop("activation_function")
        if "activation_fn" in raw and raw["activation_fn"] != alias:
            raise NeoError(
                f"{where}: 'activation_fn' ({raw['activation_fn']!r}) and 'activation_function' "
                f"({alias!r}) disagree; keep one of them."
            )
        raw.setdefault("activation_fn", alias)
    if "gpt_j_residual" in raw:
        raw.setdefault("parallel_residual", raw.pop("gpt_j_residual"))
    if "axial_pos_emb_" in raw:
        raw.setdefault("axial_pos_emb", raw.pop("axial_pos_emb_"))
    for key in RUNTIME_KEYS:
        raw.pop(key, None)

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    settable = set(fields) - {"source"}
    for key in raw:
        if key not in settable:
            hint = did_you_mean(key, sorted(settable | {"activation_function"}))
            raise NeoError(f"{where}: unknown key '{key}'.{hint} (docs/configs.md lists every key.)")
    for key in ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab", "attention_types"):
        if key not in raw:
            raise NeoError(f"{where}: required key '{key}' is missing.")

    hints = typing.get_type_hints(ModelConfig)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "attention_types":
            values[key] = expand_attention_types(value, where)
        elif key == "datasets":
            values[key] = value  # resolved below, after the scalar checks
        elif key == "moe_params":
            if not isinstance(value, dict):
                raise NeoError(f"{where}: 'moe_params' must be an object like {{\"moe_dropout_rate\": 0.0}}.")
            values[key] = dict(value)
        else:
            values[key] = _coerce(key, value, hints[key], where)

    values["datasets"] = _resolve_datasets(values.get("datasets", ()), where)
    if values["datasets"]:
        last = values["datasets"][-1].config
        values.setdefault("eos_id", last.eos_id)
        values.setdefault("padding_id", last.padding_id)
        first = values["datasets"][0].config
        if first.tokenizer_path is not None:
            values.setdefault("tokenizer_path", first.tokenizer_path)
    cfg = ModelConfig(**values, source=source)
    return _validate(cfg, where)


def _validate(cfg: ModelConfig, where: str) -> ModelConfig:
    def fail(msg: str) -> None:
        raise NeoError(f"{where}: {msg}")

    for key in ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab", "train_batch_size", "train_steps",
                "iterations", "local_attention_radius", "predict_batch_size", "keep_checkpoints"):
        if getattr(cfg, key) <= 0:
            fail(f"'{key}' must be a positive integer, got {getattr(cfg, key)}.")
    if cfg.n_embd % cfg.n_head:
        divisors = [h for h in range(1, cfg.n_embd + 1) if cfg.n_embd % h == 0]
        near = sorted(divisors, key=lambda h: abs(h - cfg.n_head))[:3]
        fail(f"n_embd ({cfg.n_embd}) is not divisible by n_head ({cfg.n_head}); "
             f"choose n_head from {sorted(near)} or change n_embd.")
    if len(cfg.attention_types) != cfg.n_layer:
        fail(f"'attention_types' expands to {len(cfg.attention_types)} layers but n_layer is "
             f"{cfg.n_layer}; make the repeat counts add up to n_layer.")
    if cfg.precision not in PRECISIONS:
        fail(f"'precision' must be one of {PRECISIONS}, got {cfg.precision!r}.{did_you_mean(cfg.precision, PRECISIONS)}")
    if cfg.lr_decay not in LR_DECAYS:
        fail(f"'lr_decay' must be one of {LR_DECAYS}, got {cfg.lr_decay!r}.{did_you_mean(cfg.lr_decay, LR_DECAYS)}")
    if cfg.opt_name.lower() not in OPTIMIZERS:
        fail(f"'opt_name' must be one of {OPTIMIZERS}, got {cfg.opt_name!r}.{did_you_mean(cfg.opt_name.lower(), OPTIMIZERS)}")
    if cfg.model != "GPT":
        fail(f"'model' must be \"GPT\" (the only family GPT-Neo has), got {cfg.model!r}.")
    for key in ("embed_dropout", "attn_dropout", "res_dropout", "mlm_mask_prob",
                "mlm_same_token_prob", "mlm_random_token_prob"):
        v = getattr(cfg, key)
        if not 0.0 <= v < 1.0:
            fail(f"'{key}' must be in [0, 1), got {v}.")
    if not 0.0 < cfg.rotary_pct <= 1.0:
        fail(f"'rotary_pct' must be in (0, 1], got {cfg.rotary_pct}.")
    if cfg.rotary_emb and int(cfg.features_per_head * cfg.rotary_pct) % 2:
        fail(f"rotary dims = int(features_per_head {cfg.features_per_head} * rotary_pct {cfg.rotary_pct}) "
             f"must be even; adjust 'rotary_pct'.")
    if cfg.axial_pos_emb is not None:
        if len(cfg.axial_pos_emb) != 2 or math.prod(cfg.axial_pos_emb) < cfg.n_ctx:
            fail(f"'axial_pos_emb' must be two sizes [a1, a2] with a1*a2 >= n_ctx ({cfg.n_ctx}), "
                 f"got {list(cfg.axial_pos_emb)}.")
    if cfg.moe_layers:
        bad = [i for i in cfg.moe_layers if not 0 <= i < cfg.n_layer]
        if bad:
            fail(f"'moe_layers' has layer indices {bad} outside 0..{cfg.n_layer - 1}.")
    if cfg.mlm_training and cfg.mlm_mask_id is None:
        fail("'mlm_training' needs 'mlm_mask_id' (the token id that replaces masked tokens).")
    if cfg.tokens_per_mb_per_replica is not None and cfg.tokens_per_mb_per_replica <= 0:
        fail("'tokens_per_mb_per_replica' must be a positive number of tokens.")
    if cfg.gradient_clipping is not None and cfg.gradient_clipping <= 0:
        fail("'gradient_clipping' must be > 0 (or absent for no clipping).")
    if cfg.warmup_steps < 0:
        fail("'warmup_steps' must be >= 0.")
    for entry in cfg.datasets:
        if entry.config.n_vocab > cfg.n_vocab:
            fail(f"dataset '{entry.id}' has n_vocab {entry.config.n_vocab} but the model's n_vocab is "
                 f"{cfg.n_vocab}; raise the model's 'n_vocab' to at least {entry.config.n_vocab}.")
        if entry.sampling_mode == "documents_random" and entry.stitch is not None and entry.stitch < 1:
            fail(f"dataset '{entry.id}': stitch must be >= 1, got {entry.stitch}.")
        shortest = entry.config.minimum_size
        if entry.sampling_mode == "documents_random" and shortest:
            stitch = entry.stitch or 1
            if stitch * shortest < cfg.n_ctx + 1:
                fail(f"dataset '{entry.id}': documents_random needs stitch x minimum_size >= n_ctx + 1 so that "
                     f"every window is real text, but {stitch} x {shortest} = {stitch * shortest} < "
                     f"{cfg.n_ctx + 1}; set stitch to at least {-(-(cfg.n_ctx + 1) // shortest)} in 'datasets'.")
    for key in ("eos_id", "padding_id", "mlm_mask_id", "mlm_cls_token_id"):
        v = getattr(cfg, key)
        if v is not None and not 0 <= v < cfg.n_vocab:
            fail(f"'{key}' ({v}) is outside the vocabulary 0..{cfg.n_vocab - 1}.")
    return cfg


def expand_attention_types(value: Any, where: str = "<config>") -> tuple[str, ...]:
    """`[[["global","local"], 12]]` -> ("global", "local", ...). A flat list of kinds is accepted too
    (Hugging Face's `attention_layers` form)."""
    example = 'e.g. [[["global", "local"], 6]]'
    if not isinstance(value, list) or not value:
        raise NeoError(f"{where}: 'attention_types' must be a non-empty list, {example}.")
    kinds: list[str] = []
    if all(isinstance(v, str) for v in value):
        kinds = list(value)
    else:
        for item in value:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], list)
                    or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
                raise NeoError(f"{where}: 'attention_types' entry {json.dumps(item)} is not "
                               f"[[kinds...], repeat]; {example}.")
            kinds.extend(item[0] * item[1])
    for kind in kinds:
        if kind not in ATTENTION_KINDS:
            raise NeoError(f"{where}: unknown attention kind {kind!r} in 'attention_types'; "
                           f"valid kinds are {', '.join(ATTENTION_KINDS)}.{did_you_mean(str(kind), ATTENTION_KINDS)}")
    return tuple(kinds)


def _resolve_datasets(entries: Any, where: str) -> tuple[DatasetEntry, ...]:
    if not isinstance(entries, (list, tuple)):
        raise NeoError(f"{where}: 'datasets' must be a list of [id, stitch, sampling_mode, weight] entries.")
    base = Path(where).parent if where and not where.startswith("<") else Path.cwd()
    out = []
    for item in entries:
        if isinstance(item, str):
            item = [item, None, None, None]
        if not isinstance(item, (list, tuple)) or not 1 <= len(item) <= 4 or not isinstance(item[0], str):
            raise NeoError(f"{where}: datasets entry {json.dumps(item)} must be [id, stitch, sampling_mode, "
                           f"weight] (or a plain id string).")
        ds_id, stitch, mode, weight = (list(item) + [None] * 4)[:4]
        if stitch is not None and (not isinstance(stitch, int) or isinstance(stitch, bool)):
            raise NeoError(f"{where}: dataset '{ds_id}': stitch must be an integer or null, got {stitch!r}.")
        if mode is not None and mode not in SAMPLING_MODES:
            raise NeoError(f"{where}: dataset '{ds_id}': sampling mode {mode!r} is not one of "
                           f"{', '.join(SAMPLING_MODES)}.{did_you_mean(str(mode), SAMPLING_MODES)}")
        if weight is not None and (not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0):
            raise NeoError(f"{where}: dataset '{ds_id}': weight must be a positive number, got {weight!r}.")
        out.append(DatasetEntry(ds_id, stitch, mode, None if weight is None else float(weight),
                                load_dataset_config(ds_id, base, where)))
    return tuple(out)


def dataset_config_dirs(base: Path) -> list[Path]:
    """Where dataset ids are looked up: beside the model config, then neo's configs/."""
    dirs = [base / "dataset_configs", CONFIG_DIR / "dataset_configs"]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            out.append(d)
    return out


def load_dataset_config(ds_id: str, base: Path, where: str = "<config>") -> DatasetConfig:
    """A dataset id -> its DatasetConfig. An id ending in .json is read as a path."""
    if ds_id.endswith(".json"):
        path = Path(resolve_path(ds_id, base))
        if not path.exists():
            raise NeoError(f"{where}: dataset config file {ds_id} does not exist.")
    else:
        dirs = dataset_config_dirs(base)
        path = next((d / f"{ds_id}.json" for d in dirs if (d / f"{ds_id}.json").exists()), None)
        if path is None:
            known = sorted({p.stem for d in dirs for p in d.glob("*.json")})
            raise NeoError(
                f"{where}: dataset id '{ds_id}' has no config; create "
                f"{dirs[-1] / (ds_id + '.json')} (see docs/data.md).{did_you_mean(ds_id, known)} "
                f"Known ids: {', '.join(known) or '(none)'}."
            )
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise NeoError(f"{path}: a dataset config must be a JSON object.")
    fields = {f.name for f in dataclasses.fields(DatasetConfig)} - {"id", "source"}
    for key in raw:
        if key not in fields:
            raise NeoError(f"{path}: unknown dataset key '{key}'.{did_you_mean(key, sorted(fields))}")
    if "n_vocab" not in raw:
        raise NeoError(f"{path}: required key 'n_vocab' is missing (the vocabulary size the data was encoded with).")
    hints = typing.get_type_hints(DatasetConfig)
    values = {k: _coerce(k, v, hints[k], str(path)) for k, v in raw.items()}
    return DatasetConfig(id=ds_id, source=str(path.parent), **values)


def _read_json(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise NeoError(f"cannot read config {path}: {e.strerror}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NeoError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the annotation `hint`; JSON numbers and lists become the right type."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        origin = typing.get_origin(hint)
    if value is None:
        if optional:
            return None
        raise NeoError(f"{where}: '{key}' must not be null.")

    def bad(expected: str) -> NeoError:
        return NeoError(f"{where}: '{key}' must be {expected}, got {json.dumps(value)}.")

    if hint is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise bad("true or false")
    if hint is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if origin is tuple:
        (elem,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_coerce(f"{key}[{i}]", v, elem, where) for i, v in enumerate(value))
    raise AssertionError(f"no coercion for {key}: {hint}")  # a bug in neo, not the user's


def to_json_dict(cfg: ModelConfig) -> dict:
    """The config as the JSON a user would write (datasets back to their entry form)."""
    out = {}
    defaults = ModelConfig(n_embd=1, n_head=1, n_layer=1, n_ctx=1, n_vocab=1, attention_types=("global",))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "source":
            continue
        if f.name == "attention_types":
            out[f.name] = [[list(v), 1]] if len(set(v)) > 1 else [[[v[0]], len(v)]]
            continue
        if f.name == "datasets":
            out[f.name] = [[e.id, e.stitch, e.sampling_mode, e.weight] for e in v]
            continue
        if f.name not in ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab") and v == getattr(defaults, f.name):
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
