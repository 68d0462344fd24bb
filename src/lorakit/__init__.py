"""lorakit: the LoRA family of parameter-efficient fine-tuning methods, small, fast and readable.

    import lorakit
    model = lorakit.adapt(model, lorakit.LoRA(r=16, alpha=32, targets="all-linear"))
    print(lorakit.summary(model))
    ...train...
    lorakit.save(model, "out/adapter")           # PEFT layout, safetensors
    model = lorakit.load(base, "out/adapter")     # also reads adapters saved by PEFT

Several named adapters on one base::

    lorakit.adapt(model, lorakit.LoRA(r=8), name="sql")       # the new one is active and trains
    lorakit.load(model, "adapters/chat", name="chat")          # another, frozen
    lorakit.set_active(model, ["sql", "chat"])                 # both run; their changes add up
    model(input_ids, adapter_names=["sql", "chat", "__base__"])  # or one adapter per sample
"""

from .inject import (
    AdaptedLayer,
    LorakitState,
    active_adapters,
    adapt,
    adapted_layers,
    adapter_config,
    adapter_names,
    adapter_parameters,
    disabled,
    lorakit_state,
    merge,
    merge_and_unload,
    per_sample_adapters,
    reconfigure,
    remove,
    set_active,
    unmerge,
)
from .hooks import Hooks, Probe, TrainingHook, training_hooks
from .io import hotswap, load, save
from .methods import METHODS, AdapterConfig, AdaLoRA, LoRA, LoRADrop, DoRA, VeRA, LoRAFA, DeltaLoRA
from .methods import lora_drop
from .optim import param_groups
from .summary import summary
from .quant import Linear4bit, quantize

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "LorakitState",
    "Probe",
    "active_adapters",
    "adapter_names",
    "hotswap",
    "lorakit_state",
    "per_sample_adapters",
    "reconfigure",
    "remove",
    "set_active",
    "LoRA",
    "DoRA",
    "VeRA",
    "LoRAFA",
    "DeltaLoRA",
    "AdaLoRA",
    "LoRADrop",
    "lora_drop",
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
