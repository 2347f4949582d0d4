"""--auto_layout and --auto_layout_and_mesh_shape: rank mesh shapes and layouts for a config.

For a number of devices and their memory (the ones present, or given on the command line to
plan a pod run from a laptop), each candidate (mesh_shape, layout) gets an estimate of the
memory one device needs and of the bytes it communicates per step, without allocating or
compiling anything:

  parameters   exact: every parameter's shard under the layout (float32 master weights)
  optimizer    Adam: 2 x parameters; Adafactor: factored statistics (replicated) + momentum
  gradients    float32 gradients and reduction buffers of the weights as the backward pass sees
               them (gathered over the batch axis under FSDP; without remat all of them, with
               remat one block's), plus an accumulator with microbatches
  activations  per microbatch: what the backward pass keeps per token and layer, counted per
               tensor in units of its (sharded) dimensions. Scanned layers (`scan_layers`)
               keep more than unrolled ones: the scan stacks every residual JAX's
               linearisation names, which XLA cannot fuse away across the loop (ACT_SCANNED
               against ACT_UNROLLED). With remat (`remat_policy`, or recompute_grad: full)
               each layer keeps what its policy saves, plus one layer recomputed at a time
  communication  ring all-reduce / all-gather / reduce-scatter bytes implied by the layout:
               gradient reduction over the batch axis, parameter gathers for FSDP, partial-sum
               reductions of matmuls whose contracted dimension is split (tensor parallelism)

The activation coefficients (ACT_*) count what XLA actually keeps. They were measured on
XLA:CPU, in float32 (FLOAT32_SHARE: what stays float32 under bfloat16 was counted in the
scanned step's outputs); tests/test_auto_layout.py checks the whole estimate against
`compiled.memory_analysis()` of neo's real train step on 8 simulated devices, within
TOLERANCE (docs/layouts.md), scanned and unrolled, with and without remat. TPU and GPU
compilers fuse more, so there the activation part is an upper bound. Remat between unrolled
layers is estimated but not checked: XLA:CPU ignores it there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from neo.config import Config, ModelConfig
from neo.errors import NeoError
from neo.loss import CHUNK_TOKENS
from neo.mesh import num_microbatches, parameter_name, parse_layout, parse_mesh_shape, resolve

GiB = 1024 ** 3
TOLERANCE = 0.25  # |estimate / compiled - 1| on simulated devices (tests/test_auto_layout.py)

# Floats kept for the backward pass, per token and layer, per unit of the named dimension:
# (residual x embd: block input, norms' inputs and outputs, residual sums; heads x heads *
# features_per_head: q, k, v and the attention output; probs x heads * keys attended: attention
# probabilities (float32); linear x heads * features_per_head: linear attention's normalised q,
# exp(k), sums; mlp x intermediate: c_fc output and the activation's intermediates).
# Unrolled layers: what XLA keeps after fusing each layer's forward into its backward; it
# recomputes cheap elementwise values (most of the gelu) instead of storing them.
ACT_UNROLLED = dict(residual=7.25, heads=4.0, probs=1.85, linear=1.6, mlp=2.3)
# Scanned layers (nn.scan, `scan_layers`): the forward loop stacks, per layer, every residual
# JAX's linearisation of the layer body names, and XLA cannot fuse across the loop to recompute
# any of them. The MLP leaves two [tokens, intermediate] values: c_fc's output (the activation
# keeps only its input, layers.saves_input) and the activation's output (c_proj's input). Before
# saves_input the activation's own intermediates made it six (counted in the compiled step's
# forward while loop, whose outputs are these stacked residuals; 2026-11-29). The norms keep
# only their inputs (layers.recomputed_norm): residual was 8.0 before, when their float32
# intermediates were stacked too (5 [tokens, embd] arrays per layer fewer in the compiled step
# of tests/test_auto_layout.py's "data" case, 2026-12-01).
ACT_SCANNED = dict(residual=3.0, heads=4.0, probs=2.0, linear=1.6, mlp=2.0)
# The share of these kept in float32 whatever `precision` says, the rest in the compute dtype:
# layer norms and the softmax compute in float32 (as mesh-tf does), so in bfloat16 six of the
# eight stacked residual-width values and one of the two [heads, T, keys] stay float32.
FLOAT32_SHARE = dict(residual=0.75, heads=0.0, probs=0.5, linear=0.0, mlp=0.0)
ACT_LOGITS = 2.2      # x vocab: float32 logits and their gradient
# Bytes, per byte of the weights as one device sees them in the backward pass (gathered over
# the batch axis when FSDP splits them there): gradients and their reduction buffers.
GRADS_LIVE = 1.5
# Bytes, per byte of the device's own share of the weights: the gradient accumulator when there
# are microbatches (neo/train.py sums them into a tree sharded as the parameters are, so under
# FSDP it holds the device's shard, not the gathered weights).
ACCUMULATOR = 1.0
ADAFACTOR_TEMP = 0.65  # x parameters: Adafactor's extra update temporaries

# Devices a user may plan for without having them (--auto_layout_target).
TARGETS = {
    "tpu-v3-8": (8, 16 * GiB, "TPU v3-8 (8 cores x 16 GiB)"),
    "tpu-v3-256": (256, 16 * GiB, "TPU v3-256 pod slice (256 cores x 16 GiB)"),
    "gpu-8x80g": (8, 80 * GiB, "one node of 8 x 80 GB GPUs (A100/H100)"),
    "gpu-8x40g": (8, 40 * GiB, "one node of 8 x 40 GB GPUs (A100 40GB)"),
}


@dataclass(frozen=True)
class Target:
    """The devices to plan for."""

    num_devices: int
    memory_bytes: float
    name: str


@dataclass(frozen=True)
class Estimate:
    """One candidate: per-device bytes and communication per step."""

    mesh_shape: str
    layout: str
    params: float
    optimizer: float
    gradients: float
    activations: float
    activations_remat: float
    communication: float
    remat: bool  # a remat_policy other than none (recompute_grad: full)
    microbatch: int  # sequences per microbatch per replica
    memory: float = 0.0  # params + optimizer + gradients + activations (remat or not)
    fits: bool = False
    own: bool = False  # the config's own mesh_shape and layout


# ----------------------------------------------------------------------------------------------
# Shapes and shardings without devices


@dataclass(frozen=True)
class _Plan:
    axes: dict
    rules: tuple

    def local(self, names: Sequence[Optional[str]], sizes: Sequence[float]) -> float:
        """Elements of one device's shard of a tensor with these dimension names."""
        spec = resolve(self.rules, names)
        return math.prod(s / (self.axes[a] if a else 1) for s, a in zip(sizes, spec))

    def split(self, dim: str, names: Sequence[Optional[str]]) -> int:
        """How many ways `dim` is split within a tensor whose dimensions are `names`."""
        spec = resolve(self.rules, names)
        axis = spec[list(names).index(dim)] if dim in names else None
        return self.axes[axis] if axis else 1

    def axis_of(self, dim: str, names: Sequence[Optional[str]]) -> Optional[str]:
        spec = resolve(self.rules, names)
        return spec[list(names).index(dim)] if dim in names else None


