"""NF4 format: code books, bit-exact agreement with bitsandbytes (stored state and its reference
dequantization; tests/bnb_reference.py says why not its native CPU kernel everywhere), dequantization paths,
memory."""

from __future__ import annotations

import pytest
import torch

from bnb_reference import (
    native_kernel_is_exact,
    reference_dequantize_4bit,
    reference_dequantize_blockwise,
    reference_kernels,
)
from lorakit.quant import Linear4bit, bits_per_parameter, nf4
from lorakit.quant.triton_kernels import dequantize, triton_available

# exact float32 values of bitsandbytes' get_4bit_type("nf4") (METHODS.md, section 6)
NF4_REFERENCE = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

SHAPES = [(64, 64), (100, 70), (33, 17), (7,), (257, 300), (3, 5, 11), (512, 128)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_normal_map_is_bitsandbytes_code_book():
    code = nf4.create_normal_map()
    assert torch.equal(code, torch.tensor(NF4_REFERENCE, dtype=torch.float32))
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1


def test_dynamic_map_shape_and_range():
    code = nf4.create_dynamic_map(signed=True)
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, no duplicates
    assert code.max() == 1.0 and code.min() > -1.0 and (code == 0).sum() == 1


def test_packing_first_element_in_high_nibble():
    # one block: 1.0 -> code 15, -1.0 -> code 0, 0 -> code 7
    w = torch.tensor([1.0, -1.0, 0.0, 1.0] + [0.0] * 60)
    q = nf4.quantize_nf4(w, double_quant=False)
    assert q.packed[0].item() == (15 << 4) | 0
    assert q.packed[1].item() == (7 << 4) | 15


def test_ties_go_to_the_lower_code():
    code = nf4.create_normal_map()
    midpoint = ((code[8] + code[9]) / 2).item()
    w = torch.tensor([midpoint, 1.0] + [0.0] * 62)  # absmax 1: the value is scaled by 1
    q = nf4.quantize_nf4(w, double_quant=False)
    assert q.packed[0].item() >> 4 == 8


def test_zero_block():
    q = nf4.quantize_nf4(torch.zeros(128), double_quant=False)
    assert torch.equal(q.absmax, torch.zeros(2))
    assert torch.equal(q.dequantize(), torch.zeros(128))


@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_is_small(double_quant):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    back = nf4.quantize_nf4(w, double_quant=double_quant).dequantize()
    assert ((back - w).norm() / w.norm()).item() < 0.12


# --- bit-exact agreement with bitsandbytes ----------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_with_bitsandbytes(shape, dtype, double_quant):
    """What bitsandbytes stores (packed codes, absmax, nested statistics) is bit-identical, and so are the
    dequantized values of its reference implementation (and of its native kernel where that is exact)."""
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(SHAPES.index(shape) * 10 + DTYPES.index(dtype) * 2 + double_quant)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    mine = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert torch.equal(mine.packed, packed.view(-1))
    if double_quant:
        assert torch.equal(mine.absmax, state.absmax)  # the 8-bit codes of the block maxima
        assert torch.equal(mine.absmax_scale, state.state2.absmax)
        assert torch.equal(mine.absmax_offset, state.offset)
        assert torch.equal(
            mine.block_absmax(), reference_dequantize_blockwise(state.absmax, state.state2) + state.offset
        )
    else:
        assert torch.equal(mine.absmax, state.absmax)
    ours = mine.dequantize()
    reference = reference_dequantize_4bit(packed, state)
    assert ours.dtype == reference.dtype == dtype
    assert torch.equal(ours.reshape(-1), reference.reshape(-1))
    if native_kernel_is_exact(shape, 64):
        assert torch.equal(ours.reshape(-1), F.dequantize_4bit(packed, state).reshape(-1))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_bit_exact_other_blocksizes(blocksize):
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(blocksize))
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=True)
    mine = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=True)
    assert torch.equal(mine.packed, packed.view(-1)) and torch.equal(mine.absmax, state.absmax)
    assert torch.equal(mine.dequantize(), reference_dequantize_4bit(packed, state))


# Shapes whose rows are a multiple of 16 but not of the block size: bitsandbytes 0.50.2's native CPU kernel
# is wrong on these when the CPU has AVX-512 (docs/bitsandbytes-cpu-dequantize-4bit.md).
STRADDLING_SHAPES = [(32, 32), (16, 48), (8, 80), (32, 96)]


