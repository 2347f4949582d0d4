"""The attention operation: softmax(q k^T * scale + mask) v, given projected q, k, v.

This is the one place that turns queries, keys and values into attention outputs for GPT-Neo's
`global` and `local` layers; the projections, rotary embeddings, KV-cache writes and learned
memory slots live in attention.py (MaxText's projection / operation split). Which kernel
computes it is decided here (`attention_impl`, docs/configs.md):

    xla          the reference: a dense [batch, heads, Tq, Tk] softmax; expresses every mask
    blocked      FlashAttention-2 in plain JAX: a scan over (query block, key block) pairs with
                 an online softmax and a hand-written backward that recomputes each block, so
                 neither pass holds T x T; blocks a causal or local mask hides are skipped
    dot_product  jax.nn.dot_product_attention (XLA): the call `cudnn` makes, on any device
    cudnn        jax.nn.dot_product_attention's cuDNN flash attention (GPU, bfloat16)
    splash       the Pallas splash-attention kernel (TPU), under shard_map when sharded
    cpu          neo's CPU kernel (neo/kernels/attention.cc), float32 or bfloat16 (computed in
                 float32), forward and backward, under shard_map when sharded
    auto         cudnn on GPU and splash on TPU where they apply; on CPU the cpu kernel where
                 it applies, else blocked when the sequence spans more than one block, else
                 xla; elsewhere blocked for local layers longer than two windows and global
                 layers of at least BLOCKED_FROM tokens, else xla

Only `xla` expresses every mask: a KV cache (query and key slots), key validity (left-padded
prompts), learned memory slots and attention dropout always take it, whatever was asked. The
fused kernels cover what training a causal or masked-LM model needs: causal or bidirectional,
with or without a local window, with or without ALiBi. ALiBi (GPT-NeoX's `pos_emb: alibi`) is
the additive bias -slope_h * |i - j| on the scaled scores, computed from the query and key slots:
per block inside `blocked` (so it never holds T x T and follows the slots under sequence
sharding), whole for `xla` and `dot_product`/`cudnn` (jax.nn.dot_product_attention's `bias`);
splash has no bias and is not chosen for it. Grouped key/value heads (k, v [b, tk, kv_heads, d]
with fewer heads than q) are native to jax.nn.dot_product_attention; the other kernels repeat
each kv head for its group of query heads (repeat_interleave, as GPT-NeoX and Hugging Face do).

As GPT-Neo (mesh-tf) does it: scores and softmax in float32 (from q and k in the compute dtype,
multiplied with float32 accumulation), probabilities cast back to the value dtype, -1e10 (not
-inf) added to masked scores in the dense path, attention dropout on the probabilities. A local
layer at slot i sees keys i-R < j <= i (R = the window, the current token included); when the
model is not causal (masked-LM training) it sees both sides, |i - j| < R.

Masks are built from "slots": while training, slot = position in the sequence; when decoding
with a KV cache, a query's slot is where its key was written in the cache, and `key_valid` marks
which cache slots hold real tokens (prompts are left-padded), so the same masks serve both.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from neo.errors import NeoError
from neo.kernels import cpu as cpu_kernels
from neo.mesh import active_layout, constrain
from neo.model.layers import einsum

NEG_INF = -1e10  # mesh-tf's additive mask value; exp() underflows to exactly 0 in float32
BLOCK = 512  # query and key block of `blocked`
BLOCKED_FROM = 1024  # on GPU and TPU, `auto` computes global layers this long blocked
SPLASH_BLOCK = 128  # the splash kernel's block; the sequence must be a multiple of it


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                          window: Optional[int] = None, q_slots: Optional[jax.Array] = None,
                          k_slots: Optional[jax.Array] = None, key_valid: Optional[jax.Array] = None,
                          memory: Optional[tuple[jax.Array, jax.Array]] = None, scale: float = 1.0,
                          dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                          alibi: Optional[np.ndarray] = None, impl: str = "auto") -> jax.Array:
    """q [b, tq, h, d], k and v [b, tk, kv_heads, d] (kv_heads divides h) -> [b, tq, h, d] in
    v's dtype.

    causal: keys after the query are hidden. window: keys R or more slots away are hidden.
    q_slots [tq], k_slots [tk]: the slots of queries and keys; None means the keys are the
    queries' own sequence (slots 0..t-1). key_valid [b, tk]: False hides that key slot.
    memory: learned (keys, values) [b, m, h, d], visible to every query, in front of the keys.
    dropout_rng: None means no attention dropout (deterministic). alibi [h]: ALiBi's slopes
    (attention.py alibi_slopes), None for no bias. impl: `attention_impl`."""
    # Only the dense path expresses caches, padding, memory slots and dropout.
    plain = q_slots is None and k_slots is None and key_valid is None and memory is None and dropout_rng is None
    kernel = choose(impl, t=q.shape[1], head_dim=q.shape[-1], dtype=q.dtype, causal=causal, window=window,
                    bias=alibi is not None) if plain else "xla"
    if kernel in ("cudnn", "dot_product"):
        bias = None if alibi is None else alibi_bias(alibi, jnp.arange(q.shape[1]), jnp.arange(k.shape[1]))[None]
        out = jax_attention(q, k, v, causal=causal, window=window, scale=scale, bias=bias,
                            implementation="cudnn" if kernel == "cudnn" else "xla")
        return checkpoint_name(out, "attention_out")
    k, v = repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2])
    if kernel == "blocked":
        out = blocked(q, k, v, causal=causal, window=window, scale=scale, alibi=alibi)
    elif kernel == "splash":
        out = splash(q, k, v, causal=causal, window=window, scale=scale)
    elif kernel == "cpu":
        out = cpu_attention(q, k, v, causal=causal, window=window, scale=scale, alibi=alibi)
    else:
        out = dense(q, k, v, causal=causal, window=window, q_slots=q_slots, k_slots=k_slots, key_valid=key_valid,
                    memory=memory, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng, alibi=alibi)
    return checkpoint_name(out, "attention_out")  # what remat_policy save_attention_out keeps


def repeat_kv(x: jax.Array, heads: int) -> jax.Array:
    """[b, t, kv_heads, d] -> [b, t, heads, d]: kv head g serves query heads g * r .. g * r + r - 1
    (r = heads / kv_heads; Hugging Face's repeat_kv, GPT-NeoX's repeat_interleave)."""
    return x if x.shape[2] == heads else jnp.repeat(x, heads // x.shape[2], axis=2)


def alibi_bias(slopes: np.ndarray, q_slots: jax.Array, k_slots: jax.Array) -> jax.Array:
    """[h, Tq, Tk] float32: -slope_h * |i - j| for query slot i and key slot j (GPT-NeoX's
    AliBi: -slope * (i - j) on and below the diagonal, where causal attention looks)."""
    distance = jnp.abs(q_slots[:, None] - k_slots[None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes, jnp.float32)[:, None, None] * distance


def dense(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, window: Optional[int],
          q_slots: Optional[jax.Array], k_slots: Optional[jax.Array], key_valid: Optional[jax.Array],
          memory: Optional[tuple[jax.Array, jax.Array]], scale: float, dropout_rate: float,
          dropout_rng: Optional[jax.Array], alibi: Optional[np.ndarray] = None) -> jax.Array:
    """The `xla` kernel: every mask (and ALiBi's bias) made explicit, then `attend`."""
    t = q.shape[1]
    q_slots = jnp.arange(t) if q_slots is None else q_slots
    k_slots = jnp.arange(k.shape[1]) if k_slots is None else k_slots
    mask = visible(q_slots, k_slots, causal=causal, window=window)[None, None]  # [1, 1, tq, tk]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if memory is not None:  # memory slots in front of the keys: always visible
        k = jnp.concatenate([memory[0], k], axis=1)
        v = jnp.concatenate([memory[1], v], axis=1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (memory[0].shape[1],), bool), mask], axis=-1)
    bias = None if alibi is None else alibi_bias(alibi, q_slots, k_slots)[None]  # no memory slots with ALiBi
    return attend(q, k, v, mask, scale, dropout_rate, dropout_rng, bias)


