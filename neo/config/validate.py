"""Every check of a config's values, in one place, run when the config is loaded (and again
after `Config.replace`), so that every mistake is reported before anything is built or
compiled. Each error is one line naming the key, the file and the fix.

What cannot be known from the config alone waits for the devices, still before compiling: a
layout that does not divide the shapes (neo/mesh.py `check_divisible`), a batch that does not
split into microbatches (neo/train.py), and each command's own needs (a `model_path` to train,
a tokenizer to sample, tasks to evaluate).
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, NoReturn

from neo.config.sections import (
    ACTIVATION_FNS, ATTENTION_IMPLS, CURRICULUM_SCHEDULES, INPUT_FNS, LR_DECAYS, MOE_POLICIES, NORMS, OPTIMIZERS,
    POS_EMBS, PRECISIONS, REMAT_POLICIES, Config, Curriculum, ModelConfig, MoEParams, OptimizerConfig, RunConfig,
    SamplingConfig, mlm_excluded_ids, mlm_vocab,
)
from neo.errors import NeoError, did_you_mean

Fail = Callable[[str], NoReturn]


def validate(cfg: Config, family: str = "GPT") -> Config:
    """`cfg` if every value is usable, else a NeoError about the first that is not. `family`
    is GPT-Neo's `model` key, which names the one model family it has."""
    where = cfg.source or "<config>"

    def fail(msg: str) -> NoReturn:
        raise NeoError(f"{where}: {msg}")

    if family != "GPT":
        fail(f"'model' must be \"GPT\" (the only family GPT-Neo has), got {family!r}.")
    _positive(cfg, fail)
    _check_model(cfg.model, fail)
    _check_moe(cfg.model.moe_params, where)
    _check_optimizer(cfg.optimizer, fail)
    _check_run(cfg.run, fail)
    _check_data(cfg, fail)
    if cfg.run.curriculum_learning is not None:
        _check_curriculum(cfg.run.curriculum_learning, cfg.model.n_ctx, cfg.model.mlm_training, fail)
    _check_sampling(cfg.sampling, fail)
    if cfg.model.mlm_training:
        _check_mlm(cfg, fail)
    return cfg


def _positive(cfg: Config, fail: Fail) -> None:
    m, r, s = cfg.model, cfg.run, cfg.sampling
    for key, v in (("n_embd", m.n_embd), ("n_head", m.n_head), ("n_layer", m.n_layer), ("n_ctx", m.n_ctx),
                   ("n_vocab", m.n_vocab), ("train_batch_size", r.train_batch_size),
                   ("train_steps", r.train_steps), ("iterations", r.iterations),
                   ("local_attention_radius", m.local_attention_radius),
                   ("predict_batch_size", s.predict_batch_size), ("keep_checkpoints", r.keep_checkpoints)):
        if v <= 0:
            fail(f"'{key}' must be a positive integer, got {v}.")


