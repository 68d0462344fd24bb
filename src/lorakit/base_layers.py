"""What lorakit needs to know about the frozen layers it adapts.

Every method sees its base layer through three functions: its shape (`in_out_features`), its
dense weight in `nn.Linear` layout `(out, in)` (`dense_weight`), and a way to write a merged
weight back (`set_dense_weight`). Supported bases:

- `torch.nn.Linear`;
- transformers' GPT-2 style `Conv1D`, whose weight is stored transposed, `(in, out)`;
- any module that implements the small `DenseWeightProvider` protocol below (lorakit's 4-bit
  `Linear4bit` does), so that quantized or otherwise packed bases plug in without changes here.

Under FSDP (`lorakit train --distributed fsdp`) a base weight outside forward is a DTensor holding
only this process's rows. These functions are then the one door to it: `dense_weight` gathers the
full weight (a collective: every process must call it) and `set_dense_weight` writes back only the
local rows (no communication: every process computes the same full weight). Inside forward FSDP has
already gathered the weight, so methods that read it there (DoRA's norm) see a plain tensor.
`gathered_weights` lets one process read weights while the others wait (saving a checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a PyTorch build without torch.distributed: nothing is ever sharded
    DTensor, distribute_tensor = (), None


@runtime_checkable
class DenseWeightProvider(Protocol):
    """A frozen linear-like layer whose weight is not a plain `(out, in)` parameter."""

    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense `(out, in)` tensor (e.g. dequantized)."""

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Replace the weight by a dense `(out, in)` tensor (e.g. re-quantize it)."""

    # Optional: `compute_dtype`, the dtype its forward computes `x W^T + b` in, and `transient_weight()`,
    # W in it for one product made right away (it may be overwritten by the next call): a base that
    # has both is computed inside LoRA's fused node with its adapter
    # (`lorakit.kernels.fused_lora.quantized_base`), dequantized there for each product.
    # Optional: `residual_factors`, `(L (out, k), R (k, in))` with `L @ R` the best rank-k
    # approximation of the rounding error `W - dense_weight()`, kept by a quantizer asked for them
    # (LoftQ, `lorakit.quant.loftq`) until an adapter starting from them takes them (sets it to None).


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


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter FSDP sharded over processes)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a DTensor (a collective), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def write_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole-tensor `value` into `target`; a DTensor `target` takes only its local part
    (every process holds the same `value`, so no communication is needed)."""
    if not is_sharded(target):
        target.copy_(value)
        return
    # src_data_rank=None: each process cuts its own part out of its own copy of `value`
    local = distribute_tensor(
        value.to(target.device, target.dtype), target.device_mesh, target.placements, src_data_rank=None
    )
    target.to_local().copy_(local.to_local())


# module -> its whole `(out, in)` weight, while `gathered_weights` holds them (read by one process)
_GATHERED: dict[nn.Module, torch.Tensor] = {}


@contextlib.contextmanager
def gathered_weights(modules: Iterable[nn.Module], keep: bool) -> Iterator[None]:
    """Gather the sharded weights of `modules` (every process calls this, in the same order); where
    `keep`, `dense_weight` returns them, without communication, until the block ends: one process
    can then read them alone (the main process writing a Delta-LoRA checkpoint). Held on the CPU,
    one layer gathered at a time, so a device holds at most one extra layer."""
    held = []
    try:
        for module in modules:
            if is_sharded(module.weight):  # a 4-bit layer's `weight` is its packed storage
                weight = dense_weight(module)
                if keep:
                    _GATHERED[module] = weight.detach().to("cpu")
                    held.append(module)
        yield
    finally:
        for module in held:
            _GATHERED.pop(module, None)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in `(out, in)` layout. A view for `nn.Linear`/`Conv1D` (no copy), except
    under FSDP outside forward, where the sharded weight is gathered (every process must call)."""
    if _GATHERED and module in _GATHERED:  # empty (always, but while saving): nothing for torch.compile to trace
        return _GATHERED[module]
    if isinstance(module, nn.Linear):
        return full_tensor(module.weight)
    if is_conv1d(module):
        return full_tensor(module.weight).T
    if isinstance(module, DenseWeightProvider):
        return module.dense_weight()
    raise TypeError(f"lorakit cannot read the weight of {type(module).__name__}")


@torch.no_grad()
def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an `(out, in)` weight into the layer, in its own storage layout and dtype (under FSDP,
    each process writes its own rows of the same full weight)."""
    if isinstance(module, nn.Linear):
        write_full(module.weight, weight)
    elif is_conv1d(module):
        write_full(module.weight, weight.T)
    elif isinstance(module, DenseWeightProvider):
        module.set_dense_weight(weight)
    else:
        raise TypeError(f"lorakit cannot write the weight of {type(module).__name__}")


def residual_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The factors `(L, R)` of a quantized layer's rounding error it kept for LoftQ, or None."""
    return getattr(module, "residual_factors", None)


def weight_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Dtype and device in which the layer computes (the compute dtype for packed bases)."""
    if isinstance(module, DenseWeightProvider) and hasattr(module, "compute_dtype"):
        # packed storage is buffers, or frozen parameters once made shardable for FSDP
        device = next(iter([*module.buffers(), *module.parameters()]), torch.empty(0)).device
        return module.compute_dtype, device
    return module.weight.dtype, module.weight.device
