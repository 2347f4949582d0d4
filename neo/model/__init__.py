"""The network: GPT-Neo (and GPT-NeoX) in flax."""

from neo.model.gpt import GPT, compute_dtype, init_cache
from neo.model.params import abstract_init, init_params

__all__ = ["GPT", "abstract_init", "compute_dtype", "init_cache", "init_params"]