def _check_model(m: ModelConfig, fail: Fail) -> None:
    if m.n_embd % m.n_head:
        divisors = [h for h in range(1, m.n_embd + 1) if m.n_embd % h == 0]
        near = sorted(divisors, key=lambda h: abs(h - m.n_head))[:3]
        fail(f"n_embd ({m.n_embd}) is not divisible by n_head ({m.n_head}); "
             f"choose n_head from {sorted(near)} or change n_embd.")
    if len(m.attention_types) != m.n_layer:
        fail(f"'attention_types' expands to {len(m.attention_types)} layers but n_layer is "
             f"{m.n_layer}; make the repeat counts add up to n_layer.")
    if m.precision not in PRECISIONS:
        fail(f"'precision' must be one of {PRECISIONS}, got {m.precision!r}.{did_you_mean(m.precision, PRECISIONS)}")
    for key in ("activation_fn", "moe_activation"):
        name = getattr(m, key)
        if name not in ACTIVATION_FNS:
            fail(f"unknown {key} {name!r}.{did_you_mean(name, ACTIVATION_FNS)} Known: {', '.join(sorted(ACTIVATION_FNS))}.")
    for key in ("embed_dropout", "attn_dropout", "res_dropout"):
        _fraction(key, getattr(m, key), fail)
    if not 0.0 < m.rotary_pct <= 1.0:
        fail(f"'rotary_pct' must be in (0, 1], got {m.rotary_pct}.")
    _above_zero("rotary_emb_base", m.rotary_emb_base, fail)
    _above_zero("layer_norm_epsilon", m.layer_norm_epsilon, fail)
    if m.num_mem_kv < 0:
        fail(f"'num_mem_kv' must be >= 0 (learned memory key/value slots), got {m.num_mem_kv}.")
    if m.intermediate_size is not None and m.intermediate_size <= 0:
        fail(f"'intermediate_size' must be a positive integer (or absent for 4 x n_embd), got {m.intermediate_size}.")
    if m.position_embedding == "rotary" and int(m.features_per_head * m.rotary_pct) % 2:
        fail(f"rotary dims = int(features_per_head {m.features_per_head} * rotary_pct {m.rotary_pct}) "
             f"must be even; adjust 'rotary_pct'.")
    if m.axial_pos_emb is not None:
        if len(m.axial_pos_emb) != 2 or min(m.axial_pos_emb) < 1 or math.prod(m.axial_pos_emb) < m.n_ctx:
            fail(f"'axial_pos_emb' must be two sizes [a1, a2] with a1*a2 >= n_ctx ({m.n_ctx}), "
                 f"got {list(m.axial_pos_emb)}.")
        if m.rotary_emb:
            fail("axial_pos_emb and rotary_emb are two position encodings; keep one of them.")
    _check_neox_options(m, fail)
    if m.moe_layers:
        bad = [i for i in m.moe_layers if not 0 <= i < m.n_layer]
        if bad:
            fail(f"'moe_layers' has layer indices {bad} outside 0..{m.n_layer - 1}.")
    _check_speed(m, fail)


def _check_neox_options(m: ModelConfig, fail: Fail) -> None:
    """GPT-NeoX's architecture keys (docs/configs.md), and how they meet GPT-Neo's own."""
    for key, value, allowed in (("pos_emb", m.pos_emb, POS_EMBS), ("norm", m.norm, NORMS)):
        if value is not None and value not in allowed:
            fail(f"'{key}' must be one of {', '.join(allowed)}, got {value!r}.{did_you_mean(value, allowed)}")
    if m.rotary_emb and m.position_embedding != "rotary":
        fail(f"rotary_emb is true but pos_emb is {m.pos_emb!r}; drop rotary_emb or set pos_emb to \"rotary\".")
    if m.axial_pos_emb is not None and m.position_embedding != "learned":
        fail(f"axial_pos_emb is a learned position table but pos_emb is {m.pos_emb!r}; drop one of them.")
    if m.position_embedding == "alibi" and m.num_mem_kv:
        fail("num_mem_kv memory slots have no position for ALiBi's distance bias; set num_mem_kv to 0 or "
             "choose another pos_emb.")
    if m.position_embedding == "alibi" and "linear" in m.attention_types:
        fail("ALiBi is a bias on softmax attention scores; linear attention layers have none. Choose "
             "another pos_emb or drop the linear layers.")
    if m.position_embedding == "sinusoidal" and m.n_embd % 2:
        fail(f"sinusoidal position embeddings need an even n_embd (sin and cos halves), got {m.n_embd}.")
    if m.scalenorm and m.norm is not None:
        fail(f"GPT-Neo's scalenorm flag and 'norm' ({m.norm!r}) both choose the norm; keep one of them.")
    for key, norm in (("rms_norm_epsilon", "rmsnorm"), ("scalenorm_epsilon", "scalenorm")):
        if getattr(m, key) is not None and m.norm_kind != norm:
            fail(f"'{key}' is set but norm is {m.norm_kind!r}; set norm to \"{norm}\" or drop '{key}'.")
    if m.num_kv_heads is not None and (m.num_kv_heads < 1 or m.n_head % m.num_kv_heads):
        fail(f"'num_kv_heads' ({m.num_kv_heads}) must divide n_head ({m.n_head}); 1 is multi-query, "
             f"n_head (or absent) multi-head.")
    if m.num_kv_heads not in (None, m.n_head) and {"linear"} & set(m.attention_types):
        fail("'num_kv_heads' (grouped-query attention) applies to softmax attention; linear layers have "
             "one key/value head per query head. Drop num_kv_heads or the linear layers.")
    if m.qkv_bias and m.use_bias_in_attn_linear is False:
        fail("qkv_bias is true but use_bias_in_attn_linear is false; keep one of them.")
    if m.mlp_glu and m.activation_fn in ("swiglu", "geglu", "reglu"):
        fail(f"activation_fn {m.activation_fn!r} is already gated; drop mlp_glu (or use its base "
             f"function with mlp_glu).")
    if m.mlp_multiple_of < 1:
        fail(f"'mlp_multiple_of' must be >= 1, got {m.mlp_multiple_of}.")
    for key in ("rms_norm_epsilon", "scalenorm_epsilon"):
        if getattr(m, key) is not None:
            _above_zero(key, getattr(m, key), fail)


