"""GPT-Neo's flat JSON config -> a checked `Config` of sections (neo/config/sections.py).

Every key of the original GPT-Neo model config is accepted with its original meaning
(reference: docs/configs.md). Where the original had no usable default (it read absent keys as
None and crashed later) neo picks the value the shipped configs use and documents it. This
module reads: unknown keys, wrong JSON types and malformed entries are reported here; what the
values mean is checked by neo/config/validate.py, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional

from neo.config.sections import (
    ATTENTION_KINDS, KEY_SECTION, SAMPLING_MODE_ALIASES, SAMPLING_MODES, SECTIONS, Config, Curriculum,
    DatasetConfig, DatasetEntry, MoEParams,
)
from neo.config.neox import is_neox_model, load_neox
from neo.config.validate import validate
from neo.errors import NeoError, did_you_mean

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG_DIR = ROOT / "configs"
REQUIRED = ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab", "attention_types")

# Keys the original main.py wrote into its params dict at run time (from flags, mesh_shape and
# the dataset configs). They are not settings: in neo each is a flag or follows from other keys,
# so a config holding one is refused with where the value comes from (none is ever ignored).
RUNTIME_KEYS = {
    "num_cores": "the device count, which follows from mesh_shape",
    "auto_layout": "the --auto_layout flag", "auto_layout_and_mesh_shape": "the --auto_layout_and_mesh_shape flag",
    "use_tpu": "the --tpu flag", "gpu_ids": "the --gpu_ids flag",
    "steps_per_checkpoint": "the --steps_per_checkpoint flag", "predict": "the --predict flag",
    "export": "the --export flag", "sampling_use_entmax": "the --entmax_sampling flag",
    "slow_sampling": "set for MoE models; neo samples every model with a KV cache",
    "mode": "train/eval/predict, chosen by the flags", "num_microbatches": "tokens_per_mb_per_replica",
    "causal": "the opposite of mlm_training", "dataset_configs": "the files the datasets entries name",
    "attention_layers": "attention_types (expanded)",
}
# mesh-tf MoE hyperparameters its v1 layer (GPT-Neo's and neo's) never reads: refused, not ignored.
MOE_UNUSED = frozenset({"moe_capacity_factor_second_level", "moe_use_experts_attention"})
# A dataset config naming GPT-2's tokenizer without ids gets GPT-Neo's GPT-2 ids (its pile.json's):
# the original's defaults (eos 1, padding 0) would stitch GPT-2 documents with '"' (id 1).
GPT2_IDS = {"eos_id": 50256, "padding_id": 50257}


# ----------------------------------------------------------------------------------------------
# Finding and reading files


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
    """`--model NAME` -> configs/NAME.json; a path ending in .json (or an existing file) as is.
    (GPT-NeoX's .yml files are load_model_config's other branch.)"""
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


def load_model_config(model: str, overrides: Optional[dict] = None) -> Config:
    """Load, check and freeze a model config (and the dataset configs it names): neo's JSON, or
    GPT-NeoX YAML files `a.yml,b.yml` (neo/config/neox.py), whose notes the Config carries."""
    if is_neox_model(model):
        raw, notes, source = load_neox(model)
        raw.update(overrides or {})
        if "n_vocab" not in raw:
            raise NeoError(f"--model {model}: no vocabulary: add a YAML file with vocab_file (e.g. "
                           f"configs/neox/tinyshakespeare.yml, the GPT-NeoX-20B tokenizer) or set neo's n_vocab.")
        return dataclasses.replace(parse_model_config(raw, source=source), notes=notes)
    path = find_model_config(model)
    raw = _read_json(path)
    if overrides:
        raw.update(overrides)
    return parse_model_config(raw, source=str(path))


def _read_json(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise NeoError(f"cannot read config {path}: {e.strerror}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NeoError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None


# ----------------------------------------------------------------------------------------------
# Flat JSON -> sections


def parse_model_config(raw: dict, source: str = "<dict>") -> Config:
    """Turn a JSON dict into a checked Config. Errors name the key and `source`."""
    if not isinstance(raw, dict):
        raise NeoError(f"{source}: a model config must be a JSON object, got {type(raw).__name__}.")
    where = source
    raw = _apply_aliases(dict(raw), where)
    for key in raw:
        if key in RUNTIME_KEYS:
            raise NeoError(f"{where}: '{key}' is not a config key: GPT-Neo's main.py wrote it into its params at "
                           f"run time; in neo it is {RUNTIME_KEYS[key]}. Remove it.")
    family = raw.pop("model", "GPT")  # GPT-Neo's model family; checked with the values
    settable = set(KEY_SECTION) | {"model"}
    for key in raw:
        if key not in settable:
            hint = did_you_mean(key, sorted(settable | {"activation_function"}))
            raise NeoError(f"{where}: unknown key '{key}'.{hint} (docs/configs.md lists every key.)")
    for key in REQUIRED:
        if key not in raw:
            raise NeoError(f"{where}: required key '{key}' is missing.")

    base = _config_dir(source)
    values = {key: _read_value(key, value, where, base, raw) for key, value in raw.items()}
    datasets = values.setdefault("datasets", ())
    if datasets:  # GPT-Neo copies the special ids from the last dataset, the tokenizer from the first
        values.setdefault("eos_id", datasets[-1].config.eos_id)
        values.setdefault("padding_id", datasets[-1].config.padding_id)
        if datasets[0].config.tokenizer_path is not None:
            values.setdefault("tokenizer_path", datasets[0].config.tokenizer_path)
    grouped: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        grouped[KEY_SECTION[key]][key] = value
    cfg = Config(**{name: SECTIONS[name](**kw) for name, kw in grouped.items()}, source=source)
    return validate(cfg, family)


def replace_keys(cfg: Config, changes: dict) -> Config:
    """`Config.replace`: flat keys with typed (or JSON-form) values, read and checked as at load."""
    where, base = cfg.source or "<config>", _config_dir(cfg.source)
    context = {"n_vocab": cfg.model.n_vocab, "eos_id": cfg.data.eos_id, "padding_id": cfg.data.padding_id,
               "tokenizer_path": cfg.data.tokenizer_path, **changes}
    grouped: dict[str, dict] = {}
    for key, value in changes.items():
        if key not in KEY_SECTION:
            raise NeoError(f"{where}: unknown key '{key}'.{did_you_mean(key, sorted(KEY_SECTION))} "
                           f"(docs/configs.md lists every key.)")
        grouped.setdefault(KEY_SECTION[key], {})[key] = _read_value(key, value, where, base, context)
    sections = {name: dataclasses.replace(getattr(cfg, name), **kw) for name, kw in grouped.items()}
    return validate(dataclasses.replace(cfg, **sections))


def _config_dir(source: str) -> Path:
    """Where a config's relative dataset ids are looked up: beside its file."""
    return Path(source).parent if source and not source.startswith("<") else Path.cwd()


