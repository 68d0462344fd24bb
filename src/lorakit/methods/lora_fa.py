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
needed for dL/dx; it is saved packed to one bit per element (tokens x in / 8 bytes), never as x.

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
from ..kernels.fused_lora import fused_lora_forward
from .base import register
from .lora import LoRAPair, LowRankConfig, check_rank


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a `(n, d)` bool mask into `(n, ceil(d / 8))` uint8, eight elements per byte."""
    n, d = mask.shape
    pad = (-d) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(n, pad)], dim=1)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = mask.view(n, -1, 8).to(torch.uint8) << shifts
    return bits.sum(dim=-1, dtype=torch.uint8)  # distinct bits: the sum is their OR


def unpack_bits(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the `(n, d)` bool mask."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :d].bool()


class FrozenDownProjection(torch.autograd.Function):
    """`y = base_out + s · dropout(x) A^T B^T` with A frozen; saves `z = dropout(x) A^T` only.

    Inputs are 2-D: `x (n, in)`, `base_out (n, out)`, `A (r, in)`, `B (out, r)` (master dtype;
    computed in x's dtype), `scale`, dropout probability `p` (0 when not training), and
    `projection` (`(r, r)` fp32 matrix applied to B's gradient, or None).
    """

    @staticmethod
    def forward(ctx, x, base_out, lora_A, lora_B, scale: float, p: float, projection):
        a = lora_A.to(x.dtype)
        if p > 0:
            keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
            z = ((x * keep) @ a.T) * (1.0 / (1.0 - p))  # (n, r); the 1/(1-p) on the small side
            packed = pack_bits(keep)
        else:
            z = x @ a.T  # (n, r)
            packed = None
        y = torch.addmm(base_out, z, lora_B.to(x.dtype).T, alpha=scale)
        # A and B are the module's own tensors (no extra memory); z is the only new activation.
        ctx.save_for_backward(z, lora_A, lora_B, packed, projection)
        ctx.scale, ctx.p, ctx.in_features = scale, p, x.shape[1]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, lora_A, lora_B, packed, projection = ctx.saved_tensors
        dtype = grad_y.dtype
        grad_x = grad_base = grad_B = None
        if ctx.needs_input_grad[0]:
            factor = ctx.scale / (1.0 - ctx.p)
            grad_x = (grad_y @ (lora_B.to(dtype) * factor)) @ lora_A.to(dtype)  # (n, in), rank-r path
            if packed is not None:
                grad_x = grad_x * unpack_bits(packed, ctx.in_features)
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
        self.r, self.scale, self.dropout = r, scale, dropout
        self.projected_grad, self.projection_damping = projected_grad, projection_damping
        # A is a buffer, not a frozen Parameter: nothing (an optimizer, `requires_grad_(True)`)
        # can make it train by accident. It is saved with the adapter like any LoRA A.
        lora_A = torch.empty(r, in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.register_buffer("lora_A", lora_A)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        y = result
        p = self.dropout if self.training else 0.0
        projection = None
        if self.projected_grad and torch.is_grad_enabled():
            projection = projected_gradient_matrix(self.lora_A, self.scale, self.projection_damping)
        out = FrozenDownProjection.apply(
            x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), self.lora_A, self.lora_B, self.scale, p, projection
        )
        return out.view(y.shape)

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """Base and adapter as one autograd node (`lora.FusedLoRALinear`; A is frozen, so it
        keeps only `z`, never x), or None (the machinery runs `forward`) where dropout is active
        or B's gradient is projected: `FrozenDownProjection` keeps the packed dropout mask and
        applies the projection."""
        if (self.dropout > 0 and self.training) or self.projected_grad:
            return None
        return fused_lora_forward(x, None, base_layer, self.lora_A, self.lora_B, self.scale)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, A frozen"


@register
@dataclass
class LoRAFA(LowRankConfig):
    """LoRA-FA (Zhang et al. 2023): LoRA with A frozen, saving only `z = x A^T` for backward.

    Attributes:
        r: rank of the update.
        alpha: scale numerator; `s = alpha / r` (or `alpha / sqrt(r)` with `rslora`).
        dropout: dropout on the adapter's input (its mask is kept at one bit per element).
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
