"""Importing a library without the heavy optional ones it would pull in by itself.

Some libraries import another eagerly "in case": TensorFlow 2.21 imports Keras (and Keras
imports scikit-learn) to register Keras optimizers for SavedModel, tensorboardX imports PyTorch to
accept torch tensors in its writers. Both catch the ImportError and go on without. neo uses
neither path (it reads records and writes float scalars), and the eager imports cost seconds
in every process: Keras 3 of TensorFlow's 6.5 s here, PyTorch 2.5 s of a training run's start
where it is installed (as with the tests' dependencies). So those modules are made
unimportable for that one import, exactly as if they were not installed, and put back.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_without(name: str, *hidden: str) -> ModuleType:
    """`import name`, with the top-level modules `hidden` unimportable while it runs (those
    not imported yet; one already imported is left as it is). Afterwards they import as usual."""
    hide = [h for h in hidden if h not in sys.modules]
    for h in hide:
        sys.modules[h] = None  # `import h` raises ImportError while this is set
    try:
        return importlib.import_module(name)
    finally:
        for h in hide:
            if sys.modules.get(h, 0) is None:
                del sys.modules[h]
