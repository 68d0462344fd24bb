"""QLoRA's 4-bit base: NF4 quantization of a model's linear layers, for any lorakit method.

    import lorakit
    model = lorakit.quantize(model)                        # nn.Linear / Conv1D -> Linear4bit (NF4)
    model = lorakit.adapt(model, lorakit.LoRA(r=64, alpha=16))
    ...train...
    lorakit.save(model, "out")      # lorakit.json records the quantization; lorakit.load redoes it
    dense = lorakit.merge_and_unload(model)                # a dense 16/32-bit model, never re-quantized
    report = lorakit.quant.requantize(dense)               # explicit: back to NF4, with the error

No run-time dependency on bitsandbytes: the format is implemented here (`nf4.py`) and is equal
bit for bit to `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import base_layers
from ..adapted_layer import adapter_names, lorakit_state
from ..targets import TargetSelection, name_matches, select_targets, set_submodule
from .linear4bit import Linear4bit
from .nf4 import (
    DEFAULT_BLOCKSIZE,
    NF4Tensor,
    create_dynamic_map,
    create_normal_map,
    dequantize_nf4,
    quantize_nf4,
)

QUANTIZATION_METHODS = ("nf4",)


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or base_layers.is_conv1d(module)


def quantization_targets(model: nn.Module, selection: TargetSelection) -> list[str]:
    """The linear layers `selection` picks that become 4-bit. Not those the model keeps in full
    precision (transformers' `_keep_in_fp32_modules`, e.g. T5's `wo`, whose forward casts its input
    to `wo.weight.dtype`: a 4-bit storage dtype would wreck it), as transformers' 4-bit loading does."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return [
        n
        for n in select_targets(model, selection)
        if _quantizable(model.get_submodule(n)) and not any(name_matches(n, k) for k in keep)
    ]


def quantize(
    model: nn.Module,
    method: str = "nf4",
    targets: str | list[str] = "all-linear",
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    layers: list[int] | None = None,
    exclude: list[str] | None = None,
    loftq_rank: int = 0,
) -> nn.Module:
    """Replace the chosen linear layers (`nn.Linear`, GPT-2 `Conv1D`) by NF4 `Linear4bit`, in place.

    `targets`/`layers`/`exclude` select modules exactly as in an adapter config; "all-linear"
    leaves the output head dense (as QLoRA does). Deterministic: the same base and arguments
    give the same bits, so `lorakit.load` re-quantizes a fresh base from the arguments recorded
    in the model's `lorakit_state(model).quantization` (written to lorakit.json by `lorakit.save`). Layers that are
    already 4-bit are left as they are. Call before `lorakit.adapt`. Returns `model`.

    Args:
        method: the 4-bit format; only "nf4" (QLoRA) for now.
        blocksize: weights per absmax block (64).
        double_quant: 8-bit absmax statistics (4.127 instead of 4.5 bits per weight).
        compute_dtype: matmul dtype (`torch.bfloat16` or "bfloat16", ...); `None`: bf16 on
            CUDA, fp32 on CPU.
        loftq_rank: keep the top `loftq_rank` singular factors of each layer's rounding error
            for an adapter built with `init="loftq"` (LoftQ, `lorakit.quant.loftq`); not part of
            the base, so not recorded.
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; lorakit implements {list(QUANTIZATION_METHODS)}")
    if adapter_names(model):
        raise ValueError("quantize the base model before lorakit.adapt (this model already carries an adapter)")
    dtype = getattr(torch, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    config = TargetSelection(targets=targets, layers=layers, exclude=exclude)
    for name in quantization_targets(model, config):
        module = model.get_submodule(name)
        set_submodule(model, name, Linear4bit.from_linear(module, blocksize, double_quant, dtype, loftq_rank))
    lorakit_state(model, create=True).quantization = quantization_settings(
        method, targets, blocksize, double_quant, compute_dtype, layers, exclude
    )
    return model


def quantization_settings(
    method: str = "nf4",
    targets: str | list[str] = "all-linear",
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    layers: list[int] | None = None,
    exclude: list[str] | None = None,
) -> dict[str, Any]:
    """The JSON-ready keyword arguments that make `quantize` redo a quantization."""
    settings: dict[str, Any] = {
        "method": method,
        "targets": targets if isinstance(targets, str) else list(targets),
        "blocksize": blocksize,
        "double_quant": double_quant,
        "compute_dtype": _dtype_name(compute_dtype),
    }
    if layers is not None:
        settings["layers"] = list(layers)
    if exclude is not None:
        settings["exclude"] = list(exclude)
    return settings


def quantized_layers(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    """(name, layer) of every 4-bit layer, adapted or not."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


