"""Hugging Face GPT-Neo / GPT-NeoX (Pythia) / LLaMA / Mistral weights <-> neo checkpoints.

    python scripts/convert_hf.py import --input EleutherAI/gpt-neo-125M --output runs/gpt-neo-125M
    python scripts/convert_hf.py import --input ./pythia-70m --output runs/pythia-70m
    python scripts/convert_hf.py import --input ./Mistral-7B-v0.1 --output runs/mistral-7b
    python main.py --model runs/pythia-70m/config.json --predict --prompt prompt.txt
    python scripts/convert_hf.py export --model runs/pythia-70m/config.json --output hf/pythia-70m-ft

docs/convert.md describes both directions. The work is done in neo/convert/hf.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF folder or hub id -> neo checkpoint + config.json")
    imp.add_argument("--input", required=True, help="HF model folder, or a hub id such as EleutherAI/pythia-70m")
    imp.add_argument("--output", required=True, help="folder for the neo checkpoint and its config.json")
    imp.add_argument("--revision", default=None, help="hub revision (e.g. a Pythia step: step143000)")
    exp = sub.add_parser("export", help="neo config's latest checkpoint -> HF folder")
    exp.add_argument("--model", required=True, help="neo config name or path (its model_path holds the checkpoint)")
    exp.add_argument("--output", required=True, help="HF folder to write")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    exp.add_argument("--dtype", default="float32", help="float32 (lossless), float16 or bfloat16")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from neo.errors import run_command

    def work() -> None:
        if args.command == "import":
            from neo.convert.hf import import_hf

            import_hf(args.input, args.output, args.revision)
        else:
            from neo.config import load_model_config
            from neo.convert.hf import export_hf

            export_hf(load_model_config(args.model), args.output, args.step, args.dtype)

    return run_command("convert_hf", work)


if __name__ == "__main__":
    sys.exit(main())
