"""`lorakit.summary`: what is adapted and how many parameters train."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import inject
from .base_layers import DenseWeightProvider


@dataclass
class ModuleRow:
    """One adapted module: its name, shape, method and own trainable parameter count."""

    name: str
    shape: tuple[int, int]  # (out, in)
    method: str
    trainable: int


def module_rows(model: nn.Module) -> list[ModuleRow]:
    """Per adapted module. A shared adapter's parameters count on the first module using them."""
    config = inject.adapter_config(model)
    seen: set[int] = set()
    rows = []
    for name, layer in inject.adapted_layers(model):
        count = 0
        for p in layer.adapter.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
        rows.append(ModuleRow(name, (layer.out_features, layer.in_features), config.method, count))
    return rows


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once.

    A quantized layer (`DenseWeightProvider`) stores its weight packed in buffers; it counts as the
    `out x in` weights it represents, as in the full-precision model (PEFT counts the same way).
    """
    total = sum(p.numel() for p in model.parameters())  # named_parameters already de-duplicates
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, DenseWeightProvider))
    trainable = sum(p.numel() for _, p in inject.adapter_parameters(model))
    return trainable, total


def summary(model: nn.Module, per_module: bool = False) -> str:
    """A table: method, adapted modules, trainable parameters and their share of the model.

    With `per_module=True`, one line per adapted module follows (name, shape, method, trainable).
    """
    config = inject.adapter_config(model)
    rows = module_rows(model)
    trainable, total = parameter_counts(model)
    adapter_params = sum(r.trainable for r in rows)
    head = f"{'method':<12} {'modules':>8} {'adapter params':>15} {'trainable':>12} {'total':>14} {'% trainable':>12}"
    line = (
        f"{config.method:<12} {len(rows):>8} {adapter_params:>15,} {trainable:>12,} {total:>14,} "
        f"{100 * trainable / max(total, 1):>11.4f}%"
    )
    out = [head, line]
    if config.train_modules:
        out.append(f"fully trained modules: {', '.join(config.train_modules)}")
    if per_module:
        width = max(len(r.name) for r in rows)
        out.append("")
        out.append(f"{'module':<{width}} {'shape (out, in)':>16} {'method':>10} {'trainable':>12}")
        for r in rows:
            out.append(f"{r.name:<{width}} {str(r.shape):>16} {r.method:>10} {r.trainable:>12,}")
    return "\n".join(out)
