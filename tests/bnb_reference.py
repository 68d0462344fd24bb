"""bitsandbytes as a test reference: what it stores, its reference dequantization, its native CPU kernel.

bitsandbytes dequantizes NF4 on the CPU with a native kernel (libbitsandbytes_cpu) and also ships a plain
PyTorch implementation (its "default" backend) that serves as the reference. On CPUs with AVX-512 the native
kernel of bitsandbytes 0.50.2 returns wrong values for some shapes: a weight whose rows are a multiple of 16
elements long but not a multiple of the block size (so that blocks straddle rows), e.g. a 32 x 32 weight in
64-blocks (docs/bitsandbytes-cpu-dequantize-4bit.md has the reproduction). Tests therefore compare

- what bitsandbytes stores (packed codes, absmax, the nested statistics) bit for bit,
- dequantized values against the reference implementation, on every shape,
- dequantized values against the native kernel only on shapes where it is known to agree
  (`native_kernel_is_exact`); `reference_kernels()` keeps the native kernel out of the way for code that
  calls it internally (bitsandbytes' Linear4bit, PEFT over bitsandbytes).

Imported as a plain module by the tests (pytest puts tests/ on the path); imports bitsandbytes lazily so
that a machine without it skips only the tests that need it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch


def _reference_ops():
    """bitsandbytes' default-backend (pure PyTorch) dequantization functions, uncompiled."""
    from bitsandbytes.backends.default import ops
    from bitsandbytes.backends.utils import _get_4bit_code

    # bitsandbytes wraps them in torch.compile (one compilation per shape); the reference needs none of it
    dequantize_4bit = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)
    dequantize_8bit = getattr(ops._dequantize_blockwise_compute, "__wrapped__", ops._dequantize_blockwise_compute)

    def dequantize_4bit_op(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return dequantize_4bit(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    def dequantize_blockwise_op(A, absmax, code, blocksize: int, dtype):
        return dequantize_8bit(A.reshape(-1), absmax, code, blocksize, dtype).reshape(A.shape)

    return dequantize_4bit_op, dequantize_blockwise_op


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within the block, bitsandbytes dequantizes on the CPU with its reference implementation instead of its
    native kernel (the dispatcher's CPU entries are overridden, then restored on exit)."""
    dequantize_4bit_op, dequantize_blockwise_op = _reference_ops()
    import bitsandbytes  # noqa: F401  (registers the bitsandbytes:: operators first)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel" is the point
        library = torch.library.Library("bitsandbytes", "IMPL")
        library.impl("dequantize_4bit", dequantize_4bit_op, "CPU")
        library.impl("dequantize_blockwise", dequantize_blockwise_op, "CPU")
    try:
        yield
    finally:
        library._destroy()  # the native kernels are registered again


def reference_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit(packed, state)`, computed by its reference implementation."""
    import bitsandbytes.functional as F

    with reference_kernels():
        return F.dequantize_4bit(packed, state)


def native_kernel_is_exact(shape: Sequence[int], blocksize: int) -> bool:
    """Shapes on which bitsandbytes' native CPU dequantize_4bit is known to equal its reference everywhere:
    rows a whole number of blocks long (measured on AVX-512 and on other CPUs), or an odd row length
    (bitsandbytes sends those to the reference implementation itself)."""
    row = shape[-1]
    return row % blocksize == 0 or row % 2 == 1


def reference_dequantize_blockwise(codes: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' 8-bit `dequantize_blockwise(codes, state)` (the nested statistics), by its reference."""
    import bitsandbytes.functional as F

    with reference_kernels():
        return F.dequantize_blockwise(codes, state)
