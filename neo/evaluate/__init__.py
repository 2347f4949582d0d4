"""Evaluation of neo models: validation loss, and lm-evaluation-harness tasks.

    validation.py  loss, perplexity and bits per byte on `eval_steps` batches of the eval split
                   (the training loop at every checkpoint; `main.py --eval`)
    harness.py     `main.py --eval` (the config's eval_tasks through lm-eval, then validation)
                   and `python -m neo.lm_eval` (lm-eval's own command line)
    backend.py     `NeoLM`, the lm-eval model backend registered as `neo`
    tasks/         neo's offline lm-eval tasks (lambada_openai_local, text_perplexity_local)

`from neo.evaluate import NeoLM` gives the backend, imported on first use so that validation
(and training) never pay lm-eval's import.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "NeoLM":
        from neo.evaluate.backend import NeoLM

        return NeoLM
    raise AttributeError(f"module 'neo.evaluate' has no attribute {name!r}")
