"""GPT-NeoX's YAML configs -> neo's flat config keys: `--model a.yml,b.yml` (docs/convert.md).

GPT-NeoX (megatron/neox_arguments/arguments.py) reads its YAML files in command-line order with
PyYAML's FullLoader (so `True`, `#` comments and trailing commas parse), turns every dash in a key
into an underscore, and refuses a key that two files both set: the files are pieces of one config,
not layers of overrides. neo merges the same way, and refuses a key repeated inside one file too
(PyYAML would keep the last silently).

Then every GPT-NeoX key is either
- mapped onto neo's key with the same meaning (num_layers -> n_layer, gpt_j_residual ->
  parallel_residual, optimizer.params.lr -> lr, warmup (a fraction) -> warmup_steps, ...);
- passed on under its own name where neo's key has GPT-NeoX's name (pos_emb other than rotary or
  learned, norm other than layernorm, gated activations, num_kv_heads, use_bias_in_* false, ...):
  if this neo does not have that key, the load stops naming it;
- listed as irrelevant to neo (DeepSpeed/ZeRO and launcher knobs, kernel fusion flags, activation
  checkpointing details) or as not applied (with what neo does instead) in the notes the command
  line prints at startup;
- or refused by name with the fix (Megatron .bin/.idx data paths, optimizers neo lacks, ...).
An unknown key is refused with the nearest GPT-NeoX or neo key. A YAML file may also set neo's own
keys (e.g. `datasets`), which pass unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from neo.config.sections import GATED_ACTIVATIONS, KEY_SECTION, neox_intermediate_size
from neo.errors import NeoError, did_you_mean

YAML_SUFFIXES = (".yml", ".yaml")

# GPT-NeoX key -> neo key, same meaning and unit.
RENAMED = {
    "num_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head", "seq_length": "n_ctx",
    "rotary_pct": "rotary_pct", "rotary_emb_base": "rotary_emb_base", "no_weight_tying": "no_weight_tie",
    "gpt_j_residual": "parallel_residual", "layernorm_epsilon": "layer_norm_epsilon",
    "intermediate_size": "intermediate_size", "attention_dropout": "attn_dropout",
    "checkpoint_activations": "recompute_grad", "train_iters": "train_steps", "lr_decay_iters": "lr_decay_end",
    "weight_decay": "weight_decay", "gradient_clipping": "gradient_clipping", "seed": "seed",
    "train_batch_size": "train_batch_size", "save": "model_path", "keep_last_n_checkpoints": "keep_checkpoints",
    "log_interval": "iterations", "log_grad_norm": "log_grads", "wandb_project": "wandb_project",
    "temperature": "temperature", "maximum_tokens": "predict_max_steps", "num_samples": "predict_batch_size",
    "sample_input_file": "prompt_path",
}

# GPT-NeoX keys whose neo key has the same name (docs/configs.md), given on only where the value
# is not what neo does without them.
PASSED_ON = ("pos_emb", "norm", "activation", "num_kv_heads", "use_bias_in_norms", "use_bias_in_attn_linear",
             "use_bias_in_mlp", "mlp_multiple_of", "sliding_window_width", "rms_norm_epsilon",
             "scalenorm_epsilon", "expansion_factor", "curriculum_learning")

# Keys that mean nothing to a JAX trainer: why, for the startup notes.
IRRELEVANT = {
    **dict.fromkeys(("zero_optimization", "fp32_allreduce", "comms_logger", "steps_per_print", "wall_clock_breakdown",
                     "deepspeed_extra_args", "autotuning", "launcher", "hostfile", "distributed_backend",
                     "num_workers", "data_impl", "checkpoint_validation_with_forward_pass", "memory_profiling",
                     "deepspeed_activation_checkpointing", "contiguous_checkpointing", "zero_allow_untested_optimizer"),
                    "DeepSpeed/launcher setting"),
    **dict.fromkeys(("pipe_parallel_size", "model_parallel_size", "output_layer_parallelism"),
                    "parallelism is neo's mesh_shape/layout (model_parallel_size still pads the vocabulary)"),
    **dict.fromkeys(("checkpoint_num_layers", "partition_activations", "synchronize_each_layer"),
                    "activation checkpointing detail (neo: recompute_grad, from checkpoint_activations)"),
    **dict.fromkeys(("scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion",
                     "bias_dropout_fusion", "rope_fusion", "layernorm_fusion", "rmsnorm_fusion",
                     "use_flashattn_swiglu"), "kernel fusion flag (XLA fuses)"),
    **dict.fromkeys(("tensorboard_dir", "log_dir", "use_wandb", "wandb_host", "wandb_team", "wandb_group"),
                    "neo logs under model_path (and to W&B when wandb_project is set)"),
    "recompute": "generation always uses the KV cache in neo",
}

# Keys neo takes but does not apply as GPT-NeoX does: what neo does instead, for the notes.
NOT_APPLIED = {
    "init_method": "neo initialises as GPT-Neo: N(0, 0.02), output layers scaled by depth only with scale_by_depth",
    "output_layer_init_method": "neo initialises as GPT-Neo (see init_method)",
    "init_method_std": "neo initialises as GPT-Neo (see init_method)",
    "checkpoint_factor": "neo saves every --steps_per_checkpoint steps",
    "extra_save_iters": "neo saves every --steps_per_checkpoint steps",
    "eval_interval": "neo validates every `iterations` (log_interval) steps when eval_steps > 0",
    "eval_iters": "neo's eval_steps: set it with --set eval_steps=N",
    "split": "neo's validation data is the dataset config's eval_path or holdout",
}

# Keys refused whatever their value: the fix.
REFUSED = {
    **dict.fromkeys(("data_path", "train_data_paths", "valid_data_paths", "test_data_paths", "train_data_weights",
                     "valid_data_weights", "test_data_weights", "label_data_paths", "weight_by_num_documents"),
                    "neo reads tfrecords or text named by a dataset config, not Megatron .bin/.idx files; "
                    "remove it and name a dataset with neo's 'datasets' key (docs/data.md)"),
    "text_gen_type": "use python main.py --predict (docs/predict.md)",
    "sample_output_file": "neo writes predictions under model_path (docs/predict.md)",
    "prompt_end": "neo reads a whole prompt file (docs/predict.md)",
}

NEOX_KEYS = sorted(set(RENAMED) | set(PASSED_ON) | set(IRRELEVANT) | set(NOT_APPLIED) | set(REFUSED) | {
    "max_position_embeddings", "mlp_type", "gpt_j_tied", "attention_config", "bias_gelu_fusion", "onnx_safe",
    "make_vocab_size_divisible_by", "vocab_file", "merge_file", "tokenizer_type", "optimizer", "lr", "min_lr",
    "lr_decay_style", "warmup", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gas",
    "fp16", "bf16", "precision", "hidden_dropout", "load", "finetune", "override_lr_scheduler", "top_k", "top_p"})
# GPT-NeoX's defaults (neox_args.py, deepspeed_args.py) where neo's differ.
NEOX_DEFAULTS = {"weight_decay": 0.1, "gradient_clipping": 1.0, "seed": 1234}
GATED = ("geglu", "reglu", "swiglu", "bilinear", "glu")
PLAIN_ACTIVATIONS = ("relu", "softsign", "swish", "mish", "silu")


def is_neox_model(model: str) -> bool:
    """`--model` names GPT-NeoX YAML files (one, or several joined by commas)."""
    return bool(model) and all(part.strip().lower().endswith(YAML_SUFFIXES) for part in model.split(","))


def load_neox(model: str) -> tuple[dict, tuple[str, ...], str]:
    """`a.yml,b.yml` -> (neo's flat keys, the startup notes, the first file as the config's source)."""
    paths = [Path(p.strip()) for p in model.split(",")]
    merged: dict[str, tuple[Any, Path]] = {}
    for path in paths:
        for key, value in read_yaml(path).items():
            name = str(key).replace("-", "_")
            if name in merged:
                raise NeoError(f"{path}: '{key}' is already set by {merged[name][1]}; GPT-NeoX refuses a key "
                               f"given in two of its YAML files: keep it in one of them.")
            merged[name] = (value, path)
    raw, notes = to_neo_keys({k: v for k, (v, _) in merged.items()}, {k: p for k, (_, p) in merged.items()})
    return raw, tuple(notes), str(paths[0])


def read_yaml(path: Path) -> dict:
    """One GPT-NeoX YAML file as a dict (PyYAML FullLoader, as GPT-NeoX reads it)."""
    import yaml

    class Loader(yaml.FullLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = str(self.construct_object(key_node, deep=deep)).replace("-", "_")
                if key in seen:
                    raise NeoError(f"{path}: '{key}' is set twice (lines {seen[key]} and "
                                   f"{key_node.start_mark.line + 1}); keep one.")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    try:
        text = path.read_text()
    except OSError as e:
        raise NeoError(f"--model {path}: cannot read it: {e.strerror}.") from None
    try:
        data = yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise NeoError(f"{path}: not valid YAML: {str(e).splitlines()[0]} {getattr(e, 'problem_mark', '') or ''}".strip()
                       + ".") from None
    if not isinstance(data, dict):
        raise NeoError(f"{path}: a GPT-NeoX config must be a mapping of keys to values.")
    return data


def to_neo_keys(neox: dict, where: dict) -> tuple[dict, list[str]]:
    """GPT-NeoX keys (underscored) -> neo's keys and the notes (module docstring)."""
    m = _Mapping(dict(neox), where)
    m.model()
    m.vocabulary()
    m.optimizer()
    m.training()
    for key, value in NEOX_DEFAULTS.items():
        if key not in m.neox and RENAMED[key] not in m.out:
            m.neox[key] = value
    for key in list(m.neox):
        m.take(key)
    m.out.setdefault("z_loss", 0.0)  # GPT-NeoX's loss is plain cross-entropy
    m.notes += [f"ignored ({why}): {', '.join(keys)}" for why, keys in m.ignored.items()]
    return m.out, m.notes


