"""The training run's optimizer and learning-rate schedule: AdamW over the adapter's parameter
groups (LoRA+'s rates where asked), warmup then a cosine, linear or constant schedule, and a
rebuild that carries both across an adapter whose layout changed mid-run (LoRA-drop, AdaLoRA)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..optim import adamw, param_groups
from .config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return adamw(param_groups(model, cfg.lr, cfg.loraplus_ratio, weight_decay=cfg.weight_decay), lr=cfg.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.schedule)
    )


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def rebuild_optimizer(
    old: torch.optim.Optimizer, old_scheduler: Any, new: torch.optim.Optimizer, make_scheduler
) -> tuple:
    """(`new`, its scheduler) continuing `old`: the schedule's position and current learning rates,
    and the optimizer state of every parameter both share (only rebuilt adapters start afresh)."""
    scheduler = make_scheduler(new)
    scheduler.load_state_dict(old_scheduler.state_dict())
    for old_group, new_group in zip(old.param_groups, new.param_groups):
        new_group["lr"] = old_group["lr"]
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
    return new, scheduler
