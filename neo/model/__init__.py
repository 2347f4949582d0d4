"""The network: GPT-Neo (and GPT-NeoX) in flax."""

from neo.model.gpt import GPT, compute_dtype, init_cache

__all__ = ["GPT", "compute_dtype", "init_cache"]