def parameter_shapes(cfg: Config) -> list[tuple[str, tuple[int, ...], tuple[Optional[str], ...]]]:
    """(path, shape, dimension names) of every parameter, from an abstract init (no memory)."""
    import flax.linen as nn
    import jax

    from neo.model import abstract_init

    boxed = abstract_init(cfg.model)
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))
    out = []
    for (path, leaf), spec in zip(flat, specs):
        names = tuple(spec) if len(tuple(spec)) == leaf.ndim else (None,) * leaf.ndim
        out.append((parameter_name(path), tuple(leaf.shape), names))
    return out


def parameter_count(cfg: Config) -> int:
    """Number of parameters, computed abstractly (nothing allocated)."""
    return sum(math.prod(shape) for _, shape, _ in parameter_shapes(cfg))


# ----------------------------------------------------------------------------------------------
# The estimate


def _keys(cfg: ModelConfig, kind: str) -> float:
    t = cfg.n_ctx
    if kind == "global":
        return t + cfg.num_mem_kv
    if kind == "local":
        r = cfg.local_attention_radius
        return (2 if cfg.causal else 3) * r if t > 2 * r else t
    if kind == "linear":
        return min(64, t) if cfg.causal else 0
    return 0


def _dense_scores(cfg: ModelConfig, kind: str) -> bool:
    """Does this layer's attention kernel hold the [heads, T, keys] probabilities? `auto` is
    resolved as attention_op.choose resolves it on the backend at hand (planning for another
    one from a CPU counts CPU's choice: an upper bound where the target fuses more)."""
    import jax.numpy as jnp

    from neo.model.attention_op import choose

    if kind not in ("global", "local"):
        return kind == "linear"  # linear attention's [heads, T, 64] chunk scores, whatever the kernel
    impl = cfg.attention_impl
    if impl == "auto":
        window = cfg.local_attention_radius if kind == "local" else None
        dtype = jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32
        impl = choose("auto", t=cfg.n_ctx, head_dim=cfg.n_embd // cfg.n_head, dtype=dtype, causal=cfg.causal,
                      window=window)
    return impl in ("xla", "dot_product")


