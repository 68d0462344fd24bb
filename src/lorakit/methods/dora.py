r"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv 2402.09353).

::

        x ──────────────► W0 (frozen, out x in) ───────────┐
        │                                                 (+) ──► ⊙ m/n (out) ──► y
        └─► dropout ─► A (r x in) ─► B (out x r) ─► * s ───┘

    W' = m ⊙ (W0 + s B A) / n,      n = ||W0 + s B A||_c   (detached)
    y  = (m/n) ⊙ (x W0^T + s · dropout(x) A^T B^T) + bias

`||.||_c` is the norm of each OUTPUT row, taken over the input axis (`torch.linalg.norm(W, dim=1)`
in `(out, in)` layout): one value per output feature. The magnitude `m (out,)` trains and starts
at `||W0||_c`, B starts at zero, so W' = W0 at step 0. The direction's norm `n` is treated as a
constant in backward (paper section 4.3), as PEFT does.

The norm is computed without building `W0 + s B A` (factored norms, arXiv 2603.22276):

    n^2 = ||W0||^2 + 2 s <W0, B A> + s^2 ||B A||^2            (per output row)
    <W0, B A>_row = rowsum((W0 A^T) ⊙ B),   ||B A||^2_row = rowsum((B (A A^T)) ⊙ B)

with `||W0||^2` per row cached once (W0 is frozen), so a step costs one `W0 A^T` product and
O(out·r + r^2) more, instead of a dense (out x in) weight. Rows whose norm is below `NORM_EPS`
are clamped to it, so an all-zero row gives a zero output, not PEFT's NaN.

Dropout applies to the low-rank branch only, and the base matmul runs once:
`y = base + (m/n - 1) ⊙ base + (m/n) ⊙ s · dropout(x) A^T B^T`. PEFT and the official code
instead multiply `(m/n - 1)` by a SECOND base matmul of the dropped input; both agree when dropout
is off or in eval mode.

