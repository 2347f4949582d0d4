"""Model FLOPs per token and the device's peak rate, for tokens/s -> MFU.

The formula (stated wherever MFU is printed): training FLOPs per token = 3 x forward, and
forward = 2 x (every matrix-multiply parameter a token uses, the output projection included,
embedding lookups and position tables excluded) + per attention layer 4 x n_embd x (average
number of keys a query really attends to: (T+1)/2 for causal global attention, the window for
local layers, T for bidirectional; d_head for linear attention, whose state update k (x) v and
read-out q . S cost 2 x n_embd x d_head each). An MoE layer counts the router (n_embd x
experts) and the k experts a token is routed to (top-k), not the capacity slack nor the
one-hot dispatch/combine einsums. Rematerialisation is not counted (MFU, not HFU).

The peak: an accelerator's dense data-sheet number for the compute dtype; a CPU's theoretical
peak from /proc/cpuinfo (`cpu_peak_flops`: cores x FLOPs per cycle per core x clock, the clock
measured where cpuinfo understates it), with a measured JAX matmul rate
(`measured_matmul_flops`) as the practical yardstick beside it.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
import re
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp

from neo.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters used in matrix multiplies per token (the LM head included)."""
    d, f = cfg.n_embd, cfg.intermediate_expanded
    per_attn = 2 * d * d + 2 * d * cfg.kv_heads * cfg.features_per_head  # q, o; k, v (grouped-query: fewer)
    per_mlp = (3 if cfg.gated else 2) * d * f
    n_attn = sum(k != "none" for k in cfg.attention_types)
    n_moe = len(set(cfg.moe_layers or ()))
    per_moe = 0
    if n_moe:
        p = cfg.moe_params
        per_moe = p.top_k * 2 * d * p.moe_hidden_size + d * p.moe_num_experts
    feed_forward = (cfg.n_layer - n_moe) * per_mlp + n_moe * per_moe
    if cfg.macaron:  # a second, dense MLP in every layer
        feed_forward += cfg.n_layer * per_mlp
    return n_attn * per_attn + feed_forward + d * cfg.n_vocab


def attended_keys(kind: str, seq: int, window: int, causal: bool = True) -> float:
    """Average number of keys per query for one attention layer over a length-`seq` sequence."""
    if kind == "none":
        return 0.0
    if kind == "linear":
        raise ValueError("linear attention has no keys per query; flops_per_token counts it by d_head")
    if kind == "global":
        return (seq + 1) / 2 if causal else float(seq)
    if not causal:
        return float(min(2 * window - 1, seq))
    w = min(window, seq)  # positions p < w see p+1 keys, the rest see w
    return (w * (w + 1) / 2 + (seq - w) * w) / seq


def flops_per_token(cfg: ModelConfig, seq: int | None = None, training: bool = True) -> float:
    seq = seq or cfg.n_ctx
    forward = 2 * matmul_params(cfg)
    for kind in cfg.attention_types:
        keys = cfg.features_per_head if kind == "linear" else attended_keys(kind, seq, cfg.local_attention_radius, cfg.causal)
        forward += 4 * cfg.n_embd * keys
    return 3 * forward if training else forward


# Dense peak FLOP/s per JAX device (bf16 unless noted), from vendor data sheets. A JAX device is
# a GPU, or a TPU chip from v4 on (megacore: both TensorCores are one device; v5e and v6e chips
# have one core), but on TPU v2 and v3 each of a chip's two cores is its own device, so those
# get half the chip's 45 / 123 TFLOP/s.
_PEAKS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "a10g": 125e12, "l4": 121e12, "v100": 125e12,
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5": 459e12,
    "tpu v4": 275e12, "tpu v3": 123e12 / 2, "tpu v2": 45e12 / 2,
}


def device_peak_flops(device: jax.Device | None = None, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from): the data sheet's dense peak
    (GPU float32: TF32), or on CPU the theoretical peak of the cores this process may use."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return cpu_peak_flops(dtype)
    return accelerator_peak_flops(device.device_kind, dtype, device.platform == "gpu")


