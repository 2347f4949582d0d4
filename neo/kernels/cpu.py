"""neo's own CPU kernels, built on first use: a decode step's products (decode_product.cc) and
its attention over the KV cache (decode_attention.cc), training's self-attention, forward and
backward (attention.cc), and training's small float32 products (matmul.cc).

A decode step multiplies every weight matrix by a few rows (the batch, one token each), so it
is limited by how fast the weights stream in from memory. XLA:CPU's products read them at half
the machine's bandwidth or less (docs/benchmarks.md, 2026-11-30 "a CPU kernel for decoding");
the kernel streams weights packed once per sampler call into contiguous column panels, on
XLA's own intra-op threads, through the XLA FFI (`jax.ffi`): no launcher, thread pool or
runtime of neo's own.

The library is compiled once per machine with the host's C++ compiler for the host CPU
(`-march=native`) and cached under ~/.cache/neo/kernels (or $NEO_KERNEL_CACHE), keyed by the
source, the compiler, jaxlib and the CPU's model and flags, so a cached build never runs on a
CPU it was not built for. Where it cannot be built (no compiler, not Linux) neo logs why once
and decodes with XLA's products, the same numbers more slowly. The training kernels compute
on 16-float vectors, so they run only where `-march=native` gives AVX-512 (`enabled`); the
decode kernels compute on the CPU's own vectors and also run on an x86-64 CPU with AVX2 and FMA
(`decode_kernels`), 8 floats at a time. On other CPUs (older x86, ARM) nothing is built and XLA
does everything (logged once). NEO_CPU_KERNELS=0 turns them off.

The attention kernel (decode_attention.cc, `attention`) reads the KV cache where XLA:CPU
rewrote a bfloat16 cache whole at every step and attended over a float32 copy of it
(docs/benchmarks.md, "decode attention on CPU"): it writes the new key and value in place and
reads each cached value once.

The training attention kernel (attention.cc, `train_attention`) computes softmax attention over
a sequence a block of query rows at a time, where XLA:CPU wrote [B, H, T, T] scores,
probabilities and gradients out between a dozen kernels (docs/benchmarks.md, "training
attention on CPU").

The training product (matmul.cc, `matmul`) takes a dense layer's product and both gradients
when the weight is small (neo/model/layers.py decides), where XLA:CPU ran the quickstart's at
90-190 GFLOP/s on two cores and the kernel's register tiles run at 180-220 (docs/benchmarks.md,
"training products on CPU").
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
DECODE_SOURCES = (HERE / "decode_product.cc", HERE / "decode_attention.cc")
# One library: on AVX-512 every kernel; on AVX2 the decode kernels alone, since the training ones
# never run there (`_vector_units`) and took two thirds of the build (24.7 of 37.1 s of compiler
# time targeting Haswell on the 2-core Xeon of docs/benchmarks.md).
SOURCES = (*DECODE_SOURCES, HERE / "attention.cc", HERE / "matmul.cc")
HEADERS = (HERE / "parallel.h", HERE / "vec.h")
MAX_ROWS = 16  # rows (batch x tokens) up to which a product goes to the kernel
READS = ("widen", "dot", "tiles")  # the bfloat16 pairs' reads, by decode_product.cc's number
# What the loaded library is: "panel", the columns of a packed panel (NeoDecodePanel); "pairs",
# bfloat16 packed in pairs along k (NeoDecodeBF16Pairs); "read", how several rows read the pairs
# on this CPU (NeoDecodeBF16Read): "tiles" (AMX), "dot" (vdpbf16ps) or "widen" (to float32);
# "all", every kernel runs (AVX-512).
_BUILT: dict = {}
TARGETS = {jnp.dtype(jnp.float32): "neo_decode_product_f32", jnp.dtype(jnp.bfloat16): "neo_decode_product_bf16"}
ATTENTION_TARGETS = {jnp.dtype(jnp.float32): "neo_decode_attention_f32",
                     jnp.dtype(jnp.bfloat16): "neo_decode_attention_bf16"}

TRAIN_ATTENTION_TARGETS = {f"neo_attention_{pass_}_{suffix.lower()}": f"NeoAttention{pass_.title()}{suffix}"
                           for pass_ in ("forward", "backward") for suffix in ("F32", "BF16")}
TRAIN_ATTENTION_DTYPES = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}
MATMUL_TARGET = ("neo_matmul_f32", "NeoMatmulF32")
TRAIN_ATTENTION_MAX_HEAD = 128  # head sizes the training attention kernel takes (attention.cc)


def enabled() -> bool:
    """Whether all of neo's CPU kernels run (decode steps' products and attention, training
    attention and small products): on the CPU backend, unless NEO_CPU_KERNELS=0, when the
    library builds (`load`) for a CPU with AVX-512."""
    return decode_kernels() and _BUILT["all"]


def decode_kernels() -> bool:
    """Whether a decode step's products and attention run on the kernels (decode_product.cc,
    decode_attention.cc): as `enabled`, and also on an x86-64 CPU with AVX2 and FMA but no
    AVX-512."""
    if os.environ.get("NEO_CPU_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
        return False
    return load() is not None


def supports(dtype: jnp.dtype) -> bool:
    """Whether the kernel multiplies operands of the compute dtype `dtype`."""
    return jnp.dtype(dtype) in TARGETS


@functools.lru_cache(maxsize=None)
def load() -> Optional[Path]:
    """Build (or find in the cache) the library and register its handlers with XLA; the
    library's path, or None where it cannot be built (logged once, with why)."""
    if platform.system() != "Linux":
        log.info("neo's CPU kernels are built on Linux only; decoding uses XLA's products and training XLA's "
                 "attention.")
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not compiler:
        log.warning("no C++ compiler (g++) found: neo's CPU kernels are not built; decoding uses XLA's products "
                    "and training XLA's attention, which are slower (install g++, or set CXX).")
        return None
    units = _vector_units(compiler)
    if units == "none":
        log.info("neo's CPU kernels are not used: they need AVX-512, or AVX2 and FMA for the decode product, and "
                 "%s -march=native targets neither on this CPU (%s). Decoding and training use XLA's products and "
                 "attention (docs/benchmarks.md, \"the kernels on a CPU without AVX-512\").", compiler,
                 platform.machine())
        return None
    if units == "avx2":
        log.info("this CPU has AVX2 but not AVX-512: of neo's CPU kernels only the decode kernels run (8-float "
                 "vectors); training uses XLA's products and attention (docs/benchmarks.md, \"decoding on a CPU "
                 "without AVX-512\").")
    try:
        path = _build(compiler, SOURCES if units == "avx512" else DECODE_SOURCES)
        try:
            lib = ctypes.cdll.LoadLibrary(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # a damaged cached build: the next process builds it afresh
            raise
        for dtype, suffix in ((jnp.float32, "F32"), (jnp.bfloat16, "BF16")):
            for targets, symbol in ((TARGETS, "NeoDecodeProduct"), (ATTENTION_TARGETS, "NeoDecodeAttention")):
                jax.ffi.register_ffi_target(targets[jnp.dtype(dtype)], jax.ffi.pycapsule(getattr(lib, symbol + suffix)),
                                            platform="cpu")
        for target, symbol in (*TRAIN_ATTENTION_TARGETS.items(), MATMUL_TARGET) if units == "avx512" else ():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _BUILT.update(panel=int(lib.NeoDecodePanel()), pairs=bool(lib.NeoDecodeBF16Pairs()),
                      read=READS[int(lib.NeoDecodeBF16Read())], all=units == "avx512")
        return path
    except (OSError, subprocess.SubprocessError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])
        log.warning("neo's CPU kernels did not build (%s); decoding uses XLA's products and training XLA's "
                    "attention, which are slower (docs/benchmarks.md).", why.strip())
        return None


