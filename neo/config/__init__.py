"""GPT-Neo JSON configs -> frozen, typed, checked sections.

    cfg = load_model_config("gpt_neo_125M")       # configs/gpt_neo_125M.json, checked
    GPT(cfg.model)                                # the network sees the architecture only
    make_optimizer(cfg.optimizer, cfg.run.train_steps)

sections.py: the sections and what each holds; load.py: reading GPT-Neo's flat JSON (and
writing it back); neox.py: GPT-NeoX's YAML configs as neo's keys; validate.py: every check of the
values, run at load time.
"""

from neo.config.load import (
    CONFIG_DIR, ROOT, RUNTIME_KEYS, dataset_config_dirs, expand_attention_types, find_model_config,
    load_dataset_config, load_model_config, parse_model_config, resolve_path, to_json_dict,
)
from neo.config.sections import (
    ACTIVATION_FNS, ATTENTION_KINDS, KEY_SECTION, SAMPLING_MODES, SECTIONS, Config, DataConfig, DatasetConfig,
    DatasetEntry, ModelConfig, MoEParams, OptimizerConfig, RunConfig, SamplingConfig, neox_intermediate_size,
)
from neo.config.validate import validate

__all__ = [
    "ACTIVATION_FNS", "ATTENTION_KINDS", "CONFIG_DIR", "KEY_SECTION", "ROOT", "RUNTIME_KEYS", "SAMPLING_MODES",
    "SECTIONS", "Config", "DataConfig", "DatasetConfig", "DatasetEntry", "ModelConfig", "MoEParams",
    "OptimizerConfig", "RunConfig", "SamplingConfig", "dataset_config_dirs", "expand_attention_types",
    "find_model_config", "load_dataset_config", "load_model_config", "neox_intermediate_size", "parse_model_config", "resolve_path",
    "to_json_dict", "validate",
]
