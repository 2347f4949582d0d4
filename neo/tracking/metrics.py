"""`<model_path>/metrics.jsonl`: one JSON object per logged step or eval, the run's
machine-readable record. Only process 0 writes it."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


class MetricsLog:
    def __init__(self, model_path: str):
        self.path = os.path.join(model_path, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
