r"""The fused LoRA layer: a plain frozen dense (or 4-bit) base and its LoRA pair as one autograd node.

The reference formula is the method's own (`lorakit.methods.lora`: `y = x W0^T + s · dropout(x) A^T B^T`,
`LoRAAdapter.forward`); this node computes the same output and gradients with fewer passes over
the activations and, with dropout, without a dropped-out copy or a mask kept for backward
(`kernels/dropout.py`), and `tests/methods/test_lora.py` checks it against that formula. LoRA, LoRA-FA (A frozen)
and VeRA's node (`fused_vera.py`) use `fusable_base` and `fused_dtype` to decide where it applies; over a
4-bit base (QLoRA: `quantized_base`, `packed_dtype`) the node dequantizes the weight for each product
and keeps no dense copy, as the base alone would.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_impl

from ..base_layers import DenseWeightProvider, is_conv1d
from .dropout import DropoutDraw


def fusable_base(base_layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(W (out, in), bias)` of a plain frozen dense base the fused path may compute itself, else None.

    Only `nn.Linear` (or a subclass that keeps its forward) and GPT-2's `Conv1D`, with frozen
    weights and no hooks: a quantized base, a layer whose forward differs, a trainable base
    (`train_modules`) or a hooked one (its hooks must see it run) goes through the base's own call.
    """
    if type(base_layer).forward is nn.Linear.forward:
        weight = base_layer.weight
    elif is_conv1d(base_layer):
        weight = base_layer.weight.T  # stored (in, out)
    else:
        return None
    bias = base_layer.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad) or has_hooks(base_layer):
        return None
    return weight, bias


def quantized_base(base_layer: nn.Module) -> tuple[DenseWeightProvider, torch.Tensor | None] | None:
    """`(layer, bias)` of a frozen base that stores its weight packed (a `DenseWeightProvider` such as
    lorakit's 4-bit `Linear4bit`) and computes `x W^T + b` in its `compute_dtype`: the fused node
    dequantizes the weight itself, in forward and again in backward, and keeps no dense copy.
    None for anything else, or with hooks or a trainable bias."""
    if (
        not isinstance(base_layer, DenseWeightProvider)
        or not hasattr(base_layer, "transient_weight")
        or not isinstance(getattr(base_layer, "compute_dtype", None), torch.dtype)
    ):
        return None
    bias = getattr(base_layer, "bias", None)
    if (bias is not None and bias.requires_grad) or has_hooks(base_layer):
        return None
    return base_layer, bias


def has_hooks(module: nn.Module) -> bool:
    """True when calling `module` would run hooks (its own or global ones), not just its forward."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module_impl._global_forward_hooks
        or module_impl._global_forward_pre_hooks
        or module_impl._global_backward_hooks
        or module_impl._global_backward_pre_hooks
    )


def fused_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype a fused layer computes in, the one the unfused path would use: autocast's where
    autocast is on (the base and adapter matmuls all run in it there), else x's when it is the
    base's; None on a dtype mismatch (the base's own call decides what that means)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype):
        return x.dtype
    return None


def packed_dtype(x: torch.Tensor, layer: DenseWeightProvider) -> torch.dtype | None:
    """The dtype a fused layer over a packed base computes in: the one both the base (its
    `compute_dtype`) and the adapter (autocast's, else x's) would use, or None where they differ."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return dtype if dtype == layer.compute_dtype else None