def _check_speed(m: ModelConfig, fail: Fail) -> None:
    """attention_impl, remat_policy and scan_layers (what the device can run is checked when the
    model is traced, before compiling)."""
    if m.attention_impl not in ATTENTION_IMPLS:
        fail(f"'attention_impl' must be one of {', '.join(ATTENTION_IMPLS)}, got {m.attention_impl!r}."
             f"{did_you_mean(m.attention_impl, ATTENTION_IMPLS)}")
    if m.attention_impl == "cudnn" and m.precision != "bfloat16":
        fail("attention_impl 'cudnn' needs precision bfloat16 (cuDNN's flash attention has no float32 "
             "kernel); use 'auto' or 'blocked' in float32.")
    if m.remat_policy is not None and m.remat_policy not in REMAT_POLICIES:
        fail(f"'remat_policy' must be one of {', '.join(REMAT_POLICIES)}, got {m.remat_policy!r}."
             f"{did_you_mean(m.remat_policy, REMAT_POLICIES)}")
    if m.recompute_grad and m.remat_policy == "none":
        fail("recompute_grad is true but remat_policy is 'none'; drop one of them (remat_policy decides "
             "when both are set).")
    if m.scan_layers and m.scan_blocker():
        fail(f"scan_layers is true but the layers cannot be scanned: {m.scan_blocker()}; set scan_layers "
             f"to \"auto\" or false.")
    if m.scan_unroll is not None and m.scan_period is None:
        why = "scan_layers is false" if m.scan_layers is False else m.scan_blocker()
        fail(f"scan_unroll is {json.dumps(m.scan_unroll)} but the layers are not scanned ({why}); drop "
             f"scan_unroll (it sets how many scanned groups each loop iteration runs).")


def _check_moe(p: MoEParams, where: str) -> None:
    """mesh-tf's MoE hyperparameters (neo/model/moe.py), with or without MoE layers: a key is
    never accepted and ignored."""
    where = f"{where}: moe_params"
    if not re.fullmatch(r"top_[1-9]\d*", p.moe_gating):
        raise NeoError(f"{where} 'moe_gating' must be top_1, top_2, ... (top-k routing), got {p.moe_gating!r}.")
    if not 1 <= p.top_k <= p.moe_num_experts:
        raise NeoError(f"{where}: {p.moe_gating} needs at least {p.top_k} experts, got moe_num_experts "
                       f"{p.moe_num_experts}.")
    for policy in (p.moe_second_policy_train, p.moe_second_policy_eval):
        if policy not in MOE_POLICIES:
            raise NeoError(f"{where} second-expert policy {policy!r} is not one of {', '.join(MOE_POLICIES)}.")
    for name in ("moe_hidden_size", "moe_group_size", "moe_min_expert_capacity"):
        if getattr(p, name) < 1:
            raise NeoError(f"{where} {name!r} must be >= 1.")
    for name in ("moe_capacity_factor_train", "moe_capacity_factor_eval"):
        if not (math.isfinite(getattr(p, name)) and getattr(p, name) > 0):
            raise NeoError(f"{where} {name!r} must be > 0, got {getattr(p, name)}.")
    if not (math.isfinite(p.moe_loss_coef) and p.moe_loss_coef >= 0):
        raise NeoError(f"{where} 'moe_loss_coef' must be >= 0, got {p.moe_loss_coef}.")
    for name in ("moe_second_threshold_train", "moe_second_threshold_eval"):
        if not 0.0 <= getattr(p, name) <= 1.0:
            raise NeoError(f"{where} {name!r} must be in [0, 1] (a gate probability), got {getattr(p, name)}.")
    if not 0.0 <= p.moe_dropout_rate < 1.0:
        raise NeoError(f"{where} 'moe_dropout_rate' must be in [0, 1), got {p.moe_dropout_rate}.")


