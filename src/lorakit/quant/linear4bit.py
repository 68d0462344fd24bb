r"""`Linear4bit`: a frozen linear layer whose weight is stored in NF4 (QLoRA's base layer).

::

    x ─► cast to compute dtype ─► x · dequantize(W_nf4)ᵀ (+ b) ─► cast back to x's dtype ─► y
                                        ▲
                 packed codes + block statistics (4.127 bits per weight with double quant)

Only the packed weight lives between steps. The matmul is a custom autograd function that keeps
no dense weight for backward: backward dequantizes again to form dX = dY · W (the weight itself
never gets a gradient), as bitsandbytes and Unsloth do. Any lorakit adapter wraps it like an
`nn.Linear`: it implements `base_layers.DenseWeightProvider` (`dense_weight()` dequantizes,
`set_dense_weight()` re-quantizes) and `merged_module()` hands `merge_and_unload` a dense
`nn.Linear`, so merging never re-quantizes unless asked to (`lorakit.quant.requantize`).

FSDP shards parameters, never buffers: `make_shardable` turns the packed storage into frozen
parameters, so that each process holds 1/N of every 4-bit layer (`lorakit train --distributed fsdp`).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .. import base_layers
from ..base_layers import full_tensor, is_sharded, write_full
from .loftq import residual_factors
from .nf4 import DEFAULT_BLOCKSIZE, block_absmax, quantize_nf4
from .triton_kernels import dequantize

_buffers = threading.local()


def _shared_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer for one dense weight in `dtype` (at least `numel` elements)."""
    by_dtype = getattr(_buffers, "by_dtype", None)
    if by_dtype is None:
        by_dtype = _buffers.by_dtype = {}
    buffer = by_dtype.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = by_dtype[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class _DequantizeMatmul(torch.autograd.Function):
    """`x @ W.T` with W dequantized on the fly in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer  # the module holds the packed weight: nothing dense is saved
        return x @ layer.transient_weight(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ ctx.layer.transient_weight(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class Linear4bit(nn.Module):
    """Frozen `y = x Wᵀ + b` with W in NF4 (blockwise absmax, optional double quantization).

    Buffers (saved in the state dict): `weight_packed` (uint8, two codes per byte, first element
    in the high nibble), `weight_absmax` (fp32 per block, or uint8 codes with double quant),
    and with double quant `weight_absmax_scale` (fp32 per 256 blocks) and `weight_absmax_offset`
    (fp32 scalar). `bias`, if any, stays a frozen parameter in its original dtype.

    Args:
        weight: the dense `(out, in)` weight to quantize.
        bias: optional `(out,)` bias.
        blocksize: weights per absmax block (64 in QLoRA).
        double_quant: quantize the absmax values to 8 bits (QLoRA's double quantization).
        compute_dtype: dtype of the dequantized weight and the matmul; `None` picks bf16 on
            CUDA and fp32 elsewhere, following the layer's device.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Linear4bit needs an (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.weight_dtype = weight.dtype  # the dtype a merged, dense layer gets back
        self._compute_dtype = compute_dtype
        self.register_buffer("weight_packed", None)
        self.register_buffer("weight_absmax", None)
        self.register_buffer("weight_absmax_scale", None)
        self.register_buffer("weight_absmax_offset", None)
        self._store(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        loftq_rank: int = 0,
    ) -> Linear4bit:
        """Quantize an `nn.Linear` or a GPT-2 `Conv1D` (weight `(in, out)`).

        `loftq_rank > 0` also keeps the top singular factors of the rounding error
        `W - deq(Q(W))` in `residual_factors`, for an adapter with `init="loftq"` (see `loftq.py`).
        """
        weight = base_layers.dense_weight(module).detach()
        layer = cls(weight, getattr(module, "bias", None), blocksize, double_quant, compute_dtype)
        if loftq_rank:
            layer.residual_factors = residual_factors(weight, layer.dense_weight(torch.float32), loftq_rank)
        return layer

    @torch.no_grad()
    def _store(self, weight: torch.Tensor) -> None:
        q = quantize_nf4(weight, self.blocksize, self.double_quant)
        # LoftQ's factors of the rounding error (not saved: an adapter consumes them when built)
        self.residual_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.weight_packed = q.packed
        self.weight_absmax = q.absmax
        self.weight_absmax_scale = q.absmax_scale
        self.weight_absmax_offset = q.absmax_offset

    # the 1-D tensors of the packed weight (the scalar `weight_absmax_offset` stays a replicated buffer)
    SHARDABLE = ("weight_packed", "weight_absmax", "weight_absmax_scale")

    def make_shardable(self) -> None:
        """Hold the packed weight and its block statistics as frozen parameters instead of buffers,
        so that FSDP shards them (same names and values: the state dict does not change)."""
        for name in self.SHARDABLE:
            tensor = self._buffers.get(name)
            if tensor is not None:
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    @property
    def compute_dtype(self) -> torch.dtype:
        if self._compute_dtype is not None:
            return self._compute_dtype
        return torch.bfloat16 if self.weight_packed.is_cuda else torch.float32

    @property
    def weight(self) -> torch.Tensor:
        """The packed uint8 storage (as bitsandbytes' `Linear4bit.weight`): for `.device` checks."""
        return self.weight_packed

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax of every block (decoded from 8 bits with double quantization)."""
        scale = self.weight_absmax_scale
        return block_absmax(
            full_tensor(self.weight_absmax), None if scale is None else full_tensor(scale), self.weight_absmax_offset
        )

    def dense_weight(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized `(out, in)` weight in `dtype` (default: the compute dtype), into `out` if given."""
        with torch.no_grad():
            shape = (self.out_features, self.in_features)
            # outside forward under FSDP the storage is sharded: gathered here (every process calls)
            packed = full_tensor(self.weight_packed)
            return dequantize(packed, self.block_absmax(), shape, self.blocksize, dtype or self.compute_dtype, out)

    def transient_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight for one product made right away (a forward or a backward GEMM).

        On the CPU it is written into a buffer that every 4-bit layer of the thread shares (the
        next call overwrites it): a dense temporary allocated and freed per layer, in forward and
        again in backward, interleaved with the activations, fragments the C heap, and the process
        then holds hundreds of MiB it has freed (`benchmarks/memory_breakdown.py`). Elsewhere (the
        CUDA caching allocator reuses its blocks) and inside `torch.compile`, a new tensor.
        """
        dtype = dtype or self.compute_dtype
        device = self.weight_packed.device
        if device.type != "cpu" or torch.compiler.is_compiling():
            return self.dense_weight(dtype)
        return self.dense_weight(
            dtype,
            out=_shared_buffer(self.out_features * self.in_features, dtype, device).view(
                self.out_features, self.in_features
            ),
        )

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize from a dense `(out, in)` weight (lossy: NF4 rounding applies again)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        if is_sharded(self.weight_packed):
            # FSDP holds these parameter objects: write each process's part in place
            q = quantize_nf4(weight.to(self.weight_packed.device), self.blocksize, self.double_quant)
            for name, value in (
                ("weight_packed", q.packed),
                ("weight_absmax", q.absmax),
                ("weight_absmax_scale", q.absmax_scale),
                ("weight_absmax_offset", q.absmax_offset),
            ):
                if value is not None:
                    write_full(getattr(self, name), value)
            return
        self._store(weight.to(self.weight_packed.device))

    def merged_module(self, weight: torch.Tensor) -> nn.Linear:
        """A dense `nn.Linear` holding `weight` (the merged weight) in the original dtype."""
        factory = {"device": self.weight_packed.device, "dtype": self.weight_dtype}
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **factory)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizeMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # `model.half()` / `.to(bfloat16)` must move the block statistics but never round them:
        # they stay fp32, as the quantizer wrote them.
        stats = {
            name: self._buffers[name]  # (parameters once `make_shardable`: FSDP moves those itself)
            for name in ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")
            if self._buffers.get(name) is not None and self._buffers[name].is_floating_point()
        }
        super()._apply(fn, recurse)
        for name, tensor in stats.items():
            setattr(self, name, tensor.to(self.weight_packed.device))
        if self.residual_factors is not None:  # fp32 as well, on the layer's device
            self.residual_factors = tuple(t.to(self.weight_packed.device) for t in self.residual_factors)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )
