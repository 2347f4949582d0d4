"""neo: EleutherAI's GPT-Neo trainer on JAX."""

__version__ = "0.1.0"
