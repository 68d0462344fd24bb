r"""LoRA-drop: output-based LoRA pruning (Zhou et al. 2024, arXiv 2402.07721).

::

    stage 1   every target module: its own LoRA, trained briefly on a sample of the data
              g_i = sum over the sample of ||ΔW_i x_i||^2,   I_i = g_i / sum_j g_j
    stage 2   kept = the fewest modules whose importance adds up to >= T (default 0.9): own LoRA
              every other module: ONE LoRA shared by all modules of its kind (same name and shape)
              train on the full data with that layout

        kept module i:     y = x W_i^T + s · x A_i^T B_i^T
        shared module j:   y = x W_j^T + s · x A_g^T B_g^T      (A_g, B_g shared by group g)

The importance is the size of what each module's update actually adds to its output on real inputs,
so a module whose (briefly trained) update barely moves its output gets a shared pair. Both stages
run inside one `lorakit train` (stage 1 in the `before_training` hook, through `Probe.train`); the
plan (scores, kept modules, groups) is the adapter's layout (`plan`, `lorakit.inject.reconfigure`): saved
with the adapter, restored on load and on resume (stage 1 never runs twice). A shared pair is saved
once; merging adds its product to every module that shares it. Stage 2 starts every pair afresh
(B = 0), as the paper trains the new layout from the start.

For a loop of your own: `module_importance`, `choose_kept`, `sharing_groups` and `apply_plan` below.
PEFT has no LoRA-drop (nor shared pairs), so the adapter is saved in lorakit's layout only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapted_layer import adapted_layers, adapter_config, reconfigure
from ..base_layers import in_out_features, weight_dtype_device
from .base import register
from .lora import LoRAAdapter, LowRankConfig


@torch.no_grad()
def module_importance(model: nn.Module, name: str, batches: list[Any]) -> dict[str, float]:
    """`I_i = g_i / sum g`, `g_i = sum over the batches of ||ΔW_i x_i||^2` for every module of the
    (LoRA-pair) adapter `name`; the model runs in eval mode (no dropout) and is left as it was."""
    totals: dict[str, float] = {}
    handles = []
    for module_name, layer in adapted_layers(model, name):
        adapter = layer.adapters[name]

        def measure(_, inputs, __, module_name=module_name, adapter=adapter):
            x = inputs[0]
            delta = (x @ adapter.lora_A.to(x.dtype).T) @ adapter.lora_B.to(x.dtype).T * adapter.scale
            totals[module_name] = totals.get(module_name, 0.0) + float(delta.float().pow(2).sum())

        handles.append(layer.register_forward_hook(measure))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    total = sum(totals.values())
    if not total > 0 or not math.isfinite(total):
        raise ValueError(
            f"LoRA-drop: the stage-1 updates add nothing measurable to the outputs (sum {total}); "
            "train stage 1 longer or with a higher learning rate"
        )
    return {m: g / total for m, g in totals.items()}


def choose_kept(importance: dict[str, float], threshold: float) -> list[str]:
    """The fewest modules, most important first, whose importance adds up to at least `threshold`."""
    kept, cumulative = [], 0.0
    for module, score in sorted(importance.items(), key=lambda item: (-item[1], item[0])):
        if cumulative >= threshold:
            break
        kept.append(module)
        cumulative += score
    return kept


def sharing_groups(model: nn.Module, name: str, kept: list[str]) -> dict[str, str]:
    """Module -> group for every module of adapter `name` not in `kept`: one group per module kind
    (the last component of its name) and shape, e.g. `q_proj(576x576)`, and per rank and alpha where
    `rank_pattern` / `alpha_pattern` give a module other ones (`q_proj(576x576,r=16,alpha=32)`): a
    shared pair has one rank and scale."""
    config = adapter_config(model, name)
    groups = {}
    for module_name, layer in adapted_layers(model, name):
        if module_name not in kept:
            in_f, out_f = in_out_features(layer.base_layer)
            r, alpha = config.module_settings(module_name)["r"], config.module_settings(module_name)["alpha"]
            own = "" if (r, alpha) == (config.r, config.alpha) else f",r={r},alpha={alpha:g}"
            groups[module_name] = f"{module_name.rsplit('.', 1)[-1]}({out_f}x{in_f}{own})"
    return groups


def apply_plan(model: nn.Module, name: str, importance: dict[str, float], threshold: float) -> dict[str, Any]:
    """Stage 2's layout for adapter `name`: kept modules keep their own pair, the others share one per
    group; every pair starts afresh. Returns the plan (also the adapter's config `plan` from now on)."""
    kept = choose_kept(importance, threshold)
    plan = {
        "scores": dict(importance),
        "kept": sorted(kept),
        "groups": sharing_groups(model, name, kept),
        "threshold": threshold,
    }
    reconfigure(model, name, plan=plan)
    return plan


class LoRADropHook:
    """Stage 1 before training: a short LoRA phase on a sample, the importance, the plan."""

    def __init__(self, name: str, config: LoRADrop) -> None:
        self.name, self.config = name, config

    def before_training(self, model: nn.Module, probe: Any) -> None:
        config = adapter_config(model, self.name)
        if config.plan:  # decided already (a loaded adapter): nothing to probe
            return
        batches = probe.sample(config.sample_fraction)
        steps = config.probe_steps or len(batches)
        lr = config.probe_lr or probe.lr
        if lr is None:
            raise ValueError("LoRA-drop's stage 1 needs a learning rate: LoRADrop(probe_lr=...) or a Probe with lr")
        probe.train(model, steps=steps, lr=lr, batches=batches)
        apply_plan(model, self.name, module_importance(model, self.name, batches), config.threshold)


@register
@dataclass
class LoRADrop(LowRankConfig):
    """LoRA-drop (Zhou et al. 2024): keep own LoRA pairs where the update matters most, share one pair
    per module kind elsewhere (see the module docstring).

    Attributes:
        r, alpha, dropout, rslora, rank_pattern, alpha_pattern: as LoRA's, for every pair.
        threshold: T, the importance the kept modules must add up to (paper: 0.9).
        sample_fraction: share of the training data stage 1 trains and measures on (evenly spread
            over the data).
        probe_steps: stage-1 optimizer steps; None: one pass over the sample.
        probe_lr: stage-1 learning rate; None: the run's.
        plan: the layout stage 1 decided (`scores`, `kept`, `groups`, `threshold`); empty until then.
    """

    threshold: float = 0.9
    sample_fraction: float = 0.1
    probe_steps: int | None = None
    probe_lr: float | None = None
    plan: dict[str, Any] = field(default_factory=dict)

    method = "lora-drop"
    peft_type = None  # PEFT has neither LoRA-drop nor shared pairs
    layout_fields: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern", "plan")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "default":
            raise ValueError("LoRA-drop supports only init='default' (stage 2 starts every pair afresh)")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.probe_steps is not None and (not isinstance(self.probe_steps, int) or self.probe_steps < 1):
            raise ValueError(f"probe_steps must be a positive integer or None, got {self.probe_steps!r}")
        if self.probe_lr is not None and not self.probe_lr > 0:
            raise ValueError(f"probe_lr must be positive, got {self.probe_lr}")
        if not isinstance(self.plan, dict) or (self.plan and not {"kept", "groups"} <= set(self.plan)):
            raise ValueError(f"plan must be a LoRA-drop plan with 'kept' and 'groups', got {self.plan!r}")

    def module_settings(self, name: str) -> dict[str, Any]:
        # every module is rebuilt when the plan arrives: stage 2 starts afresh
        return {
            **super().module_settings(name),
            "planned": bool(self.plan),
            "group": self.plan.get("groups", {}).get(name),
        }

    def make_adapters(self, layers: dict[str, nn.Module]) -> dict[str, LoRAAdapter]:
        groups = self.plan.get("groups", {})
        shared: dict[str, tuple[str, LoRAAdapter]] = {}
        adapters = {}
        for module_name, base_layer in layers.items():
            group = groups.get(module_name)
            if group is None:
                adapters[module_name] = self.make_adapter(module_name, base_layer)
                continue
            if group not in shared:
                shared[group] = module_name, self.make_adapter(module_name, base_layer)
            first, adapter = shared[group]
            if in_out_features(base_layer) != (adapter.lora_A.shape[1], adapter.lora_B.shape[0]):
                raise ValueError(f"LoRA-drop group {group!r}: {module_name} has another shape than its group")
            if self.module_rank_scale(module_name) != self.module_rank_scale(first):
                raise ValueError(
                    f"LoRA-drop group {group!r}: {module_name} has rank and scale "
                    f"{self.module_rank_scale(module_name)}, {first} {self.module_rank_scale(first)}; modules "
                    "that share one pair need the same (rank_pattern / alpha_pattern)"
                )
            adapters[module_name] = adapter
        return adapters

    def make_adapter(self, name: str, base_layer: nn.Module) -> LoRAAdapter:
        in_f, out_f = in_out_features(base_layer)
        _, device = weight_dtype_device(base_layer)
        r, scale = self.module_rank_scale(name)
        return LoRAAdapter(in_f, out_f, r, scale, self.dropout, self.param_dtype, device)

    def training_hooks(self, model: nn.Module, name: str, total_steps: int | None = None) -> list[LoRADropHook]:
        return [LoRADropHook(name, self)]
