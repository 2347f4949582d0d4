"""Validation: mean loss, perplexity and bits per byte on `eval_steps` batches of the eval split,
in the training loop at every checkpoint and in `main.py --eval`.

Bits per byte uses the real byte count of the evaluated tokens (decoded with the configured
tokenizer), not GPT-Neo's fixed 0.29335 tokens-per-byte constant for GPT-2 BPE on the Pile. The
constant is used only when no tokenizer is configured, and the log says so; a configured
tokenizer that does not load is an error, before anything is compiled.

Every process reads only its rows of each eval batch (as in training), so the batches, and
the numbers, are the same for any number of processes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from neo.config import Config
from neo.errors import NeoError
from neo.loss import shift
from neo.mesh import Layout, assemble_rows, process_rows
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


def byte_tokenizer(cfg: Config, log: Callable[[str], None]) -> Any:
    """The tokenizer that turns the evaluated tokens back into bytes (None when none is
    configured); says which way bits per byte will be computed. A configured tokenizer that
    fails to load raises its NeoError."""
    from neo.data.tokenizer import load_tokenizer

    if not cfg.data.tokenizer_path:
        log(f"neo: validation: no tokenizer configured, so bits per byte assumes GPT-Neo's "
            f"{PILE_TOKENS_PER_BYTE} tokens per byte (GPT-2 BPE on the Pile); set 'tokenizer_path' "
            f"to count the evaluated text's real bytes.")
        return None
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    log(f"neo: validation: bits per byte from the UTF-8 bytes of the evaluated tokens "
        f"(decoded with {cfg.data.tokenizer_path})")
    return tokenizer


def row_bytes(tokenizer: Any, rows: np.ndarray) -> np.ndarray:
    """UTF-8 bytes of each row's real (not padded) target tokens, [rows] int32."""
    targets = [row[1:][row[1:] >= 0] for row in rows]
    if getattr(tokenizer, "vocab_size", None) == 256 and type(tokenizer).__name__ == "ByteTokenizer":
        return np.array([len(t) for t in targets], np.int32)
    return np.array([len(tokenizer.decode(t).encode("utf-8")) for t in targets], np.int32)


class Validation:
    """`eval_steps` batches of the eval split, read once: the same ones at every checkpoint.
    Built before training starts, so an eval batch the layout cannot split is reported then."""

    def __init__(self, cfg: Config, layout: Layout, param_shardings: Any, log: Callable[[str], None] = print):
        from neo.data import make_source

        n = cfg.run.eval_rows
        shards = layout.axis_size("batch")
        if n % shards:
            raise NeoError(f"{cfg.source}: eval_batch_size {n} does not split over the layout's {shards} batch "
                           f"shards; make it a multiple of {shards}.")
        self.layout, self.n = layout, n
        self.rows = process_rows(layout.rows, n)
        source = make_source(cfg, "eval", self.rows)
        self.batches = [next(source) for _ in range(cfg.run.eval_steps)]
        self.step = make_eval_step(cfg, layout, param_shardings)
        tokenizer = byte_tokenizer(cfg, log)
        self.bytes = None
        if tokenizer is not None:  # summed on the devices: each row counted once, whichever process holds it
            total = jax.jit(lambda b: jnp.sum(b), out_shardings=layout.replicated)
            self.bytes = sum(int(total(self._global(row_bytes(tokenizer, b)))) for b in self.batches)

    def _global(self, local: np.ndarray) -> jax.Array:
        return assemble_rows(self.layout.rows, self.rows, local, self.n)

    def run(self, params: Any) -> dict:
        """-> {"eval_loss", "eval_perplexity", "eval_bits_per_byte"} of `params`."""
        nll = tokens = 0.0
        for batch in self.batches:
            out = jax.device_get(self.step(params, self._global(batch)))
            nll += float(out["nll"])
            tokens += float(out["tokens"])
        loss = nll / tokens
        if self.bytes:
            bpb = nll / math.log(2) / self.bytes
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
    validation = Validation(cfg, layout, shardings_of(params), log)
    out = validation.run(params)
    log(f"eval at step {meta.get('step')}: {summary(out)} ({cfg.run.eval_steps} batches of {validation.n})")
    return {"step": meta.get("step"), **out}
