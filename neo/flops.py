"""Model FLOPs per token and the device's peak rate, for tokens/s -> MFU.

The formula (stated wherever MFU is printed): training FLOPs per token = 3 x forward, and
forward = 2 x (every matrix-multiply parameter a token uses, the output projection included,
embedding lookups and position tables excluded) + per attention layer 4 x n_embd x (average
number of keys a query really attends to: (T+1)/2 for causal global attention, the window for
local layers, T for bidirectional; d_head for linear attention, whose state update k (x) v and
read-out q . S cost 2 x n_embd x d_head each). An MoE layer counts the router (n_embd x
experts) and the k experts a token is routed to (top-k), not the capacity slack nor the
one-hot dispatch/combine einsums. Rematerialisation is not counted (MFU, not HFU).
"""

from __future__ import annotations

import functools
import time

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
    """(peak FLOP/s of one device, where the number comes from). On CPU the peak is a measured
    float32 matmul rate, since there is no data sheet for "2 cores of some Xeon"."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform != "cpu":
        for name, peak in _PEAKS.items():
            if name in kind:
                if dtype == "float32" and device.platform == "gpu":
                    return peak / 2, f"{device.device_kind} TF32 peak"  # TF32 tensor cores
                return peak, f"{device.device_kind} {dtype} peak"
        return float("nan"), f"unknown peak for {device.device_kind}"
    return measured_matmul_flops(), "measured 2048^2 float32 matmul rate"


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(n: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of an n x n float32 matmul on the default CPU device."""
    cpu = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def mfu(cfg: ModelConfig, tokens_per_sec: float, devices: list) -> float:
    """Model FLOPs utilisation of `devices` running at `tokens_per_sec`."""
    peak, _ = device_peak_flops(devices[0], cfg.precision)
    # Simulated CPU devices share the same cores: the measured rate is the whole machine's.
    total = peak if devices[0].platform == "cpu" else peak * len(devices)
    return flops_per_token(cfg) * tokens_per_sec / total