def choose(impl: str, *, t: int, head_dim: int, dtype: jnp.dtype, causal: bool, window: Optional[int],
           bias: bool = False) -> str:
    """The kernel for `impl` on this backend, for self-attention of t tokens without cache,
    padding, memory or dropout. An explicit kernel the backend lacks is an error (raised while
    tracing, before anything compiles); `auto` takes the fastest that applies. On CPU that is
    neo's kernel (`cpu`: float32 or bfloat16, 2.7-3.8x the dense softmax at 64-256 tokens,
    2.5-5.2x `blocked` at 2048, forward and backward). Where it does not apply (the kernels off,
    not built or on a CPU without AVX-512, heads over 128 features, a split sequence),
    `blocked` once the sequence spans two blocks (5x the dense softmax's speed at 2048 tokens,
    and no T x T). Within one block that saves no memory and little time (float32: 1.2x at
    64-256 tokens; bfloat16: none), while its recomputed backward adds rounding noise that
    differs with the layout (8 devices vs 1, tests/test_train_sharding.py), so there the dense
    reference runs."""
    backend = jax.default_backend()
    if impl == "cudnn" and backend != "gpu":
        raise NeoError(f"attention_impl 'cudnn' needs a GPU, but jax runs on {backend}; use 'auto'.")
    if impl == "splash":
        if bias:
            raise NeoError("attention_impl 'splash' has no additive bias for ALiBi (pos_emb alibi); use 'auto' "
                           "or 'blocked'.")
        if backend != "tpu":
            raise NeoError(f"attention_impl 'splash' needs a TPU, but jax runs on {backend}; use 'auto'.")
        if not splash_applies(t):
            raise NeoError(f"attention_impl 'splash' needs a sequence that is a multiple of {SPLASH_BLOCK} "
                           f"tokens and not split over devices (got {t}); use 'auto' or 'blocked'.")
    if impl == "cpu":
        why = cpu_blocker(dtype, head_dim)
        if why:
            raise NeoError(f"attention_impl 'cpu' cannot run here: {why}; use 'auto'.")
    if impl != "auto":
        return impl
    if backend == "gpu" and cudnn_applies(dtype, head_dim, causal, window):
        return "cudnn"
    if backend == "tpu" and splash_applies(t) and not bias:
        return "splash"
    if backend == "cpu":
        if cpu_blocker(dtype, head_dim) is None:
            return "cpu"
        return "blocked" if t > BLOCK else "xla"
    if window is not None:
        return "blocked" if t > 2 * window else "xla"
    return "blocked" if t >= BLOCKED_FROM else "xla"


