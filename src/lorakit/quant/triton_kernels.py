"""NF4 dequantization on the GPU with Triton; plain PyTorch everywhere else.

Triton is optional: it is imported only when a CUDA tensor is dequantized (or when a test runs
the kernel in Triton's interpreter, `TRITON_INTERPRET=1`, on CPU tensors). Without Triton or
without CUDA, `dequantize` uses the vectorized PyTorch path of `nf4.dequantize_nf4`; both give
identical values (one fp32 product per weight, rounded once to the output dtype).

The kernel reads each packed byte once and writes its two weights: the high nibble is the even
element, the low nibble the odd one. The per-block absmax arrives already decoded to fp32 (for
double quantization that decode touches 1/64 of the data and runs in PyTorch, which keeps its
multiply and add separately rounded exactly as bitsandbytes does).
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache

import torch

from .nf4 import code_table, dequantize_nf4

BYTES_PER_PROGRAM = 1024


def triton_available() -> bool:
    """True when the `triton` package can be imported (it is not a lorakit dependency)."""
    return importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize_kernel(
        packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr
    ):
        byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
        even = byte * 2
        odd = even + 1
        packed = tl.load(packed_ptr + byte, mask=even < n, other=0).to(tl.int32)
        # BLOCKSIZE is even, so both weights of a byte share one block
        scale = tl.load(absmax_ptr + even // BLOCKSIZE, mask=even < n, other=0.0)
        high = tl.load(code_ptr + (packed >> 4)) * scale
        low = tl.load(code_ptr + (packed & 15)) * scale
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # fp32 -> bf16 rounded to nearest even in integer ops: the same bits on a GPU and in
            # Triton's interpreter (whose own conversion truncates)
            high_bits = high.to(tl.uint32, bitcast=True)
            low_bits = low.to(tl.uint32, bitcast=True)
            high_bits = (high_bits + 0x7FFF + ((high_bits >> 16) & 1)) >> 16
            low_bits = (low_bits + 0x7FFF + ((low_bits >> 16) & 1)) >> 16
            high_out = high_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            low_out = low_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            high_out = high.to(out_ptr.dtype.element_ty)
            low_out = low.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + even, high_out, mask=even < n)
        tl.store(out_ptr + odd, low_out, mask=odd < n)

    return nf4_dequantize_kernel


def dequantize_nf4_triton(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """`nf4.dequantize_nf4` as one Triton kernel (CUDA, or CPU under `TRITON_INTERPRET=1`)."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    code = code_table("nf4", packed.device)
    grid = (math.ceil(packed.numel() / BYTES_PER_PROGRAM),)
    _kernel()[grid](
        packed.reshape(-1), absmax.float().contiguous(), code, out, n, BLOCKSIZE=blocksize, BYTES=BYTES_PER_PROGRAM
    )
    return out.view(shape)


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense weight from packed NF4 and fp32 block absmax (into `out` when given): Triton on CUDA when available."""
    if packed.is_cuda and triton_available():
        dense = dequantize_nf4_triton(packed, absmax, shape, blocksize, dtype)
        return dense if out is None else out.copy_(dense)
    return dequantize_nf4(packed, absmax, shape, blocksize, dtype, out)
