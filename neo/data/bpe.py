"""Training a byte-level BPE tokenizer on a folder of text (what data/train_tokenizer.py runs).

The recipe is GPT-Neo's: BPE over bytes (ByteLevel pre-tokenizer and decoder), NFKC normalised,
min_frequency 2, special tokens `<|endoftext|>` (id 0) and `<|padding|>` (id 1). Unlike the
original it trains on every input file (not a random 20% of them, which needed at least five),
leaves the output folder's other files alone, and does not add a prefix space, so decoding
gives back exactly the text that was encoded.
"""

from __future__ import annotations

import os
from typing import Iterator

from neo.data.documents import Skipped, iter_documents, list_inputs
from neo.errors import NeoError

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
    log(f"train_tokenizer: {len(files)} file(s), vocabulary {tokenizer.get_vocab_size()} -> {path}"
        + (f" ({skipped.count} unreadable document(s) skipped)" if skipped.count else ""))
    log(f"  special tokens: " + ", ".join(f"{t} = {i}" for t, i in ids.items()))
    log(f"  dataset config: \"tokenizer_path\": \"{os.path.abspath(path)}\", \"n_vocab\": "
        f"{tokenizer.get_vocab_size()}, \"eos_id\": {ids['<|endoftext|>']}, \"padding_id\": {ids['<|padding|>']}")
    return path
