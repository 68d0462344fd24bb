"""What lorakit needs to know about the frozen layers it adapts.

Every method sees its base layer through three functions: its shape (`in_out_features`), its
dense weight in `nn.Linear` layout `(out, in)` (`dense_weight`), and a way to write a merged
weight back (`set_dense_weight`). Supported bases:

- `torch.nn.Linear`;
- transformers' GPT-2 style `Conv1D`, whose weight is stored transposed, `(in, out)`;
- any module that implements the small `DenseWeightProvider` protocol below (lorakit's 4-bit
  `Linear4bit` does), so that quantized or otherwise packed bases plug in without changes here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class DenseWeightProvider(Protocol):
    """A frozen linear-like layer whose weight is not a plain `(out, in)` parameter."""

    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense `(out, in)` tensor (e.g. dequantized)."""

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Replace the weight by a dense `(out, in)` tensor (e.g. re-quantize it)."""


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style `Conv1D` (weight `(in, out)`), without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_adaptable(module: nn.Module) -> bool:
    """Layers lorakit can wrap: `nn.Linear`, `Conv1D`, or a `DenseWeightProvider`."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or isinstance(module, DenseWeightProvider)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of an adaptable layer."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in `(out, in)` layout. A view for `nn.Linear`/`Conv1D`; no copy."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    if isinstance(module, DenseWeightProvider):
        return module.dense_weight()
    raise TypeError(f"lorakit cannot read the weight of {type(module).__name__}")


@torch.no_grad()
def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an `(out, in)` weight into the layer, in its own storage layout and dtype."""
    if isinstance(module, nn.Linear):
        module.weight.copy_(weight)
    elif is_conv1d(module):
        module.weight.copy_(weight.T)
    elif isinstance(module, DenseWeightProvider):
        module.set_dense_weight(weight)
    else:
        raise TypeError(f"lorakit cannot write the weight of {type(module).__name__}")


def weight_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Dtype and device in which the layer computes (the compute dtype for packed bases)."""
    if isinstance(module, DenseWeightProvider) and hasattr(module, "compute_dtype"):
        device = next(iter(module.buffers()), torch.empty(0)).device
        return module.compute_dtype, device
    return module.weight.dtype, module.weight.device
