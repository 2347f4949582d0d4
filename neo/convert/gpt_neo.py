"""Hugging Face `GPTNeoForCausalLM` <-> neo parameters and config.

torch Linear weights are [out, in]; neo kernels are [in, out] with the head axis split out
([embd, heads, features_per_head] for q/k/v, [heads, features_per_head, embd] for o).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from neo.config import Config, ModelConfig
from neo.errors import NeoError


def config_from_hf(hf: Mapping[str, Any]) -> dict:
    """An HF GPTNeoConfig (as a dict) -> a neo model-config dict."""
    act = hf.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu", "gelu": "gelu_exact", "gelu_fast": "gelu", "relu": "relu", "silu": "silu"}
    if act not in acts:
        raise NeoError(f"HF activation_function {act!r} has no neo equivalent.")
    return {
        "n_vocab": hf["vocab_size"],
        "n_ctx": hf["max_position_embeddings"],
        "n_embd": hf["hidden_size"],
        "n_layer": hf["num_layers"],
        "n_head": hf["num_heads"],
        "attention_types": hf["attention_types"],
        "local_attention_radius": hf.get("window_size", 256),
        "intermediate_size": hf.get("intermediate_size") or None,
        "activation_fn": acts[act],
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        "embed_dropout": hf.get("embed_dropout", 0.0),
        "attn_dropout": hf.get("attention_dropout", 0.0),
        "res_dropout": hf.get("resid_dropout", 0.0),
        "eos_id": hf.get("eos_token_id", 50256),
    }


def params_from_hf(sd: Mapping[str, np.ndarray], n_layer: int, n_head: int) -> dict:
    """An HF GPT-Neo state dict (numpy arrays) -> neo's parameter tree."""
    def get(key: str) -> np.ndarray:
        for k in (key, "transformer." + key):
            if k in sd:
                return np.asarray(sd[k], np.float32)
        raise NeoError(f"HF GPT-Neo weights lack '{key}'; is this a GPTNeoForCausalLM checkpoint?")

    def ln(prefix: str) -> dict:
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    wte = get("wte.weight")
    d = wte.shape[1]
    dh = d // n_head
    params: dict = {"wte": wte, "wpe": get("wpe.weight"), "ln_f": ln("ln_f")}
    for i in range(n_layer):
        p = f"h.{i}."
        a = p + "attn.attention."
        qkv = {n: {"kernel": get(a + f"{n}_proj.weight").T.reshape(d, n_head, dh)} for n in "qkv"}
        o = {"kernel": get(a + "out_proj.weight").T.reshape(n_head, dh, d), "bias": get(a + "out_proj.bias")}
        params[f"h_{i}"] = {
            "ln_1": ln(p + "ln_1"),
            "attn": {**qkv, "o": o},
            "ln_2": ln(p + "ln_2"),
            "mlp": {
                "c_fc": {"kernel": get(p + "mlp.c_fc.weight").T, "bias": get(p + "mlp.c_fc.bias")},
                "c_proj": {"kernel": get(p + "mlp.c_proj.weight").T, "bias": get(p + "mlp.c_proj.bias")},
            },
        }
    return params


def config_to_hf(cfg: Config) -> dict:
    """A neo Config -> HF GPTNeoConfig kwargs; errors for what HF GPT-Neo cannot express."""
    m = cfg.model
    unsupported = {
        "rotary_emb": m.rotary_emb, "no_weight_tie": m.no_weight_tie,
        "parallel_residual": m.parallel_residual, "scale_attention": m.scale_attention,
        "qkv_bias": m.attn_qkv_bias, "linear/none attention": bool({"linear", "none"} & set(m.attention_types)),
        f"pos_emb {m.position_embedding!r}": m.position_embedding != "learned",
        f"norm {m.norm_kind!r}": m.norm_kind != "layernorm", "bias-free norms": not m.use_bias_in_norms,
        "bias-free attention output": not m.attn_out_bias, "bias-free MLP": not m.use_bias_in_mlp,
        "num_kv_heads (grouped-query attention)": m.kv_heads != m.n_head,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NeoError(f"HF GPTNeoForCausalLM cannot represent {', '.join(bad)}; export as GPT-NeoX instead.")
    # GPT-Neo's experimental options have no Hugging Face architecture at all.
    experimental = {
        "moe_layers": bool(m.moe_layers), "mlp_glu": m.mlp_glu, "scalenorm": m.scalenorm,
        "rezero": m.rezero, "macaron": m.macaron, "num_mem_kv": m.num_mem_kv > 0,
        "axial_pos_emb": m.axial_pos_emb is not None, "share_parameters": m.share_parameters,
        "mlm_training": m.mlm_training,
    }
    bad = [k for k, v in experimental.items() if v]
    if bad:
        raise NeoError(f"no Hugging Face model can represent {', '.join(bad)}; keep neo's checkpoint.")
    acts = {"gelu": "gelu_new", "gelu_new": "gelu_new", "gelu_tanh": "gelu_new", "gelu_fast": "gelu_new",
            "gelu_exact": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
    if m.activation_fn not in acts:
        raise NeoError(f"activation_fn {m.activation_fn!r} has no HF GPT-Neo equivalent.")
    kinds = list(m.attention_types)
    return dict(
        vocab_size=m.n_vocab, max_position_embeddings=m.n_ctx, hidden_size=m.n_embd,
        num_layers=m.n_layer, num_heads=m.n_head, attention_types=[[kinds, 1]],
        window_size=m.local_attention_radius, intermediate_size=m.intermediate_size,
        activation_function=acts[m.activation_fn], layer_norm_epsilon=m.layer_norm_epsilon,
        embed_dropout=m.embed_dropout, attention_dropout=m.attn_dropout, resid_dropout=m.res_dropout,
        bos_token_id=cfg.data.eos_id if cfg.data.eos_id is not None else 50256,
        eos_token_id=cfg.data.eos_id if cfg.data.eos_id is not None else 50256,
    )


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """neo's parameter tree -> an HF GPT-Neo state dict (numpy, the parameters' dtype). The
    output head is tied to `wte`, so `lm_head.weight` is not written (transformers ties it)."""
    a = lambda x: np.asarray(x)
    d = cfg.n_embd
    sd = {"transformer.wte.weight": a(params["wte"]), "transformer.wpe.weight": a(params["wpe"]),
          "transformer.ln_f.weight": a(params["ln_f"]["scale"]), "transformer.ln_f.bias": a(params["ln_f"]["bias"])}
    for i in range(cfg.n_layer):
        p, blk = f"transformer.h.{i}.", params[f"h_{i}"]
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = a(blk[ln]["scale"]), a(blk[ln]["bias"])
        attn = blk["attn"]
        for n in "qkv":
            sd[p + f"attn.attention.{n}_proj.weight"] = a(attn[n]["kernel"]).reshape(d, d).T
        sd[p + "attn.attention.out_proj.weight"] = a(attn["o"]["kernel"]).reshape(d, d).T
        sd[p + "attn.attention.out_proj.bias"] = a(attn["o"]["bias"])
        for name in ("c_fc", "c_proj"):
            sd[p + f"mlp.{name}.weight"] = a(blk["mlp"][name]["kernel"]).T
            sd[p + f"mlp.{name}.bias"] = a(blk["mlp"][name]["bias"])
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
