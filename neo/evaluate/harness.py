"""`main.py --eval`: the config's `eval_tasks` through lm-evaluation-harness on the latest
checkpoint, then validation when `eval_steps > 0` (the original's order); and
`python -m neo.lm_eval`, lm-eval's own command line with neo's backend and tasks.

Task names are lm-eval's. neo's offline tasks (neo/evaluate/tasks/: `lambada_openai_local`,
`text_perplexity_local`) and any `--eval_include_path` folder are indexed first, which takes
no time; lm-eval's ~15,000 built-in tasks (11 s to index, and their data comes from the
Hugging Face hub) are indexed only when a name is not found there. GPT-Neo's own task name
`lambada` means `lambada_openai_local`, on the first dataset config's `lambada_tokens_path` when
it has one (GPT-Neo's key: its token cache, decoded back to text, or LAMBADA text as .jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax

from neo.config import Config
from neo.errors import NeoError, close_matches
from neo.mesh import Layout

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
ALIASES = {"lambada": "lambada_openai_local"}  # GPT-Neo's eval_tasks names -> lm-eval tasks


@dataclasses.dataclass(frozen=True)
class HarnessOptions:
    """lm-eval's knobs as `main.py --eval` exposes them (flags --eval_*)."""

    tasks: tuple[str, ...] = ()  # empty: the config's eval_tasks
    limit: Optional[float] = None  # documents per task (a fraction if < 1)
    batch_size: Optional[str] = None  # rows per batch, or "auto" (default)
    num_fewshot: Optional[int] = None
    include_path: Optional[str] = None  # a folder of task YAMLs
    bootstrap_iters: int = 1000  # for standard errors; 0 = none