def _layer_bytes(cfg: ModelConfig, plan: _Plan, kind: str, moe: bool, acts: dict, width: int) -> float:
    """Bytes one layer keeps for the backward pass, per (local) token, without remat; `acts`:
    ACT_SCANNED or ACT_UNROLLED, `width`: bytes of the compute dtype."""
    c = {k: n * (4 * FLOAT32_SHARE[k] + width * (1 - FLOAT32_SHARE[k])) for k, n in acts.items()}
    act = ("batch", "sequence", "embd")
    heads_names = ("batch", "sequence", "heads", "features_per_head")
    d = cfg.n_embd / plan.split("embd", act)
    hd = cfg.n_embd / plan.split("heads", heads_names) / plan.split("features_per_head", heads_names)
    h = cfg.n_head / plan.split("heads", ("batch", "heads", "sequence", "memory_length"))
    keys = _keys(cfg, kind) / plan.split("memory_length", ("batch", "heads", "sequence", "memory_length"))
    nbytes = c["residual"] * d
    if kind != "none":
        nbytes += c["heads"] * hd
        if _dense_scores(cfg, kind):  # the fused kernels never hold T x T
            nbytes += c["probs"] * h * keys
        if kind == "linear":
            nbytes += c["linear"] * hd
    n_mlp = 2 if cfg.macaron else 1
    if moe:
        from neo.model.moe import capacity, group_size

        p = cfg.moe_params
        s = group_size(cfg.n_ctx, p.moe_group_size)
        slots = p.moe_num_experts * capacity(s, p, train=True)  # expert slots per group
        ex = ("experts", "batch", None, "expert_capacity", "embd")
        e_split = plan.split("experts", ex)
        f = p.moe_hidden_size / plan.split("intermediate_expanded", ex[:-1] + ("intermediate_expanded",))
        nbytes += slots / s / e_split * (2 * d * width + c["mlp"] * f) + 2 * slots / e_split * width
        n_mlp -= 1
    f = cfg.intermediate_expanded / plan.split("intermediate_expanded", ("batch", "sequence", "intermediate_expanded"))
    nbytes += n_mlp * c["mlp"] * f * (2 if cfg.gated else 1)
    return nbytes


def _saved_floats(cfg: ModelConfig, plan: _Plan, policy: str, kind: str) -> float:
    """Floats one layer keeps per (local) token under a remat policy (neo/model/gpt.py
    REMAT_SAVED): its input always (the scan's carry, or the checkpoint's argument); with
    `save_dots` every Dense output (q, k, v, the attention projection, c_fc, c_proj); with
    `save_attention_out` the attention output. The rest is recomputed, one layer at a time."""
    act = ("batch", "sequence", "embd")
    d = cfg.n_embd / plan.split("embd", act)
    heads_names = ("batch", "sequence", "heads", "features_per_head")
    hd = cfg.n_embd / plan.split("heads", heads_names) / plan.split("features_per_head", heads_names)
    f = cfg.intermediate_expanded / plan.split("intermediate_expanded", ("batch", "sequence", "intermediate_expanded"))
    attn = kind != "none"
    if policy == "save_dots":
        n_mlp = 2 if cfg.macaron else 1
        return d + attn * (3 * hd + d) + n_mlp * (f * (2 if cfg.gated else 1) + d)
    if policy == "save_attention_out":
        return d + attn * hd
    return d


