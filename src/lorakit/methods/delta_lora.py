r"""Delta-LoRA: LoRA that also moves the base weight (Zi et al. 2023, arXiv 2309.02411).

::

        x ─────────────► W (out x in, no grad, moved after each step) ─┐
        │                ▲                                            (+) ──► y
        │                │ += λ·s·(B'A' - B A) after each optimizer step t > K
        └─► A (r x in) ─► B (out x r) ─► * s ──────────────────────────┘
                     (no dropout on this branch)

    forward:                y = x W^T + s · x A^T B^T,                 s = alpha / r
    after optimizer step t: W <- W + λ · s · (B_{t+1} A_{t+1} - B_t A_t)     for t > K

The forward is LoRA's without dropout: the paper's argument that the change of the product B·A is a
surrogate for W's gradient fails when the branch sees a dropped-out input. W gets no gradient and no
optimizer state; the base update needs only the previous A and B (r·(in + out) numbers per layer,
never a dense product), kept by the training hook. The paper writes `A B` in row-vector
convention; in `(out, in)` layout it is `B A`, and it is the difference of the full products, not
`(A' - A)(B' - B)`.

The updates telescope: after step T, `W_T - W0 = λ·s·(B_T A_T - B_K A_K)` (rank <= 2r; tested), so
in exact arithmetic Delta-LoRA's merged model is `W0 + (1 + λ)·s·B A - λ·s·B_K A_K`; training
dynamics differ from LoRA's because the forward during training already sees the moved W.

Because W moves, a Delta-LoRA result is not a small adapter: `lorakit.save` stores the adapted
modules' current base weights W (dense `(out, in)` layout, key `<module>.base_weight`) next to A
and B, and `lorakit.load` writes them back (see `DeltaLoRA.extra_state`). There is no PEFT
counterpart (PEFT cannot express a moved base), so no adapter_config.json is written.

Use it through the training hooks (a loop that skips `after_optimizer_step` trains plain LoRA)::

    hooks = lorakit.training_hooks(model)   # holds the previous A, B of each adapted layer
    ... loss.backward(); optimizer.step(); hooks.after_optimizer_step(model, step) ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import base_layers
from ..adapted_layer import adapted_layers
from ..base_layers import DenseWeightProvider, in_out_features, weight_dtype_device
from .base import register
from .lora import LoRAAdapter, LowRankConfig

PREFIX = "base_model.model."  # as in io.py: keys are the PEFT-style module paths
BASE_WEIGHT_KEY = "base_weight"


@torch.no_grad()
def update_base_weight(
    layer: nn.Module,
    adapter: nn.Module,
    prev_A: torch.Tensor,
    prev_B: torch.Tensor,
    delta_lambda: float,
) -> None:
    """Delta-LoRA's step: `W += λ · s · (B A - B_prev A_prev)` for one adapted layer.

    `layer` is an `AdaptedLayer`; `adapter` (one of its adapters) holds the new `lora_A`, `lora_B`
    and `scale`.
    The difference of the two rank-r products is formed as one rank-2r product
    `[B, B_prev] @ [A; -A_prev]` in the adapter's (master) dtype, then added in W's dtype.
    """
    up = torch.cat([adapter.lora_B, prev_B.to(adapter.lora_B.dtype)], dim=1)  # (out, 2r)
    down = torch.cat([adapter.lora_A, -prev_A.to(adapter.lora_A.dtype)], dim=0)  # (2r, in)
    weight = base_layers.dense_weight(layer.base_layer)
    delta = (delta_lambda * adapter.scale) * (up @ down)
    base_layers.set_dense_weight(layer.base_layer, weight + delta.to(weight.dtype))


class DeltaLoRAHook:
    """Training hook: keeps each layer's previous A, B and moves W after every step past K."""

    def __init__(self, model: nn.Module, name: str, delta_lambda: float, start_step: int) -> None:
        self.name, self.delta_lambda, self.start_step = name, delta_lambda, start_step
        self.prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._remember(model)

    @torch.no_grad()
    def _remember(self, model: nn.Module) -> None:
        for module_name, layer in adapted_layers(model, self.name):
            adapter = layer.adapters[self.name]
            self.prev[module_name] = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """`step` counts optimizer steps taken (1 after the first); W moves for step > start_step."""
        if step > self.start_step:
            for module_name, layer in adapted_layers(model, self.name):
                prev_A, prev_B = self.prev[module_name]
                update_base_weight(layer, layer.adapters[self.name], prev_A, prev_B, self.delta_lambda)
        self._remember(model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "prev_A": {n: a.clone() for n, (a, _) in self.prev.items()},
            "prev_B": {n: b.clone() for n, (_, b) in self.prev.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["prev_A"]) != set(self.prev) or set(state["prev_B"]) != set(self.prev):
            raise ValueError("Delta-LoRA hook state is for other adapted modules than this model's")
        self.prev = {
            n: (state["prev_A"][n].to(a.device, a.dtype).clone(), state["prev_B"][n].to(b.device, b.dtype).clone())
            for n, (a, b) in self.prev.items()
        }


@register
@dataclass
class DeltaLoRA(LowRankConfig):
    """Delta-LoRA (Zi et al. 2023): LoRA plus `W += λ·s·(B'A' - BA)` after each step past K.

    Attributes:
        r: rank of the update.
        alpha: scale numerator; `s = alpha / r` (or `alpha / sqrt(r)` with `rslora`).
        delta_lambda: λ, the share of the product's change written into W (paper: 0.5 on GLUE,
            2 on E2E).
        start_step: K; W moves only after optimizer steps t > K (the paper uses the warmup length,
            e.g. 500; 0 moves it from the first step).
        dropout: must be 0: Delta-LoRA's update is derived for a branch without dropout.
        rslora: rank-stabilised scale `alpha / sqrt(r)`.

    Saving stores the current base weight W of every adapted module (not W - W0: W0 is not kept
    in memory), so the file holds a dense copy of those layers; `moves_base_weights` says so.
    """

    delta_lambda: float = 0.5
    start_step: int = 0

    method = "delta-lora"
    peft_type = None  # PEFT cannot express the moved base weights
    moves_base_weights = True  # saved files carry W of the adapted modules (`<module>.base_weight`)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "default":
            raise ValueError(
                f"Delta-LoRA supports only init='default' (init={self.init!r} needs a 4-bit base, which Delta-LoRA cannot move)"
            )
        if self.dropout:
            raise ValueError(
                f"Delta-LoRA takes no dropout on the low-rank branch (got dropout={self.dropout}): its base "
                "update W += λ·s·(B'A' - BA) uses the change of BA as a surrogate for W's gradient, which "
                "only holds when the branch sees the same input x as W"
            )
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")

    def make_adapter(self, name: str, base_layer: nn.Module) -> LoRAAdapter:
        if isinstance(base_layer, DenseWeightProvider):
            # The base update would re-quantize W every step, losing the small update each time.
            raise ValueError("Delta-LoRA moves the base weights and cannot run over a 4-bit (quantized) base")
        in_f, out_f = in_out_features(base_layer)
        _, device = weight_dtype_device(base_layer)
        r, scale = self.module_rank_scale(name)
        return LoRAAdapter(in_f, out_f, r, scale, 0.0, self.param_dtype, device)

    def training_hooks(self, model: nn.Module, name: str, total_steps: int | None = None) -> list[DeltaLoRAHook]:
        return [DeltaLoRAHook(model, name, self.delta_lambda, self.start_step)]

    def extra_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The moved base weight W (unmerged, `(out, in)`) of each module adapter `name` adapts."""
        return {
            f"{PREFIX}{module_name}.{BASE_WEIGHT_KEY}": layer._unmerged_base_weight()
            for module_name, layer in adapted_layers(model, name)
        }

    def load_extra_state(self, model: nn.Module, name: str, remaining: dict[str, torch.Tensor]) -> None:
        """Write the saved base weights back (popping them); every adapted module needs one."""
        missing = []
        for module_name, layer in adapted_layers(model, name):
            key = f"{PREFIX}{module_name}.{BASE_WEIGHT_KEY}"
            if key not in remaining:
                missing.append(module_name)
                continue
            weight = remaining.pop(key)
            out_f, in_f = layer.out_features, layer.in_features
            if tuple(weight.shape) != (out_f, in_f):
                raise ValueError(f"{module_name}: saved base weight {tuple(weight.shape)} != model {(out_f, in_f)}")
            merged = layer.merged
            layer.unmerge()
            base_layers.set_dense_weight(layer.base_layer, weight.to(layer.weight.device))
            layer.merge(merged)
        if missing:
            raise ValueError(f"Delta-LoRA adapter lacks the moved base weights of {missing[:6]}")

    def to_dict(self) -> dict[str, Any]:
        # Readers of lorakit.json see what the file holds besides A and B.
        return {**super().to_dict(), "saved_base_weights": f"W (moved base, (out, in)) as <module>.{BASE_WEIGHT_KEY}"}