def resolve_tasks(names: Sequence[str], include_path: Optional[str] = None,
                  metadata: Optional[dict] = None, log: Callable[[str], None] = print) -> tuple[list[str], Any]:
    """(lm-eval task names, a TaskManager that knows them). Unknown names are an error that
    lists the nearest known ones."""
    from lm_eval.tasks import TaskManager

    names = list(names)
    for i, name in enumerate(names):
        if name in ALIASES:
            log(f"neo: eval task '{name}' is lm-eval's lambada_openai on the local copy: {ALIASES[name]}")
            names[i] = ALIASES[name]
    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    if include_path and not Path(include_path).is_dir():
        raise NeoError(f"--eval_include_path {include_path}: no such folder (it should hold task YAML files).")
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if _missing(manager, names):
        log("neo: indexing lm-eval's built-in tasks (their data is downloaded from the Hugging Face hub)...")
        manager = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    missing = _missing(manager, names)
    if missing:
        hints = {m: close_matches(m, manager.all_tasks, n=3) for m in missing}
        raise NeoError("unknown lm-eval task(s): " + "; ".join(
            f"'{m}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for m, h in hints.items())
            + ". Offline tasks shipped with neo: lambada_openai_local, text_perplexity_local (docs/evaluation.md).")
    return names, manager


def lambada_metadata(cfg: Config, log: Callable[[str], None] = print) -> Optional[dict]:
    """lm-eval task metadata pointing `lambada_openai_local` at GPT-Neo's `lambada_tokens_path`
    (a key of the first dataset config, as the original read it), or None for the shipped copy.
    The original cached LAMBADA there as a JSON list of token lists (tasks.py); those are
    decoded with the dataset's tokenizer into the text the task reads. A .jsonl path is text."""
    if not cfg.data.datasets or cfg.data.datasets[0].config.lambada_tokens_path is None:
        return None
    from neo.config import resolve_path

    ds = cfg.data.datasets[0].config
    path = resolve_path(ds.lambada_tokens_path, ds.source)
    if not os.path.exists(path):
        raise NeoError(f"lambada_tokens_path {path} (dataset '{ds.id}') does not exist: GPT-Neo downloaded LAMBADA "
                       f"there, neo reads only local files. Remove the key to use the shipped copy "
                       f"(data/lambada_openai_test.jsonl), or point it at LAMBADA text (.jsonl).")
    if path.endswith(".json"):
        path = _decode_token_cache(path, ds)
    log(f"neo: LAMBADA from lambada_tokens_path {path}")
    return {"lambada_path": path}


def _decode_token_cache(path: str, ds: Any) -> str:
    """GPT-Neo's LAMBADA token cache (a JSON list of token lists) -> a .jsonl of their texts, in
    the temporary directory under a name made from its contents: every evaluation of a run (and
    every process of a multi-host one) finds the same file instead of leaving a new one behind."""
    import hashlib
    import tempfile

    from neo.data.tokenizer import load_tokenizer

    try:
        docs = json.loads(Path(path).read_text())
        assert isinstance(docs, list) and all(isinstance(d, list) for d in docs)
    except (ValueError, AssertionError):
        raise NeoError(f"lambada_tokens_path {path}: not GPT-Neo's LAMBADA cache (a JSON list of token lists); "
                       f"for LAMBADA text use a .jsonl file of {{\"text\": ...}} lines.") from None
    tokenizer = load_tokenizer(ds.tokenizer_path, ds.tokenizer_is_pretrained)
    text = "".join(json.dumps({"text": tokenizer.decode(d)}) + "\n" for d in docs)
    out = Path(tempfile.gettempdir()) / f"neo-lambada-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not out.exists():  # named by its contents, and written whole: one that exists is this text
        partial = out.with_name(f"{out.name}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, out)  # whole or absent for a reader, whichever process wrote it
    return str(out)


def _missing(manager: Any, names: Sequence[str]) -> list[str]:
    return [n for n in names if not n.endswith(".yaml") and not manager.match_tasks([n])]


def run_tasks(cfg: Config, layout: Layout, opts: HarnessOptions, sacred_id: str = "nosacred",
              log: Callable[[str], None] = print) -> dict:
    """Evaluate the latest checkpoint on the tasks; write lm-eval's results JSON to
    <model_path>/eval_<sacred_id>_<step>.json and print lm-eval's table."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from neo.evaluate.backend import NeoLM

    names = list(opts.tasks or cfg.run.eval_tasks)
    if not names:
        raise NeoError(f"{cfg.source}: no tasks to evaluate: set 'eval_tasks' in the config or pass --eval_tasks.")
    names, manager = resolve_tasks(names, opts.include_path, metadata=lambada_metadata(cfg, log), log=log)
    lm = NeoLM(cfg, layout=layout, batch_size=opts.batch_size)
    # lm-eval computes bootstrap standard errors in a process pool; forking a process that
    # runs JAX's threads can deadlock, so they run in this process.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=opts.limit,
                                      num_fewshot=opts.num_fewshot, bootstrap_iters=opts.bootstrap_iters,
                                      log_samples=False)
    results["config"]["model"] = f"neo ({cfg.source})"
    if jax.process_index() == 0:
        from etils import epath

        out = epath.Path(cfg.run.model_path) / f"eval_{sacred_id}_{lm.step}.json"
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        table = make_table(results) + (make_table(results, "groups") if "groups" in results else "")
        log(f"{table}neo: wrote {out}")
    return results


def evaluate_checkpoint(cfg: Config, layout: Layout, opts: HarnessOptions, sacred_id: str = "nosacred",
                        log: Callable[[str], None] = print) -> dict:
    """`--eval`: the tasks (config or flags), then validation if eval_steps > 0."""
    from neo.evaluate.validation import validate_checkpoint

    if not (opts.tasks or cfg.run.eval_tasks or cfg.run.eval_steps > 0):
        raise NeoError(f"{cfg.source}: nothing to evaluate: set 'eval_tasks' (lm-eval tasks, e.g. [\"lambada\"]) "
                       f"or pass --eval_tasks, or set 'eval_steps' > 0 for validation.")
    out: dict = {}
    if opts.tasks or cfg.run.eval_tasks:
        out["tasks"] = run_tasks(cfg, layout, opts, sacred_id, log)["results"]
    if cfg.run.eval_steps > 0:
        out["validation"] = validate_checkpoint(cfg, layout, log)
    return out


def lm_eval_command() -> None:
    """`python -m neo.lm_eval ARGS`: lm-eval's own command line, with exactly its arguments,
    plus the `neo` model backend and neo's offline tasks on the task include path:

        python -m neo.lm_eval --model neo --model_args model=runs/gpt-neo-125M/config.json --tasks lambada_openai_local

    lm-eval 0.4.13 only knows the backends in its source tree, so its `lm_eval` command cannot
    see `neo`; releases that discover installed plugins (the `lm_eval.models` entry point, which
    pyproject.toml declares) run `lm_eval --model neo ...` directly."""
    from lm_eval._cli import HarnessCLI  # lm-eval's cli_evaluate(), with one step added
    from lm_eval.utils import setup_logging

    import neo.evaluate.backend  # noqa: F401  (registers the `neo` backend)
    from neo.distributed import initialize

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
