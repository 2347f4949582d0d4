"""The run's record as its readers see it: TensorBoard's event files, read back with TensorFlow's
own reader, hold exactly metrics.jsonl's numbers, also after a resume that drops what an
interrupted run logged past its checkpoint."""

import json

import numpy as np
import pytest

from neo.config import load_model_config
from neo.tracking import Tracker


def tensorboard_scalars(logdir):
    """{(tag, step): value} as TensorBoard shows it: the event files in name order, and a
    SessionLog START at step s hiding every earlier-read point at step >= s."""
    from neo.data.tfrecords import tensorflow

    tf = tensorflow()
    points = {}
    for path in sorted(logdir.iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                points = {k: v for k, v in points.items() if k[1] < event.step}
            for value in event.summary.value:
                points[(value.tag, event.step)] = value.simple_value
    return points


def metrics_scalars(path):
    out = {}
    for record in map(json.loads, path.read_text().splitlines()):
        prefix = "eval/" if record["kind"] == "eval" else "train/"
        for key, v in record.items():
            if key not in ("step", "time", "kind"):
                out[(prefix + key.removeprefix("eval_"), record["step"])] = v
    return out


def test_tensorboard_holds_the_metrics_records_also_after_a_resume(tmp_path):
    cfg = load_model_config("tiny", {"model_path": str(tmp_path)})
    rng = np.random.default_rng(0)

    def run(resume, steps):
        tracker = Tracker(cfg, resume, lambda _m: None)
        for step in steps:
            tracker.log({"kind": "train", "step": step, "loss": float(rng.random() * 5), "lr": 1e-3 * step,
                         "grad_norm": float(rng.random()), "time": 0.0})
            if step % 2 == 0:
                tracker.log({"kind": "eval", "step": step, "eval_loss": float(rng.random() * 5),
                             "eval_bits_per_byte": float(rng.random()), "time": 0.0})
        tracker.close()

    run(0, range(1, 8))  # checkpoint at 4, killed after logging 7
    run(4, range(5, 7))  # resumed from 4 (and stopped at 6): 5 and 6 again, with other numbers, 7 gone
    expected = metrics_scalars(tmp_path / "metrics.jsonl")
    assert sorted({s for _, s in expected}) == list(range(1, 7))
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-7), key  # float32 in the events