def _check_optimizer(o: OptimizerConfig, fail: Fail) -> None:
    if o.lr_decay not in LR_DECAYS:
        fail(f"'lr_decay' must be one of {LR_DECAYS}, got {o.lr_decay!r}.{did_you_mean(o.lr_decay, LR_DECAYS)}")
    if o.opt_name.lower() not in OPTIMIZERS:
        fail(f"'opt_name' must be one of {OPTIMIZERS}, got {o.opt_name!r}.{did_you_mean(o.opt_name.lower(), OPTIMIZERS)}")
    _above_zero("lr", o.lr, fail)
    for key in ("beta1", "beta2"):
        _fraction(key, getattr(o, key), fail)
    for key in ("epsilon", "ada_epsilon1"):
        _above_zero(key, getattr(o, key), fail)
    for key in ("weight_decay", "ada_epsilon2"):
        _at_least_zero(key, getattr(o, key), fail)
    if o.gradient_clipping is not None and not (math.isfinite(o.gradient_clipping) and o.gradient_clipping > 0):
        fail(f"'gradient_clipping' must be > 0 (or absent for no clipping), got {o.gradient_clipping}.")
    if o.warmup_steps < 0:
        fail("'warmup_steps' must be >= 0.")
    if o.lr_decay_end is not None and o.lr_decay_end <= o.warmup_steps:
        fail(f"'lr_decay_end' ({o.lr_decay_end}) must be after warmup_steps ({o.warmup_steps}): it is the step "
             f"where the decay ends (absent: train_steps).")


def _check_run(r: RunConfig, fail: Fail) -> None:
    for key in ("mlm_mask_prob", "mlm_same_token_prob", "mlm_random_token_prob"):
        _fraction(key, getattr(r, key), fail)
    if r.tokens_per_mb_per_replica is not None and r.tokens_per_mb_per_replica <= 0:
        fail("'tokens_per_mb_per_replica' must be a positive number of tokens.")
    if r.eval_batch_size is not None and r.eval_batch_size <= 0:
        fail(f"'eval_batch_size' must be a positive integer (or absent for train_batch_size), got {r.eval_batch_size}.")
    if r.eval_steps < 0:
        fail(f"'eval_steps' must be >= 0 (0: no validation), got {r.eval_steps}.")
    _at_least_zero("z_loss", r.z_loss, fail)
    if not 0 <= r.seed < 2 ** 31:
        fail(f"'seed' must be in 0..{2 ** 31 - 1} (JAX keeps 32 bits of it), got {r.seed}.")
    if r.entmax_loss:
        fail("entmax_loss not supported yet in neo; remove it from the config.")


def _check_curriculum(c: Curriculum, n_ctx: int, mlm: bool, fail: Fail) -> None:
    """GPT-NeoX's sequence-length curriculum (neo/curriculum.py), checked even when disabled."""
    fail_c = lambda msg: fail(f"curriculum_learning: {msg}")
    if c.curriculum_type != "seqlen":
        fail_c(f"'curriculum_type' must be \"seqlen\" (GPT-NeoX's only kind), got {c.curriculum_type!r}.")
    if c.schedule_type not in CURRICULUM_SCHEDULES:
        fail_c(f"'schedule_type' must be one of {', '.join(CURRICULUM_SCHEDULES)}, got {c.schedule_type!r}."
               f"{did_you_mean(c.schedule_type, CURRICULUM_SCHEDULES)}")
    if c.max_difficulty is not None and c.max_difficulty != n_ctx:
        fail_c(f"'max_difficulty' ({c.max_difficulty}) must equal n_ctx ({n_ctx}): the curriculum ends at the "
               f"full context (leave it out to mean n_ctx).")
    if not 1 <= c.min_difficulty <= n_ctx:
        fail_c(f"'min_difficulty' must be in 1..n_ctx ({n_ctx}): the first length trained on, got {c.min_difficulty}.")
    if c.total_curriculum_step < 1:
        fail_c(f"'total_curriculum_step' must be >= 1 (steps to grow to n_ctx), got {c.total_curriculum_step}.")
    if c.difficulty_step < 1 or c.min_difficulty % c.difficulty_step or n_ctx % c.difficulty_step:
        fail_c(f"'difficulty_step' ({c.difficulty_step}) must be >= 1 and divide both min_difficulty "
               f"({c.min_difficulty}) and n_ctx ({n_ctx}): every length is a multiple of it.")
    if c.schedule_type == "fixed_root" and (c.root_degree is None or c.root_degree < 1):
        fail_c(f"fixed_root needs schedule_config 'root_degree' >= 1, got {c.root_degree}.")
    if c.enabled and mlm:
        fail_c("GPT-NeoX's sequence-length warmup is for causal training; turn it off (enabled: false) or "
               "turn off mlm_training.")
    if c.schedule_type == "fixed_linear" and c.root_degree is not None:
        fail_c("'root_degree' belongs to schedule_type fixed_root; remove it or set schedule_type fixed_root.")