class _Mapping:
    """The state of one conversion: the keys left, neo's keys made, the notes."""

    def __init__(self, neox: dict, where: dict):
        self.neox, self.where, self.out, self.notes = neox, where, {}, []
        self.ignored: dict[str, list[str]] = {}  # why -> the keys
        self.first = next(iter(where.values()), "<neox>")  # where a key's default came from

    def pop(self, key: str, default: Any = None) -> Any:
        return self.neox.pop(key, default)

    def has(self, key: str) -> bool:
        return key in self.neox

    def refuse(self, key: str, why: str) -> NeoError:
        return NeoError(f"{self.where.get(key, self.first)}: GPT-NeoX key '{key}': {why}.")

    def pass_on(self, key: str, value: Any) -> None:
        if key not in KEY_SECTION:
            raise self.refuse(key, f"{value!r} needs neo's '{key}' config key, which this neo does not have "
                                   f"(docs/convert.md lists the GPT-NeoX keys neo takes)")
        self.out[key] = value

    def take(self, key: str) -> None:
        """A key no section below consumed: renamed, passed on, listed, refused or unknown."""
        value = self.pop(key)
        target = RENAMED.get(key, key if key in KEY_SECTION and key not in PASSED_ON else None)
        if target in self.out:
            raise NeoError(f"{self.where.get(key, self.first)}: '{key}' sets neo's '{target}', which other keys "
                           f"of these files set too; keep one.")
        if key in RENAMED:
            self.out[RENAMED[key]] = value
        elif key in PASSED_ON:
            self.pass_on(key, value)
        elif key in IRRELEVANT:
            self.ignored.setdefault(IRRELEVANT[key], []).append(key)
        elif key in NOT_APPLIED:
            self.notes.append(f"not applied '{key}' ({value!r}): {NOT_APPLIED[key]}")
        elif key in REFUSED:
            raise self.refuse(key, REFUSED[key])
        elif key in KEY_SECTION or key in ("model",):
            self.out[key] = value  # one of neo's own keys
        else:
            hint = did_you_mean(key, NEOX_KEYS + sorted(KEY_SECTION))
            raise NeoError(f"{self.where.get(key, self.first)}: unknown key '{key}'.{hint} (docs/convert.md "
                           f"lists the GPT-NeoX keys neo takes, docs/configs.md neo's own.)")

    # --- the architecture

    def model(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if not isinstance(self.neox.get(key), int) or isinstance(self.neox.get(key), bool):
                raise self.refuse(key, f"is required, a positive integer (got {self.neox.get(key)!r})")
        seq = self.neox.get("seq_length")
        max_pos = self.pop("max_position_embeddings")
        pos_emb = str(self.pop("pos_emb", "learned")).lower()
        if max_pos is not None and seq is not None and max_pos < seq:
            raise self.refuse("max_position_embeddings", f"{max_pos} is below seq_length {seq}")
        if pos_emb == "rotary":
            self.out["rotary_emb"] = True
        elif pos_emb == "learned":
            if max_pos is not None and seq is not None and max_pos != seq:
                raise self.refuse("max_position_embeddings", f"{max_pos}: neo's learned position table has "
                                                             f"seq_length ({seq}) rows; make them equal")
        else:
            self.pass_on("pos_emb", pos_emb)
        norm = str(self.pop("norm", "layernorm")).lower()
        if norm != "layernorm":
            self.pass_on("norm", norm)
        for key, kind in (("rms_norm_epsilon", "rmsnorm"), ("scalenorm_epsilon", "scalenorm")):
            if self.has(key) and norm != kind:
                self.notes.append(f"ignored '{key}': norm is {norm}")
                self.pop(key)
        self.activation()
        mlp_type = self.pop("mlp_type", "regular")
        if mlp_type != "regular":
            raise self.refuse("mlp_type", f"{mlp_type!r} is GPT-NeoX's old Llama dialect; write it as "
                                          f"activation: swiglu with intermediate_size and mlp_multiple_of "
                                          f"(GPT-NeoX's configs/llama2/7B.yml)")
        if self.pop("gpt_j_tied", False):
            raise self.refuse("gpt_j_tied", "true (one layer norm shared by attention and MLP) is not "
                                            "built by neo; Pythia and NeoX-20B use gpt_j_residual with two")
        for key in ("use_bias_in_norms", "use_bias_in_attn_linear", "use_bias_in_mlp"):
            if self.pop(key, True) is False:
                self.pass_on(key, False)
            elif key == "use_bias_in_attn_linear":
                self.out["qkv_bias"] = True  # GPT-NeoX's QKV has biases; GPT-Neo's had none
        for key, neutral in (("num_kv_heads", self.neox.get("num_attention_heads")), ("mlp_multiple_of", 1)):
            value = self.pop(key)
            if value is not None and value != neutral:
                self.pass_on(key, value)
        self.out["attention_types"] = self.attention_types()
        window = self.pop("sliding_window_width")
        if window is not None:  # Mistral: every layer attends to the last w + 1 positions (itself included)
            if not isinstance(window, int) or isinstance(window, bool) or window < 1:
                raise self.refuse("sliding_window_width", f"{window!r} must be a positive integer")
            self.out["attention_types"] = [[["local"] * len(kinds), n] for kinds, n in self.out["attention_types"]]
            self.out["local_attention_radius"] = window + 1
        self.out["scale_attention"] = True  # GPT-NeoX scales scores by 1/sqrt(head dim)

    def activation(self) -> None:
        act = str(self.pop("activation", "gelu")).lower()
        fused, onnx = self.pop("bias_gelu_fusion", False), self.pop("onnx_safe", False)
        factor = self.pop("expansion_factor")
        if act == "gelu":  # GPT-NeoX's fused bias-GELU is the tanh form, F.gelu the erf one (activations.py)
            self.out["activation_fn"] = "gelu_tanh" if fused and not onnx else "gelu_exact"
        elif act in PLAIN_ACTIVATIONS:
            self.out["activation_fn"] = act
        elif act in GATED_ACTIVATIONS:  # neo's gated MLP; GPT-NeoX's intermediate_size counts differently
            self.out["activation_fn"] = act
            size, multiple = self.pop("intermediate_size"), self.neox.get("mlp_multiple_of") or 1
            self.out["intermediate_size"] = neox_intermediate_size(size, self.neox["hidden_size"], True, multiple)
        else:
            self.pass_on("activation", act)
        if factor is not None:
            if act in GATED:
                self.pass_on("expansion_factor", factor)
            elif "intermediate_size" not in self.neox:
                self.out["intermediate_size"] = int(factor * self.neox["hidden_size"])

    def attention_types(self) -> list:
        """attention_config [[kinds], repeat] with GPT-NeoX's kernel names ("flash") as neo's kind."""
        layers = self.neox.get("num_layers")
        config = self.pop("attention_config", [[["global"], layers]])
        out = []
        for item in config if isinstance(config, list) else [config]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)):
                raise self.refuse("attention_config", f"entry {item!r} is not [[kinds...], repeat]")
            kinds = []
            for kind in item[0]:
                if kind not in ("global", "flash"):
                    raise self.refuse("attention_config", f"kind {kind!r}: neo builds GPT-NeoX's 'global' and "
                                                          f"'flash' (the same attention, one kernel) only")
                kinds.append("global")
            out.append([kinds, item[1]])
        if any("flash" in item[0] for item in config if isinstance(item, list) and isinstance(item[0], list)):
            self.notes.append("attention_config 'flash' -> neo's 'global' (the kernel is XLA's or Pallas' choice)")
        return out

    # --- the vocabulary and tokenizer

    def vocabulary(self) -> None:
        """vocab_file + tokenizer_type -> tokenizer_path, eos/padding ids and n_vocab padded to a
        multiple of make_vocab_size_divisible_by x model_parallel_size (GPT-NeoX's tokenizer.py)."""
        from neo.config.load import resolve_path

        kind = self.pop("tokenizer_type", "GPT2BPETokenizer")
        vocab_file, merge_file = self.pop("vocab_file"), self.pop("merge_file")
        divisible = self.pop("make_vocab_size_divisible_by", 128)
        parallel = self.neox.get("model_parallel_size", 1)
        if vocab_file is None:
            if merge_file is not None:
                raise self.refuse("merge_file", "is set without vocab_file")
            return
        base = self.where.get("vocab_file", Path(".")).parent
        if kind == "HFTokenizer":
            if merge_file is not None:
                raise self.refuse("merge_file", "HFTokenizer reads one tokenizers JSON file (vocab_file)")
            path = resolve_path(vocab_file, base)
            files = (path,)
        elif kind == "GPT2BPETokenizer":
            files = self.gpt2_files(vocab_file, merge_file, base)
            path = str(Path(files[0]).parent)  # neo's tokenizer_path: the folder (neo/data/tokenizer.py)
        else:
            raise self.refuse("tokenizer_type", f"{kind!r}: neo reads HFTokenizer (a tokenizers JSON file) and "
                                                f"GPT2BPETokenizer files; save the tokenizer as tokenizer.json")
        tokenizer = self.read_tokenizer(files)
        size = tokenizer.get_vocab_size(with_added_tokens=True)  # GPT-NeoX's HFTokenizer.vocab_size
        multiple = divisible * parallel
        self.out["n_vocab"] = multiple * math.ceil(size / multiple)
        self.out["tokenizer_path"] = path
        eod = tokenizer.token_to_id("<|endoftext|>")
        if eod is None:
            raise self.refuse("vocab_file", f"{vocab_file} has no <|endoftext|> token (GPT-NeoX's end of document)")
        pad = tokenizer.token_to_id("<|padding|>")
        self.out["eos_id"], self.out["padding_id"] = eod, eod if pad is None else pad
        self.notes.append(f"vocabulary: {size:,} tokens in {vocab_file}, padded to {self.out['n_vocab']:,} "
                          f"(a multiple of {divisible} x model_parallel_size {parallel})")

    def read_tokenizer(self, files: tuple[str, ...]):
        """The `tokenizers` object of a tokenizers JSON file, or of GPT-2's vocab + merges files
        (read here, not through neo.data: the config layer sits below the data layer)."""
        from tokenizers import Tokenizer
        from tokenizers.implementations import ByteLevelBPETokenizer

        for f in files:
            if not Path(f).is_file():
                raise self.refuse("vocab_file", f"{f} does not exist (GPT-NeoX's 20B tokenizer ships as "
                                                f"data/20B_tokenizer.json)")
        try:
            return Tokenizer.from_file(files[0]) if len(files) == 1 else ByteLevelBPETokenizer(*files)
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise self.refuse("vocab_file", f"{files[0]} does not load as a tokenizer: {e}") from None

    def gpt2_files(self, vocab_file: str, merge_file: Any, base: Path) -> tuple[str, str]:
        from neo.config.load import resolve_path

        vocab = Path(resolve_path(vocab_file, base))
        merges = Path(resolve_path(merge_file, base)) if merge_file is not None else None
        if merges is None or merges.parent != vocab.parent:
            raise self.refuse("tokenizer_type", "GPT2BPETokenizer (GPT-NeoX's default) needs vocab_file and "
                                                "merge_file in one folder; for a tokenizers JSON file (such as "
                                                "data/20B_tokenizer.json) set tokenizer_type: HFTokenizer")
        return str(vocab), str(merges)

    # --- the optimizer and its schedule

    def optimizer(self) -> None:
        opt = self.pop("optimizer")
        lr = self.pop("lr")
        if opt is not None:
            if not isinstance(opt, dict):
                raise self.refuse("optimizer", "must be {type: Adam, params: {lr: ..., betas: [...], eps: ...}}")
            kind = str(opt.get("type", "adam")).lower()
            if kind not in ("adam", "adamw"):
                raise self.refuse("optimizer", f"type {opt.get('type')!r}: neo trains with Adam (GPT-NeoX's "
                                               f"Adam is AdamW) or Adafactor (neo's opt_name)")
            params = opt.get("params", {})
            if not isinstance(params, dict):
                raise self.refuse("optimizer", "params must be {lr: ..., betas: [...], eps: ...}")
            unknown = set(opt) - {"type", "params"} | set(params) - {"lr", "betas", "eps", "weight_decay"}
            if unknown:
                raise self.refuse("optimizer", f"{sorted(unknown)[0]!r} is not taken; neo's Adam has lr, "
                                               f"betas, eps and weight_decay")
            lr = params.get("lr", lr)
            betas = params.get("betas", [0.9, 0.999])
            if not isinstance(betas, list) or len(betas) != 2:
                raise self.refuse("optimizer", f"betas must be [beta1, beta2], got {betas!r}")
            self.out["beta1"], self.out["beta2"] = betas
            self.out["epsilon"] = params.get("eps", 1e-8)
            if "weight_decay" in params:  # the top-level key, if also set, is refused as a repeat
                self.out["weight_decay"] = params["weight_decay"]
        self.out["opt_name"] = "adam"
        if lr is None:
            raise self.refuse("optimizer", "gives no learning rate: set optimizer.params.lr")
        self.out["lr"] = lr
        style = str(self.pop("lr_decay_style", "linear")).lower()
        if style not in ("cosine", "linear", "constant"):
            raise self.refuse("lr_decay_style", f"{style!r}: neo decays cosine, linear or constant")
        self.out["lr_decay"] = style
        min_lr = self.pop("min_lr", 0.0)
        if style != "constant" and not math.isclose(min_lr, 0.1 * lr, rel_tol=1e-6):
            raise self.refuse("min_lr", f"{min_lr}: neo's schedule (GPT-Neo's) decays to 10% of lr; set "
                                        f"min_lr: {0.1 * lr:g} or lr_decay_style: constant")
        iters = self.neox.get("lr_decay_iters") or self.neox.get("train_iters")
        warmup = self.pop("warmup", 0.01)
        if iters is not None:  # GPT-NeoX: warmup_iter = warmup x lr_decay_iters (training.py)
            self.out["warmup_steps"] = int(warmup * iters)
        elif warmup:
            raise self.refuse("warmup", "is a fraction of train_iters, which is not set")
        if self.pop("override_lr_scheduler", False):
            raise self.refuse("override_lr_scheduler", "neo resumes the schedule from the checkpoint's step")

    # --- batches, precision, dropout, checkpoints

    def training(self) -> None:
        micro = self.pop("train_micro_batch_size_per_gpu")
        gas = self.pop("gradient_accumulation_steps", self.pop("gas", 1))
        if micro is not None and not self.has("train_batch_size"):
            self.out["train_batch_size"] = micro * gas
            self.notes.append(f"train_batch_size {micro * gas} = train_micro_batch_size_per_gpu {micro} x "
                              f"gradient_accumulation_steps {gas}; GPT-NeoX also multiplies by the data-parallel "
                              f"GPUs: set --set train_batch_size=N for the global batch")
        self.out["precision"] = self.precision()
        dropout = self.pop("hidden_dropout")
        if dropout is not None:
            self.out["res_dropout"] = self.out["embed_dropout"] = dropout
        load, save = self.pop("load"), self.neox.get("save")
        if load is not None and load != save:
            raise self.refuse("load", f"{load!r}: neo resumes from model_path (GPT-NeoX's save, {save!r}); "
                                      f"make load equal save")
        if self.pop("finetune", False):
            raise self.refuse("finetune", "neo starts from a checkpoint's weights with scripts/convert_hf.py "
                                          "import or by copying it into model_path")
        for key in ("top_k", "top_p"):  # GPT-NeoX's 0 is off, neo's null
            value = self.pop(key)
            if value:
                self.out[key] = value

    def precision(self) -> str:
        """GPT-NeoX's precision (arguments.py: fp16.type bfloat16, else fp16.enabled, else fp32;
        or bf16.enabled, or an explicit precision) as neo's float32 or bfloat16."""
        fp16, bf16 = self.pop("fp16") or {}, self.pop("bf16") or {}
        for key, value in (("fp16", fp16), ("bf16", bf16)):
            if not isinstance(value, dict):
                raise self.refuse(key, f"must be a mapping such as {{enabled: true}}, got {value!r}")
        explicit = self.pop("precision")
        if fp16.get("type") == "bfloat16" or bf16.get("enabled"):
            value = "bfloat16"
        elif fp16.get("enabled"):
            value = "fp16"
        else:
            value = explicit or "fp32"
        if value == "fp16":
            self.notes.append("precision fp16 -> bfloat16 (neo trains in bfloat16 or float32; fp16's loss-scaling "
                              "keys are not needed)")
            return "bfloat16"
        if value not in ("fp32", "float32", "bfloat16"):
            raise self.refuse("precision", f"{value!r}: neo trains in fp32 or bfloat16")
        return "float32" if value in ("fp32", "float32") else "bfloat16"