class FusedLoRALinear(torch.autograd.Function):
    r"""A dense frozen base and its LoRA pair as one autograd node.

    Forward, for 2-D `x (n, in)`, `W (out, in)`, `A (r, in)`, `B (out, r)`::

        y = x W^T (+ bias);   z = x_d A^T;   y += s · z B^T      (in place: no second output tensor)

    where `x_d` is the dropped-out input `x ⊙ m / (1 - p)` of the dropout mask `draw`
    (`lorakit.kernels.dropout.DropoutDraw`), or `x` itself without dropout. Backward, with `g = dL/dy`::

        g_z = s · g B                         (n, r)
        dL/dx = g W + (g_z A) ⊙ m / (1 - p)   (without dropout: one GEMM accumulates into the other, in place)
        dL/dA = g_z^T x_d                     (r, in; x_d formed again from x and the mask's seed)
        dL/dB = s · (z^T g)^T                 (out, r)

    Over a packed base (`quantized_base`: QLoRA's 4-bit weight) W is dequantized for the forward
    product and again for dL/dx, as the 4-bit layer alone does, and never kept.

    Saved for backward: `z` (n x r), and `x` only where A trains (LoRA-FA's frozen A needs none);
    x is the layer's input, shared by the layers that read it (q/k/v; gate/up), and the dropout
    mask is drawn again from its seed, so dropout keeps nothing more. W (or its autocast copy, as
    autograd would keep it), A and B are the module's own tensors: A and B stay in their master
    dtype, cast to the activations' dtype where used, and their gradients come back in the master
    dtype. Autograd on the unfused path keeps the same activations (plus, with dropout, the
    dropped-out copy and its mask per layer) but runs the base and the adapter as separate nodes:
    an extra (n x out) output, an extra (n x in) gradient and the add between them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, draw: DropoutDraw | None):
        # `weight`: the dense W, or a packed base (`quantized_base`) that dequantizes it when asked
        packed = None if isinstance(weight, torch.Tensor) else weight
        w = weight if packed is None else packed.transient_weight()
        y = torch.mm(x, w.T) if bias is None else torch.addmm(bias, x, w.T)
        del w  # a dequantized weight lives for this product only
        z = torch.mm(x if draw is None else draw.apply(x), lora_A.to(x.dtype).T)
        y.addmm_(z, lora_B.to(x.dtype).T, alpha=scale)
        ctx.scale, ctx.draw, ctx.packed = scale, draw, packed
        # A and B as the module holds them (master dtype, no copy), cast again in backward
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, z, None if packed else weight, lora_A, lora_B)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, z, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B, _, _ = ctx.needs_input_grad
        dtype, draw = grad_y.dtype, ctx.draw
        a = lora_A.to(dtype)
        grad_x = grad_bias = grad_A = grad_B = None
        grad_z = torch.mm(grad_y, lora_B.to(dtype)).mul_(ctx.scale) if (need_x or need_A) else None
        if need_x:
            grad_x = torch.mm(grad_y, weight if ctx.packed is None else ctx.packed.transient_weight())
            if draw is None:
                grad_x.addmm_(grad_z, a)
            else:
                draw.accumulate(grad_x, torch.mm(grad_z, a))
        if need_bias:
            grad_bias = grad_y.sum(0)
        if need_A:
            grad_A = torch.mm(grad_z.T, x if draw is None else draw.apply(x)).to(lora_A.dtype)
        if need_B:
            # (z^T g)^T rather than g^T z: the same product, and the (out x tokens) transposed read
            # of g is the slow layout for the BLAS (about 1.6x the time at out = 1536, tokens = 1024)
            grad_B = torch.mm(z.T, grad_y).mul_(ctx.scale).T.to(lora_B.dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


def fused_lora_forward(
    x: torch.Tensor,
    base_layer: nn.Module,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    draw: DropoutDraw | None = None,
) -> torch.Tensor | None:
    """`base_layer(x) + s · dropout(x) A^T B^T` through `FusedLoRALinear` (`draw`: the dropout mask, or
    None for none), or None where the base is not a plain frozen dense layer (`fusable_base`) or
    dtypes would differ from the unfused path (`fused_dtype`).
    """
    base = fusable_base(base_layer)
    if base is not None:
        dtype = fused_dtype(x, *base)
    else:
        base = quantized_base(base_layer)
        dtype = None if base is None else packed_dtype(x, base[0])
    if dtype is None:
        return None
    weight, bias = base
    with torch.autocast(x.device.type, enabled=False):  # every input is already in `dtype`
        y = FusedLoRALinear.apply(
            x.reshape(-1, x.shape[-1]).to(dtype),
            weight.to(dtype) if isinstance(weight, torch.Tensor) else weight,
            None if bias is None else bias.to(dtype),
            lora_A,
            lora_B,
            scale,
            draw,
        )
    return y.view(*x.shape[:-1], y.shape[-1])