def estimate(cfg: Config, mesh_shape: str, layout: str, num_devices: int,
             params: Optional[list] = None) -> Estimate:
    """Per-device memory (bytes) and communication (bytes per step) of `cfg` under a layout.
    `params`: parameter_shapes(cfg), when already at hand."""
    axes = dict(parse_mesh_shape(mesh_shape, num_devices))
    if math.prod(axes.values()) != num_devices:
        raise NeoError(f"mesh_shape {mesh_shape!r} uses {math.prod(axes.values())} devices, not {num_devices}; "
                       f"change it, or let --auto_layout_and_mesh_shape choose one.")
    plan = _Plan(axes, parse_layout(layout, list(axes)))
    params = params if params is not None else parameter_shapes(cfg)
    param_local = sum(plan.local(names, shape) for _, shape, names in params)
    p_bytes = 4 * param_local

    if cfg.optimizer.opt_name.lower() == "adam":
        opt = 2 * p_bytes
        update_temp = 0.0
    else:  # factored second moments are replicated (their shapes carry no names); momentum
        factored = sum((math.prod(s[:-1]) + math.prod(s[:-2] + s[-1:])) if len(s) >= 2 else math.prod(s)
                       for _, s, _ in params)
        opt = 4 * factored + (p_bytes if cfg.optimizer.beta1 else 0.0)
        update_temp = ADAFACTOR_TEMP * p_bytes

    batch_shards = plan.split("batch", ("batch", "sequence"))
    r = cfg.run
    n_micro = num_microbatches(r.train_batch_size, cfg.model.n_ctx, r.tokens_per_mb_per_replica, batch_shards)
    # Weights as the backward pass sees them: FSDP gathers them over the batch axis. Without
    # remat XLA keeps every gathered weight from the forward pass; with remat each block
    # gathers again when it is recomputed, so one block's worth is gathered at a time.
    data_axis = plan.axis_of("batch", ("batch", "sequence", "embd"))
    gathered, per_block = 0.0, {}
    for path, shape, names in params:
        n = plan.axes[data_axis] if data_axis and data_axis in resolve(plan.rules, names) else 1
        extra = 4 * plan.local(names, shape) * (n - 1)
        gathered += extra
        block = path.split("/")[0]
        if block == "layers":  # stacked for nn.scan (neo/model/params.py): one layer is one slice
            block, extra = "/".join(path.split("/")[:2]), extra / shape[0]
        per_block[block] = per_block.get(block, 0.0) + extra
    seen = p_bytes + (max(per_block.values()) if cfg.model.remat != "none" else gathered)
    grads = GRADS_LIVE * seen + (ACCUMULATOR * p_bytes if n_micro > 1 else 0.0) + update_temp

    act = ("batch", "sequence", "embd")
    rows = cfg.run.train_batch_size / n_micro / batch_shards
    tokens = rows * cfg.model.n_ctx / plan.split("sequence", act)
    width = 2 if cfg.model.precision == "bfloat16" else 4
    acts, acts_remat = _activations(cfg, plan, rows, tokens, width)

    comm = _communication(cfg, plan, params, tokens, width, n_micro)
    e = Estimate(mesh_shape, layout, p_bytes, opt, grads, acts, acts_remat, comm, cfg.model.remat != "none", int(rows))
    return replace(e, memory=p_bytes + opt + grads + (acts_remat if e.remat else acts))


