"""Training a byte-level BPE tokenizer on a folder of text: `python -m neo.data.prep.train_tokenizer
--help` (or data/train_tokenizer.py, the script GPT-Neo's README names; docs/data.md).

The recipe is GPT-Neo's: BPE over bytes (ByteLevel pre-tokenizer and decoder), NFKC normalised,
min_frequency 2, special tokens `<|endoftext|>` (id 0) and `<|padding|>` (id 1). Unlike the
original it trains on every input file (not a random 20% of them, which needed at least five),
leaves the output folder's other files alone, and does not add a prefix space, so decoding
gives back exactly the text that was encoded.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

from neo.data.prep.documents import Skipped, iter_documents, list_inputs
from neo.errors import NeoError, run_command

SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")
OUTPUT_NAME = "byte-level-bpe.tokenizer.json"


def train_tokenizer(base_dir: str, output_dir: str, vocab_size: int, file_type: str = "txt",
                    min_frequency: int = 2, log=print) -> str:
    """Train on every `*.<file_type>` in `base_dir`; returns the written tokenizer JSON's path."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise NeoError(f"--vocab_size {vocab_size}: a byte-level BPE needs at least "
                       f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens).")
    files = list_inputs(base_dir, file_type)
    skipped = Skipped()

    def documents() -> Iterator[str]:
        for path in files:
            for text, _ in iter_documents(path, skipped):
                yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents(), trainer)

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, OUTPUT_NAME)
    tmp = path + ".partial"
    tokenizer.save(tmp, pretty=True)
    os.replace(tmp, path)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    log(f"tokenizer saved at {path}")  # the line GPT-Neo's README tells its users to look for
    log(f"train_tokenizer: {len(files)} file(s), vocabulary {tokenizer.get_vocab_size()}"
        + (f" ({skipped.count} unreadable document(s) skipped)" if skipped.count else ""))
    log(f"  special tokens: " + ", ".join(f"{t} = {i}" for t, i in ids.items()))
    log(f"  dataset config: \"tokenizer_path\": \"{os.path.abspath(path)}\", \"n_vocab\": "
        f"{tokenizer.get_vocab_size()}, \"eos_id\": {ids['<|endoftext|>']}, \"padding_id\": {ids['<|padding|>']}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer on a folder of text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_dir", required=True, help="folder of training text")
    p.add_argument("--output_dir", default="tokenizers", help="where the tokenizer JSON goes (other files are kept)")
    p.add_argument("--file_type", default="txt", help="extension of the input files: txt, jsonl, jsonl.zst, xz, ...")
    p.add_argument("--vocab_size", type=int, required=True, help="vocabulary size, special tokens included")
    args = p.parse_args(argv)

    return run_command("train_tokenizer",
                       lambda: train_tokenizer(args.base_dir, args.output_dir, args.vocab_size, args.file_type))


if __name__ == "__main__":
    sys.exit(main())
