"""lorakit: the LoRA family of parameter-efficient fine-tuning methods, small, fast and readable.

    import lorakit
    model = lorakit.adapt(model, lorakit.LoRA(r=16, alpha=32, targets="all-linear"))
    print(lorakit.summary(model))
    ...train...
    lorakit.save(model, "out/adapter")           # PEFT layout, safetensors
    model = lorakit.load(base, "out/adapter")     # also reads adapters saved by PEFT
"""

from .inject import (
    AdaptedLayer,
    adapt,
    adapted_layers,
    adapter_config,
    adapter_parameters,
    disabled,
    merge,
    merge_and_unload,
    unmerge,
)
from .hooks import Hooks, TrainingHook, training_hooks
from .io import load, save
from .methods import METHODS, AdapterConfig, LoRA, DoRA, VeRA, LoRAFA, DeltaLoRA
from .optim import param_groups
from .summary import summary
from .quant import Linear4bit, quantize

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "LoRA",
    "DoRA",
    "VeRA",
    "LoRAFA",
    "DeltaLoRA",
    "param_groups",
    "METHODS",
    "adapt",
    "adapted_layers",
    "adapter_config",
    "adapter_parameters",
    "disabled",
    "load",
    "merge",
    "merge_and_unload",
    "save",
    "summary",
    "unmerge",
    "Linear4bit",
    "quantize",
    "Hooks",
    "TrainingHook",
    "training_hooks",
]
