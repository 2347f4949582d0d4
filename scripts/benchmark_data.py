"""Data-path speed: create_tfrecords throughput, and the input pipeline against the train step.

    python scripts/benchmark_data.py [--model quickstart] [--steps 200] [--processes 0]

1. create_tfrecords on data/ (LAMBADA jsonl with the GPT-NeoX-20B tokenizer, documents;
   tinyshakespeare with byte tokens, chunks): MB of input text per second, start-up included and
   excluded (TensorFlow's import, paid once per run, is timed apart).
2. The tfrecord source feeding the model config's batch shape (chunks, and documents_random with
   stitch): tokens/s produced, next to the tokens/s the train step consumes for the same config
   on this machine (measured here, one process after the other).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data"


def create_speed(tmp: Path, processes: int) -> list[dict]:
    from neo.data.prep.create_tfrecords import Options, create_tfrecords
    runs = []
    for name, src, enc, mode in (("lambada", DATA / "lambada_openai_test.jsonl", str(DATA / "20B_tokenizer.json"), "documents"),
                                 ("shakespeare", ROOT / "data" / "tinyshakespeare.txt", "bytes", "chunks")):
        opts = Options(input_dir=str(src), output_dir=str(tmp / name), name=name, encoder_path=enc, mode=mode,
                       minimum_size=1, separator=None if enc != "bytes" else 0, processes=processes, progress=False)
        stats = create_tfrecords(opts, log=lambda *a: None)
        runs.append({"input": src.name, "tokenizer": Path(enc).name, "mode": mode, "MB": stats.input_bytes / 1e6,
                     "seconds": stats.seconds, "MB/s": stats.input_bytes / 1e6 / stats.seconds,
                     "tokens/s": stats.tokens / stats.seconds})
    return runs


def pipeline_speed(tmp: Path, model: str, steps: int) -> list[dict]:
    """Tokens/s of make_source for the model's batch shape, over tfrecords made from
    tinyshakespeare: chunks of n_ctx + 1 bytes, and its speeches (40+ bytes) as documents
    (documents_random, stitched just enough to fill a context)."""
    from neo.config import load_model_config, parse_model_config, to_json_dict
    from neo.data import make_source
    from neo.data.prep.create_tfrecords import Options, create_tfrecords

    base = load_model_config(model)
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()
    (tmp / "docs").mkdir()
    (tmp / "docs" / "speeches.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in text.split("\n\n")))
    out = tmp / "pipe"
    for name, src, mode, shortest in (("chunks", ROOT / "data" / "tinyshakespeare.txt", "chunks", 1),
                                      ("documents", tmp / "docs", "documents", 40)):
        create_tfrecords(Options(input_dir=str(src), output_dir=str(out), name=name, encoder_path="bytes",
                                 separator=0, mode=mode, chunk_size=base.model.n_ctx, minimum_size=shortest, processes=1,
                                 progress=False, write_dataset_config=True), log=lambda *a: None)
    results = []
    stitch = -(-(base.model.n_ctx + 1) // 41)  # the fewest speeches that always fill a context
    for name, mode, stitch in (("chunks", "chunks", None), ("documents", "documents_random", stitch)):
        raw = {**to_json_dict(base), "datasets": [[str(out / f"{name}.json"), stitch, mode, None]]}
        cfg = parse_model_config(raw, source=str(tmp / "bench.json"))
        src = make_source(cfg)
        next(src)  # the first batch opens the files and fills the first shuffle block
        t = time.perf_counter()
        for _ in range(steps):
            next(src)
        dt = time.perf_counter() - t
        results.append({"mode": mode, "stitch": stitch, "batch": cfg.run.train_batch_size, "n_ctx": cfg.model.n_ctx,
                        "tokens/s": steps * cfg.run.train_batch_size * cfg.model.n_ctx / dt, "ms/batch": 1000 * dt / steps})
    return results


def train_speed(model: str, steps: int) -> float:
    """Tokens/s the train step consumes (scripts/benchmark.py's measurement, in its own process)."""
    cfg = json.loads((ROOT / "configs" / f"{model}.json").read_text())
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", model, "--batch",
           str(cfg["train_batch_size"]), "--seq", str(cfg["n_ctx"]), "--steps", str(steps), "--backend", "neo"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["tokens_per_s"]
    raise SystemExit(f"benchmark.py gave no neo result:\n{run.stdout}\n{run.stderr}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="quickstart")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--train_steps", type=int, default=30)
    p.add_argument("--processes", type=int, default=0)
    p.add_argument("--no_train", action="store_true", help="skip the train-step measurement (slow models on CPU)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for r in create_speed(tmp, args.processes):
            print("create_tfrecords", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        pipe = pipeline_speed(tmp, args.model, args.steps)
    for r in pipe:
        print("pipeline", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    if args.no_train:
        return
    step = train_speed(args.model, args.train_steps)
    print("train_step", json.dumps({"model": args.model, "tokens/s": round(step)}))
    for r in pipe:
        print(f"{r['mode']}: pipeline {r['tokens/s']:,.0f} tok/s vs train step {step:,.0f} tok/s "
              f"= {r['tokens/s'] / step:.1f}x headroom")


if __name__ == "__main__":
    main()
