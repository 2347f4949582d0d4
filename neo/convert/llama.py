"""Hugging Face `LlamaForCausalLM` and `MistralForCausalLM` <-> neo parameters and config.

Both are neo's GPT-NeoX options together (docs/configs.md): rotary embeddings on the whole head
(`rotary_pct` 1, Hugging Face's rotate-half convention, which is neo's), RMSNorm without bias,
a SwiGLU MLP, grouped-query attention (`num_kv_heads`), no biases, an untied head. Mistral adds
a sliding window, which is GPT-Neo's `local` attention: HF's `sliding_window` W lets query i see
keys i - W < j <= i, exactly `local_attention_radius` W.

The projections are separate in Hugging Face as in neo; torch weights are [out, in], neo kernels
[in, heads, features_per_head] (q/k/v), [heads, features_per_head, out] (o), [in, 2, f] for the
gated input projection (half 0 `up_proj`, half 1 `gate_proj`: neo's MLP computes
h * act(gate)) and [f, out] for `down_proj`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from neo.config import Config, ModelConfig
from neo.errors import NeoError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# HF hidden_act (the gate's function) -> neo's GLU activation, and back
GLU_FROM_HF = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}
GLU_TO_HF = {v: k for k, v in GLU_FROM_HF.items()}


def rope_theta(hf: Mapping[str, Any]) -> float:
    """The rotary base from the old `rope_theta` key or transformers 5's `rope_parameters`;
    RoPE scaling (Llama 3's, YaRN, ...) is refused."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise NeoError(f"HF rope type {kind!r} (RoPE scaling) is not supported by neo; only plain rotary "
                       f"embeddings are.")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: Mapping[str, Any]) -> dict:
    """An HF LlamaConfig / MistralConfig (as a dict) -> a neo model-config dict."""
    act = hf.get("hidden_act", "silu")
    if act not in GLU_FROM_HF:
        raise NeoError(f"HF hidden_act {act!r} has no neo GLU activation (known: {', '.join(GLU_FROM_HF)}).")
    d, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    if hf.get("head_dim") not in (None, d // heads):
        raise NeoError(f"HF head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads "
                       f"({d // heads}); neo's heads are n_embd / n_head wide.")
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    attn_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id", 2)
    raw = {
        "n_vocab": hf["vocab_size"],
        "n_ctx": hf.get("max_position_embeddings", 4096),
        "n_embd": d,
        "n_layer": layers,
        "n_head": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "attention_types": [[["local" if window else "global"], layers]],
        "pos_emb": "rotary",
        "rotary_pct": 1.0,
        "rotary_emb_base": rope_theta(hf),
        "norm": "rmsnorm",
        "rms_norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "use_bias_in_norms": False,
        "activation_fn": GLU_FROM_HF[act],
        "intermediate_size": hf["intermediate_size"],
        "use_bias_in_attn_linear": attn_bias,
        "use_bias_in_mlp": bool(hf.get("mlp_bias", False)),
        "scale_attention": True,
        "no_weight_tie": not hf.get("tie_word_embeddings", False),
        "attn_dropout": hf.get("attention_dropout", 0.0),
        "eos_id": eos[0] if isinstance(eos, list) else eos,
    }
    if window:
        raw["local_attention_radius"] = window
    return raw


def params_from_hf(sd: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """An HF Llama/Mistral state dict (numpy arrays) -> neo's parameter tree (per layer)."""
    def get(key: str) -> np.ndarray:
        for k in ("model." + key, key):
            if k in sd:
                return np.asarray(sd[k], np.float32)
        raise NeoError(f"HF weights lack 'model.{key}'; is this a LlamaForCausalLM/MistralForCausalLM checkpoint?")

    d, h, kv, dh = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.features_per_head
    params: dict = {"wte": get("embed_tokens.weight"), "ln_f": {"scale": get("norm.weight")}}
    if cfg.no_weight_tie:
        if "lm_head.weight" not in sd:
            raise NeoError("HF weights lack 'lm_head.weight' (the untied output head).")
        params["lm_head"] = np.asarray(sd["lm_head.weight"], np.float32).T
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        attn = {}
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            attn[name] = {"kernel": get(p + f"self_attn.{name}_proj.weight").T.reshape(d, heads, dh)}
            if cfg.attn_qkv_bias:
                attn[name]["bias"] = get(p + f"self_attn.{name}_proj.bias").reshape(heads, dh)
        attn["o"] = {"kernel": get(p + "self_attn.o_proj.weight").T.reshape(h, dh, d)}
        if cfg.attn_out_bias:
            attn["o"]["bias"] = get(p + "self_attn.o_proj.bias")
        mlp = {"c_fc": {"kernel": np.stack([get(p + "mlp.up_proj.weight").T, get(p + "mlp.gate_proj.weight").T], 1)},
               "c_proj": {"kernel": get(p + "mlp.down_proj.weight").T}}
        if cfg.use_bias_in_mlp:
            mlp["c_fc"]["bias"] = np.stack([get(p + "mlp.up_proj.bias"), get(p + "mlp.gate_proj.bias")])
            mlp["c_proj"]["bias"] = get(p + "mlp.down_proj.bias")
        params[f"h_{i}"] = {"ln_1": {"scale": get(p + "input_layernorm.weight")}, "attn": attn,
                            "ln_2": {"scale": get(p + "post_attention_layernorm.weight")}, "mlp": mlp}
    return params


def family(m: ModelConfig) -> str:
    """`mistral` when every layer is local (a sliding window), else `llama`."""
    return "mistral" if set(m.attention_types) == {"local"} else "llama"


def config_to_hf(cfg: Config) -> dict:
    """A neo Config -> HF LlamaConfig / MistralConfig fields; errors for what they cannot express."""
    m = cfg.model
    unsupported = {
        f"pos_emb {m.position_embedding!r} (set pos_emb rotary)": m.position_embedding != "rotary",
        f"rotary_pct {m.rotary_pct} (LLaMA rotates the whole head)": m.rotary_pct != 1.0,
        "norms with a bias (set use_bias_in_norms false)": m.use_bias_in_norms,
        "parallel_residual": m.parallel_residual,
        "attention without 1/sqrt(d_head) scaling (set scale_attention)": not m.scale_attention,
        "q/k/v biases without an output bias or the reverse": m.attn_qkv_bias != m.attn_out_bias,
        "an ungated MLP (use activation_fn swiglu, geglu or reglu)": m.activation_fn not in GLU_TO_HF,
        "mixed global and local layers (LLaMA: all global; Mistral: all local)":
            set(m.attention_types) not in ({"global"}, {"local"}),
        "biases in a sliding-window model (MistralForCausalLM has none)":
            family(m) == "mistral" and (m.attn_out_bias or m.use_bias_in_mlp),
        "GPT-Neo's experimental options (mlp_glu, scalenorm, rezero, macaron, num_mem_kv, moe_layers, "
        "share_parameters, mlm_training)": m.mlp_glu or m.scalenorm or m.rezero or m.macaron or m.num_mem_kv > 0
        or bool(m.moe_layers) or m.share_parameters or m.mlm_training,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NeoError(f"HF LlamaForCausalLM/MistralForCausalLM cannot represent {'; '.join(bad)}.")
    eos = cfg.data.eos_id if cfg.data.eos_id is not None else 2
    fields = dict(
        vocab_size=m.n_vocab, max_position_embeddings=m.n_ctx, hidden_size=m.n_embd,
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads,
        head_dim=m.features_per_head, intermediate_size=m.intermediate_expanded,
        hidden_act=GLU_TO_HF[m.activation_fn], rms_norm_eps=m.rms_norm_epsilon or 1e-8,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_emb_base},
        rope_theta=m.rotary_emb_base, attention_bias=m.attn_out_bias, mlp_bias=m.use_bias_in_mlp,
        attention_dropout=m.attn_dropout, tie_word_embeddings=not m.no_weight_tie,
        bos_token_id=eos, eos_token_id=eos,
    )
    if family(m) == "mistral":
        fields.update(sliding_window=m.local_attention_radius)
        del fields["attention_bias"], fields["mlp_bias"]  # MistralConfig has neither
    return fields


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """neo's parameter tree (per layer) -> an HF Llama/Mistral state dict (the parameters' dtype)."""
    a = lambda x: np.asarray(x)
    d = cfg.n_embd
    sd = {"model.embed_tokens.weight": a(params["wte"]), "model.norm.weight": a(params["ln_f"]["scale"])}
    if cfg.no_weight_tie:
        sd["lm_head.weight"] = a(params["lm_head"]).T
    for i in range(cfg.n_layer):
        p, blk = f"model.layers.{i}.", params[f"h_{i}"]
        for name in "qkv":
            w = a(blk["attn"][name]["kernel"])
            sd[p + f"self_attn.{name}_proj.weight"] = w.reshape(d, -1).T
            if cfg.attn_qkv_bias:
                sd[p + f"self_attn.{name}_proj.bias"] = a(blk["attn"][name]["bias"]).reshape(-1)
        sd[p + "self_attn.o_proj.weight"] = a(blk["attn"]["o"]["kernel"]).reshape(-1, d).T
        if cfg.attn_out_bias:
            sd[p + "self_attn.o_proj.bias"] = a(blk["attn"]["o"]["bias"])
        fc = a(blk["mlp"]["c_fc"]["kernel"])
        sd[p + "mlp.up_proj.weight"], sd[p + "mlp.gate_proj.weight"] = fc[:, 0].T, fc[:, 1].T
        sd[p + "mlp.down_proj.weight"] = a(blk["mlp"]["c_proj"]["kernel"]).T
        if cfg.use_bias_in_mlp:
            b = a(blk["mlp"]["c_fc"]["bias"])
            sd[p + "mlp.up_proj.bias"], sd[p + "mlp.gate_proj.bias"] = b[0], b[1]
            sd[p + "mlp.down_proj.bias"] = a(blk["mlp"]["c_proj"]["bias"])
        sd[p + "input_layernorm.weight"] = a(blk["ln_1"]["scale"])
        sd[p + "post_attention_layernorm.weight"] = a(blk["ln_2"]["scale"])
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
