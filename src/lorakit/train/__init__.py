"""Training: the config, data formats, the loop, checkpoints and the built-in task.

    from lorakit.train import TrainConfig, train
    result = train(TrainConfig(data="my.jsonl", method="lora", steps=200))
    print(result.table())
"""

from .config import TrainConfig
from .errors import LorakitError
from .loop import RunResult, TrainingDiverged, TrainingInterrupted, train

__all__ = ["LorakitError", "RunResult", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "train"]
