"""`--predict --interactive`: prompts from stdin, one per line, round after round (GPT-NeoX's
`text_gen_type: interactive`, its `generate_samples_interactive`).

The checkpoint, the tokenizer and the compiled sampler (neo/predict.py) are loaded once and kept
for the whole session: a prompt whose length falls in a bucket already used samples without
compiling (the sampler says when it compiles, so a slow first round of a new bucket is
explained). An empty line samples unconditionally, from the end-of-text token, as GPT-NeoX does.
Round r samples with seed + r, so a session is reproducible and repeated prompts differ. EOF
(Ctrl-D) and Ctrl-C end the session with exit code 0; a bad round (e.g. an empty prompt without
an eos_id) prints its error and the session goes on.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Optional, TextIO

import jax

from neo.config import Config
from neo.errors import NeoError
from neo.mesh import Layout
from neo.predict import Sampler, SamplingOptions, check_can_sample, encode_prompt, format_samples

PROMPT = "Context prompt >>> "  # GPT-NeoX's


def interactive(cfg: Config, layout: Layout, opts: SamplingOptions, stdin: TextIO = sys.stdin,
                out: TextIO = sys.stdout, note: Optional[Callable[[str], None]] = None) -> int:
    """Sample `opts.num_samples` continuations of each line of `stdin` until EOF or Ctrl-C;
    print them to `out` (GPT-Neo's sample format, continuations only); `note` (stderr by
    default) gets the prompt marker and messages. Returns the number of rounds sampled."""
    from neo.checkpoint import load_for_inference
    from neo.data.tokenizer import load_tokenizer

    note = note or (lambda m: print(m, file=sys.stderr, flush=True))
    check_can_sample(cfg)
    if jax.process_count() > 1:
        raise NeoError("--interactive reads prompts from one terminal; run it as a single process "
                       "(without jax.distributed), or use --predict --prompt FILE on a cluster.")
    params, meta = load_for_inference(cfg, layout)
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    sampler = Sampler(cfg, params, layout,
                      on_trace=lambda: note("neo: compiling the sampler for this prompt length (once per "
                                            "length bucket; later prompts of that length reuse it)"))
    note(f"neo: interactive sampling from checkpoint {meta.get('step', 0)} of {cfg.run.model_path}: one prompt "
         f"per line, an empty line samples unconditionally; Ctrl-D or Ctrl-C ends.")
    rounds = 0
    try:
        while True:
            if stdin.isatty():  # a person at a terminal, not a pipe
                print(PROMPT, end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line:  # EOF
                break
            text = line.rstrip("\r\n")
            try:
                texts = _round(cfg, sampler, tokenizer, text, dataclasses.replace(opts, seed=opts.seed + rounds), note)
            except NeoError as e:
                note(f"neo: error: {e}")
                continue
            out.write(format_samples(texts))
            out.flush()
            rounds += 1
    except KeyboardInterrupt:
        pass
    if stdin.isatty():
        print(file=sys.stderr, flush=True)  # end the prompt marker's line
    return rounds


def _round(cfg: Config, sampler: Sampler, tokenizer, text: str, opts: SamplingOptions,
           note: Callable[[str], None]) -> list[str]:
    """One prompt's `num_samples` continuations, as text."""
    ids = encode_prompt(tokenizer, text, cfg.data.eos_id)
    if len(ids) >= cfg.model.n_ctx:
        note(f"neo: the prompt is longer than the context; keeping its last {cfg.model.n_ctx - 1} tokens.")
    new = sampler.generate([ids] * opts.num_samples, opts, cfg.data.eos_id)
    return [tokenizer.decode(c) for c in new]