def _apply_aliases(raw: dict, where: str) -> dict:
    """The README's and the shipped configs' other spellings of a key."""
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
    return raw


def _read_value(key: str, value: Any, where: str, base: Path, raw: dict) -> Any:
    """One key's JSON value (or an already typed one, from `replace`) as its section's type.
    `raw`: the config's other keys (the README's inline datasets entries take n_vocab and the
    special ids from them)."""
    if key == "attention_types":
        return expand_attention_types(value, where)
    if key == "datasets":
        if isinstance(value, tuple) and all(isinstance(e, DatasetEntry) for e in value):
            return value
        return _resolve_datasets(value, where, base, raw)
    if key == "moe_params":
        return value if isinstance(value, MoEParams) else parse_moe_params(value, where)
    if key == "scan_layers":  # "auto" (or null), true, false
        if value in ("auto", None) or isinstance(value, bool):
            return None if value == "auto" else value
        raise NeoError(f"{where}: 'scan_layers' must be \"auto\", true or false, got {json.dumps(value)}.")
    if key == "scan_unroll":  # "auto" (or null), "full" (or true), or groups per loop iteration
        if value in ("auto", None):
            return None
        if value == "full" or value is True:
            return "full"
        if isinstance(value, float) and value.is_integer():  # JSON's 2.0, as other integer keys take it
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise NeoError(f"{where}: 'scan_unroll' must be \"auto\", \"full\" or a whole number of layer "
                       f"groups >= 1, got {json.dumps(value)}.")
    if key == "curriculum_learning" and value is not None:
        return value if isinstance(value, Curriculum) else parse_curriculum(value, where)
    return _coerce(key, value, _hints(SECTIONS[KEY_SECTION[key]])[key], where)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def expand_attention_types(value: Any, where: str = "<config>") -> tuple[str, ...]:
    """`[[["global","local"], 12]]` -> ("global", "local", ...). A flat list of kinds is accepted too
    (Hugging Face's `attention_layers` form)."""
    example = 'e.g. [[["global", "local"], 6]]'
    if not isinstance(value, (list, tuple)) or not value:
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