def _activations(cfg: Config, plan: _Plan, rows: float, tokens: float, width: int) -> tuple[float, float]:
    """Bytes of activations one microbatch keeps for the backward pass on one device: without
    remat, and with the remat policy in effect (`full` when none is)."""
    act = ("batch", "sequence", "embd")
    moe_layers = set(cfg.model.moe_layers or ())
    m = cfg.model
    c = ACT_SCANNED if m.layers_loop else ACT_UNROLLED  # a scan unrolled entirely keeps what unrolled layers keep
    kinds = list(enumerate(cfg.model.attention_types))
    layers = [_layer_bytes(cfg.model, plan, k, i in moe_layers, c, width) for i, k in kinds]
    # With remat each layer keeps what its policy saves, and one layer at a time is recomputed
    # (less what was saved) and run backward inside one loop body or checkpoint, which XLA fuses
    # as it fuses an unrolled layer.
    policy = cfg.model.remat if cfg.model.remat != "none" else "full"
    saved = [_saved_floats(cfg.model, plan, policy, k) for _, k in kinds]
    d = cfg.model.n_embd / plan.split("embd", act)
    one = max(_layer_bytes(cfg.model, plan, k, i in moe_layers, ACT_UNROLLED, width) - width * (saved[i] - d)
              for i, k in kinds)
    vocab = cfg.model.n_vocab / plan.split("vocab", ("batch", "sequence", "vocab"))
    # float32 logits of one chunk of the loss (neo/loss.py) and their gradient; embeddings, ln_f
    chunk = min(tokens, rows * max(1, CHUNK_TOKENS // cfg.run.train_batch_size))
    head = chunk * 4 * ACT_LOGITS * vocab + tokens * width * 2 * d
    acts = tokens * sum(layers) + head
    acts_remat = tokens * (width * sum(saved) + one) + head
    return acts, acts_remat


def _ring(n: int) -> float:
    return (n - 1) / n


def _communication(cfg: Config, plan: _Plan, params: list, tokens: float, width: int, n_micro: int) -> float:
    """Bytes one device sends per step (ring collectives)."""
    act = ("batch", "sequence", "embd")
    batch_axis = plan.axis_of("batch", act)
    seq_axis = plan.axis_of("sequence", act)
    data_axes = [a for a in (batch_axis, seq_axis) if a]
    total = 0.0
    for _, shape, names in params:
        local = 4 * plan.local(names, shape)
        for a in data_axes:
            n = plan.axes[a]
            if n == 1:
                continue
            if a in resolve(plan.rules, names):  # FSDP: gather for forward and backward, reduce-scatter
                total += n_micro * 2 * _ring(n) * local * n + _ring(n) * local * n
            else:  # data parallel: all-reduce the gradient (inside every microbatch's backward)
                total += n_micro * 2 * _ring(n) * local
    # partial sums of matmuls whose contracted dimension is split (tensor/model parallelism):
    # forward all-reduce of the output and backward all-reduce of the input gradient
    d, f = cfg.model.n_embd, cfg.model.intermediate_expanded
    heads = ("batch", "sequence", "heads", "features_per_head")
    hidden = ("batch", "sequence", "intermediate_expanded")
    per_layer = 0.0
    for contracted, out_names, out_size in (
            ("embd", heads, 3 * d),                  # q, k, v from the residual
            ("heads", act, d),                       # o projection
            ("embd", hidden, f),                     # c_fc
            ("intermediate_expanded", act, d)):      # c_proj
        in_names = act if contracted == "embd" else (heads if contracted == "heads" else hidden)
        n = plan.split(contracted, in_names)
        if n > 1:
            per_layer += 2 * _ring(n) * tokens * width * out_size / plan.split(out_names[-1], out_names)
    n_attn_layers = sum(k != "none" for k in cfg.model.attention_types)
    total += n_micro * 2 * per_layer * (n_attn_layers + cfg.model.n_layer) / 2
    n_vocab = plan.split("vocab", ("vocab", "embd"))
    if n_vocab > 1:  # sharded embedding lookup and the LM head's input gradient
        total += n_micro * 2 * 2 * _ring(n_vocab) * tokens * width * cfg.model.n_embd
    return total


# ----------------------------------------------------------------------------------------------
# Candidates and ranking


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _role_layout(cfg: Config, data: str, model: Optional[str], model_size: int, fsdp: bool,
                 experts: bool) -> Optional[str]:
    """A layout string for a data axis (batch, optionally FSDP over embd) and a model axis
    (Megatron tensor parallelism: heads, MLP width, vocabulary where they divide)."""
    pairs = []
    if experts:
        pairs.append(f"experts:{data}")
    pairs.append(f"batch:{data}")
    if fsdp:
        pairs.append(f"embd:{data}")
    if model and model_size > 1:
        if cfg.model.kv_heads % model_size:
            return None
        pairs.append(f"heads:{model}")
        if cfg.model.intermediate_expanded % model_size == 0:
            pairs.append(f"intermediate_expanded:{model}")
        if cfg.model.n_vocab % model_size == 0:
            pairs.append(f"vocab:{model}")
    return ",".join(pairs)


def candidates(cfg: Config, num_devices: int, mesh_shape: Optional[str]) -> list[tuple[str, str]]:
    """(mesh_shape, layout) pairs to compare. With `mesh_shape` the mesh is fixed (its first
    axis carries the batch, a second one the model split); otherwise every data x model split
    of `num_devices` is tried."""
    meshes: list[tuple[tuple[str, int], ...]]
    if mesh_shape is not None:
        meshes = [parse_mesh_shape(mesh_shape, num_devices)]
    else:
        meshes = [(("x", num_devices // m), ("y", m)) if m > 1 else (("x", num_devices),)
                  for m in _divisors(num_devices)]
    experts_ok = bool(cfg.model.moe_layers)
    out = []
    for axes in meshes:
        text = ",".join(f"{a}:{s}" for a, s in axes)
        names = [a for a, _ in axes]
        orders = [(names[0], names[1] if len(names) > 1 else None)]
        if len(names) == 2 and mesh_shape is not None:
            orders.append((names[1], names[0]))
        for data, model in orders:
            size = dict(axes)[model] if model else 1
            if cfg.run.train_batch_size % dict(axes)[data]:
                continue
            for fsdp in (False, True):
                for experts in ((False, True) if experts_ok else (False,)):
                    lay = _role_layout(cfg, data, model, size, fsdp, experts)
                    if lay and (text, lay) not in out:
                        out.append((text, lay))
    return out


def fits_shapes(cfg: Config, mesh_shape: str, layout: str, num_devices: int) -> Optional[str]:
    """None if every split dimension divides by its mesh axis, else the reason."""
    axes = dict(parse_mesh_shape(mesh_shape, num_devices))
    rules = parse_layout(layout, list(axes))
    m = cfg.model
    sizes = {"batch": cfg.run.train_batch_size, "sequence": m.n_ctx, "memory_length": m.n_ctx,
             "embd": m.n_embd, "embed_sequence": m.n_ctx, "vocab": m.n_vocab, "heads": m.kv_heads,
             "features_per_head": m.features_per_head, "intermediate_expanded": m.intermediate_expanded}
    if m.moe_layers:
        p = m.moe_params
        sizes["experts"] = p.moe_num_experts
        sizes["intermediate_expanded"] = math.gcd(sizes["intermediate_expanded"], p.moe_hidden_size)
    for dim, axis in rules:
        if dim in sizes and sizes[dim] % axes[axis]:
            return f"{dim} ({sizes[dim]}) does not split over mesh axis '{axis}' ({axes[axis]})"
    batch_shards = axes[dict(rules)["batch"]] if "batch" in dict(rules) else 1
    mb = num_microbatches(cfg.run.train_batch_size, cfg.model.n_ctx, cfg.run.tokens_per_mb_per_replica, batch_shards)
    if "batch" in dict(rules) and (cfg.run.train_batch_size // mb) % axes[dict(rules)["batch"]]:
        return f"microbatches of {cfg.run.train_batch_size // mb} rows do not split over the batch axis"
    return None


def own_layout(cfg: Config, num_devices: int) -> Optional[tuple[str, str]]:
    """The config's own (mesh_shape, layout), spelled out, or None if its mesh has another size."""
    try:
        axes = parse_mesh_shape(cfg.run.mesh_shape, num_devices)
    except NeoError:  # a -1 axis that does not fit this many devices
        return None
    if math.prod(s for _, s in axes) != num_devices:
        return None
    return ",".join(f"{a}:{s}" for a, s in axes), cfg.run.layout or f"batch:{axes[0][0]}"


def rank(cfg: Config, target: Target, mesh_shape: Optional[str] = None) -> list[Estimate]:
    """Every valid candidate, best first: those that fit before those that do not, then by
    communication per step, then by memory. The config's own layout (on a mesh of the planned
    size) is always evaluated first and marked `own`. A candidate that does not fit as
    configured gets GPT-Neo's two remedies, in this order: more microbatches
    (tokens_per_mb_per_replica, down to one sequence), then recompute_grad with the largest
    microbatch that fits."""
    if mesh_shape is not None:
        size = math.prod(s for _, s in parse_mesh_shape(mesh_shape, target.num_devices))
        if size != target.num_devices:
            raise NeoError(f"mesh_shape {mesh_shape!r} uses {size} devices but {target.num_devices} are planned "
                           f"for; change mesh_shape or use --auto_layout_and_mesh_shape.")
    params = parameter_shapes(cfg)
    own = own_layout(cfg, target.num_devices)
    out = []
    for mesh, lay in ([own] if own else []) + candidates(cfg, target.num_devices, mesh_shape):
        if fits_shapes(cfg, mesh, lay, target.num_devices) or any((e.mesh_shape, e.layout) == (mesh, lay) for e in out):
            continue
        out.append(replace(_best_settings(cfg, mesh, lay, target, params), own=(mesh, lay) == own))
    return sorted(out, key=lambda e: (not e.fits, e.communication, e.memory))


def unsplittable(cfg: Config, target: Target, mesh_shape: Optional[str] = None) -> list[str]:
    """Why nothing ranks: the config's own layout's reason first, then the candidates' (distinct)."""
    own = own_layout(cfg, target.num_devices)
    reasons = []
    if own:
        reasons.append(f"the config's layout {own[1]!r} on mesh_shape {own[0]!r}: "
                       f"{fits_shapes(cfg, own[0], own[1], target.num_devices)}")
    for mesh, lay in candidates(cfg, target.num_devices, mesh_shape):
        why = fits_shapes(cfg, mesh, lay, target.num_devices)
        if why and not any(why in r for r in reasons):
            reasons.append(f"{lay!r} on {mesh!r}: {why}")
    return reasons


def _best_settings(cfg: Config, mesh: str, layout: str, target: Target, params: list) -> Estimate:
    first = estimate(cfg, mesh, layout, target.num_devices, params)
    if first.memory <= target.memory_bytes:
        return replace(first, fits=True)
    tried = []
    for remat in ((False, True) if cfg.model.remat == "none" else (True,)):
        rows = first.microbatch
        while rows >= 1:
            trial = cfg.replace(recompute_grad=remat, tokens_per_mb_per_replica=rows * cfg.model.n_ctx)
            if not fits_shapes(trial, mesh, layout, target.num_devices):
                e = estimate(trial, mesh, layout, target.num_devices, params)
                tried.append(e)
                if e.memory <= target.memory_bytes:
                    return replace(e, fits=True)
            rows //= 2
    return min(tried, key=lambda e: e.memory) if tried else first


# ----------------------------------------------------------------------------------------------
# Output


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _bytes(x: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= k:
            return f"{x / k:.1f} {unit}"
    return f"{x:.0f} B"


def report(cfg: Config, target: Target, ranked: list[Estimate], top: int = 12,
           mesh_shape: Optional[str] = None) -> str:
    """The table (the config's own layout marked *) and the config lines to paste."""
    if not ranked:
        reasons = unsplittable(cfg, target, mesh_shape)
        return (f"neo auto layout: no mesh shape and layout of {target.num_devices} devices splits {cfg.name}'s "
                f"dimensions evenly: " + "; ".join(reasons[:4] or ["no candidate layout"])
                + ". Change the named size or the mesh axis it is split over.")
    lines = [f"neo auto layout: {cfg.name} ({parameter_count(cfg):,} parameters), batch {cfg.run.train_batch_size} x "
             f"{cfg.model.n_ctx}, on {target.name}: {target.num_devices} devices x {_gib(target.memory_bytes)} GiB",
             "GiB per device (float32 weights, gradients and optimizer state; activations of one microbatch); "
             "mb = sequences per microbatch per replica; comm = bytes each device sends per step",
             ""]
    head = ["#", "mesh_shape", "layout", "params", "optim", "grads", "activ", "total", "mb", "remat", "comm", "fits"]
    rows = []
    shown = ranked[:top] + [e for e in ranked[top:] if e.own]  # the config's own layout always shows
    for e in shown:
        acts = e.activations_remat if e.remat else e.activations
        rows.append([f"{ranked.index(e) + 1}{'*' if e.own else ''}", e.mesh_shape, e.layout, _gib(e.params),
                     _gib(e.optimizer), _gib(e.gradients), _gib(acts), _gib(e.memory), str(e.microbatch), "yes" if e.remat else "no",
                     _bytes(e.communication), "yes" if e.fits else "no"])
    widths = [max(len(r[k]) for r in rows + [head]) for k in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if len(ranked) > len(shown):
        lines.append(f"... {len(ranked) - len(shown)} more")
    own = next((e for e in ranked if e.own), None)
    if own:
        lines.append(f"* the config's own mesh_shape and layout (ranked {ranked.index(own) + 1} of {len(ranked)})")
    else:
        lines.append("(the config's own layout is not ranked: " + (
            "; ".join(unsplittable(cfg, target, mesh_shape)[:1]) if own_layout(cfg, target.num_devices)
            else f"its mesh_shape {cfg.run.mesh_shape!r} is not {target.num_devices} devices") + ")")
    lines.append("")
    best = ranked[0]
    if not best.fits:
        lines.append(f"Nothing fits in {_gib(target.memory_bytes)} GiB per device, even with one sequence per "
                     f"microbatch and recompute_grad: use more devices (--auto_layout_and_mesh_shape, "
                     f"--num_devices) or a smaller model.")
        return "\n".join(lines)
    lines.append("Paste into the config:")
    lines += ["    " + line for line in config_lines(cfg, best)]
    return "\n".join(lines)


def config_lines(cfg: Config, e: Estimate) -> list[str]:
    """The JSON lines that set up candidate `e`: its mesh and layout, and the microbatching
    and remat settings where they differ from the config."""
    import json

    axes = dict(parse_mesh_shape(e.mesh_shape, 1))  # candidates always spell out their sizes
    batch_axis = dict(parse_layout(e.layout, list(axes))).get("batch")
    per_replica = cfg.run.train_batch_size // (axes[batch_axis] if batch_axis else 1)
    pairs = [("mesh_shape", e.mesh_shape), ("layout", e.layout)]
    if e.microbatch != per_replica or cfg.run.tokens_per_mb_per_replica:
        pairs.append(("tokens_per_mb_per_replica", e.microbatch * cfg.model.n_ctx))
    if e.remat != (cfg.model.remat != "none"):
        pairs.append(("recompute_grad", e.remat))
    return [f"{json.dumps(k)}: {json.dumps(v)}" + ("," if i < len(pairs) - 1 else "") for i, (k, v) in enumerate(pairs)]


def target_from(num_devices: Optional[int], memory_gb: Optional[float], preset: Optional[str]) -> Target:
    """The devices to plan for: a preset, numbers given on the command line, or the devices
    present (their memory as reported by the runtime; host memory shared for CPU devices)."""
    if preset:
        if preset not in TARGETS:
            raise NeoError(f"--auto_layout_target {preset!r} is not one of {', '.join(TARGETS)}; or give "
                           f"--num_devices and --device_memory_gb.")
        n, mem, name = TARGETS[preset]
        return Target(num_devices or n, memory_gb * GiB if memory_gb else mem, name)
    if num_devices and memory_gb:
        return Target(num_devices, memory_gb * GiB, f"{num_devices} planned devices")
    import jax

    devices = jax.devices()
    n = num_devices or len(devices)
    if memory_gb:
        return Target(n, memory_gb * GiB, f"{n} x {devices[0].device_kind}")
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return Target(n, float(stats["bytes_limit"]), f"{n} x {devices[0].device_kind}")
    if devices[0].platform == "cpu":
        import os

        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Target(n, host / len(devices), f"{n} CPU device(s) sharing {host / GiB:.0f} GiB of host memory")
    raise NeoError(f"cannot read the memory of {devices[0].device_kind}; pass --device_memory_gb.")
