"""`python -m neo.lm_eval ARGS`: lm-eval's own command line, with exactly its arguments, plus
the `neo` model backend and neo's offline tasks (neo/tasks/) on the task include path:

    python -m neo.lm_eval --model neo --model_args model=runs/gpt-neo-125M/config.json --tasks lambada_openai_local

lm-eval 0.4.13 only knows the backends in its source tree, so its `lm_eval` command cannot see
`neo`; releases that discover installed plugins (the `lm_eval.models` entry point, which
pyproject.toml declares) run `lm_eval --model neo ...` directly.
"""

from __future__ import annotations

import sys


def main() -> None:
    from lm_eval._cli import HarnessCLI  # lm-eval's cli_evaluate(), with one step added
    from lm_eval.utils import setup_logging

    import neo.lm_eval_backend  # noqa: F401  (registers the `neo` backend)
    from neo.distributed import initialize
    from neo.errors import NeoError
    from neo.eval_harness import TASKS_DIR

    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    # A --config YAML may name its own include_path; the command line would override it.
    if hasattr(args, "include_path") and not getattr(args, "config", None):
        args.include_path = [p for p in (args.include_path,) if p] + [str(TASKS_DIR)]
    try:
        initialize()
        parser.execute(args)
    except NeoError as e:
        print(f"neo: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
