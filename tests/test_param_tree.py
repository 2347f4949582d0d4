"""The parameter tree (names and shapes) is the checkpoint format and what the Hugging Face
converters read, so it must not move when the network's code is reorganised. Pinned here for
a model with every option, unshared and shared."""

from flax import traverse_util
from flax.core import meta

from neo.config import parse_model_config
from neo.model import abstract_init

EVERY_OPTION = dict(
    n_embd=8, n_head=2, n_layer=4, n_ctx=16, n_vocab=11, local_attention_radius=4,
    attention_types=[[["global", "local", "linear", "none"], 1]], moe_layers=[1],
    moe_params={"moe_num_experts": 4, "moe_hidden_size": 16, "moe_group_size": 8},
    macaron=True, scalenorm=True, mlp_glu=True, num_mem_kv=3, axial_pos_emb=[4, 4],
    activation_fn="prelu", no_weight_tie=True, qkv_bias=True)

QKVO = {"q/kernel": (8, 2, 4), "q/bias": (2, 4), "k/kernel": (8, 2, 4), "k/bias": (2, 4),
        "v/kernel": (8, 2, 4), "v/bias": (2, 4), "o/kernel": (2, 4, 8), "o/bias": (8,)}
MEMORY = {"mem_k": (3, 2, 4), "mem_v": (3, 2, 4)}
MLP = {"c_fc/kernel": (8, 2, 32), "c_fc/bias": (2, 32), "c_proj/kernel": (32, 8), "c_proj/bias": (8,),
       "act/alpha": ()}  # mlp_glu: c_fc makes two halves; prelu has a learned slope
MOE = {"gate": (8, 4), "wi": (4, 8, 16), "wo": (4, 16, 8)}
SCALENORM = {"scale": ()}


def under(prefix: str, tree: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in tree.items()}


def param_tree(raw: dict) -> dict:
    cfg = parse_model_config(raw)
    flat = traverse_util.flatten_dict(meta.unbox(abstract_init(cfg.model)), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def test_every_option_keeps_its_parameter_tree():
    macaron = {**under("ln_macaron", SCALENORM), **under("mlp_macaron", MLP), **under("ln_2", SCALENORM)}
    attention = lambda attn: {**under("ln_1", SCALENORM), **under("attn", attn)}
    layers = [
        {**macaron, **attention({**QKVO, **MEMORY}), **under("mlp", MLP)},  # global: memory slots
        {**macaron, **attention(QKVO), **under("moe", MOE)},  # local, a mixture of experts
        {**macaron, **attention(QKVO), **under("mlp", MLP)},  # linear: the same projections
        {**macaron, **under("mlp", MLP)},  # none: no attention, no ln_1
    ]
    expected = {"wte": (11, 8), "axial_wpe_1": (4, 8), "axial_wpe_2": (4, 8), "lm_head": (8, 11),
                "ln_f/scale": (8,), "ln_f/bias": (8,)}
    for i, layer in enumerate(layers):
        expected.update(under(f"h_{i}", layer))
    assert param_tree(EVERY_OPTION) == expected


def test_a_shared_block_holds_what_every_layer_kind_needs():
    raw = dict(EVERY_OPTION, share_parameters=True, rezero=True, scalenorm=False, rotary_emb=True,
               axial_pos_emb=None, attention_types=[[["local", "global", "linear", "none"], 1]], moe_layers=[2])
    block = {**under("attn", {**QKVO, **MEMORY}), **under("mlp", MLP), **under("mlp_macaron", MLP),
             **under("moe", MOE), "rezero_1": (), "rezero_2": (), "rezero_macaron": ()}  # rezero: no norms
    expected = {"wte": (11, 8), "lm_head": (8, 11), "ln_f/scale": (8,), "ln_f/bias": (8,),
                **under("h_0", block)}  # rotary: no wpe
    assert param_tree(raw) == expected
