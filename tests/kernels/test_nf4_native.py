"""lorakit's native CPU kernel for NF4 dequantization (kernels/_nf4_native.c through kernels/nf4_native.py): built
and loaded wherever a C compiler exists, bit for bit equal to the PyTorch path (every code path of the CPU,
fp32/bf16/fp16, odd sizes, special values, threads) and to bitsandbytes."""

from __future__ import annotations

import shutil

import pytest
import torch

from bnb_reference import native_kernel_is_exact, reference_dequantize_4bit
from lorakit.kernels import nf4_native as native
from lorakit.quant import nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel not built: {native.load_error()}")

# (weights, blocksize): a padded last block, odd counts (the last byte half used), one weight, blocks
# of every even size from 2 up, blocks larger than the tensor
CASES = [
    (1, 64),
    (2, 64),
    (3, 64),
    (31, 64),
    (63, 64),
    (64, 64),
    (65, 64),
    (127, 64),
    (130, 64),
    (561, 64),
    (4096, 64),
    (4097, 64),
    (1000, 32),
    (999, 128),
    (1537, 256),
    (5000, 4096),
    (70, 2),
    (90, 6),
    (333, 34),
    (250, 100),
    (1001, 66),
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.fixture(params=native.ISAS)
def isa(request, monkeypatch):
    """Each code path of the kernel, forced (skipped where the CPU or the build lacks it)."""
    if request.param not in native.supported_isas():
        pytest.skip(f"this CPU does not run the {request.param} path")
    monkeypatch.setenv("LORAKIT_NF4_ISA", request.param)
    monkeypatch.delenv("LORAKIT_NATIVE", raising=False)
    return request.param


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the native kernel made by nf4.dequantize_nf4."""
    counted = []
    real = native.dequantize

    def spy(*args, **kwargs):
        counted.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "dequantize", spy)
    return counted


def test_native_library_is_built_where_a_compiler_exists():
    """An install on a machine with a C compiler must build the kernel: no silent fallback in CI."""
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine")
    assert native.available(), native.load_error()
    assert native.library_path().parent.name == "kernels"
    assert native.supported_isas()[0] == "scalar" and native.isa() in native.supported_isas()


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_with_torch_path(isa, dtype, calls):
    g = torch.Generator().manual_seed(DTYPES.index(dtype))
    for i, (n, blocksize) in enumerate(CASES):
        w = torch.randn(n, generator=g) * torch.rand(1, generator=g).item() * 4
        q = nf4.quantize_nf4(w, blocksize, double_quant=i % 2 == 0)
        absmax = q.block_absmax()
        expected = nf4.dequantize_nf4_torch(q.packed, absmax, q.shape, blocksize, dtype)
        got = nf4.dequantize_nf4(q.packed, absmax, q.shape, blocksize, dtype)
        assert same_bits(got, expected), (isa, n, blocksize)
    assert len(calls) == len(CASES)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_bit_exact(isa, dtype):
    """Scales of every magnitude and class: inf, NaN (with payloads), zeros, fp32 subnormals, products
    that are fp16/bf16 subnormals, that overflow fp16, that round to even; random bit patterns."""
    g = torch.Generator().manual_seed(7)
    blocks, blocksize = 700, 64
    n = blocks * blocksize - 3
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    absmax = (
        torch.randint(-(2**31), 2**31 - 1, (blocks,), dtype=torch.int64, generator=g)
        .to(torch.int32)
        .view(torch.float32)
        .clone()
    )
    special = [
        float("inf"),
        -float("inf"),
        float("nan"),
        -float("nan"),
        0.0,
        -0.0,
        1e-40,
        1e-45,
        2.0**-24,
        2.0**-25,
        6.1e-5,
        65504.0,
        65520.0,
        7e4,
        3e38,
        1.0,
        0.02,
    ]
    absmax[: len(special)] = torch.tensor(special)
    absmax[20:22] = torch.tensor([0x7F812345, 0x7FBFFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    absmax[100:600] = torch.rand(500, generator=g) * torch.pow(2.0, torch.randint(-30, 18, (500,), generator=g).float())
    expected = nf4.dequantize_nf4_torch(packed, absmax, (n,), blocksize, dtype)
    got = native.dequantize(packed, absmax, n, blocksize, dtype, nf4.code_table("nf4"))
    assert same_bits(got, expected)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_on_threads(dtype, monkeypatch):
    """Large tensors are split into chunks of whole blocks on torch's threads; the result is the same."""
    monkeypatch.delenv("LORAKIT_NF4_ISA", raising=False)
    monkeypatch.setattr(native, "MIN_WEIGHTS_PER_THREAD", 1000)
    threads = torch.get_num_threads()
    w = torch.randn(97, 103, generator=torch.Generator().manual_seed(3))  # 9991 weights, 157 blocks
    q = nf4.quantize_nf4(w)
    expected = nf4.dequantize_nf4_torch(q.packed, q.block_absmax(), q.shape, q.blocksize, dtype)
    try:
        for count in (2, 3, 5):
            torch.set_num_threads(count)
            assert same_bits(q.dequantize(dtype), expected), count
    finally:
        torch.set_num_threads(threads)
    assert native._pool is not None and native._pool._max_workers >= 4


@needs_native
def test_default_threshold_splits_a_large_layer(monkeypatch):
    monkeypatch.delenv("LORAKIT_NF4_ISA", raising=False)
    pools = []
    real = native._executor
    monkeypatch.setattr(native, "_executor", lambda workers: pools.append(workers) or real(workers))
    threads = torch.get_num_threads()
    q = nf4.quantize_nf4(
        torch.randn(1024, 2 * native.MIN_WEIGHTS_PER_THREAD // 1024 + 3, generator=torch.Generator().manual_seed(4))
    )
    expected = nf4.dequantize_nf4_torch(q.packed, q.block_absmax(), q.shape, q.blocksize, torch.bfloat16)
    try:
        torch.set_num_threads(2)
        assert same_bits(q.dequantize(torch.bfloat16), expected)
    finally:
        torch.set_num_threads(threads)
    assert pools == [1]  # two chunks: one on the calling thread, one in the pool


@needs_native
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_with_bitsandbytes(dtype, double_quant, calls):
    """bitsandbytes' own packed codes and statistics, dequantized by lorakit's native kernel, equal bitsandbytes'
    native kernel (on rows of whole blocks, where that one is exact: tests/bnb_reference.py) and its reference
    implementation."""
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(11)
    for shape in [(64, 64), (96, 576), (33, 17), (7,), (40, 66), (3, 5, 11)]:
        w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
        absmax = nf4.block_absmax(state.absmax, state.state2.absmax, state.offset) if double_quant else state.absmax
        ours = nf4.dequantize_nf4(packed.view(-1), absmax, shape, 64, dtype)
        assert same_bits(ours, reference_dequantize_4bit(packed, state).view(shape)), shape
        if shape[-1] % 64 == 0 and native_kernel_is_exact(shape, 64):  # odd rows: bitsandbytes compiles its reference
            assert same_bits(ours, F.dequantize_4bit(packed, state).view(shape)), shape
    assert len(calls) == 6


@needs_native
def test_switches(monkeypatch, calls):
    q = nf4.quantize_nf4(torch.randn(40, 64, generator=torch.Generator().manual_seed(5)))
    expected = nf4.dequantize_nf4_torch(q.packed, q.block_absmax(), q.shape, q.blocksize, torch.bfloat16)
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    assert same_bits(q.dequantize(torch.bfloat16), expected) and not calls and not native.enabled()
    monkeypatch.setenv("LORAKIT_NATIVE", "1")
    assert same_bits(q.dequantize(torch.bfloat16), expected) and len(calls) == 1
    monkeypatch.setenv("LORAKIT_NF4_ISA", "sse9")
    with pytest.raises(RuntimeError, match="expected one of"):
        q.dequantize(torch.bfloat16)
    missing = [name for name in native.ISAS if name not in native.supported_isas()]
    if missing:
        monkeypatch.setenv("LORAKIT_NF4_ISA", missing[0])
        with pytest.raises(RuntimeError, match="cannot run"):
            q.dequantize(torch.bfloat16)


@needs_native
def test_other_inputs(calls):
    """Non-contiguous codes and bf16 scales go native (same bits); fp64 output, autograd through the scales,
    and codes stored in another dtype take the PyTorch path."""
    q = nf4.quantize_nf4(torch.randn(30, 64, generator=torch.Generator().manual_seed(6)), double_quant=False)
    strided = torch.stack([q.packed, torch.zeros_like(q.packed)], dim=1)[:, 0]
    assert not strided.is_contiguous()
    half_scales = q.absmax.to(torch.bfloat16)
    for packed, absmax in [(strided, q.absmax), (q.packed, half_scales)]:
        assert same_bits(
            nf4.dequantize_nf4(packed, absmax, q.shape, 64, torch.float16),
            nf4.dequantize_nf4_torch(packed, absmax, q.shape, 64, torch.float16),
        )
    assert len(calls) == 2
    assert torch.equal(
        nf4.dequantize_nf4(q.packed, q.absmax, q.shape, 64, torch.float64),
        nf4.dequantize_nf4_torch(q.packed, q.absmax, q.shape, 64, torch.float64),
    )
    scales = q.absmax.clone().requires_grad_()
    out = nf4.dequantize_nf4(q.packed, scales, q.shape, 64, torch.float32)
    assert out.requires_grad
    assert len(calls) == 2


def test_torch_path_when_the_library_is_missing(monkeypatch, calls):
    monkeypatch.setattr(native, "_library", lambda: None)
    assert not native.available() and not native.enabled()
    q = nf4.quantize_nf4(torch.randn(10, 70, generator=torch.Generator().manual_seed(8)))
    assert same_bits(
        q.dequantize(torch.bfloat16),
        nf4.dequantize_nf4_torch(q.packed, q.block_absmax(), q.shape, q.blocksize, torch.bfloat16),
    )
    assert not calls
