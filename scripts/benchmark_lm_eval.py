"""Requests per second of neo's lm-eval backend against lm-eval's own `hf` backend: the same
random-weight GPT-Neo (transformers' initialisation, converted to neo), the same requests, the
same batch size: LAMBADA (lm-eval's lambada_openai prompt: one or two scored tokens per row) or
rolling perplexity (every token scored).

    python scripts/benchmark_lm_eval.py --model gpt_neo_125M --docs 128 --batch 16
    python scripts/benchmark_lm_eval.py --model gpt_neo_125M --task rolling --docs 16 --batch 4

Each backend runs in its own process, one after the other (results in docs/benchmarks.md).
neo is timed twice: the first pass includes compiling its few batch shapes, the second is warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "lambada_openai_test.jsonl"


def requests(task: str, n: int) -> list:
    """lambada: lm-eval's lambada_openai requests, (all but the last word, " " + the last word);
    rolling: whole-document perplexity requests over 2,000-character pieces of tinyshakespeare."""
    from lm_eval.api.instance import Instance

    if task == "rolling":
        text = (ROOT / "data" / "tinyshakespeare.txt").read_text()
        return [Instance("loglikelihood_rolling", {}, (text[i * 2000:(i + 1) * 2000],), i) for i in range(n)]
    texts = [json.loads(line)["text"] for line in DATA.open()][:n]
    args = [(" ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]) for t in texts]
    return [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]


def build(model: str, tokenizer: str, seed: int = 0):
    """(neo config, neo params, transformers model) with the same random weights."""
    import torch
    import transformers

    from neo.config import load_model_config
    from neo.convert.gpt_neo import config_to_hf, params_from_hf

    cfg = load_model_config(model, {"tokenizer_path": tokenizer})
    torch.manual_seed(seed)
    hf = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**config_to_hf(cfg))).eval()
    params = params_from_hf({k: v.detach().numpy() for k, v in hf.state_dict().items()}, cfg.model.n_layer, cfg.model.n_head)
    return cfg, params, hf


def run_backend(args: argparse.Namespace) -> dict:
    cfg, params, hf_model = build(args.model, args.tokenizer)
    reqs = requests(args.task, args.docs)
    score = (lambda lm: lm.loglikelihood_rolling(reqs, disable_tqdm=True)) if args.task == "rolling" else \
        (lambda lm: lm.loglikelihood(reqs, disable_tqdm=True))
    out = {"backend": args.backend, "requests": len(reqs)}
    if args.backend == "neo":
        from neo.evaluate.backend import NeoLM

        lm = NeoLM(cfg, params=params, batch_size=args.batch)
        del hf_model
        for name in ("cold", "warm"):
            t = time.perf_counter()
            score(lm)
            out[f"{name}_s"] = time.perf_counter() - t
    else:
        import transformers
        from lm_eval.models.huggingface import HFLM

        from neo.data.tokenizer import load_tokenizer

        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(args.tokenizer).tok,
                                                   bos_token="<|endoftext|>", eos_token="<|endoftext|>")
        lm = HFLM(pretrained=hf_model, tokenizer=tok, batch_size=args.batch)
        t = time.perf_counter()
        score(lm)
        out["warm_s"] = time.perf_counter() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt_neo_125M")
    parser.add_argument("--tokenizer", default=str(ROOT / "data" / "gpt2"),
                        help="GPT-2 BPE folder (encoder.json + vocab.bpe)")
    parser.add_argument("--task", choices=["lambada", "rolling"], default="lambada")
    parser.add_argument("--docs", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", choices=["neo", "hf"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.backend:
        print(json.dumps(run_backend(args)))
        return
    results = {}
    for backend in ("neo", "hf"):
        cmd = [sys.executable, __file__, "--backend", backend, "--model", args.model, "--tokenizer", args.tokenizer,
               "--task", args.task, "--docs", str(args.docs), "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{backend} failed:\n{proc.stderr[-3000:]}")
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    n = args.docs
    neo, hf = results["neo"], results["hf"]
    print(f"{args.model}, {args.task} {n} requests, batch {args.batch}:")
    print(f"  neo: {n / neo['warm_s']:.2f} req/s warm, {n / neo['cold_s']:.2f} req/s with compilation")
    print(f"  hf:  {n / hf['warm_s']:.2f} req/s")
    print(f"  neo/hf: {hf['warm_s'] / neo['warm_s']:.2f}x warm, {hf['warm_s'] / neo['cold_s']:.2f}x with compilation")


if __name__ == "__main__":
    main()
