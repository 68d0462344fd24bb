r"""Dropout on an adapter's input that keeps neither the dropped-out copy nor its mask.

`dropout(x) A^T` needs, for A's gradient, the dropped-out input `x ⊙ m / (1 - p)`, and for x's
gradient the mask `m`. Autograd keeps both, per adapted layer: q, k and v (gate and up) read one
`x` but each keep their own copy (fp32) and mask, some 5 to 8 bytes per element and layer, while
`x` itself, kept for A's gradient when there is no dropout, is shared by them. Here the mask is a
function of a seed: forward draws one seed per call (from torch's default CPU generator, so
`torch.manual_seed`, a checkpoint's random state and activation checkpointing's replay decide it),
keeps the seed, and backward draws the same mask again from it. Saved for backward: `x` (shared),
nothing of the mask, no copy.

The mask is the same in distribution as `nn.Dropout`'s: each element kept independently with
probability `1 - p` (to within 2^-33), kept elements scaled by `1 / (1 - p)` (the same fp32 factor
`nn.Dropout` multiplies by), and a new seed, so an independent mask, at every call. On the CPU
the mask is a counter-based stream (SplitMix64 of the seed and the element's position: see
`_dropout_native.c`), computed by the native kernel where it was built and by PyTorch otherwise,
the same bits either way; on other devices it is `bernoulli_` from a generator seeded with the
seed. Inside `torch.compile` the plain `nn.functional.dropout` runs (the compiler handles the
random numbers itself).

    dropout = AdapterDropout(0.05)           # an adapter's dropout module
    z = dropout.down_projection(x, A)        # dropout(x) A^T, one node, mask drawn again in backward
    draw = dropout.draw()                    # for a fused node of one's own: DropoutDraw(p, seed) or None
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from . import nf4_native

LIBRARY_NAME = "_dropout_native"
LIBRARY_VERSION = 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
ELEMENTS_PER_THREAD = 1 << 18  # below this a tensor is not split over threads


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 PyTorch holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def keep_threshold(p: float) -> int:
    """Element i is kept when its 32-bit word is below this: `round((1 - p) * 2^32)`."""
    return min(1 << 32, max(0, round((1.0 - p) * 2.0**32)))


def draw_seed() -> int:
    """A fresh 63-bit seed from torch's default CPU generator."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


# --- the native kernel -------------------------------------------------------------------------------


@cache
def _library() -> ctypes.CDLL | None:
    path = nf4_native.library_path(LIBRARY_NAME)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        if lib.lorakit_dropout_version() != LIBRARY_VERSION:
            return None  # a library from another version of lorakit: its stream may differ
        lib.lorakit_dropout_mask.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_uint64,
            ctypes.c_uint64,
        ]
        for name in ("lorakit_dropout_apply_f32", "lorakit_dropout_accumulate_f32"):
            getattr(lib, name).argtypes = [
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_uint64,
                ctypes.c_uint64,
                ctypes.c_float,
            ]
    except (OSError, AttributeError):
        return None
    return lib


def native_enabled() -> bool:
    """The native kernel is built, loads, and LORAKIT_NATIVE is not 0."""
    return os.environ.get("LORAKIT_NATIVE", "1") != "0" and _library() is not None


def _run_split(function, n: int, head: tuple, tail: tuple) -> None:
    """`function(*head, start, stop, *tail)` over [0, n), in parallel chunks on large tensors."""
    parts = min(torch.get_num_threads(), max(1, n // ELEMENTS_PER_THREAD))
    if parts <= 1:
        function(*head, 0, n, *tail)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [
        nf4_native._executor(parts - 1).submit(function, *head, bounds[i], bounds[i + 1], *tail)
        for i in range(1, parts)
    ]
    function(*head, bounds[0], bounds[1], *tail)
    for f in futures:
        f.result()


# --- the stream in PyTorch (the same bits) -------------------------------------------------------------


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (PyTorch's `>>` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _words_torch(seed: int, n: int, device: torch.device) -> torch.Tensor:
    """The first `n` 32-bit words of the stream (int64), as the native kernel forms them."""
    j = torch.arange(1, (n + 1) // 2 + 1, dtype=torch.int64, device=device)
    z = j * _signed(GOLDEN) + _signed(seed)  # int64 arithmetic wraps: the uint64 sums and products
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX[0])
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX[1])
    z = z ^ _shift_right(z, 31)
    return torch.stack((z & 0xFFFFFFFF, _shift_right(z, 32)), dim=1).view(-1)[:n]


_generators = threading.local()


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    cache_ = getattr(_generators, "by_device", None)
    if cache_ is None:
        cache_ = _generators.by_device = {}
    generator = cache_.get(device)
    if generator is None:
        generator = cache_[device] = torch.Generator(device)
    return generator.manual_seed(seed)


@dataclass(frozen=True)
class DropoutDraw:
    """One dropout mask, given by its probability and seed: drawn in forward, drawn again in backward."""

    p: float
    seed: int

    @property
    def scale(self) -> float:
        """`1 / (1 - p)`, the factor kept elements are multiplied by, rounded to fp32 (as `nn.Dropout`'s)."""
        return struct.unpack("f", struct.pack("f", 1.0 / (1.0 - self.p)))[0]

    def _native(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and type(x) is torch.Tensor
            and not torch.compiler.is_compiling()
            and native_enabled()
        )

    def mask(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The keep mask (bool) of a tensor of `shape` on `device`."""
        device = torch.device(device)
        n = 1
        for size in shape:
            n *= size
        if device.type != "cpu":
            empty = torch.empty(shape, dtype=torch.bool, device=device)
            return empty.bernoulli_(1.0 - self.p, generator=_device_generator(device, self.seed))
        threshold = keep_threshold(self.p)
        if native_enabled():
            out = torch.empty(shape, dtype=torch.bool)
            _run_split(_library().lorakit_dropout_mask, n, (out.data_ptr(),), (self.seed, threshold))
            return out
        return (_words_torch(self.seed, n, device) < threshold).view(shape)

    def factor(self, like: torch.Tensor) -> torch.Tensor:
        """`m / (1 - p)` for a tensor like `like` (its shape, dtype and device): 0 or the scale."""
        return self.mask(like.shape, like.device).to(like.dtype).mul_(self.scale)

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`x ⊙ m / (1 - p)` (into `out`, which may be `x` itself), as `nn.Dropout` computes it: `x * (m * scale)`."""
        x = x.contiguous()
        if self._native(x) and (out is None or (out.is_contiguous() and out.dtype == x.dtype)):
            out = torch.empty_like(x) if out is None else out
            _run_split(
                _library().lorakit_dropout_apply_f32,
                x.numel(),
                (x.data_ptr(), out.data_ptr()),
                (self.seed, keep_threshold(self.p), self.scale),
            )
            return out
        dropped = x * self.factor(x)
        return dropped if out is None else out.copy_(dropped)

    def accumulate(self, acc: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """`acc += g ⊙ m / (1 - p)`, in place."""
        g = g.contiguous()
        if self._native(g) and acc.is_contiguous() and acc.dtype == g.dtype:
            _run_split(
                _library().lorakit_dropout_accumulate_f32,
                g.numel(),
                (g.data_ptr(), acc.data_ptr()),
                (self.seed, keep_threshold(self.p), self.scale),
            )
            return acc
        return acc.add_(g * self.factor(g))


class DroppedDownProjection(torch.autograd.Function):
    r"""`z = dropout(x) A^T` for 2-D `x (n, in)`, `A (r, in)` (one dtype), the mask given by `draw`.

    Backward, with `g = dL/dz`::

        dL/dx = (g A) ⊙ m / (1 - p)          dL/dA = g^T (x ⊙ m / (1 - p))

    Saved: x, and only where A trains (it is the layer's input, which the layers reading it share),
    and A where x needs a gradient; the mask is drawn again from the seed.
    """

    @staticmethod
    def forward(ctx, x, down, draw: DropoutDraw):
        z = torch.mm(draw.apply(x), down.T)
        ctx.draw = draw
        # x for A's gradient, A for x's, each only where needed (A may be a product, e.g. AdaLoRA's)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, down if ctx.needs_input_grad[0] else None)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, down = ctx.saved_tensors
        draw = ctx.draw
        grad_x = grad_down = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_z, down)  # x, A and z share one dtype (`dropped_down_projection`)
            draw.apply(grad_x, out=grad_x)
        if ctx.needs_input_grad[1]:
            grad_down = torch.mm(grad_z.T, draw.apply(x))
        return grad_x, grad_down, None


def dropped_down_projection(x: torch.Tensor, down: torch.Tensor, draw: DropoutDraw) -> torch.Tensor:
    """`dropout(x) @ down.T` for `x (..., in)`, `down (r, in)`, through `DroppedDownProjection`, in the
    dtype the plain expression would compute in (autocast's where it is on)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        z = DroppedDownProjection.apply(x.reshape(-1, x.shape[-1]).to(dtype), down.to(dtype), draw)
    return z.view(*x.shape[:-1], down.shape[0])


class AdapterDropout(nn.Module):
    """Dropout on an adapter's input, with probability `p`, in training mode only.

    Called, it is `nn.functional.dropout` (a reference, and what a compiled graph runs); an
    adapter calls `down_projection(x, A)` for `dropout(x) A^T` without keeping a dropped-out copy
    or a mask, or `draw()` for a fused node of its own.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    @property
    def active(self) -> bool:
        """Whether a call drops anything: training mode and `p > 0`."""
        return self.training and self.p > 0

    def draw(self) -> DropoutDraw | None:
        """A new mask (`DropoutDraw`) when active, outside `torch.compile`; else None."""
        if not self.active or torch.compiler.is_compiling():
            return None
        return DropoutDraw(self.p, draw_seed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, True) if self.active else x

    def down_projection(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """`dropout(x) @ down.T` (`down (r, in)` in x's dtype); in training with `p > 0` one node
        that keeps x (shared with the other layers reading it) and the seed of its mask, nothing else."""
        draw = self.draw()
        if draw is None:
            return self(x) @ down.T
        return dropped_down_projection(x, down, draw)

    def extra_repr(self) -> str:
        return f"p={self.p}"
