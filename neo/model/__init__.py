"""The network: GPT-Neo (and GPT-NeoX) in flax."""

from neo.model.gpt import GPT, compute_dtype, init_cache
from neo.model.params import abstract_init, as_model_tree, init_params, is_stacked, per_layer

__all__ = ["GPT", "abstract_init", "as_model_tree", "compute_dtype", "init_cache", "init_params", "is_stacked",
           "per_layer"]
