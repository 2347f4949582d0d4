"""Checkpoints with orbax in `<model_path>/checkpoints/<step>/`.

A checkpoint holds three items: `params`, `opt_state` (absent in a parameters-only checkpoint,
such as one imported from Hugging Face) and `meta` (JSON: step, the data pipeline's position,
anything else the loop needs to resume exactly). Saving is asynchronous and atomic: orbax writes
into a temporary directory and renames it when complete, so a crash mid-save never leaves a
checkpoint that looks finished. Restoring onto any mesh/layout works: arrays are read straight
into the shardings asked for.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from neo.errors import NeoError


def checkpoint_dir(model_path: str) -> str:
    path = os.path.join(model_path, "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def check_writable(model_path: str) -> None:
    """Refuse, before anything is built or compiled, a model_path this process cannot write:
    a file where a folder must be, or a folder without write permission. Creates nothing. For
    object stores (gs://) only a file in the way is looked for: their permissions show at the
    first write."""
    from etils import epath

    if "://" in model_path:
        for p in (epath.Path(model_path), epath.Path(model_path) / "checkpoints"):
            if p.exists() and not p.is_dir():
                raise NeoError(f"model_path {model_path}: {p} is a file, but neo needs a folder there; "
                               f"move the file or choose another model_path.")
        return
    root = os.path.abspath(model_path)
    for p in (root, os.path.join(root, "checkpoints")):
        if os.path.exists(p) and not os.path.isdir(p):
            raise NeoError(f"model_path {model_path}: {p} is a file, but neo needs a folder there; "
                           f"move the file or choose another model_path.")
    existing = root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NeoError(f"model_path {model_path}: {existing} is a file, so the folder cannot be created; "
                       f"choose another model_path.")
    for p in (existing, os.path.join(root, "checkpoints")):
        if os.path.isdir(p) and not os.access(p, os.W_OK | os.X_OK):
            raise NeoError(f"model_path {model_path}: no permission to write in {p}; fix its permissions "
                           f"or choose another model_path.")


def check_disk_space(model_path: str, checkpoint_bytes: int, saves: int, keep: Optional[int],
                     log: Callable[[str], None]) -> None:
    """Before compiling: refuse a run whose disk cannot hold one checkpoint (it would train
    until its first save, then fail), and warn when it cannot hold the `saves` checkpoints still
    to be written, up to `keep` at once plus the one being written. Local paths only (a
    bucket's space is not the machine's)."""
    import shutil

    from neo.memory import gib

    if "://" in model_path or saves < 1:
        return
    where = os.path.abspath(checkpoint_dir(model_path))
    while not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where).free
    if free < checkpoint_bytes:
        raise NeoError(f"model_path {model_path}: its disk has {gib(free)} free, but one checkpoint of this model "
                       f"(parameters and optimizer state) takes ~{gib(checkpoint_bytes)}; free space there or move "
                       f"model_path.")
    at_once = min(saves, (keep or saves) + 1)
    if free < at_once * checkpoint_bytes:
        log(f"neo: WARNING: model_path's disk has {gib(free)} free; {at_once} checkpoints of ~{gib(checkpoint_bytes)} "
            f"each may be on it at once (keep_checkpoints {keep}, plus the one being written): a save may fail "
            f"for want of space (the run then stops, the previous checkpoint intact).")


class Checkpointer:
    """Save/restore train state; keeps the newest `max_to_keep` checkpoints."""

    def __init__(self, model_path: str, max_to_keep: Optional[int] = 5, async_save: bool = True):
        self.directory = checkpoint_dir(model_path)
        self.manager = ocp.CheckpointManager(
            self.directory,
            # (cleanup_tmp_directories: a save that died, e.g. on a full disk, left its
            # `<step>.orbax-checkpoint-tmp` folder; removed when the run starts again)
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True),
            # Named up front, so that a new process can read a checkpoint's metadata before it
            # restores anything (`_stored_params`); orbax otherwise learns them from the first
            # save or restore, and until then reads no item's metadata.
            item_handlers={"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )
        self._writing: Optional[int] = None  # the step of the save in flight
        _quiet_background_errors()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any = None, meta: Optional[dict] = None,
             force: bool = False) -> bool:
        from neo.checksum import checksums_of

        sums = checksums_of({"params": params, "opt_state": opt_state})
        meta = {"step": step, **(meta or {}), "checksums": sums}
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.wait()  # a failure of the save before this one surfaces here
        self._writing = step
        with self._writes():
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _writes(self):
        """orbax's errors from writing checkpoint `self._writing` (a full disk, a lost
        permission, a bucket gone) as one line saying which checkpoint is intact."""
        try:
            yield
        except NeoError:
            raise
        except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise plain Exceptions and ValueErrors)
            step, self._writing = self._writing, None
            if step is None or not _WRITE_FAILED.search(f"{e} {e.__cause__}"):
                raise
            _quiet_background_errors(failed=True)
            from etils import epath

            for partial in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
                partial.rmtree(missing_ok=True)  # holds the disk, and is no checkpoint
            intact = [s for s in self.all_steps() if s != step and
                      not epath.Path(self.directory, f"{s}.orbax-checkpoint-tmp").exists()]
            keep = f"checkpoint {max(intact)} is intact" if intact else "no checkpoint was written before it"
            reason = _brief(e.__cause__ if _WRITE_FAILED.search(str(e.__cause__)) else e)
            raise NeoError(f"writing checkpoint {step} to {self.directory} failed ({reason}); {keep}, and the "
                           f"partial one was removed. Free space on that disk (or lower keep_checkpoints, or move "
                           f"model_path), then rerun to resume.") from None

    def has_opt_state(self, step: int) -> bool:
        """Whether checkpoint `step` holds optimizer state: training's do, an imported model's
        (parameters only) does not. A training checkpoint without it lost it: refused, since
        resuming with a fresh optimizer would not be the run it claims to continue."""
        from etils import epath

        if (epath.Path(self.directory) / str(step) / "opt_state").exists():
            return True
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 (no readable meta: restore() says what is wrong)
            return False
        if "data" in meta or "opt_state" in meta.get("checksums", {}):
            raise NeoError(f"checkpoint {self.directory}/{step} is damaged: training wrote it with optimizer state, "
                           f"but its opt_state folder is missing. Restore the folder if you have a copy, or "
                           f"{self._fallback(step)}; nothing was changed.")
        return False

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any = None) -> tuple[Any, Any, dict]:
        """(params, opt_state or None, meta). `abstract_*` are trees of jax.ShapeDtypeStruct
        carrying the target shardings; pass abstract_opt_state=None to read parameters only.
        A checkpoint that holds the layers in the other form (per layer vs stacked for nn.scan,
        neo/model/params.py) is read in its own form and converted, straight into the target
        shardings."""
        from neo.model import is_stacked, per_layer
        from neo.model.params import stacked, stacked_period

        stored = self._stored_params(step)
        if stored is None or is_stacked(stored) == is_stacked(abstract_params):
            return self._restore(step, abstract_params, abstract_opt_state)
        as_stored = (lambda t: stacked(t, stacked_period(stored))) if is_stacked(stored) else per_layer
        params, opt_state, meta = self._restore(step, as_stored(abstract_params),
                                                None if abstract_opt_state is None else as_stored(abstract_opt_state))
        to_model = (lambda t: stacked(t, stacked_period(abstract_params))) if is_stacked(abstract_params) else per_layer
        target = jax.tree.map(lambda x: x.sharding, (abstract_params, abstract_opt_state))
        # (no donation: a stacked tree cannot reuse the per-layer buffers, nor the reverse)
        params, opt_state = jax.jit(to_model, out_shardings=target)((params, opt_state))
        return params, opt_state, meta

    def _stored_params(self, step: int) -> Any:
        """The stored parameter tree's metadata (names and shapes), or None if unreadable."""
        try:
            metadata = self.manager.item_metadata(step)["params"]
        except (KeyError, TypeError, ValueError, FileNotFoundError):
            return None
        return getattr(metadata, "tree", metadata)

    def _restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict]:
        items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 (orbax wraps tensorstore's errors in a bare Exception)
            cause = e.__cause__ or e.__context__ or e
            if _DAMAGED.search(f"{e} {cause}"):
                _quiet_background_errors(failed=True)
                e = cause if _DAMAGED.search(str(cause)) else e
                raise NeoError(
                    f"checkpoint {self.directory}/{step} is damaged: a file in it is missing or unreadable "
                    f"({_brief(e)}). Restore the file if you have a copy, or "
                    f"{self._fallback(step)}; nothing was changed.") from None
            if not isinstance(e, (ValueError, KeyError, TypeError)):
                raise
            raise NeoError(
                f"checkpoint {self.directory}/{step} does not match this config's model ({type(e).__name__}: "
                f"{str(e)[:300]}). Was it written for a different config? Use a fresh model_path or --new."
            ) from None
        meta = dict(out["meta"])
        opt_state = out.get("opt_state") if abstract_opt_state is not None else None
        self._verify(step, meta.pop("checksums", {}), {"params": out["params"], "opt_state": opt_state})
        return out["params"], opt_state, meta

    def _verify(self, step: int, recorded: dict, trees: dict) -> None:
        """The arrays read back must have the checksums recorded when they were written
        (neo/checksum.py): orbax would restore a damaged data file's bytes without a word."""
        from neo.checksum import mismatches

        bad = mismatches(recorded, trees)
        if bad:
            raise NeoError(
                f"checkpoint {self.directory}/{step} is damaged: {len(bad)} array(s) read back differ from what "
                f"was written ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; their checksums differ). "
                f"Restore its files if you have a copy, or {self._fallback(step)}; "
                f"nothing was changed.")

    def _fallback(self, step: int) -> str:
        """What to do without damaged checkpoint `step`: resume from the one before it."""
        earlier = [s for s in self.all_steps() if s < step]
        if earlier:
            return f"delete {self.directory}/{step} to resume from checkpoint {max(earlier)}, the newest before it"
        return f"delete {self.directory}/{step} to start from scratch (no checkpoint precedes it)"

    def wait(self) -> None:
        with self._writes():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


# tensorstore's and the OS's words for a write that could not be done
_WRITE_FAILED = re.compile(r"\b(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE)\b|No space left|Read-only "
                           r"file system|Disk quota exceeded|Permission denied|Error writing|Failed writing")
# tensorstore's status codes for a file that is gone or does not hold what its index says
# (as opposed to a tree or shape that differs from the model's: a different config).
_DAMAGED = re.compile(r"\b(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE)\b|Error reading|was not found in the checkpoint")


def _brief(e: Exception) -> str:
    """tensorstore's message up to its JSON spec: the status and the file."""
    return str(e).split(" [tensorstore_spec=")[0][:400]


def _quiet_background_errors(failed: bool = False) -> None:
    """When one array of a restore (or a save) fails, orbax's event loop closes while
    tensorstore still completes the other reads (writes), and each reports itself: "RuntimeError:
    Event loop is closed" through sys.unraisablehook (or sys.excepthook), "Task exception was
    never retrieved" through the `asyncio` logger, orbax's own log line of the failed write, and
    at exit each coroutine left pending. A screenful of tracebacks would bury neo's one-line
    error, so these are dropped: the closed-loop errors, tensorstore's read and write errors and
    orbax's line about a failed background write (which neo reports itself) always; anything
    unraisable once a restore or save has failed (`failed`), the process then being on its way
    out with neo's error."""
    import logging
    import warnings

    if failed:  # the reads or writes left pending, reported at exit
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    hook = sys.unraisablehook
    if getattr(hook, "neo_quiet", None) is not None:
        hook.neo_quiet["failed"] |= failed
        return
    state = {"failed": failed}

    def quiet(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed_loop or state["failed"]):
            hook(unraisable)

    def unretrieved_read_error(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in record.getMessage() and error is not None
                    and (_DAMAGED.search(str(error)) or _WRITE_FAILED.search(str(error))))

    def background_write_error(record: logging.LogRecord) -> bool:  # orbax logs it, then neo reports it
        error, chain = record.exc_info[1] if record.exc_info else None, []
        while error is not None and len(chain) < 8:
            chain, error = chain + [str(error)], error.__cause__ or error.__context__
        return not (record.levelno >= logging.ERROR and _WRITE_FAILED.search(" ".join([record.getMessage(), *chain])))

    def quiet_uncaught(kind, error, traceback):  # the same error, when tensorstore prints it directly
        if not (kind is RuntimeError and str(error) == "Event loop is closed"):
            uncaught(kind, error, traceback)

    uncaught = sys.excepthook
    quiet.neo_quiet = state
    sys.unraisablehook, sys.excepthook = quiet, quiet_uncaught
    logging.getLogger("asyncio").addFilter(unretrieved_read_error)
    logging.getLogger("absl").addFilter(background_write_error)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed on `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_params(model_path: str, params: Any, step: int = 0, meta: Optional[dict] = None) -> None:
    """Write a parameters-only checkpoint (what converters produce) and wait for it."""
    ckpt = Checkpointer(model_path, max_to_keep=None, async_save=False)
    ckpt.save(step, params, meta=meta, force=True)
    ckpt.close()


def load_for_inference(cfg: Any, layout: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """(parameters, meta) of the latest (or given) checkpoint in cfg's model_path, read straight
    into their shardings under `layout` (checked against the parameter shapes first): what
    sampling, evaluation and export start from. meta["step"] is the checkpoint's step."""
    from neo.mesh import place
    from neo.model import abstract_init

    if not cfg.run.model_path:
        raise NeoError(f"{cfg.source}: 'model_path' is empty; it must name the folder holding the checkpoints.")
    abstract = place(layout, abstract_init(cfg.model))
    ckpt = Checkpointer(cfg.run.model_path, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise NeoError(f"no checkpoint in {ckpt.directory}: train first, or import weights with "
                       f"scripts/convert_hf.py import.")
    params, _, meta = ckpt.restore(step, abstract)
    ckpt.close()
    return params, meta


def start_over(model_path: str, confirm: bool = True, log=print) -> None:
    """`--new`: remove what training wrote in model_path (training checkpoints, metrics,
    TensorBoard events, the loss plot). Parameters-only checkpoints (imported weights) and
    config files stay, so an imported model restarts from its imported weights. model_path is
    shared by all processes: every process lists what goes (orbax's manager is collective),
    process 0 alone removes it (and asks, at a terminal); the others wait for it and stop too
    if it did not finish, so no process deletes what another is reading."""
    import numpy as np
    from jax.experimental import multihost_utils

    doomed, doomed_steps = _training_outputs(model_path)
    failure = None
    if jax.process_index() == 0 and doomed:
        try:
            _remove(doomed, doomed_steps, model_path, confirm, log)
        except Exception as e:  # raised below, once the others know
            failure = e
    if jax.process_count() > 1:
        done = multihost_utils.broadcast_one_to_all(np.int32(failure is None))  # every process waits here
        if not done and failure is None:
            raise NeoError(f"--new: process 0 did not clear {model_path} (its message says why); stopping.")
    if failure is not None:
        raise failure


def _training_outputs(model_path: str) -> tuple[list, list[int]]:
    """What --new removes: checkpoints with optimizer state, and the run's logs."""
    from etils import epath

    root = epath.Path(model_path)
    if not root.exists():
        return [], []
    ckpt = Checkpointer(model_path, async_save=False)
    doomed_steps = [s for s in ckpt.all_steps() if ckpt.has_opt_state(s)]
    ckpt.close()
    doomed = [root / "checkpoints" / str(s) for s in doomed_steps]
    doomed += [root / n for n in ("metrics.jsonl", "tensorboard", "loss.png", "wandb_id") if (root / n).exists()]
    return doomed, doomed_steps


def _remove(doomed: list, doomed_steps: list[int], model_path: str, confirm: bool, log) -> None:
    import sys

    if confirm and sys.stdin.isatty():
        answer = input(f"--new: delete {len(doomed_steps)} checkpoint(s) and the logs in {model_path}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise NeoError("--new cancelled; nothing was deleted.")
    for path in doomed:
        path.rmtree() if path.is_dir() else path.unlink()
    log(f"neo: --new: removed {len(doomed_steps)} training checkpoint(s) and the logs in {model_path}")