def accelerator_peak_flops(kind: str, dtype: str = "bfloat16", gpu: bool = True) -> tuple[float, str]:
    """(data-sheet dense peak, its source) for a device name such as "NVIDIA H100 80GB HBM3"."""
    for name, peak in _PEAKS.items():
        if name in kind.lower():
            if dtype == "float32" and gpu:
                return peak / 2, f"{kind} TF32 peak (data sheet)"  # TF32 tensor cores
            return peak, f"{kind} {dtype} peak (data sheet)"
    return float("nan"), f"unknown peak for {kind}"


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(dtype: str = "float32", cpuinfo: str = "/proc/cpuinfo", measure_clock: bool = True
                   ) -> tuple[float, str]:
    """Theoretical peak FLOP/s of the CPU cores this process may use, and the formula:

        cores x FLOPs per cycle per core x clock

    cores: os.sched_getaffinity, halved where cpuinfo reports two hardware threads per core
    (they share the FMA units). FLOPs per cycle per core from the flags: 2 FMA units x vector
    lanes x 2 (a fused multiply-add is 2 FLOPs): float32 64 with AVX-512 on Intel (2 x 16 x 2),
    32 with AVX2/FMA or with AMD's AVX-512 (256-bit data paths), 16 with SSE; bfloat16
    1,024 with AMX-BF16 (one 16x16x32 tile multiply per 16 cycles), 2x float32 with
    AVX512_BF16 (a dot of bfloat16 pairs per float32 lane), else float32's. clock: the
    nominal frequency in the model name ("@ 2.10GHz"), else the "cpu MHz" line, or the clock a
    core was measured to run at (`measured_clock_hz`) where that is higher. Without the
    measurement, a core running above its nominal clock beat its own peak: on a 2-vCPU AMD EPYC
    (Zen 4) whose cpuinfo says 2.6 GHz, a 2048^2 float32 matmul ran at 198 GFLOP/s against a
    166 GFLOP/s "peak", and the 125M step's MFU read 89.6%; those cores run at 3.66 GHz."""
    try:
        text = open(cpuinfo).read()
    except OSError:
        return float("nan"), "no /proc/cpuinfo: CPU peak unknown"
    first = text.split("\n\n")[0]
    field = lambda name: (re.search(rf"^{name}\s*:\s*(.*)$", first, re.M) or [None, ""])[1].strip()
    flags = set(field("flags").split())
    if not flags:
        return float("nan"), "no x86 flags in /proc/cpuinfo: CPU peak unknown"
    model, intel = field("model name"), field("vendor_id") == "GenuineIntel"
    ghz = re.search(r"@\s*([\d.]+)\s*GHz", model)
    clock = float(ghz[1]) * 1e9 if ghz else float(field("cpu MHz") or "nan") * 1e6
    clock_note = ""
    measured = measured_clock_hz() if measure_clock else None
    if measured and not measured <= clock:  # also where cpuinfo gave no clock (nan)
        clock_note = f" (measured; cpuinfo says {clock / 1e9:.2f})"
        clock = measured
    cores = len(os.sched_getaffinity(0))
    siblings, per_socket = int(field("siblings") or 0), int(field("cpu cores") or 0)
    if siblings and per_socket and siblings > per_socket:
        cores = max(1, cores * per_socket // siblings)
    if "avx512f" in flags:
        f32, unit = (64, "AVX-512, 2 FMA units") if intel else (32, "AVX-512 on 256-bit data paths")
    elif "avx2" in flags and "fma" in flags:
        f32, unit = 32, "AVX2, 2 FMA units"
    else:
        f32, unit = 16, "SSE"
    per_cycle = f32
    if dtype == "bfloat16":
        if "amx_bf16" in flags:
            per_cycle, unit = 1024, "AMX-BF16"
        elif "avx512_bf16" in flags:
            per_cycle, unit = 2 * f32, "AVX512_BF16"
    peak = cores * per_cycle * clock
    return peak, (f"{model}: {cores} core(s) x {per_cycle} {dtype} FLOP/cycle ({unit}) x {clock / 1e9:.2f} GHz"
                  f"{clock_note} = {peak / 1e9:,.0f} GFLOP/s theoretical")


# x86-64 machine code, System V ABI: rax = 3; n times (rdi) 8 dependent `imul rax, rax`; return.
# A 64-bit register multiply takes 3 cycles on every x86-64 core since Intel's Nehalem and AMD's
# Zen (more on some small cores, which only makes the measured clock lower), so the loop runs
# 24 cycles per iteration whatever the core's width; the loop counter is not on that chain.
_IMUL_CHAIN = (bytes.fromhex("48c7c003000000") + bytes.fromhex("480fafc0") * 8
               + bytes.fromhex("48ffcf") + bytes([0x75, 0x100 - (8 * 4 + 3 + 2)]) + bytes.fromhex("c3"))
_CYCLES_PER_ITERATION = 8 * 3


@functools.lru_cache(maxsize=None)
def measured_clock_hz(iterations: int = 1 << 22, reps: int = 7) -> Optional[float]:
    """The clock one core runs at, from the best of `reps` timings of a chain of dependent
    integer multiplies (`_IMUL_CHAIN`, about 0.1 G cycles each): a lower bound on the real
    clock, since a descheduled or throttled run only takes longer. Virtual machines report
    their host's base or TSC frequency in /proc/cpuinfo, below what the cores reach. None where
    it cannot run: not x86-64 Linux, or no executable memory."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    code.write(_IMUL_CHAIN)
    chain = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
    chain(1 << 10)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        chain(iterations)
        best = min(best, time.perf_counter() - t)
    return iterations * _CYCLES_PER_ITERATION / best


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype: str = "float32", n: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of an n x n JAX matmul on the default CPU device (bfloat16:
    bfloat16 inputs accumulated in float32): what this machine really gives a large matmul."""
    cpu = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), cpu)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def mfu(cfg: ModelConfig, tokens_per_sec: float, devices: list, seq: int | None = None) -> float:
    """Model FLOPs utilisation of `devices` running at `tokens_per_sec` on rows of `seq` tokens
    (default n_ctx; shorter under a curriculum)."""
    peak, _ = device_peak_flops(devices[0], cfg.precision)
    # Simulated CPU devices share the same cores: the CPU peak is the whole machine's.
    total = peak if devices[0].platform == "cpu" else peak * len(devices)
    return flops_per_token(cfg, seq) * tokens_per_sec / total
