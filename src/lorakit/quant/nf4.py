r"""4-bit NormalFloat (NF4) blockwise quantization, bit-exact with bitsandbytes (QLoRA).

A weight is flattened and cut into blocks of `blocksize` (64) values; each block keeps its
absolute maximum and stores every value as the 4-bit index of the nearest NF4 code of
`value / absmax`::

    w (n floats) ─► blocks of 64 ─► absmax_b = max |w|  ─► code index = nearest(w / absmax_b)
                                          │                         │
                                          │                 two per byte, first in the HIGH nibble
                                          ▼
               double quantization: (absmax - mean) in blocks of 256 ─► 8-bit dynamic codes
                                    + one fp32 scale per 256 blocks + the mean (one float)

    dequantize:  w ≈ NF4[index] * absmax_b,    absmax_b = DYNAMIC[code_b] * scale + mean

Storage with double quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.

Every rounding step follows bitsandbytes 0.50 on CPU so that packed codes, statistics and
dequantized values are identical bit for bit:

- 4-bit: full blocks are scaled by the reciprocal `w * (1 / absmax)` (absmax clamped to 1e-38 so a
  zero block maps to code 0.0), the trailing partial block by a division `w / absmax`; the result
  is clamped to [-1, 1] and bucketized on the fp32 midpoints of the code book (a tie goes to the
  lower code). An odd element count is padded with one zero code.
- 8-bit (absmax statistics): `value * (1 / absmax)`, clamped, goes through bitsandbytes' table of
  65536 bins over [-1, 1] (each bin holds the code nearest to its centre), so a value close to a
  midpoint may take the neighbouring code; a block of zeros gets code 0.
- dequantization multiplies in fp32 and rounds once to the output dtype.

Dequantization on the CPU runs lorakit's native kernel (`lorakit.kernels.nf4_native`, `_nf4_native.c`) when it was
compiled at install time; `LORAKIT_NATIVE=0` forces the PyTorch path (same bits) and
`LORAKIT_NF4_ISA=scalar|avx2|avx512|avx512vbmi` one of the kernel's code paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import nf4_native as native

NF4_OFFSET = 0.9677083
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
_LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' 8-bit CPU quantizer


def create_normal_map(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 codes, computed as bitsandbytes' `create_normal_map(offset)` does.

    8 positive quantiles of N(0, 1) between `offset` and 0.5, 7 negative ones, an exact zero,
    normalised so the largest is 1. Quantile points come from an fp32 `linspace`, the quantile
    function runs in float64, and the values are rounded to fp32 before normalising, as there.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    values = torch.cat([positive, torch.zeros(1), negative]).sort().values
    return values / values.max()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256-entry 8-bit "dynamic" code book (Dettmers 2015), as bitsandbytes builds it.

    Each exponent level `10^(i - max_exponent_bits + 1)` holds the midpoints of an fp32
    `linspace(0.1, 1)` with a number of fraction steps that grows with the level; plus 0 and 1.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        boundaries = torch.linspace(0.1, 1, 2**fraction_bits + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        level = 10 ** (-(max_exponent_bits - 1) + i)
        data += (level * means).tolist()
        if signed:
            data += (-level * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        level = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (level * means).tolist()
        if signed:
            data += (-level * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _cached_table(name: str, device: str) -> torch.Tensor:
    # a plain dict, not functools.cache: torch.compile reads a dict's tensor as a constant, but traces
    # into a cached function and would build the table again (`create_dynamic_map` leaves the graph)
    table = _TABLES.get((name, device))
    if table is None:
        if torch.compiler.is_compiling():  # built inside the graph (no side effect on the dict there)
            return _build_table(name, device)
        table = _TABLES[(name, device)] = _build_table(name, device)
    return table


def _build_table(name: str, device: str) -> torch.Tensor:
    if name == "nf4":
        return create_normal_map().to(device)
    if name == "nf4_midpoints":
        code = _cached_table("nf4", device)
        return (code[:-1] + code[1:]) / 2
    if name == "nf4_pairs":
        # byte -> (code of high nibble, code of low nibble) as ONE 8-byte word: a single
        # `index_select` of int64 words decodes two weights per byte (viewing the words as
        # fp32 gives them in order); about 10x faster on CPU than gathering rows of a (256, 2) table
        code = _cached_table("nf4", device)
        byte = torch.arange(256, device=device)
        return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous().view(torch.int64).view(256)
    if name == "dynamic":
        return create_dynamic_map(signed=True).to(device)
    if name == "dynamic_lut":
        # bin i covers the value -1 + 2i / 65535; its code is the first whose upper midpoint is
        # not below that value
        code = _cached_table("dynamic", device)
        midpoints = 0.5 * (code[:-1] + code[1:])
        bins = torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)
        centers = -1.0 + (2.0 * bins) / float(_LUT_SIZE - 1)
        return torch.searchsorted(midpoints, centers, side="left")
    raise KeyError(name)


def code_table(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A cached constant table ("nf4", "nf4_midpoints", "nf4_pairs", "dynamic", "dynamic_lut")."""
    return _cached_table(name, str(torch.device(device)))


