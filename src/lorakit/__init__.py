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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562): `lorakit` on the command line starts without importing
# torch, so that its own code (which turns Ctrl-C into a clean exit) is running before the heavy imports.
_EXPORTS = {
    "inject": ("AdaptedLayer", "LorakitState", "active_adapters", "adapt", "adapted_layers", "adapter_config",
               "adapter_names", "adapter_parameters", "disabled", "lorakit_state", "merge", "merge_and_unload",
               "per_sample_adapters", "reconfigure", "remove", "set_active", "unmerge"),
    "hooks": ("Hooks", "Probe", "TrainingHook", "training_hooks"),
    "io": ("hotswap", "load", "save"),
    "gguf_export": ("export_gguf",),
    "methods": ("METHODS", "AdapterConfig", "AdaLoRA", "LoRA", "LoRADrop", "DoRA", "VeRA", "LoRAFA", "DeltaLoRA", "lora_drop"),
    "optim": ("param_groups",),
    "losses": ("causal_lm_loss",),
    "param_summary": ("summary",),
    "quant": ("Linear4bit", "quantize"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # what static analysis and IDEs see
    from .hooks import Hooks, Probe, TrainingHook, training_hooks
    from .inject import (AdaptedLayer, LorakitState, active_adapters, adapt, adapted_layers, adapter_config, adapter_names,
                         adapter_parameters, disabled, lorakit_state, merge, merge_and_unload, per_sample_adapters,
                         reconfigure, remove, set_active, unmerge)
    from .gguf_export import export_gguf
    from .io import hotswap, load, save
    from .losses import causal_lm_loss
    from .methods import METHODS, AdaLoRA, AdapterConfig, DeltaLoRA, DoRA, LoRA, LoRADrop, LoRAFA, VeRA, lora_drop
    from .optim import param_groups
    from .quant import Linear4bit, quantize
    from .param_summary import summary


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "export_gguf",
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
    "causal_lm_loss",
]
