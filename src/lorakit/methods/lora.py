r"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv 2106.09685).

::

        x ──────────────► W0 (frozen, out x in) ──────────┐
        │                                                  (+) ──► y
        └─► dropout ─► A (r x in) ─► B (out x r) ─► * s ──┘

    y = x W0^T + s · dropout(x) A^T B^T,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts kaiming-uniform (a = sqrt 5, as loralib and PEFT), B starts at zero, so the adapted
model equals the base model at step 0. Merging writes W = W0 + s·B·A into the base weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..base_layers import in_out_features, residual_factors, weight_dtype_device
from ..kernels.dropout import AdapterDropout
from ..kernels.fused_lora import fused_lora_forward
from .base import AdapterConfig, AdditiveAdapter, common_fields_from_peft, load_exact, register


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    """The LoRA scale `alpha / r`, or rsLoRA's `alpha / sqrt(r)`."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def low_rank_update(base_out: torch.Tensor, z: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """`base_out + scale * z @ up.T` in one GEMM.

    `addmm` folds the scale and the residual add into the up-projection, saving two passes over
    the (tokens x out) output that `base_out + B(z) * scale` would make.
    """
    out_features = base_out.shape[-1]
    y = torch.addmm(base_out.reshape(-1, out_features), z.reshape(-1, z.shape[-1]), up.T, alpha=scale)
    return y.view(base_out.shape)


class LoRAPair(AdditiveAdapter):
    """What every adapter holding `lora_A (r, in)` and `lora_B (out, r)` shares: its dense delta
    `s·B·A`, PEFT's tensor names, and B as the LoRA+ fast side (LoRA, LoRA-FA, Delta-LoRA)."""

    # LoRA+ (lorakit.param_groups): B is the output side of the pair and gets the larger lr.
    loraplus_fast = ("lora_B",)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.lora_B.to(base_weight.dtype) @ self.lora_A.to(base_weight.dtype))

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach(), self.scale * self.lora_B.detach()

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_exact(self, self.peft_state_dict(), state)

    @torch.no_grad()
    def set_initial_pair(self, lora_A: torch.Tensor, lora_B: torch.Tensor, base_layer: nn.Module) -> None:
        """Start from the given `A (r, in)`, `B (out, r)` instead of the default init (LoftQ)."""
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


class LoRAAdapter(LoRAPair, nn.Module):
    """The LoRA pair for one layer: `lora_A (r, in)`, `lora_B (out, r)`, scale, dropout."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scale: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        check_rank(r, "LoRA rank r")
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # dropout(x) A^T without a dropped-out copy or a mask kept for backward (kernels/dropout.py)
        self.dropout = AdapterDropout(dropout)

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        # Compute in the activation dtype; `.to` is free when the dtypes already agree.
        z = self.dropout.down_projection(x, self.lora_A.to(x.dtype))  # dropout(x) A^T, (..., r)
        return low_rank_update(result, z, self.lora_B.to(x.dtype), self.scale)

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor | None:
        """The whole layer, `base_layer(x) + s · dropout(x) A^T B^T`, as one autograd node
        (`lorakit.kernels.fused_lora.FusedLoRALinear`), or None where the base cannot be fused (the machinery then runs the
        base and `forward`). The dropout mask is drawn as `forward` draws it (one seed from the
        default generator), so both paths give the same numbers; inside `torch.compile` dropout
        runs as the plain `nn.functional.dropout` of `forward`."""
        if self.dropout.active and torch.compiler.is_compiling():
            return None
        return fused_lora_forward(x, base_layer, self.lora_A, self.lora_B, self.scale, self.dropout.draw())

    def shared_input_pair(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """`(A, B, s)` where this layer may run in one node with its siblings that read the same x
        (`lorakit.kernels.grouped_lora`); None while dropout draws a mask of its own."""
        return None if self.dropout.active else (self.lora_A, self.lora_B, self.scale)


@dataclass
class LowRankConfig(AdapterConfig):
    """The fields of every method built on a LoRA pair (LoRA, LoRA-FA, DoRA, Delta-LoRA).

    Attributes:
        r: rank of the update.
        alpha: scale numerator; `s = alpha / r` (or `alpha / sqrt(r)` with `rslora`).
        dropout: dropout on the adapter's input (the base path sees `x` unchanged).
        rslora: rank-stabilised scale `alpha / sqrt(r)` (Kalajdzievic 2023).
        init: how the pair starts. "default": A random, B zero (the adapted model equals the
            base). "loftq": over a 4-bit base quantized with `loftq_rank >= r`, `s·B·A` starts
            as the best rank-r approximation of the base's rounding error `W - Q(W)` (LoftQ,
            `lorakit.quant.loftq`), so the adapted model starts closer to the full-precision one.
        rank_pattern: per-module ranks, `{pattern: r}`; a pattern is a regular expression matched
            against the end of the module's name after a dot (PEFT's rule: `"q_proj"`,
            `"layers\\.0\\.mlp\\..*"`); the first matching pattern wins, others get `r`.
            Training may change it (`lorakit.inject.reconfigure`), e.g. AdaLoRA's final ranks.
        alpha_pattern: per-module alphas, the same way; others get `alpha`.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    peft_use_dora: ClassVar[bool] = False  # how PEFT's LoraConfig tells DoRA from LoRA
    layout_fields: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.r, "r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in LOW_RANK_INITS:
            raise ValueError(f"init={self.init!r} is not one of {', '.join(LOW_RANK_INITS)}")
        for field_name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, field_name), dict):
                raise ValueError(
                    f"{field_name} must be a mapping {{module pattern: value}}, got {getattr(self, field_name)!r}"
                )
        for pattern, rank in self.rank_pattern.items():
            check_rank(rank, f"rank_pattern[{pattern!r}]")
            _check_pattern(pattern, "rank_pattern")
        for pattern, alpha in self.alpha_pattern.items():
            _check_pattern(pattern, "alpha_pattern")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise ValueError(f"alpha_pattern[{pattern!r}] must be a number, got {alpha!r}")

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)

    def module_settings(self, name: str) -> dict[str, Any]:
        """`{"r": ..., "alpha": ...}` of the module `name`, patterns resolved as PEFT does."""
        r_key = pattern_key(self.rank_pattern, name)
        alpha_key = pattern_key(self.alpha_pattern, name)
        return {
            "r": int(self.rank_pattern[r_key]) if r_key is not None else self.r,
            "alpha": float(self.alpha_pattern[alpha_key]) if alpha_key is not None else self.alpha,
        }

    def module_rank_scale(self, name: str) -> tuple[int, float]:
        """The rank and LoRA scale of the module `name`."""
        settings = self.module_settings(name)
        return settings["r"], lora_scale(settings["r"], settings["alpha"], self.rslora)

    def initialise(self, adapter: nn.Module, base_layer: nn.Module) -> nn.Module:
        """Apply `init` to an adapter just built for `base_layer` (its constructor did "default")."""
        if self.init == "loftq":
            lora_A, lora_B = loftq_pair(base_layer, adapter.r, adapter.scale)
            adapter.set_initial_pair(lora_A, lora_B, base_layer)
            base_layer.residual_factors = None  # consumed; they weigh r x (in + out) floats a layer
        return adapter

    def to_peft(self, target_names: list[str]) -> dict[str, Any]:
        return {
            **super().to_peft(target_names),
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": self.peft_use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            # The file holds the trained A and B whatever the init was; "loftq" here would make
            # PEFT recompute LoftQ on load (and need its loftq_config).
            "init_lora_weights": True,
            "fan_in_fan_out": False,
        }

    @classmethod
    def matches_peft(cls, peft_config: dict[str, Any]) -> bool:
        return bool(peft_config.get("use_dora", False)) == cls.peft_use_dora

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> LowRankConfig:
        return cls(**lora_fields_from_peft(peft_config))


