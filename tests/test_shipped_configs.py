"""The shipped GPT-Neo configs: each loads, builds abstractly (nothing allocated) with the
released model's parameter count, and its mesh/layout examples fit their devices."""

import json
import math

import pytest

from neo.auto_layout import TARGETS, estimate, fits_shapes, parameter_shapes
from neo.config import CONFIG_DIR, load_model_config

# Released GPT-Neo models (Hugging Face configs; spec section 5). 350M: the shapes of HF's
# EleutherAI/gpt-neo-350M (24 x 1024, 16 heads); 760M: the original repo's gpt3_large_256 shape
# with the GPT-2 vocabulary (no 760M GPT-Neo was released) -- both computed from the shapes.
RELEASED = {
    "gpt_neo_125M": 125_198_592,
    "gpt_neo_350M": 355_798_016,
    "gpt_neo_760M": 760_189_440,
    "gpt_neo_1.3B": 1_315_575_808,
    "gpt_neo_2.7B": 2_651_307_520,
}
EXAMPLES = json.loads((CONFIG_DIR / "layouts" / "examples.json").read_text())
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p.stem.startswith(("gpt_neo_", "gpt3_")))


_SHAPES: dict = {}


def shapes(name):
    """Every parameter's shape and names, from jax.eval_shape of the model's init: no weights
    are allocated, even for 13B."""
    if name not in _SHAPES:
        _SHAPES[name] = parameter_shapes(load_model_config(name))
    return _SHAPES[name]


def gpt_neo_count(cfg) -> int:
    """Parameters of a GPT-Neo model from its shapes: tied embedding, learned positions, per
    layer LN1 + q/k/v/o (+ o bias) when it has attention, LN2 + MLP with biases, final LN."""
    d, f = cfg.model.n_embd, cfg.model.intermediate_expanded
    attn = 4 * d * d + d + 2 * d
    mlp = 2 * d * f + f + d + 2 * d
    layers = sum((attn if k != "none" else 0) + mlp for k in cfg.model.attention_types)
    return cfg.model.n_vocab * d + cfg.model.n_ctx * d + layers + 2 * d


def test_the_released_sizes_and_the_original_family_are_shipped():
    assert set(RELEASED) <= set(SHIPPED)
    for name in ("gpt3_small_256", "gpt3_medium_256", "gpt3_large_256", "gpt3_XL_256_Pile", "gpt3_2-7B_256",
                 "gpt3_6-7B_256", "gpt3_13B_256", "gpt3_13B_256_Pile", "gpt3_PAR_small_256"):
        assert name in SHIPPED
    assert set(EXAMPLES) == set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_builds_abstractly_with_the_right_parameter_count(name):
    cfg = load_model_config(name)
    count = sum(math.prod(shape) for _, shape, _ in shapes(name))
    assert count == gpt_neo_count(cfg)
    if name in RELEASED:
        assert count == RELEASED[name]


def test_released_attention_patterns():
    kinds = {n: load_model_config(n).model.attention_types for n in RELEASED}
    for n in ("gpt_neo_125M", "gpt_neo_350M", "gpt_neo_1.3B", "gpt_neo_2.7B"):
        assert kinds[n][:2] == ("global", "local") and len(set(kinds[n][::2])) == 1
    assert load_model_config("gpt_neo_2.7B").model.n_head == 20  # the release, not the repo's 32-head config


@pytest.mark.parametrize("name", SHIPPED)
def test_layout_examples_fit_their_devices(name):
    cfg = load_model_config(name)
    for target, example in EXAMPLES[name].items():
        n, memory, _ = TARGETS[target]
        if not example["fits"]:
            assert cfg.model.n_embd >= 4096, f"{name} on {target}: only the biggest models may lack an example"
            continue
        trial = cfg.replace(**{k: example[k] for k in ("mesh_shape", "layout", "tokens_per_mb_per_replica",
                                                       "recompute_grad") if k in example})
        assert math.prod(int(a.split(":")[1]) for a in trial.run.mesh_shape.split(",")) == n
        assert fits_shapes(trial, trial.run.mesh_shape, trial.run.layout, n) is None
        assert estimate(trial, trial.run.mesh_shape, trial.run.layout, n, shapes(name)).memory <= memory, (name, target)