@pytest.mark.parametrize("shape", STRADDLING_SHAPES)
def test_bit_exact_where_blocks_straddle_rows(shape):
    """lorakit equals bitsandbytes' reference on the shapes its native AVX-512 kernel gets wrong (the tiny
    test models' 32-wide layers are such shapes)."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    for double_quant in (False, True):
        packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
        mine = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)
        assert torch.equal(mine.packed, packed.view(-1))
        assert torch.equal(mine.dequantize(), reference_dequantize_4bit(packed, state))


def test_native_kernel_agrees_with_reference_where_documented():
    """The claim the tests rely on, checked on this machine's own kernel: bitsandbytes' native CPU dequantization
    equals its reference wherever `native_kernel_is_exact` says so (whatever the CPU's vector extensions), and
    `reference_kernels()` really routes bitsandbytes' public call to the reference (and back afterwards)."""
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(0)
    checked = 0
    for blocksize in (32, 64, 128):
        for rows in (1, 3, 8):
            for row_length in range(2, 260, 2 if blocksize == 64 else 6):
                shape = (rows, row_length)
                if not native_kernel_is_exact(shape, blocksize):
                    continue
                packed, state = F.quantize_4bit(torch.randn(shape, generator=g), quant_type="nf4", blocksize=blocksize)
                assert torch.equal(F.dequantize_4bit(packed, state), reference_dequantize_4bit(packed, state)), shape
                checked += 1
    assert checked > 20
    packed, state = F.quantize_4bit(torch.randn(32, 32, generator=g), quant_type="nf4", blocksize=64)
    native_registration = torch._C._dispatch_dump("bitsandbytes::dequantize_4bit")
    with reference_kernels():
        assert "bnb_reference.py" in torch._C._dispatch_dump("bitsandbytes::dequantize_4bit")
        inside = F.dequantize_4bit(packed, state)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).view(-1).long()  # high nibble first
    naive = (torch.tensor(NF4_REFERENCE)[codes].view(-1, 64) * state.absmax.view(-1, 1)).view(32, 32)
    assert torch.equal(inside, naive)
    assert torch._C._dispatch_dump("bitsandbytes::dequantize_4bit") == native_registration  # restored


def test_nested_statistics_bit_exact_near_code_midpoints():
    # bitsandbytes' 8-bit CPU quantizer bins values before choosing a code; values near the
    # midpoint between two dynamic codes are where a plain nearest-code search would differ
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.rand(50_000, generator=torch.Generator().manual_seed(3)) * 0.2 - 0.05
    codes, state = F.quantize_blockwise(x, blocksize=256)
    mine, absmax = nf4.quantize_blockwise_8bit(x, 256)
    assert torch.equal(mine, codes) and torch.equal(absmax, state.absmax)


# --- dequantization paths -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_matches_reference_on_cpu(dtype):
    q = nf4.quantize_nf4(torch.randn(130, 66, generator=torch.Generator().manual_seed(0)))
    out = dequantize(q.packed, q.block_absmax(), q.shape, q.blocksize, dtype)
    assert torch.equal(out, q.dequantize(dtype))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (7,), (300, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_matches_torch(shape, dtype, monkeypatch):
    # On a machine without CUDA, run the kernel in Triton's interpreter on CPU tensors.
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lorakit.quant import triton_kernels

    triton_kernels._kernel.cache_clear()  # jit again under the interpreter setting
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = nf4.quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device))
    out = triton_kernels.dequantize_nf4_triton(q.packed, q.block_absmax(), q.shape, q.blocksize, dtype)
    triton_kernels._kernel.cache_clear()
    assert torch.equal(out, q.dequantize(dtype))


# --- the layer's memory -------------------------------------------------------------------------


def test_bits_per_parameter_large_layer():
    layer = Linear4bit(torch.randn(4096, 4096) * 0.02, double_quant=True)
    bits = bits_per_parameter(layer)
    assert 4.12 < bits <= 4.13
    assert bits_per_parameter(Linear4bit(torch.randn(2048, 4096) * 0.02, double_quant=False)) == pytest.approx(
        4.5, abs=1e-3
    )
    assert bits_per_parameter(torch.nn.Linear(64, 64, bias=False)) == 32.0


def test_half_keeps_fp32_statistics():
    layer = Linear4bit(torch.randn(64, 128))
    before = layer.dense_weight(torch.float32)
    layer.half()
    assert layer.weight_absmax_scale.dtype == torch.float32 and layer.weight_absmax_offset.dtype == torch.float32
    assert torch.equal(layer.dense_weight(torch.float32), before)
