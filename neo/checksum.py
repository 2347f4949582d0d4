"""Content checksums of a tree of (sharded) arrays: how a checkpoint proves it reads back what
was written.

orbax and tensorstore check a checkpoint's structure, not its bytes: a flipped bit or a
half-copied chunk in a data file restores silently as a different number (a NaN in the
embedding, say), and the resumed run is no longer the uninterrupted one. So every checkpoint
neo writes records, per array, two 32-bit sums of its bit pattern (the words, and the words
weighted by their position, both mod 2^32), computed on the devices where the array lives; a
restore recomputes them on the arrays it read and refuses a difference, naming the array.

The sums are modular integer sums, so they do not depend on how the array is sharded or on how
XLA orders the reduction: a checkpoint written on 8 devices verifies on 1, or on 2 processes.
One pass over the state, one fused reduction per array: measured 1.0 s for gpt_neo_125M's
parameters and AdamW state (1.5 GB) on 2 CPU cores, where XLA's integer reductions run at about
3 GB/s, beside the save's own ~1.7 s; on an accelerator it runs at memory bandwidth.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def _words(x: jax.Array) -> jax.Array:
    """The array's bit pattern as 32-bit words (narrower types widened, wider ones split), typed
    int32: two's complement addition and multiplication wrap to the same bits as unsigned ones,
    and a plain int32 sum is one XLA's CPU backend vectorizes (uint32's ran 6x slower)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.int32)
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.int32)  # 8 bytes: a trailing axis of 2 words
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.int32)


def _sums(x: jax.Array) -> jax.Array:
    """[2] int32: the sum of the words and the sum of word x (its flat position + 1), mod 2^32.
    The position comes from iotas over the array's own axes (no reshape, so no resharding)."""
    w = _words(x)
    if w.ndim == 0:
        return jnp.stack([w, w])
    position = jnp.zeros(w.shape, jnp.int32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        factor = jnp.uint32(stride % 2**32).view(jnp.int32)  # the same bits, wrapped
        position = position + jax.lax.broadcasted_iota(jnp.int32, w.shape, axis) * factor
        stride *= w.shape[axis]
    return jnp.stack([w.sum(dtype=jnp.int32), (w * (position + 1)).sum(dtype=jnp.int32)])


@functools.lru_cache(maxsize=None)
def _all_sums(mesh):
    """The jitted sums of a list of arrays, replicated over `mesh` (every process gets them all)."""
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda leaves: jnp.stack([_sums(x) for x in leaves]), out_shardings=out)


def checksums_of(trees: dict[str, Any]) -> dict[str, dict[str, list]]:
    """{name: checksums of trees[name]} for every tree not None, in one compiled program over all
    their arrays: a checkpoint's parameters and optimizer state cost one compilation, not two
    (half a second each for the tests' tiny models on 2 CPU cores)."""
    flat = {name: [(path, x if isinstance(x, jax.Array) else jnp.asarray(x))
                   for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
            for name, tree in trees.items() if tree is not None}
    leaves = [x for items in flat.values() for _, x in items]
    if not leaves:
        return {name: {} for name in flat}
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, NamedSharding)), None)
    sums = np.asarray(_all_sums(mesh)(leaves).addressable_data(0))
    sums = sums.view(np.uint32)  # recorded as unsigned numbers
    out, first = {}, 0
    for name, items in flat.items():
        out[name] = {jax.tree_util.keystr(path): [int(a), int(b), str(x.dtype)]
                     for (path, x), (a, b) in zip(items, sums[first:first + len(items)])}
        first += len(items)
    return out


def checksums(tree: Any) -> dict[str, list]:
    """{path of each array in the tree (jax.tree_util.keystr): [sum, weighted sum, dtype]}."""
    return checksums_of({"tree": tree})["tree"]


def mismatches(recorded: dict[str, dict[str, list]], trees: dict[str, Any]) -> list[str]:
    """"name path" of each array of trees[name] whose checksums differ from recorded[name]. A tree
    `recorded` lacks, a path it lacks (a checkpoint written before neo kept checksums) or an array
    read back as another dtype is not checked."""
    now = checksums_of({name: tree for name, tree in trees.items() if name in recorded})
    return [f"{name}{path}" for name, sums in now.items() for path, got in sums.items()
            if path in recorded[name] and recorded[name][path][2:] == got[2:]
            and list(recorded[name][path][:2]) != got[:2]]
