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

The names below are the whole top-level API of ordinary use. Everything else is
reachable from its module, e.g. `lorakit.inject` (adapter sets: `adapted_layers`, `adapter_config`,
`reconfigure`, `per_sample_adapters`, ...), `lorakit.io` (`hotswap`), `lorakit.hooks` (`Probe`,
`Hooks`), `lorakit.methods` (`METHODS`, `AdapterConfig`, one module a method), `lorakit.quant`
(`Linear4bit`, `requantize`), `lorakit.losses`, `lorakit.models`, `lorakit.train`.
"""

from __future__ import annotations

import importlib
import importlib.util

# Each public name and the module that defines it, imported on first use (PEP 562): `lorakit` on the
# command line starts without importing torch, so that its own code (which turns Ctrl-C into a clean
# exit) is running before the heavy imports.
_PUBLIC: dict[str, str] = {
    # the methods: one config dataclass each
    **dict.fromkeys(("LoRA", "DoRA", "VeRA", "LoRAFA", "DeltaLoRA", "AdaLoRA", "LoRADrop"), "methods"),
    # adapters on a model
    **dict.fromkeys(
        ("adapt", "set_active", "remove", "disabled", "merge", "unmerge", "merge_and_unload", "adapter_parameters"),
        "inject",
    ),
    # training with any loop: LoRA+ parameter groups, the methods' training hooks
    "param_groups": "optim",
    "training_hooks": "hooks",
    # files: PEFT's adapter layout, llama.cpp's GGUF
    "save": "io",
    "load": "io",
    "export_gguf": "gguf_export",
    # the base model: 4-bit NF4 (QLoRA); what is adapted and trains
    "quantize": "quant",
    "summary": "param_summary",
}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name, or one of lorakit's modules (`lorakit.inject`), imported on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
