"""Where a run's numbers go (only process 0 writes):

    tracker.py      `Tracker`: the console, metrics.jsonl, TensorBoard event files in
                    `<model_path>/tensorboard/` (tensorboardX), a loss-curve PNG, Weights &
                    Biases; a resumed run's record cut back to its checkpoint
    metrics.py      `<model_path>/metrics.jsonl`, one JSON object per logged step or eval
"""

from neo.tracking.tracker import Tracker

__all__ = ["Tracker"]
