"""Training: the config, data formats, the loop, checkpoints and the built-in task.

from lorakit.train import TrainConfig, train
result = train(TrainConfig(data="my.jsonl", method="lora", steps=200))
print(result.table())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import LorakitError
from .config import TrainConfig

# The loop (and torch) load on first use, as in lorakit/__init__.py: the command line reads its
# config before anything heavy is imported.
_LOOP_NAMES = ("RunResult", "TrainingDiverged", "TrainingInterrupted", "train")

if TYPE_CHECKING:
    from .loop import RunResult, TrainingDiverged, TrainingInterrupted, train


def __getattr__(name: str):
    if name not in _LOOP_NAMES:
        raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(".loop", __name__), name)
    globals()[name] = value
    return value


__all__ = ["LorakitError", "RunResult", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "train"]
