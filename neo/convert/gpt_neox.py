"""Hugging Face `GPTNeoXForCausalLM` (GPT-NeoX-20B, Pythia) <-> neo parameters and config.

The fused `query_key_value` projection is interleaved per head: its 3*d outputs are
[head 0: q k v][head 1: q k v]..., so the torch weight [3d, d] is viewed as [heads, 3, dh, d]
(reference 9.2); neo keeps q, k, v as separate [embd, heads, features_per_head] kernels.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from neo.config import Config, ModelConfig
from neo.errors import NeoError

# HF hidden_act -> neo activation_fn. HF "gelu" is the exact erf form (Pythia); "gelu_fast" and
# "gelu_new" are the tanh approximation (GPT-NeoX-20B), which neo calls "gelu" as GPT-Neo did.
ACT_FROM_HF = {"gelu": "gelu_exact", "gelu_fast": "gelu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
               "relu": "relu", "silu": "silu"}
ACT_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_fast", "gelu_new": "gelu_fast", "gelu_tanh": "gelu_fast",
             "gelu_fast": "gelu_fast", "relu": "relu", "silu": "silu", "swish": "silu"}


def rope_settings(hf: Mapping[str, Any]) -> tuple[float, float]:
    """(rotary_pct, base) from either the old keys or transformers 5's `rope_parameters`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise NeoError(f"HF GPT-NeoX rope type {kind!r} (RoPE scaling) is not supported by neo; only plain "
                       f"rotary embeddings are.")
    pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000))
    return float(pct), float(base)


def config_from_hf(hf: Mapping[str, Any]) -> dict:
    """An HF GPTNeoXConfig (as a dict) -> a neo model-config dict."""
    act = hf.get("hidden_act", "gelu")
    if act not in ACT_FROM_HF:
        raise NeoError(f"HF hidden_act {act!r} has no neo equivalent (known: {', '.join(ACT_FROM_HF)}).")
    pct, base = rope_settings(hf)
    d = hf["hidden_size"]
    eos = hf.get("eos_token_id", 0)
    return {
        "n_vocab": hf["vocab_size"],
        "n_ctx": hf.get("max_position_embeddings", 2048),
        "n_embd": d,
        "n_layer": hf["num_hidden_layers"],
        "n_head": hf["num_attention_heads"],
        "attention_types": [[["global"], hf["num_hidden_layers"]]],
        "intermediate_size": hf.get("intermediate_size") or 4 * d,
        "activation_fn": ACT_FROM_HF[act],
        "layer_norm_epsilon": hf.get("layer_norm_eps", 1e-5),
        "rotary_emb": True,
        "rotary_pct": pct,
        "rotary_emb_base": base,
        "parallel_residual": hf.get("use_parallel_residual", True),
        "scale_attention": True,
        "qkv_bias": hf.get("attention_bias", True),
        "no_weight_tie": not hf.get("tie_word_embeddings", False),
        "embed_dropout": hf.get("hidden_dropout", 0.0),
        "res_dropout": hf.get("hidden_dropout", 0.0),
        "attn_dropout": hf.get("attention_dropout", 0.0),
        "eos_id": eos[0] if isinstance(eos, list) else eos,
    }