def cudnn_applies(dtype: jnp.dtype, head_dim: int, causal: bool, window: Optional[int]) -> bool:
    """cuDNN flash attention: 16-bit inputs, head size a multiple of 8 up to 128, and a window
    only on the left (it has no two-sided local window)."""
    return dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128 \
        and (causal or window is None)


def visible(q_slots: jax.Array, k_slots: jax.Array, *, causal: bool, window: Optional[int]) -> jax.Array:
    """[..., Tq, Tk] bool: may query slot i see key slot j?"""
    i, j = q_slots[..., :, None], k_slots[..., None, :]
    ok = j <= i if causal else jnp.ones_like(i == j)
    if window is not None:
        ok &= (i - j < window) & (causal | (j - i < window))
    return ok


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
           dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
           bias: Optional[jax.Array] = None) -> jax.Array:
    """Dense softmax attention: float32 scores from q, k in their dtype. q: [b,tq,h,d], k/v:
    [b,tk,h,d], mask (and the additive float32 bias, if any) broadcastable to [b,h,tq,tk].
    The products take q, k and v as they come, [b, t, h, d]: on CPU, `einsum` copies 16-bit
    operands into the heads-first order XLA needs to keep them in 16 bits (layers.py
    _row_major), which a transpose here would hide from it."""
    logits = einsum("bqhd,bkhd->bhqk", q, k, q.dtype)
    if scale != 1.0:
        logits = logits * scale
    if bias is not None:
        logits = logits + bias
    logits = constrain(logits, ("batch", "heads", "sequence", "memory_length"))
    # The mask is added as a bias (0 or NEG_INF, as mesh-tf does), not selected with `where`:
    # the same scores wherever |score| < 512 (-1e10 + x rounds back to -1e10), the same
    # gradients (a masked score's probability is exactly 0, so softmax's backward gives it 0),
    # and the backward pass needs no mask. `where`'s backward selects with the mask, so XLA
    # wrote it out broadcast to [batch, heads, Tq, Tk] in every layer: on CPU 4.1 of the
    # quickstart step's 48.9 ms, and 7-12% of its tokens/s (docs/benchmarks.md).
    logits = logits + jnp.where(mask, 0.0, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, dropout_rng)
    return einsum("bhqk,bkhd->bqhd", probs, v, v.dtype).astype(v.dtype)


