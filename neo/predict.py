"""Sampling with a KV cache (`main.py --predict`).

All prompts of a run go in one batch, left-padded to a common length; `key_valid` hides the
padding and positions count from each row's first real token, so a padded row computes
exactly what it would alone. The prompt pass and the whole token-by-token loop
(`lax.while_loop`) are one jit-compiled function: nothing is recompiled per token, and the
shapes it is compiled for are bucketed (prompt length and new-token room rounded up to powers
of two), so a few compilations serve any prompts. Temperature, top-k, top-p, the token limit
and the EOS id are traced values, not constants: changing them does not recompile either.

Decoding follows transformers' `generate()`: logits / temperature, then top-k, then top-p
(nucleus), then a categorical draw; temperature 0 is greedy (argmax), which gives exactly the
tokens `generate(do_sample=False)` gives for the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neo.config import Config
from neo.errors import NeoError, read_user_text
from neo.memory import host_available_memory
from neo.mesh import Layout, constrain
from neo.kernels import cpu as cpu_kernels
from neo.model import GPT, compute_dtype, init_cache, per_layer

PROMPT_SEPARATOR = "<|endofprompt|>"
MIN_BUCKET = 8
CACHE_NAMES = ("batch", "heads", "memory_length", "features_per_head")
# The original's default prompt when --prompt is not given (reference 1.18).
UNICORNS = ("In a shocking finding, scientists discovered a herd of unicorns living in a remote, previously "
            "unexplored valley, in the Andes Mountains. Even more surprising to the researchers was the fact "
            "that the unicorns spoke perfect English.")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample; `from_config` fills what the command line leaves unset."""

    temperature: float = 0.9
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    max_new_tokens: Optional[int] = None  # None: until the context is full
    num_samples: int = 1  # samples per prompt
    seed: int = 1

    @classmethod
    def from_config(cls, cfg: Config, **flags: Any) -> "SamplingOptions":
        given = {k: v for k, v in flags.items() if v is not None}
        s = cfg.sampling
        opts = cls(temperature=s.temperature, top_k=s.top_k or 0, top_p=1.0 if s.top_p is None else s.top_p,
                   max_new_tokens=s.predict_max_steps, num_samples=s.predict_batch_size, seed=cfg.run.seed)
        opts = dataclasses.replace(opts, **given)
        opts.check()
        return opts

    def check(self) -> None:
        if self.temperature < 0:
            raise NeoError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise NeoError(f"--top_k must be >= 0 (0 = off), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise NeoError(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise NeoError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.num_samples < 1:
            raise NeoError(f"--num_samples must be >= 1, got {self.num_samples}.")


# ----------------------------------------------------------------------------------------------
# Prompts


def prompt_file(flag: str, cfg: Config) -> str:
    """--prompt if given, else the config's `prompt_path` (relative paths found like other
    config paths), else "" (the original's unicorn prompt)."""
    from neo.config import resolve_path

    if flag or not cfg.sampling.prompt_path:
        return flag
    return resolve_path(cfg.sampling.prompt_path, Path(cfg.source).parent if cfg.source else "")


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: a .jsonl file holds one {"prompt": "..."} per line; any other file
    is one prompt, or several separated by lines reading exactly `<|endofprompt|>`.
    No file: the original GPT-Neo's unicorn prompt."""
    if not path:
        return [UNICORNS]
    text = read_user_text(path, f"--prompt {path}")
    if path.endswith(".jsonl"):
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                prompts.append(item["prompt"] if isinstance(item, dict) else None)
            except (json.JSONDecodeError, KeyError):
                prompts.append(None)
            if not isinstance(prompts[-1], str):
                raise NeoError(f"--prompt {path}, line {n}: expected {{\"prompt\": \"...\"}}.")
        if not prompts:
            raise NeoError(f"--prompt {path}: no prompts in the file.")
        return prompts
    parts, current = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == PROMPT_SEPARATOR:
            parts.append("".join(current))
            current = []
        else:
            current.append(line)
    parts.append("".join(current))
    # The newline that ends the line before a separator belongs to the separator.
    prompts = [p[:-1] if i < len(parts) - 1 and p.endswith("\n") else p for i, p in enumerate(parts)]
    return [p for p in prompts if p.strip()] or [""]


def bucket(n: int) -> int:
    """Shapes are compiled for powers of two, so nearby lengths share one compilation."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# The compiled sampler


def predict_layout(layout: Layout) -> Layout:
    """The config's layout without sequence splitting: a decode step has one token, and cache
    lengths are buckets that need not divide a mesh axis. Batch, heads, vocab and embd keep
    their placement, so a model sharded for training samples sharded the same way."""
    return Layout(layout.mesh, tuple(r for r in layout.rules if r[0] not in ("sequence", "memory_length")))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, use_top_k: bool,
                  use_top_p: bool) -> jax.Array:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (as
    transformers: the nucleus is the smallest set whose probability reaches top_p)."""
    if not (use_top_k or use_top_p):
        return logits
    desc = -jnp.sort(-logits, axis=-1)
    ranks = jnp.arange(logits.shape[-1])
    if use_top_k:
        desc = jnp.where(ranks < top_k, desc, -jnp.inf)
    if use_top_p:
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly better tokens
        desc = jnp.where((before < top_p) | (ranks == 0), desc, -jnp.inf)
    kept = jnp.sum(desc > -jnp.inf, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(desc, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           use_top_k: bool, use_top_p: bool) -> jax.Array:
    """Next token per row: argmax at temperature 0, else a draw from the filtered softmax
    (a `cond`, so greedy decoding skips the random draw, which costs as much as the argmax
    of a small model's logits many times over)."""
    def draw(logits: jax.Array) -> jax.Array:
        filtered = filter_logits(logits / temperature, top_k, top_p, use_top_k, use_top_p)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)


def constrain_cache(cache: list) -> list:
    """Shard the key/value caches by name (scanned layers stack them behind a leading `layers`
    axis); linear attention's running sums stay as the compiler places them."""
    def one(path, c):
        if getattr(path[-1], "key", None) not in ("k", "v"):
            return c
        return constrain(c, (None,) * (c.ndim - len(CACHE_NAMES)) + CACHE_NAMES)

    return jax.tree_util.tree_map_with_path(one, cache)


def decode_arch(cfg: Config) -> Any:
    """The model config a sampler runs. Decoding runs the layers unrolled whatever
    `scan_layers` says: a scanned decode step slices every group's weights and cache out of
    their stacks and writes the cache back at each token (125M, batch 1: 23.8 tok/s scanned vs
    33.9 unrolled on a 2-core CPU). Compile time is paid once per bucket, so scanning buys
    nothing here. Nothing is differentiated, so no layer is rematerialised either."""
    return dataclasses.replace(cfg.model, scan_layers=False, scan_unroll=None, remat_policy="none")


def make_pack(cfg: Config, layout: Layout) -> Optional[Callable]:
    """The jit-compiled packing of `params` for neo's CPU decode kernels (neo/kernels/cpu.py):
    pack(params) -> the model's "decode" collection, every dense kernel and the head in the
    compute dtype, in the panels the product kernel streams, and (on a CPU with AVX-512, where
    the attention kernel runs) a mark on each attention layer that its decode steps attend with
    it. A decode step's products then run 1.2-3.6x faster than XLA:CPU's (1.45-1.7x on an AVX2
    CPU), and its attention 2.5-8x (docs/benchmarks.md). None where
    the kernels do not apply: off CPU, on more than one device, a compute dtype other than
    float32 and bfloat16, or no compiler to build them."""
    arch = decode_arch(cfg)
    layout = predict_layout(layout)
    if not (layout.mesh.size == 1 and cpu_kernels.supports(compute_dtype(arch)) and cpu_kernels.decode_kernels()):
        return None
    model = GPT(arch)

    def pack(params):
        with layout.active():
            # One token through the model with the collection mutable: each dense layer packs
            # its own kernel (Dense), each attention layer marks itself (Attention.
            # decodes_with_kernel); the token's logits are dropped, so XLA computes nothing else.
            one = jnp.zeros((1, 1), jnp.int32)
            _, packed = model.apply({"params": per_layer(params)}, one, one, cache=init_cache(arch, 1, 1),
                                    cache_index=jnp.int32(0), key_valid=jnp.ones((1, 1), bool), mutable=["decode"])
            return packed["decode"]

    return jax.jit(pack)


def make_generate(cfg: Config, layout: Layout, on_trace: Optional[Callable[[], None]] = None) -> Callable:
    """The jit-compiled sampler for `cfg`:

        generate(params, packed, tokens [B, P], pad [B], limit [B], key, temperature, top_k,
                 top_p, eos, room=N, use_top_k=..., use_top_p=...) -> new tokens [B, N], lengths [B]

    `packed`: `make_pack`'s weights for the CPU decode kernel, or {} (XLA's products).
    Row r's prompt sits right-aligned in `tokens` after `pad[r]` padding slots; it gets at most
    `limit[r]` (<= N) new tokens and stops after `eos` (-1: never). `on_trace` runs each time
    the function is traced (tests count compilations with it)."""
    arch = decode_arch(cfg)
    model = GPT(arch)
    layout = predict_layout(layout)

    def generate(params, packed, tokens, pad, limit, key, temperature, top_k, top_p, eos, *, room, use_top_k,
                 use_top_p):
        if on_trace is not None:
            on_trace()
        with layout.active():
            b, p = tokens.shape
            slots = jnp.arange(p + room)
            key_valid = slots[None, :] >= pad[:, None]  # the causal mask hides the future slots
            params = per_layer(params)  # a no-op on per-layer trees
            cache = constrain_cache(init_cache(arch, b, p + room))
            positions = jnp.maximum(jnp.arange(p)[None, :] - pad[:, None], 0)
            variables = {"params": params} | ({"decode": packed} if packed else {})
            logits, cache = model.apply(variables, tokens, positions, cache=cache, cache_index=jnp.int32(0),
                                        key_valid=key_valid, last_only=True)
            out = jnp.zeros((b, room), jnp.int32)
            done = limit <= 0
            length = jnp.zeros((b,), jnp.int32)

            def cond(state):
                step, _, _, _, done, _ = state
                return (step < room) & ~jnp.all(done)

            def body(state):
                step, cache, logits, out, done, length = state
                tok = choose(logits[:, -1], jax.random.fold_in(key, step), temperature, top_k, top_p,
                             use_top_k, use_top_p)
                tok = jnp.where(done, 0, tok)
                out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], step, axis=1)
                length = length + (~done).astype(jnp.int32)
                done = done | (tok == eos) | (length >= limit)
                slot = p + step
                # Finished rows keep stepping (with token 0) while others run; clamp their
                # positions so they stay inside the position table.
                position = jnp.minimum(slot - pad, cfg.model.n_ctx - 1)
                logits, cache = model.apply(variables, tok[:, None], position[:, None],
                                            cache=cache, cache_index=slot, key_valid=key_valid)
                return step + 1, cache, logits, out, done, length

            state = (jnp.int32(0), cache, logits, out, done, length)
            _, _, _, out, _, length = jax.lax.while_loop(cond, body, state)
            return out, length

    # Results come back replicated: small, and readable on every host of a multi-host run.
    return jax.jit(generate, static_argnames=("room", "use_top_k", "use_top_p"),
                   out_shardings=(layout.replicated, layout.replicated))