def parse_moe_params(value: Any, where: str) -> MoEParams:
    """`moe_params` {key: value} over mesh-tf's defaults; keys may drop the `moe_` prefix.
    Unknown keys and wrong types are errors here, the values' meaning is checked in validate."""
    if not isinstance(value, dict):
        raise NeoError(f"{where}: 'moe_params' must be an object like {{\"moe_dropout_rate\": 0.0}}.")
    defaults = MoEParams()
    known = [f.name for f in dataclasses.fields(MoEParams)]
    values: dict[str, Any] = {}
    for key, v in value.items():
        name = key if key.startswith("moe_") else "moe_" + key
        if name in MOE_UNUSED:
            raise NeoError(f"{where}: moe_params {key!r} is a mesh-tf setting its v1 MoE layer (GPT-Neo's, and "
                           f"neo's) never reads; remove it.")
        if name not in known:
            raise NeoError(f"{where}: unknown moe_params key {key!r}.{did_you_mean(name, known)} "
                           f"Known: {', '.join(known)}.")
        kind = type(getattr(defaults, name))
        if kind is bool:
            ok = isinstance(v, bool) or v in (0, 1)
        elif kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, kind) and not isinstance(v, bool)
        if not ok:
            raise NeoError(f"{where}: moe_params {key!r} must be a {kind.__name__}, got {v!r}.")
        values[name] = kind(v)
    return MoEParams(**values)


def parse_curriculum(value: Any, where: str) -> Curriculum:
    """GPT-NeoX's (DeepSpeed's) `curriculum_learning` object: `enabled`, `curriculum_type`,
    `min_difficulty`, `max_difficulty`, `schedule_type` and `schedule_config` {`total_curriculum_step`,
    `difficulty_step`, `root_degree`}. Unknown keys and wrong types are errors here; what the
    values mean is checked in validate (they need n_ctx)."""
    where = f"{where}: curriculum_learning"
    if not isinstance(value, dict):
        raise NeoError(f"{where} must be an object like {{\"min_difficulty\": 64, \"schedule_config\": "
                       f"{{\"total_curriculum_step\": 1000, \"difficulty_step\": 8}}}}.")
    value = dict(value)
    schedule = value.pop("schedule_config", {})
    if not isinstance(schedule, dict):
        raise NeoError(f"{where} 'schedule_config' must be an object with total_curriculum_step, difficulty_step.")
    top = [f.name for f in dataclasses.fields(Curriculum) if f.name not in Curriculum.SCHEDULE_KEYS]
    fields: dict[str, Any] = {}
    for keys, given, name in ((top + ["schedule_config"], value, ""), (Curriculum.SCHEDULE_KEYS, schedule,
                                                                       "schedule_config ")):
        for key, v in given.items():
            if key not in keys:
                raise NeoError(f"{where}: unknown {name}key {key!r}.{did_you_mean(key, list(keys))} "
                               f"Known: {', '.join(keys)}.")
            fields[key] = _coerce(f"curriculum_learning {key}", v, _hints(Curriculum)[key], where.split(":")[0])
    for key in ("min_difficulty", "total_curriculum_step"):
        if key not in fields:
            raise NeoError(f"{where}: '{key}' is required (schedule_config holds total_curriculum_step).")
    return Curriculum(**fields)


