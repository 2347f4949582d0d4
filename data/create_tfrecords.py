"""Turn a folder of text into GPT-Neo tfrecords: python data/create_tfrecords.py --help

Reads .txt, .jsonl, .jsonl.zst (lm_dataformat) and the other formats in neo/data/documents.py,
tokenizes with --encoder_path, and writes <output_dir>/<name>_<index>_<records>.tfrecords
(docs/data.md). The work is done by neo/data/create_tfrecords.py.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing


def parse_separator(value: str) -> int:
    """GPT-Neo wrote the separator as a JSON list ("[50256]"); a bare id works too."""
    parsed = json.loads(value)
    if isinstance(parsed, list):
        if len(parsed) != 1:
            raise argparse.ArgumentTypeError("exactly one separator token id, e.g. [50256]")
        parsed = parsed[0]
    if not isinstance(parsed, int):
        raise argparse.ArgumentTypeError("a token id, e.g. 50256 or [50256]")
    return parsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input_dir", required=True, help="folder of input files (not recursive), or one file")
    p.add_argument("--output_dir", default="./tfrecords", help="where the tfrecords go (created if missing)")
    p.add_argument("--name", default="openwebtext", help="output file prefix")
    p.add_argument("--encoder_path", default="gpt2",
                   help="tokenizer: a tokenizers JSON file, a folder with GPT-2's encoder.json + vocab.bpe, "
                        "or a Hugging Face hub name (needs the network)")
    p.add_argument("--mode", choices=["chunks", "documents"], default="chunks",
                   help="chunks: fixed chunk_size+1-token records; documents: one document per record")
    p.add_argument("--chunk_size", type=int, default=2048, help="n_ctx of the model: records hold chunk_size+1 tokens")
    p.add_argument("--minimum_size", type=int, default=100, help="drop documents with fewer tokens than this")
    p.add_argument("--separator", type=parse_separator, default=None,
                   help="token id appended after every document (default: the tokenizer's <|endoftext|>)")
    p.add_argument("--files_per", type=int, default=100_000, help="records per output file")
    p.add_argument("--processes", type=int, default=0, help="tokenizing worker processes (0: one per core)")
    p.add_argument("--ftfy", action="store_true", help="repair Unicode with ftfy (NFKC) before tokenizing")
    p.add_argument("--wikitext-detokenize", "--wikitext_detokenize", dest="wikitext_detokenize",
                   action="store_true", help="undo WikiText tokenisation before tokenizing")
    p.add_argument("--write_dataset_config", action="store_true",
                   help="also write <output_dir>/<name>.json, the dataset config for these files")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from neo.data.create_tfrecords import Options, create_tfrecords
    from neo.errors import run_command

    options = {k: v for k, v in vars(args).items() if k != "no_progress"}
    return run_command("create_tfrecords",
                       lambda: create_tfrecords(Options(**options, progress=not args.no_progress)))


if __name__ == "__main__":
    sys.exit(main())