def dropout(probs: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    """Attention dropout as flax's nn.Dropout applies it: keep with probability 1 - rate and
    scale by 1 / (1 - rate); nothing without an rng or at rate 0."""
    if rng is None or rate == 0.0:
        return probs
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    return jax.lax.select(keep, probs / (1.0 - rate), jnp.zeros_like(probs))


# ----------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention (cuDNN on GPU)


def jax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, window: Optional[int],
                  scale: float, implementation: str, bias: Optional[jax.Array] = None) -> jax.Array:
    """GPT-Neo's masks in jax.nn.dot_product_attention's terms: `local_window_size` (left,
    right) excludes the bound, so a window of R is (R - 1, 0) causal and (R - 1, R - 1) not.
    k, v may have fewer (grouped) heads; bias [1, h, tq, tk] is ALiBi's."""
    local = None if window is None else (window - 1, 0 if causal else window - 1)
    if bias is not None:
        bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                        local_window_size=local, implementation=implementation)


# ----------------------------------------------------------------------------------------------
# blocked: FlashAttention-2 (Dao 2023) as a scan, forward and backward


def blocked(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, window: Optional[int],
            scale: float, alibi: Optional[np.ndarray] = None) -> jax.Array:
    """Self-attention q, k, v [b, t, h, d] -> [b, t, h, d] in blocks of BLOCK tokens: O(t * d)
    memory and, with a causal or local mask, only the blocks it leaves visible. alibi [h]:
    ALiBi's slopes, whose bias is made per block."""
    b, t, h, d = q.shape
    blk = min(BLOCK, t)
    n = -(-t // blk)
    pad = n * blk - t
    to_heads = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [b, h, T, d]
    slopes = None if alibi is None else tuple(float(x) for x in np.asarray(alibi))
    out = _flash(to_heads(q), to_heads(k), to_heads(v), _Mask(causal, window, t, blk, slopes), float(scale))
    return out.transpose(0, 2, 1, 3)[:, :t]


class _Mask:
    """What `blocked` hides, and ALiBi's bias, for query block i and key block j (static,
    hashable)."""

    def __init__(self, causal: bool, window: Optional[int], t: int, blk: int,
                 slopes: Optional[tuple[float, ...]] = None):
        self.causal, self.window, self.t, self.blk, self.slopes = causal, window, t, blk, slopes
        n = -(-t // blk)
        pairs = [(i, j) for i in range(n) for j in range(n) if self._touches(i, j)]
        self.pairs = np.array(pairs, np.int32).T  # [2, pairs], i-major: each query block's keys in order

    def _touches(self, i: int, j: int) -> bool:
        """Does any query of block i see any key of block j?"""
        lo_q, hi_q, lo_k, hi_k = i * self.blk, (i + 1) * self.blk - 1, j * self.blk, (j + 1) * self.blk - 1
        if self.causal and lo_k > hi_q:
            return False
        if self.window is not None and (lo_q - hi_k >= self.window or (not self.causal and lo_k - hi_q >= self.window)):
            return False
        return True

    def __call__(self, i: jax.Array, j: jax.Array) -> jax.Array:
        """[blk, blk] bool for the traced block indices."""
        q_slots, k_slots = i * self.blk + jnp.arange(self.blk), j * self.blk + jnp.arange(self.blk)
        padded = k_slots >= self.t  # keys past the sequence: never visible
        return visible(q_slots, k_slots, causal=self.causal, window=self.window) & ~padded

    def bias(self, i: jax.Array, j: jax.Array) -> jax.Array:
        """ALiBi's [h, blk, blk] bias for the traced block indices (0 without ALiBi)."""
        if self.slopes is None:
            return jnp.zeros((), jnp.float32)
        q_slots, k_slots = i * self.blk + jnp.arange(self.blk), j * self.blk + jnp.arange(self.blk)
        return alibi_bias(np.array(self.slopes, np.float32), q_slots, k_slots)

    def __hash__(self):
        return hash((self.causal, self.window, self.t, self.blk, self.slopes))

    def __eq__(self, other):
        return isinstance(other, _Mask) and hash(self) == hash(other)


def _block(x: jax.Array, i: jax.Array, blk: int) -> jax.Array:
    """Block i of x [b, h, T, ...] along T."""
    return jax.lax.dynamic_slice_in_dim(x, i * blk, blk, axis=2)


def _put(x: jax.Array, y: jax.Array, i: jax.Array, blk: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, y, i * blk, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, mask: _Mask, scale: float):
    return _flash_fwd(q, k, v, mask, scale)[0]


def _flash_fwd(q, k, v, mask: _Mask, scale: float):
    """q, k, v [b, h, T, d] -> (o, residuals): the running max m, sum l and output of each query
    row are updated block by block (online softmax); only o and logsumexp are kept."""
    b, h, t, d = q.shape
    blk = mask.blk

    def step(carry, ij):
        acc, m, l = carry
        i, j = ij
        s = einsum("bhqd,bhkd->bhqk", _block(q, i, blk), _block(k, j, blk), q.dtype) * scale + mask.bias(i, j)
        s = jnp.where(mask(i, j), s, -jnp.inf)
        m_i, l_i, acc_i = _block(m, i, blk), _block(l, i, blk), _block(acc, i, blk)
        m_new = jnp.maximum(m_i, s.max(-1))
        shift = jnp.where(jnp.isinf(m_new), 0.0, m_new)  # a row that has seen no key yet
        p = jnp.exp(s - shift[..., None])
        rescale = jnp.exp(m_i - shift)
        l_i = l_i * rescale + p.sum(-1)
        acc_i = acc_i * rescale[..., None] + einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _block(v, j, blk), v.dtype)
        return (_put(acc, acc_i, i, blk), _put(m, m_new, i, blk), _put(l, l_i, i, blk)), None

    init = (jnp.zeros((b, h, t, d), jnp.float32), jnp.full((b, h, t), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, t), jnp.float32))
    (acc, m, l), _ = jax.lax.scan(step, init, jnp.asarray(mask.pairs.T))
    seen = l > 0  # padded query rows may see no key: output 0, and nothing in the backward
    o = (acc / jnp.where(seen, l, 1.0)[..., None]).astype(q.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    # Named so that remat_policy save_attention_out keeps them and the backward pass does not
    # run this forward scan again.
    return o, (q, k, v, checkpoint_name(o, "attention_out"), checkpoint_name(lse, "attention_out"))


def _flash_bwd(mask: _Mask, scale: float, residuals, do):
    """FlashAttention-2's backward: each visible block's probabilities are recomputed from the
    saved logsumexp; dq, dk, dv accumulate in float32."""
    q, k, v, o, lse = residuals
    blk = mask.blk
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # [b, h, T]

    def step(carry, ij):
        dq, dk, dv = carry
        i, j = ij
        q_i, k_j, v_j, do_i = _block(q, i, blk), _block(k, j, blk), _block(v, j, blk), _block(do, i, blk)
        s = einsum("bhqd,bhkd->bhqk", q_i, k_j, q.dtype) * scale + mask.bias(i, j)
        p = jnp.where(mask(i, j), jnp.exp(s - _block(lse, i, blk)[..., None]), 0.0)
        dv_j = einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), do_i, do.dtype)
        dp = einsum("bhqd,bhkd->bhqk", do_i, v_j, do.dtype)
        ds = (p * (dp - _block(delta, i, blk)[..., None]) * scale).astype(q.dtype)
        dq_i = einsum("bhqk,bhkd->bhqd", ds, k_j, q.dtype)
        dk_j = einsum("bhqk,bhqd->bhkd", ds, q_i, q.dtype)
        add = lambda x, y, r: _put(x, _block(x, r, blk) + y, r, blk)
        return (add(dq, dq_i, i), add(dk, dk_j, j), add(dv, dv_j, j)), None

    zeros = jnp.zeros(q.shape, jnp.float32)
    (dq, dk, dv), _ = jax.lax.scan(step, (zeros, zeros, zeros), jnp.asarray(mask.pairs.T))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# splash: the Pallas TPU kernel