@torch.no_grad()
def requantize(model: nn.Module, **settings: Any) -> dict[str, Any]:
    """Quantize a dense (e.g. merged) model again, in place, and report what that rounding costs.

    Uses `settings` (the keyword arguments of `quantize`), else the model's recorded
    quantization (`lorakit_state(model).quantization`), else the defaults. Returns a report: per layer and overall, the
    relative Frobenius error `||W - Q(W)|| / ||W||` and the largest absolute error.
    """
    if not settings:
        state = lorakit_state(model)
        settings = dict(state.quantization or {}) if state is not None else {}
    config = TargetSelection(
        targets=settings.get("targets", "all-linear"), layers=settings.get("layers"), exclude=settings.get("exclude")
    )
    dense = {
        name: base_layers.dense_weight(model.get_submodule(name)).detach().float().clone()
        for name in quantization_targets(model, config)
    }
    quantize(model, **settings)
    layers: dict[str, dict[str, float]] = {}
    err_sq = ref_sq = 0.0
    max_abs = 0.0
    for name, weight in dense.items():
        diff = model.get_submodule(name).dense_weight(torch.float32) - weight
        e, r = diff.pow(2).sum().item(), weight.pow(2).sum().item()
        layers[name] = {"relative_error": (e / r) ** 0.5 if r else 0.0, "max_abs_error": diff.abs().max().item()}
        err_sq, ref_sq, max_abs = err_sq + e, ref_sq + r, max(max_abs, layers[name]["max_abs_error"])
    return {
        "layers": layers,
        "relative_error": (err_sq / ref_sq) ** 0.5 if ref_sq else 0.0,
        "max_abs_error": max_abs,
    }


def bits_per_parameter(module: nn.Module) -> float:
    """Storage bits per weight, from the tensors the module actually holds.

    Counts every parameter once (tied weights once) and the buffers of 4-bit layers (packed
    codes and statistics); a `Linear4bit` contributes `in x out` parameters (plus its bias).
    """
    bits = 0
    params = 0
    seen: set[int] = set()
    for sub in module.modules():
        tensors = list(sub.parameters(recurse=False))
        if isinstance(sub, Linear4bit):
            tensors += [b for b in sub.buffers(recurse=False) if b is not None]
            params += sub.in_features * sub.out_features
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            bits += t.numel() * t.element_size() * 8
            if isinstance(t, nn.Parameter):
                params += t.numel()
    return bits / params if params else 0.0


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's weights (parameters, and the buffers of 4-bit layers)."""
    bits = 0
    seen: set[int] = set()
    for sub in module.modules():
        tensors = list(sub.parameters(recurse=False))
        if isinstance(sub, Linear4bit):
            tensors += [b for b in sub.buffers(recurse=False) if b is not None]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                bits += t.numel() * t.element_size() * 8
    return bits // 8


from .loading import load_quantized_causal_lm  # noqa: E402  (uses quantize above)

__all__ = [
    "Linear4bit",
    "NF4Tensor",
    "QUANTIZATION_METHODS",
    "bits_per_parameter",
    "create_dynamic_map",
    "create_normal_map",
    "dequantize_nf4",
    "load_quantized_causal_lm",
    "quantization_settings",
    "quantize",
    "quantize_nf4",
    "quantized_layers",
    "requantize",
    "weight_bytes",
]
