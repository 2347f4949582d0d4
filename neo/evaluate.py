"""Validation during training: mean loss, perplexity and bits per byte on the eval split.

Bits per byte uses the real byte count of the evaluated tokens (decoded with the dataset's
tokenizer), not GPT-Neo's fixed 0.29335 tokens-per-byte constant for GPT-2 BPE on the Pile;
the constant is the fallback when no tokenizer is configured.

The lm-evaluation-harness side of evaluation lives beside this file: the `neo` lm-eval backend
(`NeoLM`, neo/lm_eval_backend.py) and `main.py --eval` (neo/eval_harness.py). `NeoLM` is
importable from here too, loaded on first use so validation never pays lm-eval's import.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from neo.config import ModelConfig
from neo.mesh import Layout
from neo.model import GPT

PILE_TOKENS_PER_BYTE = 0.29335  # GPT-Neo's constant (reference 1.17)


def make_eval_step(cfg: ModelConfig, layout: Layout, param_shardings: Any) -> Callable:
    """jit(params, tokens [b, n_ctx+1]) -> summed token cross-entropy and token count."""
    model = GPT(cfg)

    def step(params: Any, batch: jax.Array) -> dict:
        with layout.active():
            logits = model.apply({"params": params}, batch[:, :-1])
            log_z = jax.nn.logsumexp(logits, axis=-1)
            target = jnp.take_along_axis(logits, batch[:, 1:, None], axis=-1)[..., 0]
            return {"nll": (log_z - target).sum(), "tokens": jnp.asarray(target.size, jnp.float32)}

    return jax.jit(step, in_shardings=(param_shardings, layout.rows),
                   out_shardings=layout.replicated)


def token_bytes(tokenizer: Any, rows: np.ndarray) -> Optional[int]:
    """UTF-8 bytes of the target tokens of each row (None without a tokenizer)."""
    if tokenizer is None:
        return None
    if getattr(tokenizer, "vocab_size", None) == 256 and type(tokenizer).__name__ == "ByteTokenizer":
        return int(rows[:, 1:].size)
    return sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for row in rows)


def validate(eval_step: Callable, params: Any, batches: list[jax.Array], local_rows: list[np.ndarray],
             tokenizer: Any = None) -> dict:
    """Run the eval batches; -> {"eval_loss", "eval_perplexity", "eval_bits_per_byte"}."""
    nll = tokens = 0.0
    for batch in batches:
        out = jax.device_get(eval_step(params, batch))
        nll += float(out["nll"])
        tokens += float(out["tokens"])
    loss = nll / tokens
    n_bytes = None
    if tokenizer is not None and jax.process_count() == 1:
        n_bytes = sum(token_bytes(tokenizer, rows) for rows in local_rows)
    if n_bytes:
        bpb = nll / math.log(2) / n_bytes
    else:
        bpb = loss * PILE_TOKENS_PER_BYTE / math.log(2)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_bits_per_byte": bpb}


def validate_checkpoint(cfg: ModelConfig, layout: Layout, log: Callable[[str], None] = print) -> dict:
    """`--eval`'s validation part: the latest checkpoint on `eval_steps` eval batches."""
    from neo.checkpoint import load_for_inference
    from neo.data import make_source
    from neo.data.tokenizer import load_tokenizer
    from neo.errors import NeoError
    from neo.mesh import shardings_of

    if cfg.eval_steps <= 0:
        raise NeoError(f"{cfg.source}: set 'eval_steps' > 0 (batches of the eval split) to validate.")
    params, meta = load_for_inference(cfg, layout)
    source = make_source(cfg, "eval", jax.process_index(), jax.process_count())
    rows = [next(source) for _ in range(cfg.eval_steps)]
    batches = [jax.make_array_from_process_local_data(layout.rows, r) for r in rows]
    shardings = shardings_of(params)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer_path) if cfg.tokenizer_path else None
    except NeoError:
        tokenizer = None
    out = validate(make_eval_step(cfg, layout, shardings), params, batches, rows, tokenizer)
    log(f"eval at step {meta.get('step')}: loss {out['eval_loss']:.4f} | perplexity {out['eval_perplexity']:.2f} | "
        f"bits/byte {out['eval_bits_per_byte']:.4f} ({cfg.eval_steps} batches of {rows[0].shape[0]})")
    return {"step": meta.get("step"), **out}


def __getattr__(name: str) -> Any:
    """`from neo.evaluate import NeoLM` (the lm-eval backend) without importing lm-eval eagerly."""
    if name == "NeoLM":
        from neo.lm_eval_backend import NeoLM

        return NeoLM
    raise AttributeError(f"module 'neo.evaluate' has no attribute {name!r}")