def splash_applies(t: int) -> bool:
    """The kernel imports (jax's Pallas TPU ops), the sequence fills whole kernel blocks, and
    the active layout does not split the sequence (the kernel needs every key on one device)."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel  # noqa: F401
    except ImportError:
        return False
    return t % SPLASH_BLOCK == 0 and not sequence_split()


def sequence_split() -> bool:
    """Whether the active layout splits the sequence over devices (a per-device kernel then
    lacks keys)."""
    layout = active_layout()
    return layout is not None and layout.axis_size("sequence") * layout.axis_size("memory_length") > 1


def per_device(run, *arrays: jax.Array, extra: tuple[tuple[str, ...], ...] = ()) -> jax.Array:
    """run(q, k, v, *rest) on each device's share of batch and heads, under shard_map when the
    active layout has more than one device (`extra`: the dimension names of the arrays after
    q, k and v)."""
    layout = active_layout()
    if layout is None or layout.mesh.size == 1:
        return run(*arrays)
    spec = layout.spec(("batch", "sequence", "heads", "features_per_head"))
    specs = (spec, spec, spec, *(layout.spec(names) for names in extra))
    return jax.shard_map(run, mesh=layout.mesh, in_specs=specs, out_specs=spec, check_vma=False)(*arrays)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, window: Optional[int], scale: float,
           interpret: bool = False) -> jax.Array:
    """q, k, v [b, t, h, d] -> [b, t, h, d] with the splash kernel (per sequence, all heads), run
    per device under shard_map when a layout splits batch or heads. `interpret` runs the kernel
    in Pallas' interpreter (any backend; tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    layout = active_layout()
    b, t, h, d = q.shape
    local_heads = h // (layout.axis_size("heads") if layout is not None and layout.mesh.size > 1 else 1)
    if window is not None:
        one = sm.LocalMask((t, t), window_size=(window - 1, 0 if causal else window - 1), offset=0)
    else:
        one = sm.CausalMask((t, t)) if causal else sm.FullMask((t, t))
    blk = min(SPLASH_BLOCK, t)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * local_heads), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)

    def run(q, k, v):  # [b, t, h, d] on one device
        heads_first = lambda a: a.transpose(0, 2, 1, 3)
        out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v))
        return out.transpose(0, 2, 1, 3).astype(v.dtype)

    return per_device(run, q, k, v)


