"""`mesh_shape` and `layout` strings -> a jax Mesh, logical-axis rules and shardings.

GPT-Neo names every tensor dimension (batch, sequence, embd, heads, vocab, ...); the config's
`layout` maps those names onto mesh axes. neo keeps that vocabulary: parameters carry their
dimension names as flax logical-axis metadata, activations are constrained by name through
`constrain`, and this module is the only place the names become PartitionSpecs.

Rule semantics (as in mesh-tensorflow and flax): a dimension is split over a mesh axis iff the
layout maps it there; one dimension may not map to two axes; within one tensor a mesh axis is
used at most once, and the pair written first in `layout` wins (so `batch:x,embd:x` is FSDP:
parameters split along embd, activations along batch; `embd:x,batch:x` splits the activations
along embd instead, which `parse_layout` warns about). A pair naming a mesh axis that mesh_shape
does not have is skipped with a warning (mesh-tf skipped it silently); an unknown dimension
name is an error.

Here too, because they are the same question asked of a whole tree: the shardings of a state
(`place`: parameters and optimizer state, from their logical names), of batch rows
(`Layout.rows`; `process_rows` / `assemble_rows`: which rows of a global batch this process's
devices hold, and the global array built from only those), and how many microbatches a batch is
cut into (`num_microbatches`). The planner (neo/auto_layout.py) resolves layouts on paper with
the same `resolve`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from neo.errors import NeoError, did_you_mean

# Every dimension name neo's tensors carry (GPT-Neo's names, plus `experts` for MoE).
DIMENSIONS = (
    "batch", "sequence", "memory_length", "embd", "embed_sequence", "vocab", "heads",
    "features_per_head", "intermediate_expanded", "experts", "expert_capacity",
    "mem_kv_sequence", "axial_dim",
)
# Dimensions of weights that activations split along `batch` carry too: a layout that puts one
# of them before `batch` on the same mesh axis takes that axis from the activations' batch.
# `experts` is left out: `experts:x,batch:x` is the expert-parallel recipe (docs/layouts.md).
WEIGHT_DIMENSIONS = ("embd", "vocab", "heads", "features_per_head", "intermediate_expanded")
_SEPARATORS = r"[,.;\s]+"


class LayoutOrderWarning(UserWarning):
    """A layout whose pair order changes what is split (the pair written first wins)."""


class UnknownAxisWarning(UserWarning):
    """A layout pair naming a mesh axis that mesh_shape does not have (the pair is skipped)."""


def resolve(rules: Sequence[tuple[str, str]], names: Sequence[Optional[str]]) -> tuple[Optional[str], ...]:
    """The mesh axis each dimension of a tensor called `names` is split over (None: whole): the
    layout's pairs in order, each mesh axis used at most once per tensor."""
    used: set[str] = set()
    out: list[Optional[str]] = [None] * len(names)
    for dim, axis in rules:  # layout order = priority
        if dim in names and axis not in used:
            out[list(names).index(dim)] = axis
            used.add(axis)
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """A mesh plus the ordered (dimension -> mesh axis) rules of a config's `layout`."""

    mesh: Mesh
    rules: tuple[tuple[str, str], ...]

    def spec(self, names: Sequence[Optional[str]]) -> P:
        """PartitionSpec for a tensor whose dimensions are called `names`."""
        return P(*resolve(self.rules, names))

    def sharding(self, names: Sequence[Optional[str]]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    @property
    def rows(self) -> NamedSharding:
        """Arrays of [batch rows, ...] (token batches, prompts, scores): rows split as `batch`,
        every other dimension whole, whatever the rank."""
        return self.sharding(("batch",))

    def axis_size(self, dim: str) -> int:
        """How many ways dimension `dim` is split (1 if it is not in the layout)."""
        axis = dict(self.rules).get(dim)
        return self.mesh.shape[axis] if axis else 1

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @contextlib.contextmanager
    def active(self) -> Iterator["Layout"]:
        """Make `constrain` apply this layout while tracing the model."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Optional[Layout]] = contextvars.ContextVar("neo_layout", default=None)


def active_layout() -> Optional[Layout]:
    """The layout `Layout.active` set while tracing, if any (a kernel that runs per device, under
    shard_map, needs the mesh and the specs of its operands)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Pin an activation's sharding by dimension names (a no-op outside `Layout.active`)."""
    layout = _ACTIVE.get()
    if layout is None or layout.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(names))


# ----------------------------------------------------------------------------------------------
# Parsing