def _check_data(cfg: Config, fail: Fail) -> None:
    n_vocab, n_ctx = cfg.model.n_vocab, cfg.model.n_ctx
    datasets = cfg.data.datasets
    for entry in datasets:
        # a .txt path is read whole by neo/data/text.py, tfrecords by the mixture: never both
        if entry.config.path.endswith(".txt") and len(datasets) > 1:
            fail(f"a plain-text dataset ('{entry.id}') cannot be mixed with others; "
                 f"turn the text into tfrecords with data/create_tfrecords.py.")
        if entry.config.eval_path.endswith(".txt") and not entry.config.path.endswith(".txt"):
            fail(f"dataset '{entry.id}': a plain-text eval_path cannot be mixed with tfrecord datasets; "
                 f"turn it into tfrecords with data/create_tfrecords.py.")
        if entry.config.n_vocab > n_vocab:
            fail(f"dataset '{entry.id}' has n_vocab {entry.config.n_vocab} but the model's n_vocab is "
                 f"{n_vocab}; raise the model's 'n_vocab' to at least {entry.config.n_vocab}.")
        if entry.stitch is not None and entry.stitch < 1:
            fail(f"dataset '{entry.id}': stitch must be >= 1 (documents joined per example), got {entry.stitch}.")
        ds = entry.config
        if not 0.0 <= ds.holdout < 1.0:
            fail(f"dataset '{entry.id}': 'holdout' must be in [0, 1) (the share of the text kept for "
                 f"evaluation), got {ds.holdout} in {ds.source}.")
        if ds.n_vocab <= 0:
            fail(f"dataset '{entry.id}': 'n_vocab' must be positive, got {ds.n_vocab} in {ds.source}.")
        if not 0 <= ds.eos_id < n_vocab:
            fail(f"dataset '{entry.id}': 'eos_id' ({ds.eos_id}, which joins stitched documents) is outside the "
                 f"model's vocabulary 0..{n_vocab - 1} (in {ds.source}).")
        if ds.minimum_size is not None and ds.minimum_size < 1:
            fail(f"dataset '{entry.id}': 'minimum_size' must be >= 1 token, got {ds.minimum_size} in {ds.source}.")
        shortest = entry.config.minimum_size
        if entry.sampling_mode == "documents_random" and shortest:
            stitch = entry.stitch or 1
            if stitch * shortest < n_ctx + 1:
                fail(f"dataset '{entry.id}': documents_random needs stitch x minimum_size >= n_ctx + 1 so that "
                     f"every window is real text, but {stitch} x {shortest} = {stitch * shortest} < "
                     f"{n_ctx + 1}; set stitch to at least {-(-(n_ctx + 1) // shortest)} in 'datasets'.")
    for key, v in (("eos_id", cfg.data.eos_id), ("mlm_mask_id", cfg.run.mlm_mask_id),
                   ("mlm_cls_token_id", cfg.run.mlm_cls_token_id)):
        if v is not None and not 0 <= v < n_vocab:
            fail(f"'{key}' ({v}) is outside the vocabulary 0..{n_vocab - 1}.")
    outside = [i for i in cfg.run.mlm_mask_ignore_ids if not 0 <= i < n_vocab]
    if outside:
        fail(f"'mlm_mask_ignore_ids' {outside} are outside the vocabulary 0..{n_vocab - 1}.")
    # padding_id may lie outside the vocabulary, as in GPT-Neo's GPT-2 datasets (50257 of 50257
    # ids): padded positions are never targets, and an id past the table embeds as zeros, as
    # mesh-tf's gather gave (neo/model/gpt.py).
    if cfg.data.padding_id is not None and cfg.data.padding_id < 0:
        fail(f"'padding_id' ({cfg.data.padding_id}) must be >= 0.")
    _check_readers(cfg, fail)