def params_from_hf(sd: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """An HF GPT-NeoX state dict (numpy arrays) -> neo's parameter tree."""
    def get(key: str, default: Any = None) -> np.ndarray:
        for k in (key, "gpt_neox." + key):
            if k in sd:
                return np.asarray(sd[k], np.float32)
        if default is not None:
            return default
        raise NeoError(f"HF GPT-NeoX weights lack '{key}'; is this a GPTNeoXForCausalLM checkpoint?")

    def ln(prefix: str) -> dict:
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    d, h = cfg.n_embd, cfg.n_head
    dh = d // h
    params: dict = {"wte": get("embed_in.weight"), "ln_f": ln("final_layer_norm")}
    if cfg.no_weight_tie:
        head = sd.get("embed_out.weight", sd.get("lm_head.weight"))
        if head is None:
            raise NeoError("HF GPT-NeoX weights lack 'embed_out.weight' (the untied output head).")
        params["lm_head"] = np.asarray(head, np.float32).T
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        w = get(p + "attention.query_key_value.weight").reshape(h, 3, dh, d)
        attn = {n: {"kernel": w[:, j].transpose(2, 0, 1)} for j, n in enumerate("qkv")}
        if cfg.attn_qkv_bias:
            b = get(p + "attention.query_key_value.bias").reshape(h, 3, dh)
            for j, n in enumerate("qkv"):
                attn[n]["bias"] = b[:, j]
        attn["o"] = {"kernel": get(p + "attention.dense.weight").T.reshape(h, dh, d),
                     "bias": get(p + "attention.dense.bias", np.zeros(d, np.float32))}
        params[f"h_{i}"] = {
            "ln_1": ln(p + "input_layernorm"),
            "attn": attn,
            "ln_2": ln(p + "post_attention_layernorm"),
            "mlp": {
                "c_fc": {"kernel": get(p + "mlp.dense_h_to_4h.weight").T, "bias": get(p + "mlp.dense_h_to_4h.bias")},
                "c_proj": {"kernel": get(p + "mlp.dense_4h_to_h.weight").T, "bias": get(p + "mlp.dense_4h_to_h.bias")},
            },
        }
    return params


def _attention_bias(cfg: ModelConfig, params: Mapping[str, Any]) -> bool:
    """HF has one switch for the qkv and output biases; neo always has an output bias, so it is
    needed whenever q/k/v have biases or any output bias is non-zero."""
    return cfg.attn_qkv_bias or any(np.any(np.asarray(params[f"h_{i}"]["attn"]["o"].get("bias", 0)) != 0)
                               for i in range(cfg.n_layer))


def config_to_hf(cfg: Config, params: Mapping[str, Any]) -> dict:
    """A neo Config -> HF GPTNeoXConfig fields; errors for what GPT-NeoX cannot express."""
    m = cfg.model
    unsupported = {
        f"pos_emb {m.position_embedding!r} (set pos_emb rotary)": m.position_embedding != "rotary",
        "attention without 1/sqrt(d_head) scaling (set scale_attention)": not m.scale_attention,
        "local/linear/none attention layers": set(m.attention_types) != {"global"},
        f"norm {m.norm_kind!r} (export RMSNorm models as LLaMA)": m.norm_kind != "layernorm",
        "bias-free norms": not m.use_bias_in_norms, "bias-free MLP": not m.use_bias_in_mlp,
        "num_kv_heads (grouped-query attention)": m.kv_heads != m.n_head,
        "gated MLP": m.gated,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NeoError(f"HF GPTNeoXForCausalLM cannot represent {', '.join(bad)}.")
    if m.activation_fn not in ACT_TO_HF:
        raise NeoError(f"activation_fn {m.activation_fn!r} has no HF GPT-NeoX equivalent.")
    eos = cfg.data.eos_id if cfg.data.eos_id is not None else 0
    return dict(
        vocab_size=m.n_vocab, max_position_embeddings=m.n_ctx, hidden_size=m.n_embd,
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
        intermediate_size=m.intermediate_expanded, hidden_act=ACT_TO_HF[m.activation_fn],
        rotary_pct=m.rotary_pct, rotary_emb_base=m.rotary_emb_base,
        layer_norm_eps=m.layer_norm_epsilon, use_parallel_residual=m.parallel_residual,
        attention_bias=bool(_attention_bias(m, params)), tie_word_embeddings=not m.no_weight_tie,
        hidden_dropout=m.res_dropout, attention_dropout=m.attn_dropout,
        bos_token_id=eos, eos_token_id=eos,
    )


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """neo's parameter tree -> an HF GPT-NeoX state dict (numpy, the parameters' dtype)."""
    a = lambda x: np.asarray(x)
    d, h = cfg.n_embd, cfg.n_head
    dh = d // h
    bias = _attention_bias(cfg, params)
    sd = {"gpt_neox.embed_in.weight": a(params["wte"]),
          "gpt_neox.final_layer_norm.weight": a(params["ln_f"]["scale"]),
          "gpt_neox.final_layer_norm.bias": a(params["ln_f"]["bias"])}
    if cfg.no_weight_tie:
        # The name every released GPT-NeoX/Pythia file uses; transformers 5 maps it to lm_head.
        sd["embed_out.weight"] = a(params["lm_head"]).T
    for i in range(cfg.n_layer):
        p, blk = f"gpt_neox.layers.{i}.", params[f"h_{i}"]
        attn = blk["attn"]
        w = np.stack([a(attn[n]["kernel"]).transpose(1, 2, 0) for n in "qkv"], axis=1)  # [h, 3, dh, d]
        sd[p + "attention.query_key_value.weight"] = w.reshape(3 * d, d)
        if bias:
            zeros = np.zeros((h, dh), w.dtype)
            b = np.stack([a(attn[n]["bias"]) if "bias" in attn[n] else zeros for n in "qkv"], axis=1)
            sd[p + "attention.query_key_value.bias"] = b.reshape(3 * d)
            sd[p + "attention.dense.bias"] = a(attn["o"]["bias"])
        sd[p + "attention.dense.weight"] = a(attn["o"]["kernel"]).reshape(d, d).T
        for hf, ours in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            sd[p + hf + ".weight"] = a(blk[ours]["scale"])
            sd[p + hf + ".bias"] = a(blk[ours]["bias"])
        for hf, ours in (("dense_h_to_4h", "c_fc"), ("dense_4h_to_h", "c_proj")):
            sd[p + f"mlp.{hf}.weight"] = a(blk["mlp"][ours]["kernel"]).T
            sd[p + f"mlp.{hf}.bias"] = a(blk["mlp"][ours]["bias"])
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