def _vector_units(compiler: str) -> str:
    """Which kernels are fast here, from what `-march=native` targets: "avx512", all of them;
    "avx2" (x86-64 with AVX2 and FMA), only the decode kernels; "none", none. The training
    kernels (attention.cc, matmul.cc) are written for 16-float (512-bit) vectors: without
    AVX-512 the compiler splits every vector into narrower ones and their register tiles spill
    (built for AVX2 on an AVX-512 machine, the training products ran at 2-4 GFLOP/s against
    XLA's 82-184, the attention kernel 2.7-7.7x slower than XLA's or `blocked`;
    docs/benchmarks.md, "the kernels on a CPU without AVX-512"). The decode kernels compute on
    8-float vectors there and beat XLA's (docs/benchmarks.md, "decoding on a CPU without
    AVX-512"). Other CPUs (older x86, ARM) were never measured, so nothing runs there."""
    try:
        done = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "avx512"  # a compiler that does not run: the build says so
    if done.returncode:
        return "avx512"
    macros = set(done.stdout.split())
    if "__AVX512F__" in macros:
        return "avx512"
    return "avx2" if {"__AVX2__", "__FMA__"} <= macros else "none"


def build_key(compiler: str, sources: tuple = SOURCES) -> str:
    """What a cached build depends on: the sources, the compiler's version, jaxlib's FFI
    headers, and the CPU (-march=native code must not run on another CPU model)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in sources + HEADERS), version.encode(), jax.ffi.include_dir().encode(),
                 jaxlib.__version__.encode(), platform.machine().encode(), _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = ("model name", "flags", "Features", "cpu family", "model\t", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(keep)}))


def cache_dir() -> Path:
    return Path(os.environ.get("NEO_KERNEL_CACHE") or Path.home() / ".cache" / "neo" / "kernels")


def _build(compiler: str, sources: tuple = SOURCES) -> Path:
    target = cache_dir() / f"decode-{build_key(compiler, sources)}.so"
    if target.exists():
        return target
    log.info("building neo's CPU kernels for this CPU (once) into %s", target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: a process that finds the file finds it whole.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            # One compiler per source, all at once, then one link: on the 2-core Xeon of
            # docs/benchmarks.md 15.5 s instead of 22.8 (attention.cc alone takes 8.4 s).
            flags = [compiler, "-O3", "-march=native", "-std=c++17", "-fPIC", "-w", "-I", jax.ffi.include_dir()]
            objects = [os.path.join(work, f"{src.stem}.o") for src in sources]
            _run_all([[*flags, "-c", str(src), "-o", obj] for src, obj in zip(sources, objects)])
            _run_all([[compiler, "-shared", "-fPIC", *objects, "-o", tmp]])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _run_all(commands: list[list[str]]) -> None:
    """Run the commands side by side and wait for all; the first that fails raises with its
    message (SubprocessError), and the others are stopped."""
    jobs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    try:
        for job in jobs:
            _, err = job.communicate(timeout=300)
            if job.returncode:
                raise subprocess.SubprocessError(f"{' '.join(job.args)}: {err.strip() or job.returncode}")
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()


def pack(w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A weight matrix [K, N] in the compute dtype, as the kernel reads it: column panels
    [ceil(N / P), K, P], the last one padded with zero columns, P = 32 with AVX-512 and 16 with
    AVX2 (two of the CPU's vectors); bfloat16 on a CPU with AVX512_BF16 in pairs along k,
    [ceil(N / 32), ceil(K / 2), 32, 2] (decode_product.cc)."""
    if load() is None:
        raise RuntimeError("neo's CPU decode kernel is not built here (see the log); decode with XLA's products "
                           "instead (an empty `decode` collection).")
    k, n = w.shape
    panel = _BUILT["panel"]
    pairs = jnp.dtype(dtype) == jnp.bfloat16 and _BUILT["pairs"]
    w = jnp.pad(w.astype(dtype), ((0, k % 2 if pairs else 0), (0, -n % panel)))
    if pairs:
        return w.reshape(-1, 2, w.shape[1] // panel, panel).transpose(2, 0, 3, 1)
    return w.reshape(k, -1, panel).transpose(1, 0, 2)


def takes(rows: int, k: int, dtype: jnp.dtype) -> bool:
    """Whether a product of x [rows, k] in `dtype` goes to the kernel, its weight packed: a decode
    step's (at most MAX_ROWS rows), and a sampler's prompt pass (any number of rows) in float32,
    or in bfloat16 where AMX tiles read the pairs (K a multiple of 32). XLA's products would
    read the unpacked parameters instead: slices of the scanned stacks copied at every call in
    float32, every weight converted to bfloat16 again at every call in bfloat16 (gpt_neo_125M,
    132 ms of a 1.0 s call of 64 tokens at batch 1; docs/benchmarks.md, 2026-12-01 "AMX"). In
    bfloat16 without tiles, many rows stay with XLA (not measured there)."""
    dtype = jnp.dtype(dtype)
    return (rows <= MAX_ROWS or dtype == jnp.float32
            or (dtype == jnp.bfloat16 and _BUILT.get("read") == "tiles" and k % 32 == 0))


def product(x: jax.Array, packed: jax.Array, n: int, read: Optional[str] = None) -> jax.Array:
    """x [..., K] @ the packed [K, n] weight (`pack`), in the packed weight's dtype with
    float32 accumulation; a float32 [..., n]. read (bfloat16 pairs only): how two rows or more
    read the pairs, "tiles" (AMX, where K is a multiple of 32, else as "dot"), "dot"
    (vdpbf16ps) or "widen" (to float32); by default what pays on this CPU (decode_product.cc,
    NeoDecodeBF16Read)."""
    if load() is None:
        raise RuntimeError("neo's CPU decode kernel is not built here (see the warning above); "
                           "decode with XLA's products instead (an empty `decode` collection).")
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k).astype(packed.dtype)
    call = jax.ffi.ffi_call(TARGETS[jnp.dtype(packed.dtype)], jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))
    if jnp.dtype(packed.dtype) != jnp.bfloat16:
        return call(rows, packed).reshape(*lead, n)
    return call(rows, packed, read=np.int32(READS.index(read or _BUILT["read"]))).reshape(*lead, n)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, slot: jax.Array, bias: jax.Array,
              scale: float) -> tuple[jax.Array, dict]:
    """One decode step's attention (decode_attention.cc): the new keys and values k, v [B, G, D]
    written into the cache {"k", "v"} [B, G, S, D] at `slot` in place, then q [B, H, D] attends
    to all S slots with the float32 `bias` [B, 1 or H, S] (0 where visible, NEG_INF where not,
    ALiBi's bias) added to its scores times `scale`. The same sums as attention_op.attend, in
    the cache's dtype (float32 or bfloat16) with float32 scores and softmax; returns (out
    [B, H, D] in that dtype, the updated cache). Keys and values in blocks of 16 slots (8 with
    AVX2) where the bias shows nothing visible are not read: they weigh exactly 0."""
    if load() is None:
        raise RuntimeError("neo's CPU decode kernels are not built here (see the warning above); "
                           "decode with XLA's attention instead (an empty `decode` collection).")
    dtype = cache["k"].dtype
    like = lambda x: jax.ShapeDtypeStruct(x.shape, dtype)
    call = jax.ffi.ffi_call(ATTENTION_TARGETS[jnp.dtype(dtype)], (like(q), like(cache["k"]), like(cache["v"])),
                            input_output_aliases={3: 1, 4: 2})
    out, k_cache, v_cache = call(q.astype(dtype), k.astype(dtype), v.astype(dtype), cache["k"], cache["v"],
                                 jnp.asarray(slot, jnp.int32), bias.astype(jnp.float32), scale=np.float32(scale))
    return out, {"k": k_cache, "v": v_cache}


