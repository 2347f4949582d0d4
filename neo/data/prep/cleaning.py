"""Optional text clean-up before tokenizing, as GPT-Neo's create_tfrecords.py offered it.

Both are off unless asked for (the original had them on by default, with flags that turned
them off: docs/differences.md).
"""

from __future__ import annotations

import re

from neo.errors import NeoError


def fix_text(text: str) -> str:
    """ftfy's mojibake and Unicode repair, NFKC-normalised (what GPT-Neo applied)."""
    try:
        import ftfy
    except ImportError:
        raise NeoError("--ftfy needs the ftfy package: pip install ftfy") from None
    return ftfy.fix_text(text, normalization="NFKC")


def wikitext_detokenize(string: str) -> str:
    """Undo WikiText's tokenisation (` @-@ `, spaced punctuation, `= = =` headings, ...): the
    detokeniser GPT-Neo, Megatron and lm-eval share."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # brackets and quotes
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # headings and the rest
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string
