"""Turn a folder of text into GPT-Neo tfrecords: python data/create_tfrecords.py --help

The script GPT-Neo's README names. Reads .txt, .jsonl, .jsonl.zst (lm_dataformat) and the other
formats in neo/data/prep/documents.py, tokenizes with --encoder_path, and writes
<output_dir>/<name>_<index>_<records>.tfrecords (docs/data.md). The tool is
neo/data/prep/create_tfrecords.py (also `python -m neo.data.prep.create_tfrecords`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from neo.data.prep.create_tfrecords import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
