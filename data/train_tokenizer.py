"""Train a byte-level BPE tokenizer on a folder of text: python data/train_tokenizer.py --help

Writes <output_dir>/byte-level-bpe.tokenizer.json (a Hugging Face `tokenizers` file) and prints
the ids of its special tokens <|endoftext|> and <|padding|>. The work is done by neo/data/bpe.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_dir", required=True, help="folder of training text")
    p.add_argument("--output_dir", default="tokenizers", help="where the tokenizer JSON goes (other files are kept)")
    p.add_argument("--file_type", default="txt", help="extension of the input files: txt, jsonl, jsonl.zst, xz, ...")
    p.add_argument("--vocab_size", type=int, required=True, help="vocabulary size, special tokens included")
    args = p.parse_args(argv)

    from neo.data.bpe import train_tokenizer
    from neo.errors import run_command

    return run_command("train_tokenizer",
                       lambda: train_tokenizer(args.base_dir, args.output_dir, args.vocab_size, args.file_type))


if __name__ == "__main__":
    sys.exit(main())
