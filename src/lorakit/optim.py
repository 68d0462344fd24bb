r"""Optimizer parameter groups, with LoRA+ (Hayou et al. 2024, arXiv 2402.12354).

LoRA+ changes no layer, only learning rates: in `ΔW = B A` the output-side factor B learns
`ratio` times faster than the input-side factor A (ratio ≈ 16 = 2^4; the paper uses 16-80,
larger for harder tasks)::

    lr_A = lr            lr_B = loraplus_ratio · lr

    x ─► A (r x in) ──► B (out x r) ─► ΔW x
         lr                ratio · lr

Why (the paper's width argument): A's update reaches the output through a sum over the `in`
input features, B's only through the r features of `A x`. For updates of the right size at large
width, A needs an lr shrinking with the width and B one that does not: no single lr suits both.

    opt = torch.optim.AdamW(lorakit.param_groups(model, lr=2e-4, loraplus_ratio=16.0))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import inject


def _is_fast(adapter: nn.Module, name: str) -> bool:
    """Whether the adapter parameter `name` (dotted, relative to `adapter`) is on the fast side.

    The deepest module on the parameter's path that declares `loraplus_fast` decides, by the
    parameter's name relative to it; with no declaration anywhere on the path, a parameter whose
    own name is `lora_B` (or starts with it) is fast, and everything else is not.
    """
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = adapter.get_submodule(".".join(parts[:depth])) if depth else adapter
        declared = getattr(module, "loraplus_fast", None)
        if declared is not None:
            return ".".join(parts[depth:]) in declared
    return parts[-1].startswith("lora_B")


def fast_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the adapter parameters that LoRA+ puts in the fast (`ratio · lr`) group."""
    fast: set[int] = set()
    for _, layer in inject.adapted_layers(model):
        for adapter in layer.adapters.values():
            for name, p in adapter.named_parameters():
                if _is_fast(adapter, name):
                    fast.add(id(p))
    return fast


def vector_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the adapter parameters that are vectors stored with a dimension of size 1 (AdaLoRA's
    singular values E, r x 1), as the module holding each declares: `no_weight_decay = ("lora_E",)`."""
    found: set[int] = set()
    for _, layer in inject.adapted_layers(model):
        for adapter in layer.adapters.values():
            for name, p in adapter.named_parameters():
                path, _, leaf = name.rpartition(".")
                if leaf in getattr(adapter.get_submodule(path) if path else adapter, "no_weight_decay", ()):
                    found.add(id(p))
    return found


def param_groups(
    model: nn.Module,
    lr: float,
    loraplus_ratio: float | None = 16.0,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """torch optimizer parameter groups for the model's trainable parameters, with LoRA+.

    Args:
        model: a model adapted by lorakit (any method).
        lr: the base learning rate: A-side adapter parameters and `train_modules` use it.
        loraplus_ratio: LoRA+'s `lr_B / lr_A`; B-side adapter parameters get
            `loraplus_ratio · lr`. `None` or `1` gives plain training (every group at `lr`).
            The paper recommends about 16 (2^4), up to 80 for harder tasks; tune `lr` as for
            A, since B's lr follows from it.
        weight_decay: applied to matrices (2-D and up) only; vectors (biases, norms, DoRA's
            magnitude, VeRA's vectors, AdaLoRA's singular values) get none: decaying them pulls
            scales toward zero.

    Returns:
        Up to four groups, each a dict with `params`, `lr`, `weight_decay` and a `name`
        (`"A"`/`"B"` for the slow/fast side, `"/no_decay"` appended for vectors); empty groups
        are left out. Each trainable parameter appears exactly once, shared ones included.

    Which side each parameter is on. Adapter modules say so with a class attribute listing the
    names (relative to the module) of their fast parameters, e.g. `loraplus_fast = ("lora_B",)`;
    the deepest declaring module on a parameter's path decides, and an adapter without any
    declaration has its parameters named `lora_B` fast and the rest slow. The choices made:

    - LoRA, Delta-LoRA, LoRA-FA, DoRA's inner pair: B fast, A slow (the paper's rule). LoRA-FA
      trains only B, so there LoRA+ simply means `ratio · lr` for B.
    - DoRA's magnitude `m (out,)`: fast. It scales the output rows directly (no sum over input
      features reaches it), the same position as B.
    - VeRA: `b (out,)` fast, `d (r,)` slow. VeRA's trainable pair is (d, b): d scales the rank-r
      code `A x` on the input side, b the output; LoRA+ carries over as `lr_b = ratio · lr_d`.
      PEFT's LoRA+ instead puts every 1-D parameter (VeRA's d, any bias) in the fast group,
      which for VeRA turns LoRA+ into a plain `ratio` times larger lr.
    - Non-adapter trainable parameters (`train_modules`, e.g. a classifier head): the base
      group. LoRA+ is about the low-rank pair; a fully trained head is ordinary fine-tuning.
    """
    ratio = 1.0 if loraplus_ratio is None else float(loraplus_ratio)
    if ratio <= 0:
        raise ValueError(f"loraplus_ratio must be positive (or None), got {loraplus_ratio}")
    fast, vectors = fast_parameter_ids(model), vector_parameter_ids(model)
    buckets: dict[str, list[nn.Parameter]] = {"A": [], "A/no_decay": [], "B": [], "B/no_decay": []}
    for _, p in inject.adapter_parameters(model):  # trainable, each once
        side = "B" if id(p) in fast else "A"
        buckets[side if p.ndim >= 2 and id(p) not in vectors else f"{side}/no_decay"].append(p)
    groups = []
    for name, params in buckets.items():
        if params:
            groups.append(
                {
                    "name": name,
                    "params": params,
                    "lr": lr * ratio if name.startswith("B") else lr,
                    "weight_decay": weight_decay if not name.endswith("no_decay") else 0.0,
                }
            )
    return groups


def adamw(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float, **options: Any
) -> torch.optim.Optimizer:
    """`torch.optim.AdamW` over `params` (tensors or `param_groups`), as `lorakit train` builds it:
    torch's fused implementation (one kernel over every parameter, where the default on the CPU
    runs a loop of a dozen ops per parameter) wherever torch has one for the parameters' device
    and dtype, else the default. The two compute the same update up to rounding. `options` go to
    AdamW as given (an explicit `fused` or `foreach` is kept)."""
    params = list(params)
    if "fused" in options or "foreach" in options:
        return torch.optim.AdamW(params, lr=lr, **options)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **options)
    except RuntimeError:  # a device or dtype without a fused kernel (torch checks at construction)
        return torch.optim.AdamW(params, lr=lr, **options)
