r"""LoftQ initialisation: start the adapter where the quantization error is (Li et al. 2023, arXiv 2310.08659).

QLoRA starts from `Q(W)` with `B = 0`, so training begins with the full rounding error
`W - Q(W)` in every layer. LoftQ instead chooses the 4-bit weight and the low-rank pair jointly,

    min_{Q, A, B}  || W - Q - s·B·A ||_F ,

alternating `Q = NF4(W - s·B·A)` and `s·B·A = SVD_r(W - Q)`. lorakit takes one alternation
step from `B·A = 0` (as PEFT's `replace_lora_weights_loftq` does):

    Q = NF4(W),    W - deq(Q) = U Σ V^T,    s·B·A = U_r Σ_r V_r^T

so the 4-bit base stays exactly `NF4(W)`: it is still re-quantized deterministically from the
original weights when an adapter is loaded, and the adapter file alone carries the
initialisation (in its trained A and B). By Eckart-Young the start is the closest a rank-r
update can get to the full-precision layer: the remaining error is `sqrt(Σ_{i>r} σ_i^2)`.

The split of `U_r Σ_r V_r^T` into the pair is balanced, as in the paper and PEFT:
`B = U_r Σ_r^{1/2} / sqrt(s)`, `A = Σ_r^{1/2} V_r^T / sqrt(s)`, so that `s·B·A` is the
truncated SVD for any scale `s` (PEFT assigns `B = U_r Σ_r^{1/2}`, `A = Σ_r^{1/2} V_r^T`, which
is the same pair when `lora_alpha == r`).

The factors are computed where the full-precision weight exists (while quantizing, also in the
streamed loader) and kept on the 4-bit layer until the adapter takes them:
`lorakit.quantize(model, loftq_rank=r)` then `lorakit.adapt(model, LoRA(r=r, init="loftq"))`.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def residual_factors(weight: torch.Tensor, dequantized: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(L, R)` with `L @ R` the best rank-`rank` approximation of `weight - dequantized`.

    `L = U_r Σ_r^{1/2}` is `(out, rank)` and `R = Σ_r^{1/2} V_r^T` is `(rank, in)`, in float32,
    the singular values in decreasing order (so `L[:, :k] @ R[:k]` is the best rank-k one too).
    """
    if rank <= 0:
        raise ValueError(f"LoftQ rank must be positive, got {rank}")
    residual = weight.float() - dequantized.float()
    rank = min(rank, *residual.shape)
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).contiguous(), (root[:, None] * Vh[:rank]).contiguous()


def lora_pair(base_layer: torch.nn.Module, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's `(A (r, in), B (out, r))` for a 4-bit layer quantized with `loftq_rank >= r`.

    `s·B·A` equals the rank-`r` truncated SVD of the layer's quantization error.
    """
    factors = getattr(base_layer, "residual_factors", None)
    if factors is None:
        raise ValueError(
            'init="loftq" starts the adapter from the quantization error of a 4-bit base, which must be '
            "kept when quantizing: lorakit.quantize(model, loftq_rank=r) or "
            f"load_quantized_causal_lm(..., loftq_rank=r) (this layer is a {type(base_layer).__name__}"
            f"{' without kept factors' if hasattr(base_layer, 'residual_factors') else ''})"
        )
    L, R = factors
    if L.shape[1] < r and L.shape[1] < min(L.shape[0], R.shape[1]):
        raise ValueError(f'init="loftq" with r={r}, but the base was quantized with loftq_rank={L.shape[1]}: use loftq_rank >= r')
    root = scale ** 0.5
    A = torch.zeros(r, R.shape[1], dtype=torch.float32, device=R.device)
    B = torch.zeros(L.shape[0], r, dtype=torch.float32, device=L.device)
    k = min(r, L.shape[1])  # a layer narrower than r has only k singular directions
    A[:k], B[:, :k] = R[:k] / root, L[:, :k] / root
    return A, B
