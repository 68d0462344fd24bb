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
streamed loader) and kept on the 4-bit layer as its `residual_factors` (`base_layers`) until the
adapter takes them (`lorakit.methods.lora.loftq_pair` makes the pair):
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