def _check_readers(cfg: Config, fail: Fail) -> None:
    """`input_fn`, `no_dataset` and `lambada_tokens_path`, GPT-Neo's keys about where data comes from."""
    d = cfg.data
    if d.input_fn is not None:
        if d.input_fn == "pred_input":
            fail("input_fn 'pred_input' is GPT-Neo's --predict reader (it always read the prompt that way), "
                 f"not a training reader; use one of {', '.join(INPUT_FNS)} or leave input_fn out.")
        if d.input_fn not in INPUT_FNS:
            fail(f"input_fn {d.input_fn!r} is not one of GPT-Neo's readers {', '.join(INPUT_FNS)} "
                 f"(docs/data.md).{did_you_mean(d.input_fn, INPUT_FNS)}")
        if any(e.config.path.endswith(".txt") for e in d.datasets):
            fail(f"input_fn {d.input_fn!r} chooses how tfrecords are read; a plain-text dataset is read whole "
                 f"by neo's text source. Leave input_fn out, or make tfrecords with data/create_tfrecords.py.")
    if d.no_dataset and d.datasets:
        fail(f"no_dataset is true but 'datasets' lists {len(d.datasets)} dataset(s); keep one of them "
             f"(no_dataset declares a config that runs without data, e.g. for --predict or --auto_layout).")
    for entry in d.datasets:
        path = entry.config.lambada_tokens_path
        if path is not None and not path.endswith((".json", ".jsonl")):
            fail(f"dataset '{entry.id}': lambada_tokens_path {path!r} must be GPT-Neo's token cache (.json) "
                 f"or LAMBADA text, one {{\"text\": ...}} per line (.jsonl).")


def _check_mlm(cfg: Config, fail: Fail) -> None:
    """Masked-LM training (neo/mlm.py) needs a mask id and something left to mask."""
    r = cfg.run
    if r.mlm_mask_id is None:
        fail("'mlm_training' needs 'mlm_mask_id' (the token id that replaces masked tokens).")
    if r.mlm_same_token_prob + r.mlm_random_token_prob > 1.0:
        fail(f"mlm_same_token_prob ({r.mlm_same_token_prob}) + mlm_random_token_prob "
             f"({r.mlm_random_token_prob}) exceed 1; they are shares of the selected tokens.")
    if set(range(mlm_vocab(cfg))) <= mlm_excluded_ids(cfg):
        fail("every token id is excluded from masking (mlm_mask_ignore_ids); nothing could be masked.")


def _check_sampling(s: SamplingConfig, fail: Fail) -> None:
    """The defaults of `--predict` and of sampling during training (the flags are checked again
    by neo/predict.py's SamplingOptions)."""
    if s.predict_steps < 0:
        fail(f"'predict_steps' must be >= 0 (0: no samples during training), got {s.predict_steps}.")
    if s.predict_max_steps is not None and s.predict_max_steps < 1:
        fail(f"'predict_max_steps' must be >= 1 new token (or absent: fill the context), got {s.predict_max_steps}.")
    _at_least_zero("temperature", s.temperature, fail)
    if s.top_k is not None and s.top_k < 0:
        fail(f"'top_k' must be >= 0 (0 or absent: off), got {s.top_k}.")
    if s.top_p is not None and not 0.0 < s.top_p <= 1.0:
        fail(f"'top_p' must be in (0, 1] (1 or absent: off), got {s.top_p}.")


def _fraction(key: str, v: float, fail: Fail) -> None:
    if not 0.0 <= v < 1.0:
        fail(f"'{key}' must be in [0, 1), got {v}.")


def _above_zero(key: str, v: float, fail: Fail) -> None:
    if not (math.isfinite(v) and v > 0):
        fail(f"'{key}' must be a finite number > 0, got {v}.")


def _at_least_zero(key: str, v: float, fail: Fail) -> None:
    if not (math.isfinite(v) and v >= 0):
        fail(f"'{key}' must be a finite number >= 0, got {v}.")
