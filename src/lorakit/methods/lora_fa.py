r"""LoRA-FA: LoRA with a frozen down-projection (Zhang et al. 2023, arXiv 2308.03303).

::

        x ──────────────► W0 (frozen, out x in) ───────────────────────┐
        │                                                             (+) ──► y
        └─► dropout ─► A (r x in, FROZEN) ─► z ─► B (out x r) ─► * s ──┘
                                             │
                       saved for backward: z (tokens x r) only, never x (tokens x in)

    y = x W0^T + s · dropout(x) A^T B^T,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

The forward is LoRA's. `A` is random (kaiming-uniform, a = sqrt 5, as LoRA) and never trains; only
`B` (init 0) does, so ΔW = s·B·A stays in the fixed r-dimensional row space of A and a layer trains
r·out parameters instead of r·(in + out).

The point of the method is activation memory. The gradients are

    dL/dB = s · g^T z          with z = dropout(x) A^T   (tokens x r)
    dL/dx = s · (g B A) ⊙ mask / (1 - p)

so backward needs `z`, not `x`. Freezing A in the optimizer (what PEFT's LoRA-FA does) still lets
autograd keep `x` alive for A's gradient; here a custom `torch.autograd.Function` saves only `z`
(plus A and B themselves, which are the module's own tensors, no extra memory). The frozen base
layer does not keep `x` either: its weight needs no gradient. With dropout on, the dropout mask is
needed for dL/dx; it is drawn again from its seed in backward (`lorakit.kernels.dropout`), so
nothing of it is kept.

Optional, from v2 of the paper ("LoRA-FA optimizer"): `projected_grad=True` replaces B's gradient
by its projection `g_B (A A^T + δI)^+ / s^2`, the gradient full fine-tuning would take restricted to
A's row space (PEFT's `create_lorafa_optimizer` does the same in its optimizer).

Saved in PEFT's LoRA format (PEFT has no LoRA-FA adapter type: its LoRA-FA is an optimizer over a
plain LoRA), so `peft.PeftModel.from_pretrained` reads the file as a LoRA with the same outputs;
lorakit.json records `method: lora-fa`, so `lorakit.load` gives A back frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base_layers import in_out_features, weight_dtype_device
from ..kernels.dropout import AdapterDropout, DropoutDraw
from ..kernels.fused_lora import fused_lora_forward
from .base import register
from .lora import LoRAPair, LowRankConfig, check_rank


class FrozenDownProjection(torch.autograd.Function):
    """`y = base_out + s · dropout(x) A^T B^T` with A frozen; saves `z = dropout(x) A^T` only.

    Inputs are 2-D: `x (n, in)`, `base_out (n, out)`, `A (r, in)`, `B (out, r)` (master dtype;
    computed in x's dtype), `scale`, the dropout mask `draw` (`kernels.dropout.DropoutDraw`, drawn
    again from its seed in backward; None: no dropout), and `projection` (`(r, r)` fp32 matrix
    applied to B's gradient, or None).
    """

    @staticmethod
    def forward(ctx, x, base_out, lora_A, lora_B, scale: float, draw: DropoutDraw | None, projection):
        z = (x if draw is None else draw.apply(x)) @ lora_A.to(x.dtype).T  # (n, r)
        y = torch.addmm(base_out, z, lora_B.to(x.dtype).T, alpha=scale)
        # A and B are the module's own tensors (no extra memory); z is the only new activation.
        ctx.save_for_backward(z, lora_A, lora_B, projection)
        ctx.scale, ctx.draw = scale, draw
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, lora_A, lora_B, projection = ctx.saved_tensors
        dtype = grad_y.dtype
        grad_x = grad_base = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ (lora_B.to(dtype) * ctx.scale)) @ lora_A.to(dtype)  # (n, in), rank-r path
            if ctx.draw is not None:
                ctx.draw.apply(grad_x, out=grad_x)  # ⊙ m / (1 - p), the mask drawn again
        if ctx.needs_input_grad[1]:
            grad_base = grad_y
        if ctx.needs_input_grad[3]:
            grad_B = (grad_y.T @ z) * ctx.scale  # (out, r)
            if projection is not None:
                grad_B = grad_B.float() @ projection
            grad_B = grad_B.to(lora_B.dtype)
        return grad_x, grad_base, None, grad_B, None, None, None


def projected_gradient_matrix(lora_A: torch.Tensor, scale: float, damping: float) -> torch.Tensor:
    """`(A A^T + damping·I)^+ / s^2` (r x r, fp32): LoRA-FA v2's right factor for B's gradient."""
    a = lora_A.detach().float()
    gram = a @ a.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.pinv(gram + damping * eye) / (scale * scale)


class LoRAFAAdapter(LoRAPair, nn.Module):
    """LoRA-FA for one layer: frozen buffer `lora_A (r, in)`, trainable `lora_B (out, r)`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scale: float,
        dropout: float = 0.0,
        projected_grad: bool = False,
        projection_damping: float = 1e-8,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        check_rank(r, "LoRA-FA rank r")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r, self.scale = r, scale
        self.dropout = AdapterDropout(dropout)  # its mask is drawn again in backward, never kept
        self.projected_grad, self.projection_damping = projected_grad, projection_damping
        # A is a buffer, not a frozen Parameter: nothing (an optimizer, `requires_grad_(True)`)
        # can make it train by accident. It is saved with the adapter like any LoRA A.
        lora_A = torch.empty(r, in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.register_buffer("lora_A", lora_A)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        y = result
        projection = None
        if self.projected_grad and torch.is_grad_enabled():
            projection = projected_gradient_matrix(self.lora_A, self.scale, self.projection_damping)
        draw = self.dropout.draw()
        if self.dropout.active and draw is None:  # inside torch.compile: plain dropout, ahead of the node
            x = self.dropout(x)
        out = FrozenDownProjection.apply(
            x.reshape(-1, x.shape[-1]),
            y.reshape(-1, y.shape[-1]),
            self.lora_A,
            self.lora_B,
            self.scale,
            draw,
            projection,
        )
        return out.view(y.shape)

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """Base and adapter as one autograd node (`lora.FusedLoRALinear`; A is frozen, so it
        keeps only `z`, never x, and the dropout mask is drawn again from its seed), or None (the
        machinery runs `forward`) where B's gradient is projected (`FrozenDownProjection` applies
        the projection) or dropout runs inside `torch.compile`."""
        if self.projected_grad or (self.dropout.active and torch.compiler.is_compiling()):
            return None
        return fused_lora_forward(x, base_layer, self.lora_A, self.lora_B, self.scale, self.dropout.draw())

    def shared_input_pair(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """`(A, B, s)` where this layer may run in one node with its siblings that read the same x
        (`lorakit.kernels.grouped_lora`; A frozen, so x is kept only for the siblings whose A
        trains); None while dropout draws a mask or B's gradient is projected."""
        if self.projected_grad or self.dropout.active:
            return None
        return self.lora_A, self.lora_B, self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, A frozen"


@register
@dataclass
class LoRAFA(LowRankConfig):
    """LoRA-FA (Zhang et al. 2023): LoRA with A frozen, saving only `z = x A^T` for backward.

    Attributes:
        r: rank of the update.
        alpha: scale numerator; `s = alpha / r` (or `alpha / sqrt(r)` with `rslora`).
        dropout: dropout on the adapter's input (its mask is drawn again in backward, never kept).
        rslora: rank-stabilised scale `alpha / sqrt(r)`.
        projected_grad: LoRA-FA v2: B's gradient becomes `g_B (A A^T + δI)^+ / s^2`.
        projection_damping: δ above (PEFT's LoRA-FA optimizer uses 1e-8).
    """

    projected_grad: bool = False
    projection_damping: float = 1e-8

    method = "lora-fa"
    # PEFT has no LoRA-FA adapter type; the saved tensors are a plain LoRA, which PEFT reads.
    peft_type = "LORA"

    def make_adapter(self, name: str, base_layer: nn.Module) -> LoRAFAAdapter:
        in_f, out_f = in_out_features(base_layer)
        _, device = weight_dtype_device(base_layer)
        r, scale = self.module_rank_scale(name)
        adapter = LoRAFAAdapter(
            in_f,
            out_f,
            r,
            scale,
            self.dropout,
            self.projected_grad,
            self.projection_damping,
            self.param_dtype,
            device,
        )
        return self.initialise(adapter, base_layer)

    @classmethod
    def matches_peft(cls, peft_config: dict[str, Any]) -> bool:
        # A PEFT "LORA" file does not say whether A was frozen: read it as plain LoRA. lorakit's
        # own lorakit.json (method "lora-fa") is what brings a LoRA-FA adapter back as LoRA-FA.
        return False