class Sampler:
    """Token-level sampling for one config and parameters on a layout."""

    def __init__(self, cfg: Config, params: Any, layout: Layout,
                 on_trace: Optional[Callable[[], None]] = None):
        self.cfg, self.layout = cfg, layout
        self._generate = make_generate(cfg, layout, on_trace)
        self._pack = make_pack(cfg, layout)
        self.params = params

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        """New parameters (the training loop samples each checkpoint's with one Sampler): the
        weights packed from the old ones are dropped, and packed afresh at the next call."""
        self._params, self._packed = params, None

    def packed(self, rows: int) -> dict:
        """The weights packed for the CPU decode kernel (`make_pack`), made at the first call
        that uses them and kept: {} where the kernel does not apply, for more than MAX_ROWS rows,
        or where the packed copy (the parameters' size in float32, half of it in bfloat16)
        would take more than half the memory the machine has free."""
        if self._pack is None or rows > cpu_kernels.MAX_ROWS:
            return {}
        if self._packed is None:
            shapes = jax.eval_shape(self._pack, self.params)
            need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
            free = host_available_memory()
            if free is not None and need > free / 2:
                logging.getLogger(__name__).warning(
                    "the weights packed for neo's CPU decode kernel need %.1f GB, more than half of the %.1f GB "
                    "free: decoding uses XLA's products, which are slower.", need / 1e9, free / 1e9)
                self._pack = None
                return {}
            self._packed = self._pack(self.params)
        return self._packed

    def generate(self, prompts: Sequence[Sequence[int]], opts: SamplingOptions,
                 eos_id: Optional[int] = None) -> list[list[int]]:
        """New tokens for each prompt (token ids), EOS excluded. Prompts longer than the
        context keep their last n_ctx - 1 tokens; a row stops at EOS, at `max_new_tokens`, or
        when its context is full."""
        cfg = self.cfg
        if not prompts:
            return []
        rows = [list(p)[-(cfg.model.n_ctx - 1):] for p in prompts]
        if any(not r for r in rows):
            raise NeoError("an empty prompt has no token to start from; give it text (or set eos_id, which "
                           "neo uses as the start token of an empty prompt).")
        longest = max(map(len, rows))
        want = opts.max_new_tokens or cfg.model.n_ctx - min(map(len, rows))
        limits = [min(want, cfg.model.n_ctx - len(r)) for r in rows]
        p, room = min(bucket(longest), cfg.model.n_ctx), bucket(max(limits))
        shards = self.layout.axis_size("batch")
        b = -(-len(rows) // shards) * shards  # rows are split over the batch shards
        tokens = np.zeros((b, p), np.int32)
        pad = np.full((b,), p, np.int32)
        limit = np.zeros((b,), np.int32)  # filler rows generate nothing
        for i, r in enumerate(rows):
            tokens[i, p - len(r):] = r
            pad[i], limit[i] = p - len(r), limits[i]
        put = lambda x: jax.device_put(x, self.layout.rows)
        out, length = self._generate(
            self.params, self.packed(b), put(tokens), put(pad), put(limit), jax.random.PRNGKey(opts.seed),
            jnp.float32(opts.temperature), jnp.int32(opts.top_k), jnp.float32(opts.top_p),
            jnp.int32(-1 if eos_id is None else eos_id),
            room=room, use_top_k=opts.top_k > 0, use_top_p=opts.top_p < 1.0)
        out, length = np.asarray(out), np.asarray(length)
        result = []
        for i in range(len(rows)):
            new = out[i, :length[i]].tolist()
            result.append(new[:-1] if new and eos_id is not None and new[-1] == eos_id else new)
        return result


# ----------------------------------------------------------------------------------------------
# --predict


def format_samples(texts: Sequence[str]) -> str:
    """The original's output format: a header line per sample, the text, a closing rule."""
    return "".join(f"{'=' * 40} SAMPLE {i} {'=' * 40}\n{t}\n{'=' * 80}\n" for i, t in enumerate(texts))


def encode_prompt(tokenizer: Any, text: str, eos_id: Optional[int]) -> list[int]:
    """A prompt's token ids; an empty prompt (unconditional sampling) starts from eos_id, as
    GPT-2 and GPT-NeoX start unconditional samples from the end-of-text token."""
    return tokenizer.encode(text) if text else ([eos_id] if eos_id is not None else [])


def check_can_sample(cfg: Config) -> None:
    """What --predict needs of the config: a causal model and a tokenizer."""
    if not cfg.model.causal:
        raise NeoError(f"{cfg.source}: --predict needs a causal model; this config has mlm_training on.")
    if cfg.data.tokenizer_path is None:
        raise NeoError(f"{cfg.source}: no tokenizer for --predict: set 'tokenizer_path' in the model config "
                       f"or in its first dataset config.")


def predict(cfg: Config, layout: Layout, prompt_path: str, opts: SamplingOptions,
            sacred_id: str = "nosacred", log: Callable[[str], None] = print) -> Path:
    """Sample `opts.num_samples` continuations of every prompt in `prompt_path` from the latest
    checkpoint in model_path; print them and write <model_path>/predictions_<id>_<step>.txt."""
    from neo.checkpoint import load_for_inference

    check_can_sample(cfg)
    params, meta = load_for_inference(cfg, layout)
    return write_samples(cfg, layout, params, meta.get("step", 0), prompt_path, opts, sacred_id, log)


def write_samples(cfg: Config, layout: Layout, params: Any, step: int, prompt_path: str,
                  opts: SamplingOptions, sacred_id: str = "nosacred",
                  log: Callable[[str], None] = print, sampler: Optional[Sampler] = None) -> Path:
    """Sample from `params` (at training step `step`), print the samples and write
    <model_path>/predictions_<id>_<step>.txt. Used by --predict and, with `predict_steps` > 0,
    by the training loop after every checkpoint."""
    from neo.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    prompts = read_prompts(prompt_path)
    eos = cfg.data.eos_id
    encoded = [encode_prompt(tokenizer, p, eos) for p in prompts]
    too_long = [i for i, e in enumerate(encoded) if len(e) >= cfg.model.n_ctx]
    if too_long:
        log(f"neo: prompt(s) {too_long} are longer than the context; keeping their last {cfg.model.n_ctx - 1} tokens.")
    if sampler is None:
        sampler = Sampler(cfg, params, layout)
    sampler.params = params
    rows = [e for e in encoded for _ in range(opts.num_samples)]
    new = sampler.generate(rows, opts, eos)
    texts = []
    for row, completion in zip(rows, new):
        ids = completion if cfg.sampling.remove_partial_sequences else row[-(cfg.model.n_ctx - 1):] + completion
        texts.append(tokenizer.decode(ids))
    report = format_samples(texts)
    out = Path(cfg.run.model_path) / f"predictions_{sacred_id}_{step}.txt"
    if jax.process_index() == 0:  # every host computed the same samples
        out.write_text(report, encoding="utf-8")
        log(report + f"neo: wrote {len(texts)} sample(s) to {out}")
    return out
