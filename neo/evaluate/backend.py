"""lm-evaluation-harness backend for neo checkpoints, registered with lm-eval as `neo`.

    lm_eval.simple_evaluate(model="neo", model_args="model=runs/gpt-neo-125M/config.json", tasks=[...])
    python -m neo.lm_eval --model neo --model_args model=runs/gpt-neo-125M/config.json --tasks lambada_openai_local

(`import neo.evaluate.backend` registers the name; `python -m neo.lm_eval` is lm-eval's own
command line with the backend registered and neo's offline tasks on the include path.)

Requests are scored the way lm-eval's `hf` backend scores them, so the numbers are
interchangeable: the same context/continuation split (lm-eval's TemplateLM), inputs longer than
the context cut from the left with the continuation kept, rolling windows from lm-eval's own
`get_rolling_token_windows`, an empty context replaced by the EOS token. What differs is how the
work is done: rows are sorted by length and batched into a few bucketed shapes (at most 25%
padding, so a handful of compilations serve a whole task), sharded over the mesh like training
batches; logits are computed only at the positions being scored (for LAMBADA, one or two per
row: most of the vocabulary projection is skipped), and only per-token log-probabilities and
greedy flags come back from the devices, never [batch, sequence, vocab] logits.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
# lm-eval fills its model registry with its own backends only if the registry is still empty
# at the first lookup; registering `neo` first would hide `hf` and the rest, so load them now.
import lm_eval.models  # noqa: F401
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from neo.config import Config, load_model_config
from neo.errors import NeoError
from neo.mesh import Layout
from neo.model import GPT

MIN_BUCKET = 16
# "auto" batch size: rows such that a batch's float32 logits at every position would stay under
# 1 GiB (only scored positions get logits, so this bounds the activations with room to spare).
AUTO_LOGITS_BUDGET = 2 ** 28
DEFAULT_MAX_BATCH = 64


def make_score_fn(cfg: Config, layout: Layout, param_shardings: Any) -> Callable:
    """jit(params, inputs [b, t], at [b, k], targets [b, k]) -> (log p(target), target == argmax),
    both [b, k]: the model's prediction after input position at[r, i] scored against targets[r, i]."""
    model = GPT(cfg.model)
    rows = layout.rows

    def score(params: Any, inputs: jax.Array, at: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        with layout.active():
            logits = model.apply({"params": params}, inputs, logits_at=at)
            target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            logp = target - jax.nn.logsumexp(logits, axis=-1)
            return logp, jnp.argmax(logits, axis=-1) == targets

    return jax.jit(score, in_shardings=(param_shardings, rows, rows, rows),
                   out_shardings=(layout.replicated, layout.replicated))


def bucket(n: int, cap: int, multiple: int = 1) -> int:
    """Length a batch is padded to: a power of two up to 64, then quarter-octave steps (80, 96,
    112, 128, 160, ...: at most 25% padding, four shapes per doubling), at most `cap`, rounded
    up to `multiple` (the sequence shards)."""
    n = max(n, 1)
    if n <= MIN_BUCKET:
        n = MIN_BUCKET
    else:
        step = (1 << (n - 1).bit_length()) // (8 if n > 64 else 1)
        n = -(-n // step) * step
    n = min(n, cap)
    return -(-n // multiple) * multiple


@register_model("neo")
class NeoLM(TemplateLM):
    """A neo model as an lm-eval `LM`.

    model_args (lm-eval's `--model_args`): `model` = a config name or path (required); `step` =
    checkpoint step (default: the latest); `tokenizer` = a tokenizer path overriding the
    config's; `max_length` (default n_ctx); `max_gen_toks` (default 256); any other key
    overrides that config key, e.g. `model_path=runs/x` or `mesh_shape=x:8`. `batch_size` is rows
    per batch, or "auto" (the default): as many rows as keep one batch's logits under 1 GiB,
    at most `max_batch_size` (64).

    Python callers holding a model already pass `NeoLM(cfg, params=params, layout=layout)`.
    """

    backend = "causal"

    def __init__(self, model: str | Config | None = None, *, params: Any = None,
                 layout: Optional[Layout] = None, step: Optional[int] = None, tokenizer: Optional[str] = None,
                 batch_size: int | str | None = None, max_batch_size: Optional[int] = None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, device: Optional[str] = None,
                 **overrides: Any) -> None:
        super().__init__()
        if model is None:
            raise NeoError("the neo backend needs a model: --model_args model=CONFIG (a config name from "
                           "configs/ or a path to a .json config).")
        cfg = model if isinstance(model, Config) else load_model_config(str(model), overrides)
        if overrides and isinstance(model, Config):
            cfg = cfg.replace(**overrides)
        if not cfg.model.causal:
            raise NeoError(f"{cfg.source}: lm-eval scores causal language models; this config has mlm_training on.")
        from neo.checkpoint import load_for_inference
        from neo.data.tokenizer import load_tokenizer
        from neo.mesh import make_layout, place, shardings_of
        from neo.model import abstract_init

        # Arguments and tokenizer first: mistakes are found before a large checkpoint is read.
        self._max_length = max_length or cfg.model.n_ctx
        if not 0 < self._max_length <= cfg.model.n_ctx:
            raise NeoError(f"max_length {self._max_length} must be between 1 and the model's n_ctx "
                           f"({cfg.model.n_ctx}).")
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = self._parse_batch_size(batch_size)
        self._max_batch = int(max_batch_size or DEFAULT_MAX_BATCH)
        path = tokenizer or cfg.data.tokenizer_path
        if path is None:
            raise NeoError(f"{cfg.source}: lm-eval needs the model's tokenizer: set 'tokenizer_path' in the config "
                           f"(or its first dataset config), or pass --model_args tokenizer=PATH.")
        self.tokenizer = load_tokenizer(path)
        self._tokenizer_path = path
        if self.tokenizer.vocab_size > cfg.model.n_vocab:
            raise NeoError(f"tokenizer {path} has {self.tokenizer.vocab_size} tokens but the model's n_vocab is "
                           f"{cfg.model.n_vocab}: is it the tokenizer this model was trained with?")
        eos = cfg.data.eos_id if cfg.data.eos_id is not None else self.tokenizer.token_to_id("<|endoftext|>")
        if eos is None:
            raise NeoError(f"{cfg.source}: set 'eos_id': lm-eval conditions empty contexts and rolling "
                           f"windows on the end-of-text token.")
        self._eot = int(eos)

        # `device` (lm-eval's --device) is not used: the config's mesh_shape and layout place the model.
        self.cfg = cfg
        self.layout = layout or make_layout(cfg.run.mesh_shape, cfg.run.layout)
        self.step = step
        if params is None:
            params, meta = load_for_inference(cfg, self.layout, step)
            self.step = meta.get("step", step)
        else:
            params = jax.device_put(params, shardings_of(place(self.layout, abstract_init(cfg.model))))
        self.params = params
        self._sampler = None  # built on the first generate_until
        self._score = make_score_fn(cfg, self.layout, shardings_of(params))

    @staticmethod
    def _parse_batch_size(batch_size: int | str | None) -> Optional[int]:
        """None means "auto"; lm-eval's "auto:N" (re-detect N times) is the same for neo."""
        if batch_size is None or str(batch_size).startswith("auto"):
            return None
        try:
            value = int(batch_size)
        except ValueError:
            value = 0
        if value < 1:
            raise NeoError(f"batch_size {batch_size!r}: give a positive number of rows, or 'auto'.")
        return value

    # ------------------------------------------------------------------ what lm-eval asks of an LM

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_path

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs: Any) -> list[int]:
        ids = self.tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict:
        """Provenance lm-eval writes into the results' "config"."""
        return {
            "model_num_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(self.params)),
            "model_dtype": self.cfg.model.precision,
            "model_revision": f"step {self.step}" if self.step is not None else "",
            "model_sha": "",
        }

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in windows of max_length tokens, each window conditioned
        on as much preceding text as fits (lm-eval's windows, as its hf backend)."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations from neo's KV-cache sampler (greedy unless the task asks for do_sample),
        at most max_gen_toks tokens, cut at the first of the request's `until` strings or EOS;
        contexts keep their last max_length - max_gen_toks tokens (as lm-eval's hf backend)."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from neo.predict import Sampler, SamplingOptions

        if self._sampler is None:
            self._sampler = Sampler(self.cfg, self.params, self.layout)
        eos = self.tok_decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}  # requests with the same generation arguments run together
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        results = [""] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for idxs in groups.values():
            kwargs = normalize_gen_kwargs(requests[idxs[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = kwargs.pop("max_gen_toks")
            if new_tokens >= self.max_length:
                raise NeoError(f"max_gen_toks {new_tokens} leaves no room for a prompt in the model's "
                               f"{self.max_length}-token context.")
            sample = bool(kwargs.get("do_sample"))
            opts = SamplingOptions(temperature=float(kwargs.get("temperature") or 0.0) if sample else 0.0,
                                   top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                                   max_new_tokens=new_tokens, seed=self.cfg.run.seed)
            opts.check()
            # An empty context starts from the end-of-text token (there is nothing else to condition on).
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - new_tokens)
                       or [self.eot_token_id] for i in idxs}
            order = sorted(idxs, key=lambda i: -len(prompts[i]))
            rows = self._batch_size or self._generation_rows()
            for start in range(0, len(order), rows):
                chunk = order[start:start + rows]
                new = self._sampler.generate([prompts[i] for i in chunk], opts, self.eot_token_id)
                for i, ids in zip(chunk, new):
                    results[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                pbar.update(len(chunk))
        pbar.close()
        return results

    def _generation_rows(self) -> int:
        """"auto" rows for generation: as many as keep the float32 KV cache under 1 GiB."""
        cfg = self.cfg
        per_row = 2 * cfg.model.n_layer * cfg.model.n_ctx * cfg.model.n_embd * 4
        return self._pow2_rows(2 ** 30 // per_row)

    # ------------------------------------------------------------------ the batched scorer

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """requests: (request args or None, context ids, continuation ids) ->
        (sum of the continuation's log-probabilities, whether greedy decoding produces it)."""
        rows: list[tuple[list[int], int]] = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise NeoError(f"a continuation of {len(continuation)} tokens does not fit the model's context "
                               f"({self.max_length} tokens).")
            # As lm-eval's hf backend: keep the last max_length + 1 tokens, the continuation whole.
            rows.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        pbar = tqdm(total=len(rows), disable=disable_tqdm, desc="Running loglikelihood requests")

        def collect(chunk: list[int], k: int, logp: jax.Array, greedy: jax.Array) -> None:
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for j, i in enumerate(chunk):
                cont = rows[i][1]
                if cont == 0:  # nothing to score (an empty continuation)
                    continue
                span = slice(k - cont, k)
                results[i] = (float(logp[j, span].sum(dtype=np.float64)), bool(greedy[j, span].all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            pbar.update(len(chunk))

        # The next batch is dispatched before the previous one is read back, so the host prepares
        # batch n + 1 while the devices compute batch n.
        pending: list[tuple] = []
        seq_shards = self.layout.axis_size("sequence")
        start = 0
        while start < len(order):
            longest = len(rows[order[start]][0]) - 1
            length = bucket(longest, self.max_length, seq_shards)
            full = self._rows_per_batch(length)
            chunk = order[start:start + full]
            # A last, partial batch is padded to a power of two rows only (fewer shapes to compile).
            b = full if len(chunk) == full else min(full, 1 << (len(chunk) - 1).bit_length())
            scored = max(rows[i][1] for i in chunk)
            k = min(-(-(1 << max(0, scored - 1).bit_length()) // seq_shards) * seq_shards, length)
            pending.append((chunk, k, *self._dispatch(chunk, rows, length, k, b)))
            if len(pending) > 1:
                collect(*pending.pop(0))
            start += len(chunk)
        while pending:
            collect(*pending.pop(0))
        pbar.close()
        return results

    def _rows_per_batch(self, length: int) -> int:
        if self._batch_size is not None:
            return self._batch_size
        return self._pow2_rows(AUTO_LOGITS_BUDGET // (length * self.cfg.model.n_vocab))

    def _pow2_rows(self, fit: int) -> int:
        """"auto" rows: the largest power of two <= fit, between 1 and max_batch_size."""
        return max(1, min(self._max_batch, 1 << max(0, fit.bit_length() - 1)))

    def _dispatch(self, chunk: list[int], rows: list[tuple[list[int], int]], length: int, k: int,
                  b: int) -> tuple[jax.Array, jax.Array]:
        """Start scoring one batch (asynchronously): the inputs padded (right, with EOS) to
        `length`, the last `k` positions of each row scored (the continuation is at their end),
        the batch padded to `b` rows rounded up to a multiple of the batch shards (filler rows
        are discarded)."""
        shards = self.layout.axis_size("batch")
        b = -(-b // shards) * shards
        inputs = np.full((b, length), self._eot, np.int32)
        at = np.zeros((b, k), np.int32)
        targets = np.zeros((b, k), np.int32)
        for j, i in enumerate(chunk):
            seq = np.asarray(rows[i][0], np.int32)
            inputs[j, :len(seq) - 1] = seq[:-1]
            at[j] = np.maximum(np.arange(len(seq) - 1 - k, len(seq) - 1), 0)
            targets[j] = seq[at[j] + 1]
        put = lambda x: jax.make_array_from_callback(x.shape, self.layout.rows, lambda idx: x[idx])
        return self._score(self.params, put(inputs), put(at), put(targets))
