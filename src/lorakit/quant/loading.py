"""Loading a causal LM straight into 4-bit, one weight at a time.

`load_quantized_causal_lm` streams the model (`lorakit.models.stream_causal_lm`: built on the
`meta` device, then filled from the checkpoint tensor by tensor): a weight of a chosen linear layer
is quantized to NF4 as soon as it arrives and its dense copy is dropped; every other tensor is
placed as it is. The dense model never exists, so peak memory stays near the 4-bit model plus the
largest single tensor (plus the file pages the OS maps in).

The result is bit-identical to `quantize(load_causal_lm(spec), ...)`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import base_layers
from ..adapted_layer import lorakit_state
from ..models import stream_causal_lm
from ..targets import TargetSelection
from .linear4bit import Linear4bit
from .nf4 import DEFAULT_BLOCKSIZE


def load_quantized_causal_lm(
    spec: str | None = None,
    method: str = "nf4",
    targets: str | list[str] = "all-linear",
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    layers: list[int] | None = None,
    exclude: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    loftq_rank: int = 0,
) -> nn.Module:
    """A causal LM (default: the built-in SmolLM2-135M) with its linear layers loaded as NF4.

    `spec` is as in `lorakit.models.load_causal_lm` (built-in name, local directory, `.gguf`
    file); the other arguments are those of `lorakit.quantize` (so `**lorakit_state(model).quantization`
    redoes a recorded quantization). Non-quantized tensors (embeddings, norms, the output head)
    get `dtype`, and weights are rounded to `dtype` before quantization, so the result equals
    `lorakit.quantize(load_causal_lm(spec, dtype), method, targets, ...)` bit for bit.
    `loftq_rank` keeps LoftQ's factors of each layer's rounding error, as in `quantize`.
    """
    from . import QUANTIZATION_METHODS, quantization_settings, quantization_targets

    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; lorakit implements {list(QUANTIZATION_METHODS)}")
    cdtype = getattr(torch, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    selection = TargetSelection(targets=targets, layers=layers, exclude=exclude)

    def chosen(model: nn.Module) -> set[str]:
        return set(quantization_targets(model, selection))

    def quantized(module: nn.Module, weight: torch.Tensor) -> nn.Module:
        return Linear4bit.from_linear(_with_weight(module, weight), blocksize, double_quant, cdtype, loftq_rank)

    model = stream_causal_lm(spec, dtype, chosen, quantized)
    lorakit_state(model, create=True).quantization = quantization_settings(
        method, targets, blocksize, double_quant, compute_dtype, layers, exclude
    )
    return model


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """`module` (Linear or Conv1D) viewed with a real weight, for `Linear4bit.from_linear`."""
    if base_layers.is_conv1d(module):
        holder = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
        holder.weight = nn.Parameter(weight.T, requires_grad=False)
    else:
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(weight, requires_grad=False)
    holder.bias = module.bias if getattr(module, "bias", None) is not None and not module.bias.is_meta else None
    return holder