def parse_mesh_shape(text: str, n_devices: int) -> tuple[tuple[str, int], ...]:
    """"x:2,y:4" -> (("x", 2), ("y", 4)). One size may be -1: it takes the remaining devices.
    An empty string means every device on one data-parallel axis "x"."""
    if not text.strip():
        return (("x", n_devices),)
    axes: list[tuple[str, int]] = []
    for part in re.split(_SEPARATORS, text.strip()):
        m = re.fullmatch(r"([A-Za-z_]\w*):(-?\d+)", part)
        if not m:
            raise NeoError(f"mesh_shape {text!r}: cannot read {part!r}; write name:size pairs like \"x:2,y:4\".")
        name, size = m.group(1), int(m.group(2))
        if any(name == a for a, _ in axes):
            raise NeoError(f"mesh_shape {text!r}: axis '{name}' appears twice.")
        if size == 0 or size < -1:
            raise NeoError(f"mesh_shape {text!r}: axis '{name}' has size {size}; sizes are positive (or -1 = the rest).")
        axes.append((name, size))
    fill = [a for a, s in axes if s == -1]
    if len(fill) > 1:
        raise NeoError(f"mesh_shape {text!r}: only one axis may be -1.")
    if fill:
        rest = math.prod(s for _, s in axes if s != -1)
        if n_devices % rest:
            raise NeoError(f"mesh_shape {text!r}: the fixed axes use {rest} devices, which does not divide "
                           f"the {n_devices} available.")
        axes = [(a, n_devices // rest if s == -1 else s) for a, s in axes]
    return tuple(axes)


def parse_layout(text: str, axis_names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """"batch:x,embd:y" -> (("batch", "x"), ("embd", "y")), checked against the mesh axes.
    An empty layout means pure data parallelism: batch over the first mesh axis."""
    if not text.strip():
        return (("batch", axis_names[0]),)
    rules: list[tuple[str, str]] = []  # pairs whose mesh axis exists, in the layout's order
    for part in re.split(_SEPARATORS, text.strip()):
        m = re.fullmatch(r"(\w+):(\w+)", part)
        if not m:
            raise NeoError(f"layout {text!r}: cannot read {part!r}; write dimension:mesh_axis pairs like \"batch:x,heads:y\".")
        dim, axis = m.groups()
        if dim not in DIMENSIONS:
            raise NeoError(f"layout {text!r}: {dim!r} is not a tensor dimension name.{did_you_mean(dim, DIMENSIONS)} "
                           f"Known dimensions: {', '.join(DIMENSIONS)}.")
        if axis not in axis_names:
            # mesh-tf skipped such a rule, and a config GPT-Neo's Colab notebook writes has one
            # (`vocab:n_vocab`): the dimension stays whole, said out loud.
            warnings.warn(f"layout {text!r} maps '{dim}' to mesh axis '{axis}', which is not in mesh_shape (axes: "
                          f"{', '.join(axis_names)}), so '{dim}' is not split (GPT-Neo ignored such pairs too)."
                          f"{did_you_mean(axis, axis_names)}", UnknownAxisWarning, stacklevel=3)
            continue
        for d, a in rules:
            if d == dim and a != axis:
                raise NeoError(f"layout {text!r}: dimension '{dim}' is mapped to two mesh axes ('{a}' and "
                               f"'{axis}'); a dimension can be split over one axis only.")
        if (dim, axis) not in rules:
            rules.append((dim, axis))
    _warn_weight_before_batch(text, rules)
    return tuple(rules)


def _warn_weight_before_batch(text: str, rules: Sequence[tuple[str, str]]) -> None:
    """`embd:x,batch:x` reads like FSDP but is not: the pair written first wins, so activations
    [batch, sequence, embd] are split along embd and not along batch."""
    batch_axis = dict(rules).get("batch")
    if batch_axis is None:
        return
    before = rules[:list(rules).index(("batch", batch_axis))]
    first = [d for d, a in before if a == batch_axis and d in WEIGHT_DIMENSIONS]
    if first:
        pairs = ",".join(f"{d}:{batch_axis}" for d in first)
        warnings.warn(f"layout {text!r}: {pairs} is written before batch:{batch_axis}, so activations that carry "
                      f"{' or '.join(first)} are split along it instead of along batch (the pair written first "
                      f"wins). For FSDP write batch:{batch_axis} first: \"batch:{batch_axis},{pairs}\".",
                      LayoutOrderWarning, stacklevel=3)


def suggest_mesh_shape(axes: Sequence[tuple[str, int]], rules: Sequence[tuple[str, str]], n_devices: int) -> str:
    """A mesh_shape over `n_devices` keeping the model-parallel axes where they fit and giving
    the rest to the axis `batch` is split over."""
    batch_axis = dict(rules).get("batch", axes[0][0])
    remaining = n_devices
    sizes = {}
    for name, size in axes:
        if name == batch_axis:
            continue
        sizes[name] = math.gcd(size, remaining)
        remaining //= sizes[name]
    sizes[batch_axis] = remaining
    return ",".join(f"{name}:{sizes[name]}" for name, _ in axes)


def make_layout(mesh_shape: str, layout: str, devices: Optional[Sequence[Any]] = None) -> Layout:
    """Build the Mesh over `devices` (default: all) and the rules; mismatches are explained."""
    devices = list(jax.devices() if devices is None else devices)
    axes = parse_mesh_shape(mesh_shape, len(devices))
    rules = parse_layout(layout, [a for a, _ in axes])
    size = math.prod(s for _, s in axes)
    if size != len(devices):
        raise NeoError(
            f"mesh_shape {mesh_shape!r} needs {size} devices but {len(devices)} are available "
            f"({devices[0].platform}); try \"mesh_shape\": \"{suggest_mesh_shape(axes, rules, len(devices))}\" "
            f"(or use -1 for the axis that should take the rest)."
        )
    shape = tuple(s for _, s in axes)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # topologies mesh_utils does not know (CPU, subsets of devices): plain order
        grid = np.array(devices).reshape(shape)
    return Layout(Mesh(grid, tuple(a for a, _ in axes)), rules)


def check_divisible(layout: Layout, sizes: dict[str, int], what: str = "") -> None:
    """Every dimension the layout splits must divide evenly by its mesh axis."""
    for dim, axis in layout.rules:
        if dim not in sizes:
            continue
        n, k = sizes[dim], layout.mesh.shape[axis]
        if n % k:
            fix = f"use a mesh axis size that divides {n}, or leave '{dim}' out of the layout"
            if dim == "vocab":
                fix = f"pad n_vocab to {_round_up(n, 128 * k)} (a multiple of 128*{k}), or leave 'vocab' out of the layout"
            elif dim == "batch":
                fix = f"make the batch a multiple of {k}"
            raise NeoError(f"layout maps '{dim}' (size {n}{what}) to mesh axis '{axis}' of size {k}, "
                           f"which does not divide it; {fix}.")


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k



def place(layout: Layout, boxed: Any) -> Any:
    """A state tree (parameters, optimizer state, a whole train state) as jax.ShapeDtypeStructs
    carrying their shardings under `layout`, from an abstract init whose leaves carry flax
    logical names (nn.Partitioned; see neo.model.abstract_init). A leaf whose names do not fit
    its shape (Adafactor's factored statistics) is replicated. Every split dimension must divide
    by its mesh axis, checked here before anything compiles; the error names the parameter (an
    optimizer moment by its parameter's path)."""
    import flax.linen as nn

    names = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))
    placed = []
    for (path, leaf), spec in zip(leaves, names):
        sharding = layout.replicated
        if len(spec) == leaf.ndim:
            sizes = {n: s for n, s in zip(spec, leaf.shape) if n}
            check_divisible(layout, sizes, f" in parameter {parameter_name(path)}")
            sharding = layout.sharding(tuple(spec))
        placed.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return jax.tree.unflatten(treedef, placed)


def shardings_of(tree: Any) -> Any:
    """The shardings of a tree of arrays or placed ShapeDtypeStructs."""
    return jax.tree.map(lambda x: x.sharding, tree)


def parameter_name(path: Sequence[Any]) -> str:
    """"h_0/attn/q/kernel": the dictionary keys of a leaf's path (a train state's fields and an
    optimizer state's tuples are not part of a parameter's name)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def process_rows(sharding: jax.sharding.Sharding, n: int) -> np.ndarray:
    """The rows of an [n, ...] array sharded by `sharding` that this process's devices hold,
    sorted: what this process reads of a global batch. The rows follow from the layout, not the
    process count: with the batch split over an axis whose devices span processes (tensor
    parallelism across hosts) several processes hold, and read, the same rows."""
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((n,)).values():
        held.update(range(*index[0].indices(n)))
    return np.array(sorted(held), dtype=np.int64)


def assemble_rows(sharding: jax.sharding.Sharding, rows: np.ndarray, local: np.ndarray, n: int,
                  axis: int = 0) -> jax.Array:
    """The global array of n rows along `axis` ([n, ...], or a stack of batches [steps, n, ...]
    with axis 1) whose rows `rows` (from `process_rows`) are `local`; each device gets its slice
    of them (the other processes supply the other rows)."""
    if local.shape[axis] != len(rows):
        raise ValueError(f"{local.shape[axis]} local rows for the {len(rows)} rows this process holds")

    def part(index: tuple) -> np.ndarray:
        start, stop, _ = index[axis].indices(n)
        i = int(np.searchsorted(rows, start))
        return local[index[:axis] + (slice(i, i + stop - start),)]

    shape = local.shape[:axis] + (n,) + local.shape[axis + 1:]
    return jax.make_array_from_callback(shape, sharding, part)


def num_microbatches(batch_size: int, n_ctx: int, tokens_per_mb_per_replica: int, batch_shards: int) -> int:
    """GPT-Neo's rule: sequences per microbatch = tokens_per_mb_per_replica // n_ctx (at least 1),
    lowered until it divides the per-replica batch; 0 tokens means one microbatch."""
    per_replica = batch_size // batch_shards
    if not tokens_per_mb_per_replica:
        return 1
    mb = min(max(1, tokens_per_mb_per_replica // n_ctx), per_replica)
    while per_replica % mb:
        mb -= 1
    return per_replica // mb