def _resolve_datasets(entries: Any, where: str, base: Path, raw: dict) -> tuple[DatasetEntry, ...]:
    """`datasets` entries: `[id, stitch, sampling_mode, weight]` (GPT-Neo's code; a plain id
    string too) or the README's `[train_glob, eval_glob, stitch, sampling_mode, weight]`."""
    form = "[id, stitch, sampling_mode, weight] or [train_glob, eval_glob, stitch, sampling_mode, weight]"
    if not isinstance(entries, (list, tuple)):
        raise NeoError(f"{where}: 'datasets' must be a list of {form} entries.")
    out = []
    for item in entries:
        if isinstance(item, str):
            item = [item, None, None, None]
        if not isinstance(item, (list, tuple)) or not 1 <= len(item) <= 5 or not isinstance(item[0], str):
            raise NeoError(f"{where}: datasets entry {json.dumps(item)} must be {form} (or a plain id string).")
        inline = len(item) == 5
        if inline:
            train, evals, stitch, mode, weight = item
            if not isinstance(evals, (str, type(None))):
                raise NeoError(f"{where}: datasets entry {json.dumps(item)}: the eval glob (2nd) must be a string.")
        else:
            train, stitch, mode, weight = (list(item) + [None] * 4)[:4]
        mode = SAMPLING_MODE_ALIASES.get(mode, mode)
        if stitch is not None and (not isinstance(stitch, int) or isinstance(stitch, bool)):
            raise NeoError(f"{where}: dataset '{train}': stitch must be an integer or null, got {stitch!r}.")
        if mode is not None and mode not in SAMPLING_MODES:
            known = SAMPLING_MODES + tuple(SAMPLING_MODE_ALIASES)
            raise NeoError(f"{where}: dataset '{train}': sampling mode {mode!r} is not one of "
                           f"{', '.join(known)}.{did_you_mean(str(mode), known)}")
        if weight is not None and (not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0):
            raise NeoError(f"{where}: dataset '{train}': weight must be a positive number, got {weight!r}.")
        config = (_inline_dataset(train, evals or "", base, raw, where) if inline
                  else load_dataset_config(train, base, where))
        out.append(DatasetEntry(train, stitch, mode, None if weight is None else float(weight), config, inline))
    return tuple(out)


def _inline_dataset(train: str, evals: str, base: Path, raw: dict, where: str) -> DatasetConfig:
    """The README's entry names its files itself: the data is taken to be in the model's
    vocabulary, with the model config's eos_id / padding_id (GPT-Neo's defaults 1 / 0 without
    them) and its tokenizer_path."""
    if "n_vocab" not in raw:
        raise NeoError(f"{where}: required key 'n_vocab' is missing.")
    ids = {k: _coerce(k, raw[k], int, where) for k in ("eos_id", "padding_id") if raw.get(k) is not None}
    tokenizer = raw.get("tokenizer_path")
    return DatasetConfig(id=train, n_vocab=_coerce("n_vocab", raw["n_vocab"], int, where), path=train,
                         eval_path=evals, tokenizer_path=tokenizer if isinstance(tokenizer, str) else None,
                         source=str(base), **ids)


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
    if raw.get("tokenizer_path") == "gpt2":
        raw = {**GPT2_IDS, **raw}
    for key in raw:
        if key not in fields:
            raise NeoError(f"{path}: unknown dataset key '{key}'.{did_you_mean(key, sorted(fields))}")
    if "n_vocab" not in raw:
        raise NeoError(f"{path}: required key 'n_vocab' is missing (the vocabulary size the data was encoded with).")
    values = {k: _coerce(k, v, _hints(DatasetConfig)[k], str(path)) for k, v in raw.items()}
    return DatasetConfig(id=ds_id, source=str(path.parent), **values)


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
        if isinstance(value, str):  # GPT-Neo's released config.json files write "ada_epsilon1": "1e-30"
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if origin is tuple:
        (elem,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return tuple(_coerce(f"{key}[{i}]", v, elem, where) for i, v in enumerate(value))
    raise AssertionError(f"no coercion for {key}: {hint}")  # a bug in neo, not the user's


# ----------------------------------------------------------------------------------------------
# Sections -> flat JSON


def to_json_dict(cfg: Config) -> dict:
    """The config as the flat JSON a user would write: GPT-Neo's keys, defaults left out
    (the architecture's required keys always in), datasets back to their entry form."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if f.name == "attention_types":
                out[f.name] = [[list(v), 1]] if len(set(v)) > 1 else [[[v[0]], len(v)]]
            elif f.name == "datasets":
                out[f.name] = [[e.config.path, e.config.eval_path, e.stitch, e.sampling_mode, e.weight] if e.inline
                               else [e.id, e.stitch, e.sampling_mode, e.weight] for e in v]
            elif f.name not in REQUIRED and v == _default(f):
                continue
            elif f.name == "curriculum_learning":
                out[f.name] = curriculum_json(v)
            elif f.name == "moe_params":
                defaults = MoEParams()
                out[f.name] = {k: x for k, x in dataclasses.asdict(v).items() if x != getattr(defaults, k)}
            else:
                out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def curriculum_json(c: Curriculum) -> dict:
    """A Curriculum in GPT-NeoX's nested form (what parse_curriculum reads)."""
    flat = {k: v for k, v in dataclasses.asdict(c).items() if v is not None}
    return {**{k: v for k, v in flat.items() if k not in Curriculum.SCHEDULE_KEYS},
            "schedule_config": {k: v for k, v in flat.items() if k in Curriculum.SCHEDULE_KEYS}}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING

