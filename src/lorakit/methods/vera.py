r"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2023, arXiv 2310.11454).

::

        x ──────────────► W0 (frozen, out x in) ───────────────────────┐
        │                                                             (+) ──► y
        └─► dropout ─► A[:, :in] ─► ⊙ d (r) ─► B[:out, :] ─► ⊙ b (out) ┘
                            ▲                      ▲
                            └──── one frozen random pair, shared by all adapted layers,
                                  regenerated from a seed: A (r x max_in), B (max_out x r)

    y = x W0^T + b ⊙ ((d ⊙ (dropout(x) A^T)) B^T)        i.e.  ΔW = diag(b) B diag(d) A

Only the vectors `d (r,)` (init `d_initial`, 0.1) and `b (out,)` (init 0, so the model is unchanged
at step 0) train: `out + r` parameters per layer. `A` and `B` are drawn once, exactly as PEFT draws
them (a CPU `torch.Generator` seeded with `projection_prng_key`, A first, then B, each
kaiming-uniform with fan_in = size(1)), so an adapter file needs only the seed; `save_projection`
stores the matrices too, under PEFT's keys `base_model.vera_A` / `base_model.vera_B`.

The forward folds both vectors into the small `(out, r)` matrix `B' = diag(b) B diag(d)`, and the
only activation kept for backward is `z = x A^T` (tokens x r), since A is frozen and the vectors'
gradients come from the `(out, r)` gradient of `B'`. Over a plain dense base the layer is one
autograd node (`lorakit.kernels.fused_vera.FusedVeRALinear`): `z` is computed once for all layers that read the same input
(q/k/v, gate/up share A's slice), and backward forms `dL/dx = g (W + B' A)` in one GEMM instead of
`g W + (g B') A`: per layer a step costs the base's GEMMs, two rank-r GEMMs (`z B'^T`, `g^T z`),
the dense `B' A` (out x in x r, independent of the batch) and, once per distinct input, `x A^T`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapted_layer import adapted_layers
from ..base_layers import in_out_features, weight_dtype_device
from ..kernels.dropout import AdapterDropout
from ..kernels.fused_lora import fusable_base, fused_dtype
from ..kernels.fused_vera import SharedDownProjection, fused_vera_linear
from .base import AdapterConfig, AdditiveAdapter, common_fields_from_peft, load_exact, register
from .lora import check_rank, low_rank_update

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # PEFT's keys in adapter_model.safetensors


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt 2, fan_in = size(1)) drawn from `generator`, as PEFT's `_kaiming_init`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair `(A (r, max_in), B (max_out, r))`, bit-identical to PEFT's for the same seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = kaiming_uniform((r, max_in), generator)  # A is drawn first, then B: the order matters
    vera_B = kaiming_uniform((max_out, r), generator)
    return vera_A, vera_B


class VeRAProjections(SharedDownProjection):
    """The frozen random matrices every VeRA adapter of a model references (one instance per model);
    `down_projection(x, in_features, dtype)` gives `x A[:, :in]^T` once for the layers reading the
    same x (`lorakit.kernels.fused_vera.SharedDownProjection`).

    Buffers, not parameters (they never train), and non-persistent: the model's own state dict
    does not repeat them under every adapted layer; the adapter file stores the seed (or, with
    `save_projection`, the matrices once, through the config's `extra_state`).
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)  # (r, max_in)
        self.register_buffer("vera_B", vera_B, persistent=False)  # (max_out, r)

    def extra_repr(self) -> str:
        return f"vera_A={tuple(self.vera_A.shape)}, vera_B={tuple(self.vera_B.shape)}"


class VeRAAdapter(AdditiveAdapter, nn.Module):
    """VeRA's trainable vectors for one layer, `vera_lambda_d (r,)` and `vera_lambda_b (out,)`,
    over the shared projections, of which it uses the slices `A[:, :in]` and `B[:out, :]`."""

    loraplus_fast = ("vera_lambda_b",)  # LoRA+ (lorakit.param_groups): b is the output side, d the input side

    def __init__(
        self,
        projections: VeRAProjections,
        in_features: int,
        out_features: int,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        r, max_in = projections.vera_A.shape
        if in_features > max_in or out_features > projections.vera_B.shape[0]:
            raise ValueError(
                f"VeRA projections {tuple(projections.vera_A.shape)}/{tuple(projections.vera_B.shape)} "
                f"are too small for a layer of shape (out={out_features}, in={in_features})"
            )
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.projections = projections
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), dtype=dtype, device=device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        self.dropout = AdapterDropout(dropout)  # keeps no dropped-out copy or mask for backward

    def scaled_up_projection(self) -> torch.Tensor:
        """`diag(b) B[:out, :] diag(d)`, `(out, r)`, in the parameters' dtype."""
        b = self.vera_lambda_b
        vera_B = self.projections.vera_B[: self.out_features].to(device=b.device, dtype=b.dtype)
        return b[:, None] * vera_B * self.vera_lambda_d[None, :]

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        y = result
        vera_A = self.projections.vera_A[:, : self.in_features].to(device=x.device, dtype=x.dtype)
        z = self.dropout.down_projection(x, vera_A)  # (..., r); A is frozen: nothing of x is kept
        up = self.scaled_up_projection().to(device=x.device, dtype=x.dtype)  # (out, r)
        return low_rank_update(y, z, up, 1.0)

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """The whole layer as one autograd node (`FusedVeRALinear`) over a plain frozen dense
        base, with `x A^T` shared by the layers that read the same x; None (the machinery runs the
        base and `forward`) where the base cannot be fused or dropout is active (the adapter's
        input then differs from the base's)."""
        if self.dropout.active:
            return None
        base = fusable_base(base_layer)
        dtype = None if base is None else fused_dtype(x, *base)
        if dtype is None:
            return None
        weight, bias = base
        z = self.projections.down_projection(x, self.in_features, dtype)
        vera_A = self.projections.vera_A[:, : self.in_features].to(device=x.device, dtype=dtype)
        up = self.scaled_up_projection().to(device=x.device, dtype=dtype)
        return fused_vera_linear(x, z, weight, bias, up, vera_A, dtype)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        vera_A = self.projections.vera_A[:, : self.in_features]
        up = self.scaled_up_projection()
        compute = torch.promote_types(up.dtype, base_weight.dtype)
        return (up.to(compute) @ vera_A.to(device=up.device, dtype=compute)).to(base_weight.dtype)

    @torch.no_grad()
    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A[:, :in], diag(b) B[:out] diag(d))`: VeRA's update as one plain pair of this layer's own."""
        vera_A = self.projections.vera_A[:, : self.in_features]
        up = self.scaled_up_projection()
        return vera_A.to(device=up.device, dtype=up.dtype), up

    def describe(self) -> dict[str, float]:
        """What `lorakit inspect` shows of this layer's own vectors: how far d and b moved."""
        d, b = self.vera_lambda_d.detach().float(), self.vera_lambda_b.detach().float()
        return {
            "vera mean |d|": float(d.abs().mean()),
            "vera mean |b|": float(b.abs().mean()),
            "vera share of d near 0": float((d.abs() < 1e-3 * max(float(d.abs().max()), 1e-12)).float().mean()),
        }

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_exact(self, self.peft_state_dict(), state)

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"


@register
@dataclass
class VeRA(AdapterConfig):
    """VeRA (Kopiczko et al. 2023): `y = x W0^T + b ⊙ ((d ⊙ (x A^T)) B^T)`, A and B frozen, shared, random.

    Attributes:
        r: rank of the shared random projections (large is cheap: each layer trains only r + out).
        projection_prng_key: seed of the projections (PEFT's name); the same seed gives PEFT's
            exact matrices.
        save_projection: also store the matrices in the adapter file (PEFT's `base_model.vera_A`
            / `base_model.vera_B`); by default only the seed is stored.
        d_initial: initial value of every entry of `d` (PEFT's name; the paper's ablation favours
            0.1 or smaller).
        dropout: dropout on the adapter's input (PEFT's `vera_dropout`).
    """

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = False
    d_initial: float = 0.1
    dropout: float = 0.0

    method = "vera"
    peft_type = "VERA"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.r, "VeRA rank r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def make_adapters(self, layers: dict[str, nn.Module]) -> dict[str, VeRAAdapter]:
        """One adapter per module, all over ONE shared pair sized to the largest layer."""
        return self.adapters_for(layers)

    def make_adapter(self, name: str, base_layer: nn.Module) -> VeRAAdapter:
        """A lone VeRA adapter with its own projections, sized to `base_layer`."""
        return self.adapters_for({name: base_layer})[name]

    def adapters_for(self, layers: Mapping[str, nn.Module]) -> dict[str, VeRAAdapter]:
        shapes = {name: in_out_features(layer) for name, layer in layers.items()}
        max_in = max(i for i, _ in shapes.values())
        max_out = max(o for _, o in shapes.values())
        _, device = weight_dtype_device(next(iter(layers.values())))
        # Drawn on the CPU in float32 (as PEFT does, for portability) and kept in float32 whatever
        # `dtype` says (one small pair per model; rounding it would break the seed's promise); cast
        # to the activation dtype in forward.
        vera_A, vera_B = vera_projections(self.r, max_in, max_out, self.projection_prng_key)
        projections = VeRAProjections(vera_A.to(device), vera_B.to(device))
        adapters = {}
        for name, layer in layers.items():
            in_f, out_f = shapes[name]
            _, layer_device = weight_dtype_device(layer)
            adapters[name] = VeRAAdapter(
                projections, in_f, out_f, self.d_initial, self.dropout, self.param_dtype, layer_device
            )
        return adapters

    # --- the shared projections in the adapter file ------------------------------------------
    def extra_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The projection matrices under PEFT's keys when `save_projection`, else nothing (the seed
        in the config regenerates them)."""
        if not self.save_projection:
            return {}
        projections = shared_projections(model, name)
        return {PROJECTION_KEYS[0]: projections.vera_A, PROJECTION_KEYS[1]: projections.vera_B}

    def load_extra_state(self, model: nn.Module, name: str, remaining: dict[str, torch.Tensor]) -> None:
        """Load saved projections when the file holds them (popping their keys)."""
        saved = [remaining.pop(key, None) for key in PROJECTION_KEYS]
        if all(t is None for t in saved):
            if self.save_projection:
                raise ValueError(f"adapter config says save_projection=True but the file holds no {PROJECTION_KEYS}")
            return
        if any(t is None for t in saved):
            raise ValueError(f"adapter file holds only one of {PROJECTION_KEYS}")
        projections = shared_projections(model, name)
        targets = dict(zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B)))
        load_exact(projections, targets, dict(zip(PROJECTION_KEYS, saved)))

    # --- PEFT config interchange ---------------------------------------------------------------
    def to_peft(self, target_names: list[str]) -> dict[str, Any]:
        return {
            **super().to_peft(target_names),
            "r": self.r,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": False,
            "init_weights": True,
        }

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> VeRA:
        return cls(  # taken as written: the config's own type checks refuse `r: "8"` (no coercion)
            **common_fields_from_peft(peft_config),
            r=peft_config.get("r", 256),
            projection_prng_key=peft_config.get("projection_prng_key", 0),
            save_projection=peft_config.get("save_projection", True),
            d_initial=peft_config.get("d_initial", 0.1),
            dropout=peft_config.get("vera_dropout", 0.0),
        )


def shared_projections(model: nn.Module, name: str) -> VeRAProjections:
    """The one `VeRAProjections` module the VeRA adapter `name` shares across its layers."""
    found = {
        id(layer.adapters[name].projections): layer.adapters[name].projections
        for _, layer in adapted_layers(model, name)
    }
    if len(found) != 1:
        raise ValueError(f"expected one shared VeRA projection pair for adapter {name!r}, found {len(found)}")
    return next(iter(found.values()))