With other adapters active on the same layer, DoRA adds its own change `W' x - W0 x` to the running
output: its magnitude rescales its own direction `W0 + s B A`, not the other adapters' changes, so
several active adapters still sum their changes (as PEFT composes them). Merging follows the same
rule: DoRA is merged against W0, the others add to it; two DoRA adapters cannot merge into one
weight exactly and are refused (`lorakit.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..base_layers import dense_weight, in_out_features, weight_dtype_device
from .base import RankComponents, load_exact, register, svd_components
from .lora import LoRAAdapter, LowRankConfig, low_rank_update

NORM_EPS = 1e-6  # floor of a row norm: guards all-zero rows (PEFT divides 0 by 0 there)


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output row of an `(out, in)` weight, in float32, floored at `NORM_EPS`."""
    return torch.linalg.norm(weight.float(), dim=1).clamp_min(NORM_EPS)


def factored_row_norm(
    base_weight: torch.Tensor, base_row_sq_norm: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> torch.Tensor:
    """`||W0 + s B A||` per output row (float32, floored at `NORM_EPS`) without forming `B A`.

    `base_row_sq_norm` is `||W0||^2` per row. Only `W0 A^T` touches the full weight (in W0's dtype,
    so a bf16 base runs a bf16 GEMM); everything after it is `(out, r)` or `(r, r)`, in float32.
    """
    W_At = (base_weight @ lora_A.to(base_weight.dtype).T).float()  # (out, r)
    A, B = lora_A.float(), lora_B.float()
    cross = (W_At * B).sum(dim=1)  # <W0, B A> per row
    ba_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # ||B A||^2 per row
    sq = base_row_sq_norm.float() + (2.0 * scale) * cross + (scale * scale) * ba_sq
    # Rounding can push a true zero slightly negative; clamp before the square root.
    return sq.clamp_min(NORM_EPS * NORM_EPS).sqrt()


class DoRAAdapter(nn.Module):
    """A LoRA pair (`lora`, a `LoRAAdapter`) plus the magnitude `m (out,)` for one layer.

    `base_row_sq_norm` caches `||W0||^2` per output row (W0 is frozen); it is a non-persistent
    buffer, computed from the base weight when the adapter is built, so change the base weight
    after `adapt` only through `refresh_base_norm`.
    """

    # LoRA+ (lorakit.param_groups): m scales output rows directly, B's position; the inner
    # LoRAAdapter declares its own lora_B fast.
    loraplus_fast = ("magnitude",)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scale: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        in_f, out_f = in_out_features(base_layer)
        _, device = weight_dtype_device(base_layer)
        self.lora = LoRAAdapter(in_f, out_f, r, scale, dropout, dtype, device)
        self.register_buffer("base_row_sq_norm", None, persistent=False)  # float32 (out,)
        self.refresh_base_norm(base_layer)
        # m = ||W0||_c, so W' = W0 at step 0
        self.magnitude = nn.Parameter(self.base_row_sq_norm.sqrt().to(dtype))
        # The norm used at merge time, kept so that unmerge can invert the merge exactly.
        self.register_buffer("merged_norm", None, persistent=False)

    @torch.no_grad()
    def refresh_base_norm(self, base_layer: nn.Module) -> None:
        """Recompute the cached `||W0||^2` per row (needed only if the base weight changed)."""
        weight = dense_weight(base_layer).detach().float()
        self.base_row_sq_norm = weight.pow(2).sum(dim=1)

    @property
    def scale(self) -> float:
        return self.lora.scale

    @property
    def r(self) -> int:
        return self.lora.r

    @torch.no_grad()
    def set_initial_pair(self, lora_A: torch.Tensor, lora_B: torch.Tensor, base_layer: nn.Module) -> None:
        """Start the pair from `A`, `B` (LoftQ) with `m = ||W0 + s B A||_c`, so W' = W0 + s B A."""
        self.lora.set_initial_pair(lora_A, lora_B, base_layer)
        self.magnitude.copy_(self.weight_norm(base_layer))

    def weight_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """`n = ||W0 + s B A||_c`, detached (no gradient flows through the norm)."""
        return factored_row_norm(
            dense_weight(base_layer).detach(),
            self.base_row_sq_norm,
            self.lora.lora_A.detach(),
            self.lora.lora_B.detach(),
            self.scale,
        )

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        z = self.lora.dropout.down_projection(x, self.lora.lora_A.to(x.dtype))  # dropout(x) A^T, (..., r)
        direction = low_rank_update(base_out, z, self.lora.lora_B.to(x.dtype), self.scale)  # base + s z B^T
        mag_norm = (self.magnitude / self.weight_norm(base_layer)).to(x.dtype)  # (out,)
        bias = getattr(base_layer, "bias", None)
        if bias is None:
            own = direction * mag_norm
        else:
            # The bias is not part of W0: (m/n)(x W0^T + b + s...) + (1 - m/n) b = (m/n)(x W0^T + s...) + b
            own = torch.addcmul(bias.to(x.dtype) * (1 - mag_norm), direction, mag_norm)
        if result is base_out:
            return own
        # with other active adapters: DoRA adds its own change W' x - W0 x to the running output
        return result + (own - base_out)

    def change_parts(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """The change `W' x - W0 x` in two parts that add up to it (for `lorakit explain`):

        magnitude:  (m/n - 1) ⊙ W0 x        the base path's rows rescaled by the magnitude
        direction:  (m/n) ⊙ s · B A x       the low-rank turn of the rows, rescaled with them
        """
        z = self.lora.dropout(x) @ self.lora.lora_A.to(x.dtype).T
        turn = low_rank_update(torch.zeros_like(base_out), z, self.lora.lora_B.to(x.dtype), self.scale)
        mag_norm = (self.magnitude / self.weight_norm(base_layer)).to(x.dtype)
        bias = getattr(base_layer, "bias", None)
        base_path = base_out if bias is None else base_out - bias.to(base_out.dtype)
        return {"magnitude": base_path * (mag_norm - 1), "direction": turn * mag_norm}

    @torch.no_grad()
    def rank_components(self, base_layer: nn.Module) -> RankComponents:
        """The direction part's components: the singular components of `diag(m/n) s B A`."""
        mag_norm = (self.magnitude.float() / self.weight_norm(base_layer)).to(self.lora.lora_B.dtype)
        return svd_components("direction", self.scale * mag_norm[:, None] * self.lora.lora_B, self.lora.lora_A)

    def merged_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(W', n)`: `W' = m/n ⊙ (W0 + s B A)` in float32 for the `(out, in)` base weight `W0`."""
        A, B = self.lora.lora_A.float(), self.lora.lora_B.float()
        direction = weight.float() + self.scale * (B.to(weight.device) @ A.to(weight.device))
        norm = row_norm(direction)
        return direction * (self.magnitude.float().to(weight.device) / norm)[:, None], norm

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        merged, _ = self.merged_weight(base_weight)
        return (merged - base_weight.float()).to(base_weight.dtype)

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        merged, norm = self.merged_weight(weight)
        self.merged_norm = norm
        return merged.to(weight.dtype)

    def unmerge(self, weight: torch.Tensor) -> torch.Tensor:
        """`W0 = W' ⊙ n/m - s B A`, with the norm cached by `merge`.

        A row whose magnitude is exactly 0 merged to zero and lost its direction; it unmerges to
        `-s B A`, which is exact for the row the epsilon guards (W0 + s B A = 0). The cached norm
        is kept (`unmerge` is also used as a pure function, e.g. for `delta_weight` while merged).
        """
        if self.merged_norm is None:
            raise RuntimeError("DoRA unmerge needs the norm cached by merge; this adapter was not merged")
        magnitude = self.magnitude.float().to(weight.device)
        inverse = torch.where(magnitude != 0, self.merged_norm / magnitude, torch.zeros_like(magnitude))
        A, B = self.lora.lora_A.float(), self.lora.lora_B.float()
        base = weight.float() * inverse[:, None] - self.scale * (B.to(weight.device) @ A.to(weight.device))
        return base.to(weight.dtype)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.lora.peft_state_dict(), "lora_magnitude_vector": self.magnitude}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_exact(self, self.peft_state_dict(), state)

    def extra_repr(self) -> str:
        return f"out={self.magnitude.shape[0]}"


@register
@dataclass
class DoRA(LowRankConfig):
    """DoRA (Liu et al. 2024): `W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_c`, `s = alpha / r`.

    `||.||_c` is the norm of each output row (over the input axis); `m (out,)` trains and starts
    at the row norms of W0. Saved as PEFT's `LoraConfig(use_dora=True)`.

    Attributes:
        r: rank of the low-rank direction update.
        alpha: scale numerator; `s = alpha / r` (or `alpha / sqrt(r)` with `rslora`).
        dropout: dropout on the low-rank branch's input.
        rslora: rank-stabilised scale `alpha / sqrt(r)`.
    """

    method = "dora"
    peft_type = "LORA"
    peft_use_dora = True

    def make_adapter(self, name: str, base_layer: nn.Module) -> DoRAAdapter:
        r, scale = self.module_rank_scale(name)
        return self.initialise(DoRAAdapter(base_layer, r, scale, self.dropout, self.param_dtype), base_layer)