MAX_RANK = 65536  # far above any published setting; a larger rank is a typo that would exhaust memory


def check_rank(r: Any, what: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= MAX_RANK:
        raise ValueError(f"{what} must be an integer from 1 to {MAX_RANK}, got {r!r}"[:200])


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first pattern matching the module `name` as PEFT matches it (`(.*\\.)?(pattern)$`)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@register
@dataclass
class LoRA(LowRankConfig):
    """LoRA (Hu et al. 2021): `y = x W0^T + s · dropout(x) A^T B^T`, `s = alpha / r`.

    Fields: see `LowRankConfig` (r, alpha, dropout, rslora) and `AdapterConfig` (targets, ...).
    """

    method = "lora"
    peft_type = "LORA"

    def make_adapter(self, name: str, base_layer: nn.Module) -> LoRAAdapter:
        in_f, out_f = in_out_features(base_layer)
        _, device = weight_dtype_device(base_layer)
        r, scale = self.module_rank_scale(name)
        return self.initialise(LoRAAdapter(in_f, out_f, r, scale, self.dropout, self.param_dtype, device), base_layer)


LOW_RANK_INITS = ("default", "loftq")


def lora_fields_from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    """The LoRA-family fields of a PEFT LoraConfig body (shared with DoRA and friends)."""
    return {
        **common_fields_from_peft(peft_config),
        # taken as written: the config's own type checks refuse `r: 1.5` or `use_rslora: "no"` (no coercion)
        "r": peft_config.get("r", 8),
        "alpha": peft_config.get("lora_alpha", 8),
        "dropout": peft_config.get("lora_dropout", 0.0),
        "rslora": peft_config.get("use_rslora", False),
        "rank_pattern": dict(peft_config.get("rank_pattern") or {}),
        "alpha_pattern": dict(peft_config.get("alpha_pattern") or {}),
    }


def _check_pattern(pattern: str, field_name: str) -> None:
    """A rank or alpha pattern key is a regular expression over module names (as in PEFT)."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field_name} key {pattern!r} is not a valid regular expression ({err})") from None


def loftq_pair(base_layer: nn.Module, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's `(A (r, in), B (out, r))` for a 4-bit layer quantized with `loftq_rank >= r`.

    `s·B·A` equals the rank-`r` truncated SVD of the layer's quantization error, split evenly between
    the two factors (`lorakit.quant.loftq` explains the choice): `B = L_r / sqrt(s)`, `A = R_r / sqrt(s)`
    for the factors `L @ R` the quantizer kept (`base_layers.residual_factors`).
    """
    factors = residual_factors(base_layer)
    if factors is None:
        raise ValueError(
            'init="loftq" starts the adapter from the quantization error of a 4-bit base, which must be '
            "kept when quantizing: lorakit.quantize(model, loftq_rank=r) or "
            f"load_quantized_causal_lm(..., loftq_rank=r) (this layer is a {type(base_layer).__name__}"
            f"{' without kept factors' if hasattr(base_layer, 'residual_factors') else ''})"
        )
    L, R = factors
    if L.shape[1] < r and L.shape[1] < min(L.shape[0], R.shape[1]):
        raise ValueError(
            f'init="loftq" with r={r}, but the base was quantized with loftq_rank={L.shape[1]}: use loftq_rank >= r'
        )
    root = scale**0.5
    A = torch.zeros(r, R.shape[1], dtype=torch.float32, device=R.device)
    B = torch.zeros(L.shape[0], r, dtype=torch.float32, device=L.device)
    k = min(r, L.shape[1])  # a layer narrower than r has only k singular directions
    A[:k], B[:, :k] = R[:k] / root, L[:, :k] / root
    return A, B
