r"""LoRA layers that read one input, as one autograd node: q/k/v of an attention block, gate/up of a gated MLP.

The reference formula is LoRA's, per layer (`lorakit.methods.lora`; `fused_lora.FusedLoRALinear` is
one layer's node). For members `i = 1..k` that read the same `x (n, in)`, each with a frozen dense
`W_i (out_i, in)` (and frozen bias), a pair `A_i (r_i, in)`, `B_i (out_i, r_i)` and scale `s_i`::

    z = x A^T,   A = [A_1; …; A_k] (R, in),   z = [z_1 | … | z_k]      one pass over x for all k
    y_i = x W_i^T (+ b_i) + s_i z_i B_i^T

Backward, with `g_i = dL/dy_i`::

    g_z = [s_1 g_1 B_1 | … | s_k g_k B_k]                       (n, R)
    dL/dx = Σ_i g_i W_i + g_z A                                  accumulated by the GEMMs in one buffer
    dL/dA = g_z^T x                                              one pass over x, split by rows
    dL/dB_i = s_i (z_i^T g_i)^T

Run one by one, the k layers read x k times in each direction, add into k gradients of x and
autograd adds those in k - 1 more passes; the rank-r products are memory-bound, so those passes
are most of what LoRA adds to the frozen model's step on a CPU (docs/benchmarks/speed-memory.md).

`SharedInput` runs a group: the adapted children of one module named as such siblings
(`SIBLING_NAMES`), computed together when the first is called, the others' outputs handed over when
they are called with that same, unmodified tensor. Anything else (a member with dropout, another
adapter, a hook-changed input, a different order) runs each layer alone, as before; a call other
than the planned one ends grouping for that module for good.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..base_layers import is_sharded
from .fused_lora import fusable_base, fused_dtype


class GroupedLoRALinear(torch.autograd.Function):
    """k dense frozen bases over one input, each with its LoRA pair, as one node (see the module docstring).

    `forward(ctx, x, scales, *tensors)`: `x (n, in)`; `scales`, the k scales; `tensors`, the k
    weights, then the k biases (None allowed), then the k `A`s, then the k `B`s. Returns the k
    outputs. Saved for backward: x (where some A trains), z (n, R), and the module's own W, A
    and B tensors (the stacked A is formed again), so the group keeps what each layer alone keeps.
    """

    @staticmethod
    def forward(ctx, x, scales, *tensors):
        k = len(scales)
        weights, biases, downs, ups = (tensors[i * k : (i + 1) * k] for i in range(4))
        stacked = torch.cat([a.to(x.dtype) for a in downs])
        z = torch.mm(x, stacked.T)
        outputs, start = [], 0
        for weight, bias, up, scale in zip(weights, biases, ups, scales):
            y = torch.mm(x, weight.T) if bias is None else torch.addmm(bias, x, weight.T)
            y.addmm_(z[:, start : start + up.shape[1]], up.to(x.dtype).T, alpha=scale)
            outputs.append(y)
            start += up.shape[1]
        ctx.scales = scales
        ctx.set_materialize_grads(False)  # an output nobody used adds nothing: skip its products
        need_down = any(ctx.needs_input_grad[2 + 2 * k : 2 + 3 * k])
        # the stacked A is formed again in backward: kept, it would be one more (R x in) copy per group
        ctx.save_for_backward(x if need_down else None, z, *weights, *downs, *ups)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        scales = ctx.scales
        k = len(scales)
        x, z, *rest = ctx.saved_tensors
        weights, downs, ups = rest[:k], rest[k : 2 * k], rest[2 * k :]
        need = ctx.needs_input_grad
        need_x, need_bias = need[0], need[2 + k : 2 + 2 * k]
        need_down, need_up = need[2 + 2 * k : 2 + 3 * k], need[2 + 3 * k :]
        used = [g for g in grads if g is not None]
        none = (None,) * (2 + 4 * k)
        if not used:
            return none
        dtype, n = used[0].dtype, used[0].shape[0]
        grad_x = None
        grad_bias = [g.sum(0) if g is not None and nb else None for g, nb in zip(grads, need_bias)]
        grad_down: list[torch.Tensor | None] = [None] * k
        grad_up: list[torch.Tensor | None] = [None] * k
        if need_x or any(need_down):
            grad_z = torch.cat(
                [
                    torch.zeros(n, up.shape[1], dtype=dtype, device=z.device)
                    if g is None
                    else torch.mm(g, up.to(dtype)).mul_(scale)
                    for g, up, scale in zip(grads, ups, scales)
                ],
                dim=1,
            )
            if need_x:
                for g, weight in zip(grads, weights):
                    if g is not None:  # Σ g_i W_i into one buffer: beta = 1 in the GEMM itself
                        grad_x = torch.mm(g, weight) if grad_x is None else grad_x.addmm_(g, weight)
                grad_x.addmm_(grad_z, torch.cat([a.to(dtype) for a in downs]))
            if any(need_down):
                products = torch.mm(grad_z.T, x)
                start = 0
                for i, down in enumerate(downs):
                    if need_down[i]:
                        grad_down[i] = products[start : start + down.shape[0]].to(down.dtype)
                    start += down.shape[0]
        start = 0
        for i, (g, up, scale) in enumerate(zip(grads, ups, scales)):
            if g is not None and need_up[i]:
                # (z_i^T g)^T: the BLAS's fast layout for g (see fused_lora.FusedLoRALinear)
                grad_up[i] = torch.mm(z[:, start : start + up.shape[1]].T, g).mul_(scale).T.to(up.dtype)
            start += up.shape[1]
        return (grad_x, None, *([None] * k), *grad_bias, *grad_down, *grad_up)


def grouped_lora_forward(x: torch.Tensor, members: Sequence[nn.Module]) -> list[torch.Tensor] | None:
    """The outputs of the adapted layers `members` for the input `x` they all read, as one
    `GroupedLoRALinear` node; None where one of them cannot join: it does not run exactly one
    adapter with a plain LoRA pair now (`shared_input_pair`: no dropout drawn, A and B as they are),
    its base is not a plain frozen dense layer, or dtypes differ from what each alone would use."""
    weights, biases, downs, ups, scales = [], [], [], [], []
    dtype = None
    for member in members:
        adapter = member.lone_adapter()
        pair = getattr(adapter, "shared_input_pair", None)
        pair = pair() if pair is not None else None
        base = fusable_base(member.base_layer)
        if pair is None or base is None or base[0].shape[1] != x.shape[-1]:
            return None
        if any(is_sharded(t) for t in (*base[:1], *pair[:2])):  # a sibling of another FSDP unit
            return None
        member_dtype = fused_dtype(x, *base)
        if member_dtype is None or dtype not in (None, member_dtype):
            return None
        dtype = member_dtype
        (weight, bias), (down, up, scale) = base, pair
        weights.append(weight.to(dtype))
        biases.append(None if bias is None else bias.to(dtype))
        downs.append(down)
        ups.append(up)
        scales.append(scale)
    with torch.autocast(x.device.type, enabled=False):  # every input is already in `dtype`
        outputs = GroupedLoRALinear.apply(
            x.reshape(-1, x.shape[-1]).to(dtype), tuple(scales), *weights, *biases, *downs, *ups
        )
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outputs]


# Children of one module that the model calls in this order with one tensor, by the names the
# model families give them: attention's query/key/value projections, a gated MLP's gate and up.
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("wq", "wk", "wv"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


def call_state(x: torch.Tensor) -> tuple:
    """What must not change between a group's first call and the others': the input's version and
    the grad and autocast modes the outputs were computed under."""
    device = x.device.type
    return (x._version, torch.is_grad_enabled(), torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))


class SharedInput:
    """Adapted children of one module that read one input (`link_siblings`), computed together.

    When the first member (`members[0]`) is called, the node computes every member's output and
    keeps the others' (`pending`) until each is called with that same, unmodified tensor under the
    same grad and autocast modes. The plan is fixed when the adapter is added, never learned from
    calls, so a run computes the same numbers from its first step to its last, resumed or not
    (grouping adds the gradients of x in another order than autograd). A call that differs from
    the plan (a member called with another tensor, as cross-attention's key does, or out of order)
    is answered exactly, and the group then runs each member alone for good. Not a module: between
    forwards it holds no tensors and nothing to save."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.members = tuple(members)
        self.active = True
        self._pending: dict[nn.Module, torch.Tensor] = {}
        self._pending_input: torch.Tensor | None = None
        self._pending_state: tuple = ()

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output for `x` if its group computes it, else None (the layer runs alone)."""
        if not self.active or torch.compiler.is_compiling() or x.is_inference():
            return None
        if self._pending:
            if layer in self._pending and x is self._pending_input and call_state(x) == self._pending_state:
                y = self._pending.pop(layer)
                if not self._pending:
                    self._pending_input = None
                return y
            self.stop()  # a member the group computed for was not called as planned
            return None
        if layer is not self.members[0]:
            return None
        outputs = grouped_lora_forward(x, self.members)
        if outputs is None:
            return None
        self._pending = dict(zip(self.members[1:], outputs[1:]))
        self._pending_input, self._pending_state = x, call_state(x)
        return outputs[0]

    def stop(self) -> None:
        """Run every member alone from now on."""
        self.active = False
        self._pending, self._pending_input = {}, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # outputs waiting for their member belong to one forward only
        state.update(_pending={}, _pending_input=None)
        return state


def link_siblings(model: nn.Module, is_adapted: Any) -> None:
    """Give the adapted children of every module of `model` (`is_adapted(child)`) named as siblings
    that read one input (`SIBLING_NAMES`, at least two of a set, with one input width) one
    `SharedInput` (`layer.siblings`), in the set's order; every other adapted layer gets None."""
    for parent in model.modules():
        children = {name: child for name, child in parent.named_children() if is_adapted(child)}
        for child in children.values():
            child.siblings = None
        for names in SIBLING_NAMES:
            members = [children[n] for n in names if n in children]
            if (
                len(members) > 1
                and len({input_width(m) for m in members}) == 1
                and None not in map(input_width, members)
            ):
                group = SharedInput(members)
                for member in members:
                    member.siblings = group


def input_width(layer: nn.Module) -> int | None:
    try:
        return layer.in_features
    except (AttributeError, IndexError, TypeError):  # a base without a plain input width
        return None
