"""`lorakit.summary`: what is adapted and how many parameters train."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import inject
from .base_layers import DenseWeightProvider


@dataclass
class ModuleRow:
    """One adapter on one module: module name, shape, adapter name, method, own trainable count."""

    name: str
    shape: tuple[int, int]  # (out, in)
    adapter: str
    method: str
    trainable: int
    rank: int | None = None  # the adapter's live rank on this module (AdaLoRA's changes in training)
    shared_with: str | None = None  # the first module using the same adapter object (LoRA-drop's shared pairs)


def module_rows(model: nn.Module) -> list[ModuleRow]:
    """Per adapted module and adapter. A shared adapter's parameters count on the first module
    using them; frozen adapters count 0."""
    state = inject.lorakit_state(model)
    if state is None or not state.configs:
        inject.adapter_config(model)  # the usual "no adapter" error
    seen: set[int] = set()
    first_user: dict[int, str] = {}
    rows = []
    for name, layer in inject.adapted_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            owner = first_user.setdefault(id(adapter), name)
            count = 0
            for p in adapter.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    count += p.numel()
            rows.append(
                ModuleRow(
                    name,
                    (layer.out_features, layer.in_features),
                    adapter_name,
                    state.configs[adapter_name].method,
                    count,
                    getattr(adapter, "r", None),
                    owner if owner != name else None,
                )
            )
    return rows


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once.

    A quantized layer (`DenseWeightProvider`) stores its weight packed (in buffers, or in frozen
    parameters under FSDP); it counts as the `out x in` weights it represents, as in the
    full-precision model (PEFT counts the same way).
    """
    # packed storage held as parameters (made shardable for FSDP) counts as the weights it packs, below
    packed = {
        id(p)
        for m in model.modules()
        if isinstance(m, DenseWeightProvider)
        for name, p in m.named_parameters(recurse=False)
        if name != "bias"
    }
    total = sum(p.numel() for p in model.parameters() if id(p) not in packed)  # parameters() already de-duplicates
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, DenseWeightProvider))
    trainable = sum(p.numel() for _, p in inject.adapter_parameters(model))
    return trainable, total


def summary(model: nn.Module, per_module: bool = False) -> str:
    """A table: per adapter its method, adapted modules and trainable parameters, then the
    model's trainable share. With `per_module=True`, one line per adapted module and adapter
    follows (name, shape, adapter, method, trainable)."""
    state = inject.lorakit_state(model)
    rows = module_rows(model)
    trainable, total = parameter_counts(model)
    several = len(state.configs) > 1
    head = f"{'method':<12} {'modules':>8} {'adapter params':>15} {'trainable':>12} {'total':>14} {'% trainable':>12}"
    if several:
        head = f"{'adapter':<12} {'active':>6} " + head
    out = [head]
    for name, config in state.configs.items():
        own = [r for r in rows if r.adapter == name]
        line = (
            f"{config.method:<12} {len(own):>8} {sum(r.trainable for r in own):>15,} {trainable:>12,} {total:>14,} "
            f"{100 * trainable / max(total, 1):>11.4f}%"
        )
        if several:
            line = f"{name:<12} {'yes' if name in state.active else 'no':>6} " + line
        out.append(line)
        if config.train_modules:
            out.append(f"fully trained modules{f' ({name})' if several else ''}: {', '.join(config.train_modules)}")
    if per_module:
        width = max(len(r.name) for r in rows)
        out.append("")
        out.append(
            f"{'module':<{width}} {'shape (out, in)':>16} {'adapter':>10} {'method':>10} {'rank':>5} {'trainable':>12}"
        )
        for r in rows:
            rank = "–" if r.rank is None else str(r.rank)
            shared = f"  (shares {r.shared_with}'s pair)" if r.shared_with else ""
            out.append(
                f"{r.name:<{width}} {str(r.shape):>16} {r.adapter:>10} {r.method:>10} {rank:>5} {r.trainable:>12,}{shared}"
            )
    return "\n".join(out)
