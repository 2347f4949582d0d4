"""Sequence-length curriculum: GPT-NeoX's `curriculum_learning` (DeepSpeed's legacy `seqlen`
curriculum, Li et al. 2021, "The Stability-Efficiency Dilemma").

Early steps train on the first `length` tokens of every row, and `length` grows to n_ctx. As
in GPT-NeoX (megatron/training.py: `tokens[:, :curriculum_seqlen]`) the rows are the ones the
data stream gives at full length, cut: the stream, its position and its resume are those of a
run without a curriculum. DeepSpeed's schedule (runtime/data_pipeline/curriculum_scheduler.py)
gives the step with global_steps = s the length

    fixed_linear: floor(min + (max - min) * (s + 1) / total), rounded down to a multiple of
                  difficulty_step, at most max;
    fixed_root:   the same with ((s + 1) / total) ** (1 / root_degree).

neo changes the length only at multiples of `iterations`, since one compiled call runs one
shape: steps s .. s + iterations - 1 (s a multiple of iterations) all train at the length of
step s, so each length compiles once (iterations 1 is DeepSpeed's schedule exactly). The
length is a function of the step alone, so a resumed run repeats it.
"""

from __future__ import annotations

import math

from neo.config import Config
from neo.config.sections import Curriculum


def difficulty(c: Curriculum, n_ctx: int, global_steps: int) -> int:
    """DeepSpeed's `get_difficulty(global_steps)` for the fixed_linear / fixed_root schedules."""
    top = c.max_difficulty or n_ctx
    degree = c.root_degree if c.schedule_type == "fixed_root" else 1
    grown = math.floor((global_steps / c.total_curriculum_step) ** (1.0 / degree) * (top - c.min_difficulty)
                       + c.min_difficulty)
    return min(grown - grown % c.difficulty_step, top)


def active(cfg: Config) -> bool:
    c = cfg.run.curriculum_learning
    return c is not None and c.enabled


def seq_len(cfg: Config, step: int) -> int:
    """Tokens per row (inputs, without the shifted target) that train step `step` (0-based:
    the state's step count before it) trains on; n_ctx without a curriculum."""
    if not active(cfg):
        return cfg.model.n_ctx
    start = step - step % cfg.run.iterations
    return difficulty(cfg.run.curriculum_learning, cfg.model.n_ctx, start + 1)  # DeepSpeed: global_steps + 1


def next_change(cfg: Config, step: int) -> int:
    """The first step after `step` that trains at another length (train_steps if none does)."""
    length, end = seq_len(cfg, step), cfg.run.train_steps
    if length == cfg.model.n_ctx:  # the schedule never shrinks: n_ctx is for good
        return end
    every = cfg.run.iterations
    s = step - step % every + every
    while s < end and seq_len(cfg, s) == length:
        s += every
    return min(s, end)


def lengths(cfg: Config) -> list[int]:
    """Every length a run of `train_steps` trains at, in order (its length buckets)."""
    out, s = [], 0
    while s < cfg.run.train_steps:
        out.append(seq_len(cfg, s))
        s = next_change(cfg, s)
    return out


def full_from(cfg: Config) -> int:
    """The first step that trains at n_ctx (train_steps if none does)."""
    s = 0
    while s < cfg.run.train_steps and seq_len(cfg, s) < cfg.model.n_ctx:
        s = next_change(cfg, s)
    return s


def summary(cfg: Config, step: int) -> str:
    """The startup line: the length at `step`, the run's lengths (elided when many), and when
    n_ctx is reached."""
    all_ = lengths(cfg)
    shown = ", ".join(map(str, all_)) if len(all_) <= 8 else \
        f"{', '.join(map(str, all_[:3]))}, ..., {all_[-1]} ({len(all_)} lengths)"
    return (f"neo: curriculum: rows cut to {seq_len(cfg, step)} tokens at step {step}; lengths {shown} "
            f"(n_ctx from step {full_from(cfg)})")
