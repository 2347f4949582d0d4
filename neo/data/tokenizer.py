"""Tokenizers named by a dataset config's `tokenizer_path`.

- "bytes": raw UTF-8 bytes, ids 0..255 (the quickstart's byte-level model);
- a `tokenizers` JSON file (train_tokenizer.py's output, the GPT-NeoX-20B tokenizer, HF's
  tokenizer.json);
- a directory holding GPT-2 BPE files (encoder.json + vocab.bpe, or vocab.json + merges.txt);
- "gpt2": GPT-2's BPE from the copy in data/gpt2 (OpenAI's encoder.json and vocab.bpe, byte for
  byte the hub's `gpt2` files), so GPT-Neo's dataset configs (`"tokenizer_path": "gpt2"`) and
  `create_tfrecords.py --use_gpt2_tokenizer` work offline;
- any other hub name with `tokenizer_is_pretrained` (needs the network or a local cache).

GPT-2 BPE files load as transformers' GPT2Tokenizer does: `<|endoftext|>` is a special token,
so the text "<|endoftext|>" encodes to its one id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from neo.errors import NeoError

GPT2_DIR = Path(__file__).resolve().parents[2] / "data" / "gpt2"  # encoder.json, vocab.bpe, LICENSE
GPT2_EOS = 50256


class ByteTokenizer:
    """UTF-8 bytes as tokens; decoding replaces invalid sequences."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> Optional[int]:
        return None


@dataclass
class HFTokenizer:
    """A `tokenizers.Tokenizer` with the interface neo uses."""

    tok: "object"
    name: str

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)


def load_tokenizer(path: Optional[str], pretrained: bool = False):
    """Load the tokenizer a dataset/model config names; errors say what was tried."""
    if path is None:
        raise NeoError("no tokenizer configured: set 'tokenizer_path' in the dataset config "
                       "(\"bytes\", a tokenizers JSON file, or a folder with GPT-2 BPE files).")
    if path == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    from neo.config import resolve_path

    p = GPT2_DIR if path == "gpt2" else Path(resolve_path(path))
    if p.is_dir():
        for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if (p / vocab).exists() and (p / merges).exists():
                return HFTokenizer(gpt2_bpe(p / vocab, p / merges), str(p))
        if (p / "tokenizer.json").exists():
            p = p / "tokenizer.json"
        else:
            raise NeoError(f"tokenizer folder {p} has no tokenizer.json, encoder.json+vocab.bpe or "
                           f"vocab.json+merges.txt.")
    if p.is_file():
        try:
            return HFTokenizer(Tokenizer.from_file(str(p)), str(p))
        except Exception as e:  # tokenizers raises plain Exceptions with its parser's message
            raise NeoError(f"tokenizer file {p} does not load as a `tokenizers` JSON file: {e}") from None
    if pretrained or "/" not in path:
        try:
            return HFTokenizer(Tokenizer.from_pretrained(path), path)
        except Exception as e:
            raise NeoError(
                f"cannot load pretrained tokenizer {path!r} from the Hugging Face hub ({type(e).__name__}). "
                f"Offline? Point 'tokenizer_path' at local files instead, e.g. a folder with GPT-2's "
                f"encoder.json and vocab.bpe."
            ) from None
    raise NeoError(f"tokenizer {path!r}: no such file or folder.")


def gpt2_bpe(vocab: Path, merges: Path):
    """A `tokenizers.Tokenizer` from GPT-2-style BPE files, as transformers' GPT2TokenizerFast
    builds it: byte-level, no prefix space, `<|endoftext|>` special."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(str(vocab), str(merges))._tokenizer
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens(["<|endoftext|>"])
    return tok


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
