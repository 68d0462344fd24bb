r"""The fused VeRA layer: a plain frozen dense base and its VeRA change as one autograd node.

The reference formula is the method's own (`lorakit.methods.vera`: `y = x W0^T + b ⊙ ((d ⊙ (x A^T)) B^T)`,
`VeRAAdapter.forward`); `tests/methods/test_vera.py` checks this node against it. Three pieces:

- `SharedDownProjection`: the frozen projection `A` every VeRA layer of a model reads, with `x A^T`
  computed once for the layers that read the same activation (q/k/v; gate/up);
- `FusedVeRALinear`: the node, `dL/dx = g (W + U A)` in one GEMM;
- `merge_in_forward`: whether the forward forms `W + U A` too.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn


class SharedDownProjection(nn.Module):
    """Holds the frozen down-projection `vera_A (r, max_in)` (a buffer the subclass registers: VeRA's
    `VeRAProjections`) and remembers the last `x A^T` it computed, for the next layer that reads the
    same, unmodified `x`."""

    def __init__(self) -> None:
        super().__init__()
        self._last_down: tuple[weakref.ref, tuple, torch.Tensor] | None = None

    def down_projection(self, x: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        """`x A[:, :in]^T` in `dtype`, `(tokens, r)`, outside autograd (the fused node differentiates
        through x itself). Layers that read the same activation (q/k/v; gate/up) get the same
        product: it is computed once, for the first of them, and reused while `x` is the same,
        unmodified tensor. Compiled graphs (the compiler deduplicates) and inference-mode tensors
        (which have no version counter) compute it each time."""
        a = self.vera_A[:, :in_features].to(device=x.device, dtype=dtype)
        if torch.compiler.is_compiling():
            return torch.mm(x.detach().reshape(-1, in_features).to(dtype), a.T)
        if x.is_inference():  # `torch.inference_mode()` tensors keep no version counter to key a memo by
            return torch.mm(x.reshape(-1, in_features).to(dtype), a.T)
        key = (x._version, in_features, dtype, self.vera_A._version)
        last = self._last_down
        if last is not None and last[0]() is x and last[1] == key:
            return last[2]
        with torch.no_grad():
            z = torch.mm(x.reshape(-1, in_features).to(dtype), a.T)
        self._last_down = (weakref.ref(x), key, z)
        return z

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last_down"] = None  # a weak reference cannot be pickled; the memo is only a cache
        return state


class FusedVeRALinear(torch.autograd.Function):
    r"""A dense frozen base and its VeRA change as one autograd node.

    With `z = x A^T` `(n, r)` (given, outside autograd) and the scaled up-projection
    `U = diag(b) B diag(d)` `(out, r)`::

        forward:   y = x W^T (+ bias) + z U^T                 (the rank-r term added in place)
        backward:  dL/dx = g (W + U A)                        one GEMM, as the base alone needs
                   dL/dU = g^T z                              (b's and d's gradients follow from it)

    `g (W + U A)` replaces `g W + (g U) A`: the dense `(out, in)` sum costs out·in·r once per
    layer, the two rank-r GEMMs it saves cost tokens·r·(in + out); at r = 256 and a thousand
    tokens or more the dense sum is the cheaper. Saved for backward: z only (A and W are frozen
    and the module's own; x is not needed).

    With `merged` (see `merge_in_forward`) the forward is `y = x (W + U A)^T` too: the sum
    (out·in·r) replaces `z U^T` (tokens·r·out), the cheaper whenever tokens > in. The sum is
    formed again in backward rather than kept: keeping it would hold a copy of every adapted
    weight until the backward pass.
    """

    @staticmethod
    def forward(ctx, x, z, weight, bias, up, vera_A, merged=False):
        if merged:
            effective = torch.addmm(weight, up, vera_A)
            y = torch.mm(x, effective.T) if bias is None else torch.addmm(bias, x, effective.T)
            del effective
        else:
            y = torch.mm(x, weight.T) if bias is None else torch.addmm(bias, x, weight.T)
            y.addmm_(z, up.T)
        ctx.save_for_backward(z, weight, up, vera_A)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, weight, up, vera_A = ctx.saved_tensors
        need_x, _, _, need_bias, need_up, _, _ = ctx.needs_input_grad
        grad_x = grad_bias = grad_up = None
        if need_x:
            grad_x = torch.mm(grad_y, torch.addmm(weight, up, vera_A))
        if need_bias:
            grad_bias = grad_y.sum(0)
        if need_up:
            grad_up = torch.mm(grad_y.T, z)
        return grad_x, None, None, grad_bias, grad_up, None, None


def merge_in_forward(tokens: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether `FusedVeRALinear` forms `W + U A` in forward too: when it costs fewer multiplications
    than `z U^T` (tokens > in), and only in fp32/fp64. In bf16/fp16 the sum would round VeRA's
    update against W's larger entries (8 or 11 bits of mantissa), so the forward keeps the update
    a separate term there."""
    return tokens > in_features and dtype in (torch.float32, torch.float64)


def fused_vera_linear(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    up: torch.Tensor,
    vera_A: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`x W^T (+ bias) + z U^T` through `FusedVeRALinear`, every input already in `dtype` (`z`, `up`
    and `vera_A` cast by the caller; `x`, `weight` and `bias` here), for `x (..., in)`."""
    with torch.autocast(x.device.type, enabled=False):  # every input is already in `dtype`
        flat = x.reshape(-1, vera_A.shape[1]).to(dtype)
        y = FusedVeRALinear.apply(
            flat,
            z,
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            up,
            vera_A,
            merge_in_forward(flat.shape[0], vera_A.shape[1], dtype),
        )
    return y.view(*x.shape[:-1], y.shape[-1])
