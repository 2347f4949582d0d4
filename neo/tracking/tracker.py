"""Where a run's numbers go: the console, `<model_path>/metrics.jsonl`, TensorBoard event files
in `<model_path>/tensorboard/` (written by tensorboardX: a small maintained writer, ~1 s to
import, where TensorFlow's tf.summary would cost ~8 s in runs that read no tfrecords), a
loss-curve PNG `<model_path>/loss.png`, and Weights & Biases when `wandb_project` is set and
wandb is installed. Only process 0 writes.

A resumed run first cuts every record after the checkpoint it resumes from (metrics.jsonl is
rewritten; TensorBoard gets a restart marker, SessionLog START, that hides the stale events),
so the record always reads like one uninterrupted run.

Object stores (gs://) cannot append to a file, so for a remote model_path the files are written
in a local mirror directory and copied to model_path at every checkpoint and at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Optional

import jax

from neo.config import Config, to_json_dict
from neo.tracking.metrics import MetricsLog


class Tracker:
    def __init__(self, cfg: Config, resume_step: int, console: Callable[[str], None] = print):
        self.cfg = cfg
        self.console = console
        self.enabled = jax.process_index() == 0
        self.remote = "://" in cfg.run.model_path
        self.dir = mirror_dir(cfg.run.model_path) if self.remote else cfg.run.model_path
        self.metrics = MetricsLog(self.dir)
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        os.makedirs(self.dir, exist_ok=True)
        if self.remote:
            self._download("metrics.jsonl")
        self._truncate(resume_step)
        from neo.imports import import_without

        SummaryWriter = import_without("tensorboardX", "torch").SummaryWriter  # PyTorch: 2.5 s (neo/imports.py)

        # purge_step: TensorBoard drops the events an interrupted run wrote after the checkpoint.
        # Files are named by the second they were opened; the suffix keeps a run resumed within
        # that second from overwriting the last one's file and sorts it after it (TensorBoard
        # reads a folder's files in name order).
        self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"), filename_suffix=f".{time.time_ns()}",
                                purge_step=resume_step + 1 if resume_step else None)
        self.wandb = _start_wandb(cfg, console)

    def _truncate(self, resume_step: int) -> None:
        """Drop records a crashed or killed run wrote after the checkpoint we resume from."""
        records = self.metrics.read()
        keep = [r for r in records if r.get("step", 0) <= resume_step]
        if len(keep) == len(records):
            return
        tmp = self.metrics.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.metrics.path)
        self.console(f"neo: dropped {len(records) - len(keep)} metrics record(s) after step {resume_step} "
                     f"left by an interrupted run")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(record)
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k not in ("step", "time", "kind") and isinstance(v, (int, float)) and math.isfinite(v)}
        prefix = "eval/" if record.get("kind") == "eval" else "train/"
        for k, v in scalars.items():
            self.tb.add_scalar(prefix + k.removeprefix("eval_"), v, step)
        self.tb.flush()  # visible in TensorBoard now, not at the writer's next timed flush
        if self.wandb is not None:
            self.wandb.log({prefix + k.removeprefix("eval_"): v for k, v in scalars.items()}, step=step)

    def plot(self) -> None:
        """Redraw `<model_path>/loss.png` from metrics.jsonl."""
        if not self.enabled:
            return
        records = self.metrics.read()
        train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
        evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
        if not train and not evals:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(self.cfg.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = os.path.join(self.dir, "loss.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, os.path.join(self.dir, "loss.png"))

    def sync(self) -> None:
        """Copy the local mirror to a remote model_path (no-op for local paths)."""
        if not (self.enabled and self.remote):
            return
        from etils import epath

        remote = epath.Path(self.cfg.run.model_path)
        for root, _, files in os.walk(self.dir):
            for name in files:
                local = os.path.join(root, name)
                target = remote / os.path.relpath(local, self.dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(open(local, "rb").read())

    def _download(self, name: str) -> None:
        from etils import epath

        source = epath.Path(self.cfg.run.model_path) / name
        if source.exists():
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(source.read_bytes())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self.sync()
        if self.wandb is not None:
            self.wandb.finish()


def mirror_dir(model_path: str) -> str:
    """A stable local directory standing in for a remote model_path."""
    digest = hashlib.sha1(model_path.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "neo-logs", digest)


def _start_wandb(cfg: Config, console: Callable[[str], None]) -> Optional[Any]:
    if not cfg.run.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        console("neo: wandb_project is set but wandb is not installed (pip install wandb); not logging to W&B")
        return None
    path = cfg.run.model_path
    id_file = os.path.join(mirror_dir(path) if "://" in path else path, "wandb_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else wandb.util.generate_id()
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(project=cfg.run.wandb_project, name=cfg.name, id=run_id, resume="allow",
                      config=to_json_dict(cfg), dir=os.path.dirname(id_file))
