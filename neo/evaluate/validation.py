"""Validation: mean loss, perplexity and bits per byte on `eval_steps` batches of the eval split,
in the training loop at every checkpoint and in `main.py --eval`.

Bits per byte uses the real byte count of the evaluated tokens (decoded with the dataset's
tokenizer), not GPT-Neo's fixed 0.29335 tokens-per-byte constant for GPT-2 BPE on the Pile;
the constant is the fallback when no tokenizer is configured.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from neo.config import Config
from neo.errors import NeoError
from neo.loss import shift
from neo.mesh import Layout
from neo.model import GPT

PILE_TOKENS_PER_BYTE = 0.29335  # GPT-Neo's constant (reference 1.17)


def make_eval_step(cfg: Config, layout: Layout, param_shardings: Any) -> Callable:
    """jit(params, tokens [b, n_ctx+1]) -> summed token cross-entropy and token count, over the
    real targets only (padding is neither scored nor counted; neo/loss.py `shift`)."""
    model = GPT(cfg.model)

    def step(params: Any, batch: jax.Array) -> dict:
        with layout.active():
            inputs, targets, mask = shift(batch, cfg.data.padding_id)
            logits = model.apply({"params": params}, inputs)
            log_z = jax.nn.logsumexp(logits, axis=-1)
            target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            nll = jnp.where(mask, log_z - target, 0.0)
            return {"nll": nll.sum(), "tokens": mask.sum().astype(jnp.float32)}

    return jax.jit(step, in_shardings=(param_shardings, layout.rows), out_shardings=layout.replicated)


def byte_tokenizer(cfg: Config) -> Any:
    """The tokenizer that turns the evaluated tokens back into bytes, or None when none is
    configured or it cannot be loaded here (the hub's gpt2 offline): bits per byte then uses
    GPT-Neo's constant rather than failing the run."""
    from neo.data.tokenizer import load_tokenizer

    if not cfg.data.tokenizer_path:
        return None
    try:
        return load_tokenizer(cfg.data.tokenizer_path)
    except NeoError:
        return None


def token_bytes(tokenizer: Any, rows: np.ndarray) -> Optional[int]:
    """UTF-8 bytes of the (real, not padded) target tokens of each row (None without a tokenizer)."""
    if tokenizer is None:
        return None
    targets = [row[1:][row[1:] >= 0] for row in rows]
    if getattr(tokenizer, "vocab_size", None) == 256 and type(tokenizer).__name__ == "ByteTokenizer":
        return sum(len(t) for t in targets)
    return sum(len(tokenizer.decode(t).encode("utf-8")) for t in targets)


class Validation:
    """`eval_steps` batches of the eval split, read once: the same ones at every checkpoint."""

    def __init__(self, cfg: Config, layout: Layout, param_shardings: Any):
        from neo.data import make_source

        source = make_source(cfg, "eval", jax.process_index(), jax.process_count())
        self.rows = [next(source) for _ in range(cfg.run.eval_steps)]
        self.layout = layout
        self.step = make_eval_step(cfg, layout, param_shardings)
        self.tokenizer = byte_tokenizer(cfg)

    def run(self, params: Any) -> dict:
        """-> {"eval_loss", "eval_perplexity", "eval_bits_per_byte"} of `params`."""
        nll = tokens = 0.0
        for rows in self.rows:
            out = jax.device_get(self.step(params, jax.make_array_from_process_local_data(self.layout.rows, rows)))
            nll += float(out["nll"])
            tokens += float(out["tokens"])
        loss = nll / tokens
        n_bytes = None
        if self.tokenizer is not None and jax.process_count() == 1:
            n_bytes = sum(token_bytes(self.tokenizer, rows) for rows in self.rows)
        if n_bytes:
            bpb = nll / math.log(2) / n_bytes
        else:
            bpb = loss * PILE_TOKENS_PER_BYTE / math.log(2)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_bits_per_byte": bpb}


def summary(out: dict) -> str:
    """One log line's worth of a validation result."""
    return (f"loss {out['eval_loss']:.4f} | perplexity {out['eval_perplexity']:.2f} | "
            f"bits/byte {out['eval_bits_per_byte']:.4f}")


def validate_checkpoint(cfg: Config, layout: Layout, log: Callable[[str], None] = print) -> dict:
    """`--eval`'s validation part: the latest checkpoint on `eval_steps` eval batches."""
    from neo.checkpoint import load_for_inference
    from neo.mesh import shardings_of

    if cfg.run.eval_steps <= 0:
        raise NeoError(f"{cfg.source}: set 'eval_steps' > 0 (batches of the eval split) to validate.")
    params, meta = load_for_inference(cfg, layout)
    validation = Validation(cfg, layout, shardings_of(params))
    out = validation.run(params)
    log(f"eval at step {meta.get('step')}: {summary(out)} ({cfg.run.eval_steps} batches of {validation.rows[0].shape[0]})")
    return {"step": meta.get("step"), **out}