# --- 8-bit blockwise quantization of the absmax statistics ------------------------------------


def quantize_blockwise_8bit(
    values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 absmax per block) of fp32 `values` with the signed dynamic map.

    Follows bitsandbytes' CPU kernel step by step: `value * (1 / absmax)`, clamped to [-1, 1],
    is mapped to one of 65536 evenly spaced bins (`trunc((v + 1) * 0.5 * 65535 + 0.5)`), and a
    table gives each bin its nearest code. That is not always the nearest code of `v` itself,
    hence the table. A block of zeros stores absmax 0 and code index 0.
    """
    lut = code_table("dynamic_lut", values.device)
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    normed = torch.clamp(padded * (1.0 / absmax)[:, None], -1.0, 1.0)
    bins = ((((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1)) + 0.5).to(torch.int64)
    codes = torch.where(absmax[:, None] == 0, 0, lut[bins.clamp(0, _LUT_SIZE - 1)])
    return codes.reshape(-1)[:n].to(torch.uint8).view(values.shape), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """fp32 values of `quantize_blockwise_8bit` output."""
    code = code_table("dynamic", codes.device)
    flat = codes.reshape(-1)
    n = flat.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[flat.long()] * scale).view(codes.shape)


# --- NF4 --------------------------------------------------------------------------------------


@dataclass
class NF4Tensor:
    """A weight in NF4: packed codes plus the statistics needed to rebuild it.

    Attributes:
        packed: uint8 `(ceil(n / 2),)`, two codes per byte, the first element in the high nibble.
        absmax: fp32 `(blocks,)` without double quantization; uint8 dynamic codes with it.
        absmax_scale: fp32 `(ceil(blocks / 256),)` absmax of the absmax blocks (double quant only).
        absmax_offset: fp32 scalar, the mean subtracted from absmax (double quant only).
        shape: the original shape; dtype: the original dtype; blocksize: values per block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of each 64-block (decoded when double quantized)."""
        return block_absmax(self.absmax, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in `dtype` (default: the original dtype)."""
        return dequantize_nf4(self.packed, self.block_absmax(), self.shape, self.blocksize, dtype or self.dtype)


def block_absmax(
    absmax: torch.Tensor, absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None
) -> torch.Tensor:
    """fp32 per-block absmax: `absmax` itself, or its double-quantized codes decoded."""
    if absmax_scale is None:
        return absmax
    return dequantize_blockwise_8bit(absmax, absmax_scale) + absmax_offset


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> NF4Tensor:
    """Quantize a float tensor to NF4 (optionally with double-quantized statistics).

    Equal bit for bit to `bitsandbytes.functional.quantize_4bit(weight, quant_type="nf4",
    blocksize=blocksize, compress_statistics=double_quant)` on CPU.
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 quantizes fp32/fp16/bf16 tensors, got {weight.dtype}")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, code_table("nf4_midpoints", flat.device), out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax, scale = quantize_blockwise_8bit(absmax - offset)
    return NF4Tensor(packed, absmax, scale, offset, weight.shape, weight.dtype, blocksize)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense tensor of `shape` from packed NF4 codes and fp32 per-block `absmax` (written into `out`,
    a contiguous tensor of `shape` and `dtype` on the codes' device, when given).

    Each weight is `NF4[code] * absmax` formed in fp32 and rounded once to `dtype`, as bitsandbytes
    does. CPU tensors (uint8 codes; fp32, bf16 or fp16 output) go through lorakit's native kernel
    (`kernels/nf4_native.py`: vectorised C, multi-threaded on large tensors) when it was built; otherwise, and
    on every other device, dtype, or under `LORAKIT_NATIVE=0`, through PyTorch: one gather of
    8-byte words (a 256-entry table, see `code_table("nf4_pairs")`) decodes both nibbles of each
    byte, then the block scale. Both paths give the same bits.
    """
    n = math.prod(shape)
    if native.accepts(packed, absmax, n, blocksize, dtype):
        return native.dequantize(packed, absmax, n, blocksize, dtype, _cached_table("nf4", "cpu"), shape, out)
    dense = dequantize_nf4_torch(packed, absmax, shape, blocksize, dtype)
    return dense if out is None else out.copy_(dense)


def dequantize_nf4_torch(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`dequantize_nf4` in PyTorch alone (any device): the pairs-table gather, then the block scale."""
    n = math.prod(shape)
    pairs = code_table("nf4_pairs", packed.device)
    values = pairs.index_select(0, packed.reshape(-1).to(torch.int32)).view(torch.float32)
    blocks = absmax.numel()
    if values.numel() != blocks * blocksize:
        values = torch.nn.functional.pad(values[:n], (0, blocks * blocksize - n))
    out = values.view(blocks, blocksize).mul_(absmax.view(blocks, 1).float()).view(-1)
    return out[:n].view(shape).to(dtype)
