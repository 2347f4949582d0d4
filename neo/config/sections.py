"""The config's typed sections: what each part of neo may read.

GPT-Neo kept every setting in one flat JSON object; neo reads that object unchanged and splits
it by who uses each key (as levanter composes a run from model, optimizer, trainer and data
configs):

    Config
      .model      ModelConfig      the architecture; the only part the network sees
      .optimizer  OptimizerConfig  learning rate, schedule, Adam/Adafactor, clipping
      .run        RunConfig        batches, steps, objective, checkpoints, mesh and layout
      .data       DataConfig       datasets, special token ids, tokenizer
      .sampling   SamplingConfig   prompts and decoding
      .source     the file it came from (for messages and relative paths)
      .notes      a GPT-NeoX YAML's keys neo ignores or applies differently (printed at startup)

Field names are the original JSON keys, unique across sections, so a flat key names exactly
one field (docs/configs.md). Sections are frozen; `Config.replace(**flat_keys)` makes a
changed copy and checks it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ATTENTION_KINDS = ("global", "local", "linear", "none")
SAMPLING_MODES = ("chunks", "documents_fixed", "documents_random")
# GPT-Neo's README calls documents_random `random_sample` (its parameter reference).
SAMPLING_MODE_ALIASES = {"random_sample": "documents_random"}
# GPT-Neo's readers (main.py `input_fn`), mapped onto neo's sampling (neo/data/__init__.py):
# `sequential_input` reads every dataset's records in file order as chunks; `generic_text`
# samples each `datasets` entry as it says. Absent: neo's reader, which is `generic_text`'s.
INPUT_FNS = ("sequential_input", "generic_text")
PRECISIONS = ("float32", "bfloat16")
LR_DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adam", "adafactor")
# GPT-Neo's activation names (models/activations.py of the original); neo/model/activations.py
# implements each, and a test keeps the two lists equal.
ACTIVATION_FNS = (
    "gelu", "gelu_new", "gelu_fast", "gelu_tanh", "gelu_exact", "relu", "sigmoid", "tanh", "selu", "elu",
    "abs", "sin", "cos", "sign", "silu", "swish", "softplus", "lrelu001", "lrelu020", "id",
    "triangle_relax", "square_relax", "spike", "spike2", "tanhshrink", "softsign", "softmax", "logsoftmax",
    "bipolarsigmoid", "rrelu", "elish", "arcsinh", "maxsig", "cosid", "minsin", "maxtanh", "mish",
    "tanhexp", "lisht", "seagull", "snake", "roottanh", "softplusmone",
    "aria", "prelu", "parcsinh", "psoftplus", "proottanh",
    # GPT-NeoX's gated activations (GLU variants, Shazeer 2020): the MLP's input projection makes
    # two halves x and gate, and the hidden layer is x * act(gate)
    "swiglu", "geglu", "reglu",
)
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_exact", "reglu": "relu"}  # gate activation
# GPT-NeoX's `pos_emb` and `norm` values (docs/configs.md)
POS_EMBS = ("learned", "rotary", "alibi", "sinusoidal", "none")
NORMS = ("layernorm", "rmsnorm", "scalenorm")
MOE_POLICIES = ("random", "threshold", "all", "none")
# Kernels of the attention operation (neo/model/attention_op.py) and rematerialisation policies
# (neo/model/gpt.py); docs/configs.md describes each.
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "blocked", "cudnn", "splash", "cpu")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_out")
UNROLL_MAX_LAYERS = 12  # scan_unroll "auto": no loop up to this depth (ModelConfig.scan_unroll_groups)
CURRICULUM_SCHEDULES = ("fixed_linear", "fixed_root")


@dataclass(frozen=True)
class MoEParams:
    """mesh-tf's MoE hyperparameters with the defaults GPT-Neo ran with; `moe_params` keys
    (with or without the `moe_` prefix) override them (neo/model/moe.py uses them)."""

    moe_num_experts: int = 16
    moe_gating: str = "top_2"
    moe_loss_coef: float = 1e-2
    moe_hidden_size: int = 4096
    moe_group_size: int = 1024
    moe_capacity_factor_train: float = 1.25
    moe_capacity_factor_eval: float = 2.0
    moe_min_expert_capacity: int = 1
    moe_second_policy_train: str = "random"
    moe_second_policy_eval: str = "random"
    moe_second_threshold_train: float = 0.2
    moe_second_threshold_eval: float = 0.2
    moe_use_second_place_loss: bool = False
    moe_dropout_rate: float = 0.0

    @property
    def top_k(self) -> int:
        return int(self.moe_gating.split("_")[1])


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
    # GPT-Neo's LAMBADA file for `eval_tasks: ["lambada"]`: its token cache (.json, a list of
    # token lists) or the text (.jsonl); neo/evaluate/harness.py reads it.
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
    """A model config's `datasets` element `[id, stitch, sampling_mode, weight]`, or the
    README's `[train_glob, eval_glob, stitch, sampling_mode, weight]` (`inline`: its files are
    named in the entry itself, `id` is the train glob)."""

    id: str
    stitch: Optional[int]
    sampling_mode: Optional[str]
    weight: Optional[float]
    config: DatasetConfig
    inline: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """The architecture: everything the network needs and nothing else (neo/model sees only
    this). `mlm_training` is here because it decides causal or bidirectional attention."""

    n_embd: int
    n_head: int
    n_layer: int
    n_ctx: int
    n_vocab: int
    attention_types: tuple[str, ...]  # expanded: one kind per layer
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
    moe_params: MoEParams = field(default_factory=MoEParams)
    moe_activation: str = "relu"
    precision: str = "float32"
    recompute_grad: bool = False
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    res_dropout: float = 0.0
    mlm_training: bool = False
    # neo extensions for the GPT-NeoX / Pythia family (docs/configs.md)
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    parallel_residual: bool = False
    scale_attention: bool = False
    qkv_bias: bool = False
    intermediate_size: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    # GPT-NeoX's architecture options, under GPT-NeoX's names (docs/configs.md)
    pos_emb: Optional[str] = None  # None: "rotary" with rotary_emb, else "learned"
    norm: Optional[str] = None  # None: "layernorm" (GPT-Neo's `scalenorm` flag is separate)
    rms_norm_epsilon: Optional[float] = None  # None: 1e-8 (GPT-NeoX's default)
    scalenorm_epsilon: Optional[float] = None  # None: 1e-8
    use_bias_in_norms: bool = True
    use_bias_in_attn_linear: Optional[bool] = None  # None: GPT-Neo's (q/k/v per qkv_bias, o with)
    use_bias_in_mlp: bool = True
    mlp_multiple_of: int = 1
    num_kv_heads: Optional[int] = None  # None: n_head (multi-head); 1: multi-query
    # neo: how the network is computed (docs/configs.md, "Speed and memory")
    attention_impl: str = "auto"
    remat_policy: Optional[str] = None  # None: `full` with recompute_grad, else `none`
    scan_layers: Optional[bool] = None  # None ("auto"): scan when the layers can be
    scan_unroll: Optional[int | str] = None  # None ("auto"), "full" or groups per loop iteration

    # Derived values: properties so they can never disagree with the fields.
    @property
    def features_per_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def position_embedding(self) -> str:
        """`pos_emb` in effect: GPT-Neo's `rotary_emb` means "rotary", else learned (axial
        embeddings are a learned table too)."""
        return self.pos_emb or ("rotary" if self.rotary_emb else "learned")

    @property
    def norm_kind(self) -> str:
        return self.norm or "layernorm"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.n_head

    @property
    def gated(self) -> bool:
        """Is the MLP gated (GPT-Neo's `mlp_glu`, or a GLU activation such as swiglu)?"""
        return self.mlp_glu or self.activation_fn in GATED_ACTIVATIONS

    @property
    def mlp_activation(self) -> str:
        """The function applied in the MLP (the gate's for GLU activations)."""
        return GATED_ACTIVATIONS.get(self.activation_fn, self.activation_fn)

    @property
    def attn_qkv_bias(self) -> bool:
        return self.qkv_bias if self.use_bias_in_attn_linear is None else self.use_bias_in_attn_linear

    @property
    def attn_out_bias(self) -> bool:
        return True if self.use_bias_in_attn_linear is None else self.use_bias_in_attn_linear

    @property
    def intermediate_expanded(self) -> int:
        """The MLP's hidden width (each half's when gated): `intermediate_size`, else 4 * n_embd,
        or for a GLU activation LLaMA's 2/3 of that (int(8 * n_embd / 3)); rounded up to a
        multiple of `mlp_multiple_of` (LLaMA: 4096 -> 11008 with 256)."""
        f = self.intermediate_size or (int(2 * 4 * self.n_embd / 3) if self.activation_fn in GATED_ACTIVATIONS
                                       else 4 * self.n_embd)
        return -(-f // self.mlp_multiple_of) * self.mlp_multiple_of

    @property
    def causal(self) -> bool:
        return not self.mlm_training

    @property
    def remat(self) -> str:
        """The rematerialisation policy in effect: `remat_policy`, else GPT-Neo's
        `recompute_grad` (true: recompute each whole layer)."""
        if self.remat_policy is not None:
            return self.remat_policy
        return "full" if self.recompute_grad else "none"

    @property
    def pattern_period(self) -> int:
        """The length of the shortest run of layers that repeats to make every layer (its
        attention kind and MoE flag): 2 for GPT-Neo's [global, local] * 12."""
        moe = set(self.moe_layers or ())
        kinds = [(kind, i in moe) for i, kind in enumerate(self.attention_types)]
        return next(p for p in range(1, self.n_layer + 1)
                    if self.n_layer % p == 0 and all(kinds[i] == kinds[i % p] for i in range(self.n_layer)))

    def scan_blocker(self) -> Optional[str]:
        """Why the layers cannot run under nn.scan, or None if they can."""
        if self.share_parameters:
            return "share_parameters (one block serves every layer)"
        if self.moe_layers:
            return "moe_layers (mixture-of-experts layers sow their balance loss per layer)"
        if self.pattern_period == self.n_layer:
            return f"attention_types does not repeat over the {self.n_layer} layers"
        return None

    @property
    def scan_period(self) -> Optional[int]:
        """Layers per scanned group (the repeating pattern), or None: unrolled layers."""
        if self.scan_layers is False or self.scan_blocker() is not None:
            return None
        return self.pattern_period

    @property
    def scan_unroll_groups(self) -> Optional[int]:
        """Scanned groups per iteration of the compiled loop (lax.scan's `unroll`), or None with
        unrolled layers. `auto`: all of them (no loop) up to UNROLL_MAX_LAYERS layers, else one.
        A loop costs each layer its bookkeeping (stacking residuals and gradients, slicing
        weights): on a 2-core CPU the quickstart (4 layers) took 50.6 ms a step in the loop and
        46.0 ms unrolled, gpt_neo_125M (12) 5.93 s and 5.74 s (compiling and one step: 15 s
        and 23 s); an H200 ran gpt_neo_1.3B (24) in 0.283 s scanned and 0.268 s unrolled,
        compiling in 10 s and 28 s (docs/benchmarks.md). Deeper models keep the loop, whose
        compile time does not grow with depth."""
        period = self.scan_period
        if period is None:
            return None
        groups = self.n_layer // period
        if self.scan_unroll == "full" or (self.scan_unroll is None and self.n_layer <= UNROLL_MAX_LAYERS):
            return groups
        return min(self.scan_unroll or 1, groups)

    @property
    def layers_loop(self) -> bool:
        """Whether the compiled step runs the layers in a loop (scanned and not unrolled
        entirely), which is what decides what XLA keeps for the backward pass."""
        groups = self.scan_unroll_groups
        return groups is not None and groups < self.n_layer // self.scan_period


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its learning-rate schedule (neo/optim.py)."""

    lr: float = 1e-4
    warmup_steps: int = 0
    lr_decay: str = "constant"
    lr_decay_end: Optional[int] = None  # None: train_steps
    opt_name: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.95
    epsilon: float = 1e-8
    ada_epsilon1: float = 1e-30
    ada_epsilon2: float = 1e-3
    weight_decay: float = 0.0
    gradient_clipping: Optional[float] = None


@dataclass(frozen=True)
class Curriculum:
    """GPT-NeoX's `curriculum_learning` (DeepSpeed's seqlen curriculum, its config form): train
    on the first `length` tokens of each row, growing from `min_difficulty` to
    `max_difficulty` (= n_ctx) over `total_curriculum_step` steps in multiples of
    `difficulty_step` (neo/curriculum.py). `schedule_config` keys are flattened here."""

    min_difficulty: int
    total_curriculum_step: int
    max_difficulty: Optional[int] = None  # None: n_ctx
    enabled: bool = True
    curriculum_type: str = "seqlen"
    schedule_type: str = "fixed_linear"
    difficulty_step: int = 1
    root_degree: Optional[int] = None  # fixed_root only

    SCHEDULE_KEYS = ("total_curriculum_step", "difficulty_step", "root_degree")


@dataclass(frozen=True)
class RunConfig:
    """How a run trains and evaluates: batches and steps, the objective (z-loss, masked-LM
    masking), where checkpoints go, the mesh and layout, seed and tracking."""

    train_batch_size: int = 8
    train_steps: int = 1000
    tokens_per_mb_per_replica: Optional[int] = None
    iterations: int = 500
    eval_batch_size: Optional[int] = None
    eval_steps: int = 0
    eval_tasks: tuple[str, ...] = ()
    z_loss: float = 1e-4
    entmax_loss: bool = False
    mlm_mask_id: Optional[int] = None
    mlm_cls_token_id: Optional[int] = None
    mlm_mask_prob: float = 0.15
    mlm_same_token_prob: float = 0.10
    mlm_random_token_prob: float = 0.0
    mlm_mask_ignore_ids: tuple[int, ...] = ()
    model_path: str = ""
    mesh_shape: str = ""
    layout: str = ""
    seed: int = 1
    keep_checkpoints: int = 5  # neo (docs/configs.md)
    wandb_project: Optional[str] = None  # neo
    log_grads: bool = False
    curriculum_learning: Optional[Curriculum] = None  # GPT-NeoX's sequence-length warmup

    @property
    def eval_rows(self) -> int:
        """Rows of a validation batch: eval_batch_size, else train_batch_size."""
        return self.eval_batch_size or self.train_batch_size


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from and the token ids that have a meaning."""

    datasets: tuple[DatasetEntry, ...] = ()
    no_dataset: bool = False  # GPT-Neo: a config that runs without data (--auto_layout, --predict)
    input_fn: Optional[str] = None  # None: neo's reader (= generic_text); see INPUT_FNS
    shuffle_input_filenames: bool = True
    eos_id: Optional[int] = None  # default: the last dataset's
    padding_id: Optional[int] = None  # default: the last dataset's
    tokenizer_path: Optional[str] = None  # default: the first dataset's


@dataclass(frozen=True)
class SamplingConfig:
    """`--predict` and sampling during training (`predict_steps`)."""

    predict_steps: int = 0
    predict_batch_size: int = 1
    predict_max_steps: Optional[int] = None
    remove_partial_sequences: bool = False
    temperature: float = 0.9
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    prompt_path: str = ""  # neo: prompt file used when --prompt is not given


SECTIONS: dict[str, type] = {"model": ModelConfig, "optimizer": OptimizerConfig, "run": RunConfig,
                             "data": DataConfig, "sampling": SamplingConfig}
# flat JSON key -> the section that holds it
KEY_SECTION: dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Config:
    """A whole GPT-Neo config, as sections (module docstring)."""

    model: ModelConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    source: str = ""
    # what loading a GPT-NeoX YAML config decided beyond the keys (ignored, not applied), printed
    # at startup (neo/config/neox.py)
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "model"

    def replace(self, **changes: Any) -> "Config":
        """A copy with some keys changed (flat GPT-Neo keys, typed values), checked like a
        loaded config."""
        from neo.config.load import replace_keys

        return replace_keys(self, changes)


def neox_intermediate_size(intermediate_size: Optional[int], n_embd: int, gated: bool, multiple_of: int = 1) -> int:
    """neo's `intermediate_size` (the hidden width, each half's when gated) for GPT-NeoX's
    `intermediate_size` (megatron/model/transformer.py ParallelMLP): f = intermediate_size or 4h;
    gated: f = int(2f/3), and the hidden width is f // 2 rounded up to `mlp_multiple_of`
    (Llama-2-7B's YAML: 32768 -> 11008 with 256)."""
    f = intermediate_size or 4 * n_embd
    if gated:
        f = int(f * 2 / 3) // 2
    return -(-f // multiple_of) * multiple_of


def mlm_excluded_ids(cfg: Config) -> frozenset[int]:
    """Token ids masked-LM training never selects nor draws: `mlm_mask_ignore_ids`, CLS, the
    mask id and `padding_id` (neo/mlm.py)."""
    specials = (cfg.run.mlm_cls_token_id, cfg.run.mlm_mask_id, cfg.data.padding_id)
    return frozenset(cfg.run.mlm_mask_ignore_ids) | {i for i in specials if i is not None}


def mlm_vocab(cfg: Config) -> int:
    """Random replacements come from ids below the data's vocabulary (the smallest of the
    model's and every dataset's)."""
    return min([cfg.model.n_vocab] + [e.config.n_vocab for e in cfg.data.datasets])