# ----------------------------------------------------------------------------------------------
# cpu: neo's CPU kernel, forward and backward (neo/kernels/attention.cc)


def cpu_blocker(dtype: jnp.dtype, head_dim: int) -> Optional[str]:
    """Why neo's CPU attention kernel cannot run this attention, or None if it can: float32 or
    bfloat16 on jax's CPU backend, heads up to 128 features, the sequence whole on each device, the kernels
    built (and not turned off with NEO_CPU_KERNELS=0)."""
    if jax.default_backend() != "cpu":
        return f"it needs jax on CPU, but jax runs on {jax.default_backend()}"
    if jnp.dtype(dtype) not in cpu_kernels.TRAIN_ATTENTION_DTYPES:
        return f"it takes float32 or bfloat16, but the model computes in {jnp.dtype(dtype).name} (precision)"
    if head_dim > cpu_kernels.TRAIN_ATTENTION_MAX_HEAD:
        return f"it takes heads of up to {cpu_kernels.TRAIN_ATTENTION_MAX_HEAD} features, not {head_dim}"
    if sequence_split():
        return "the layout splits the sequence over devices, and the kernel needs every key on one device"
    layout = active_layout()
    if layout is not None and layout.axis_size("features_per_head") > 1:
        return "the layout splits features_per_head over devices, and the kernel needs whole heads"
    if not cpu_kernels.enabled():
        return ("neo's CPU kernels are off (NEO_CPU_KERNELS=0), could not be built, or are not used on this CPU "
                "(they need AVX-512; the log says which)")
    return None


def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, window: Optional[int], scale: float,
                  alibi: Optional[np.ndarray] = None) -> jax.Array:
    """Self-attention q, k, v [b, t, h, d] float32 or bfloat16 -> [b, t, h, d] with neo's CPU
    kernel: the sums of `attend` (to rounding; bfloat16 inputs are computed in float32 and each
    result rounded once, where `attend` also rounds the probabilities), never more of the scores than 16 query rows at a time, each
    (sequence, head) whole on one thread, so the result does not depend on threads or layout.
    alibi [h]: ALiBi's slopes."""
    slopes = jnp.asarray(np.zeros(q.shape[2], np.float32) if alibi is None else alibi, jnp.float32)
    run = functools.partial(_cpu_kernel, scale=float(scale), causal=bool(causal), window=window)
    return per_device(run, q, k, v, slopes, extra=(("heads",),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _cpu_kernel(q, k, v, slopes, scale: float, causal: bool, window: Optional[int]):
    return cpu_kernels.train_attention(q, k, v, slopes, scale=scale, causal=causal, window=window)


def _cpu_kernel_fwd(q, k, v, slopes, scale, causal, window):
    return _cpu_kernel(q, k, v, slopes, scale, causal, window), (q, k, v, slopes)


def _cpu_kernel_bwd(scale, causal, window, residuals, d_out):
    q, k, v, slopes = residuals
    dq, dk, dv = cpu_kernels.train_attention_grad(q, k, v, slopes, d_out, scale=scale, causal=causal, window=window)
    return dq, dk, dv, jnp.zeros_like(slopes)


_cpu_kernel.defvjp(_cpu_kernel_fwd, _cpu_kernel_bwd)
