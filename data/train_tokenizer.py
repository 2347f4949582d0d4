"""Train a byte-level BPE tokenizer on a folder of text: python data/train_tokenizer.py --help

The script GPT-Neo's README names. Writes <output_dir>/byte-level-bpe.tokenizer.json (a Hugging
Face `tokenizers` file) and prints the ids of its special tokens <|endoftext|> and <|padding|>.
The tool is neo/data/prep/train_tokenizer.py (also `python -m neo.data.prep.train_tokenizer`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from neo.data.prep.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
