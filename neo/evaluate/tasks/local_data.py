"""Datasets for neo's offline lm-eval tasks, read from local files (no hub access).

lm-eval calls these through `custom_dataset: !function local_data.<name>` with the task's
metadata as keyword arguments: lm-eval's `--metadata '{"lambada_path": "..."}'` (or
TaskManager(metadata=...)) sets a path; so does an environment variable; otherwise the copy
shipped in neo's data/ folder is used.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]  # the repository, three levels above neo/evaluate/tasks/


def lambada_openai(**metadata: Any) -> dict:
    """LAMBADA, OpenAI's detokenized test set: one {"text": ...} per line, 5,153 passages."""
    path = _path(metadata, "lambada_path", "NEO_LAMBADA_PATH", ROOT / "data" / "lambada_openai_test.jsonl")
    return {"test": _dataset(_jsonl(path, "text"))}


def text(**metadata: Any) -> dict:
    """Documents for rolling perplexity: a .jsonl file holds one {"text": ...} per line; a text
    file (or every file a glob pattern matches) is one document."""
    pattern = _path(metadata, "text_path", "NEO_TEXT_PATH", ROOT / "data" / "tinyshakespeare.txt")
    files = sorted(glob.glob(pattern)) or [pattern]
    docs: list[str] = []
    for f in files:
        if f.endswith(".jsonl"):
            docs += _jsonl(f, "text")
        else:
            docs.append(_read(f))
    return {"test": _dataset(docs)}


def _path(metadata: dict, key: str, env: str, default: Path) -> str:
    return str(metadata.get(key) or os.environ.get(env) or default)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no such file. Point the task at your copy with lm-eval's --metadata "
            f"(keys lambada_path / text_path) or the NEO_LAMBADA_PATH / NEO_TEXT_PATH environment variables."
        ) from None


def _jsonl(path: str, field: str) -> list[str]:
    out = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line)[field])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}, line {n}: expected a JSON object with a {field!r} field.") from None
    return out


def _dataset(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": texts})
