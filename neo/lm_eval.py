"""`python -m neo.lm_eval ARGS`: lm-eval's command line with the `neo` backend and neo's offline
tasks registered (the work is neo/evaluate/harness.py's `lm_eval_command`; docs/evaluation.md)."""

from neo.evaluate.harness import lm_eval_command

if __name__ == "__main__":
    lm_eval_command()