def train_attention(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, *, scale: float, causal: bool,
                    window: Optional[int]) -> jax.Array:
    """Self-attention of one sequence per row (attention.cc): q, k, v [B, T, H, D] float32 or
    bfloat16 (computed in float32, the output rounded once), the ALiBi slopes [H] (zeros: no
    bias) -> out [B, T, H, D] in q's dtype, the sums of attention_op.attend."""
    call = jax.ffi.ffi_call(f"neo_attention_forward_{TRAIN_ATTENTION_DTYPES[q.dtype]}",
                            jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, k, v, slopes, **_attention_attrs(scale, causal, window))


def train_attention_grad(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, d_out: jax.Array, *,
                         scale: float, causal: bool, window: Optional[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients (dq, dk, dv) of `train_attention` for the output's cotangent d_out; the
    probabilities are recomputed exactly as the forward made them."""
    like = jax.ShapeDtypeStruct(q.shape, q.dtype)
    call = jax.ffi.ffi_call(f"neo_attention_backward_{TRAIN_ATTENTION_DTYPES[q.dtype]}", (like, like, like))
    return call(q, k, v, slopes, d_out, **_attention_attrs(scale, causal, window))


def matmul(a: jax.Array, b: jax.Array, *, a_transposed: bool = False, b_transposed: bool = False) -> jax.Array:
    """a [M, K] @ b [K, N] -> float32 [M, N] (matmul.cc), a given as [K, M] when a_transposed,
    b as [N, K] when b_transposed; float32 operands. Each output is one thread's sum over k, in
    k order within blocks of 128."""
    m = a.shape[1] if a_transposed else a.shape[0]
    n = b.shape[0] if b_transposed else b.shape[1]
    if load() is None:
        raise RuntimeError("neo's CPU kernels are not built here (see the warning above).")
    call = jax.ffi.ffi_call(MATMUL_TARGET[0], jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, a_transposed=np.int32(a_transposed), b_transposed=np.int32(b_transposed))


def _attention_attrs(scale: float, causal: bool, window: Optional[int]) -> dict:
    if load() is None:
        raise RuntimeError("neo's CPU kernels are not built here (see the warning above); set attention_impl to "
                           "'xla' or 'auto'.")
    return {"scale": np.float32(scale), "causal": np.int32(causal), "window": np.int64(window or 0)}
