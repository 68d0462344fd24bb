"""Training hooks: how a method acts during training without owning the loop.

Fixed points of a training step, in order::

    before_training(model, batches)      once, before the first step (LoRA-drop's probe)
    loss = task_loss + extra_loss(model)  every step (AdaLoRA's orthogonality term)
    loss.backward(); clip; optimizer.step()
    after_optimizer_step(model, step)     while .grad still exists (Delta-LoRA's base update,
                                          AdaLoRA's rank allocation)
    optimizer.zero_grad()

lorakit's trainer calls these; a user with their own loop calls them the same way::

    hooks = lorakit.training_hooks(model)
    hooks.before_training(model, batches)
    for step, batch in enumerate(batches, start=1):
        loss = model(**batch).loss + hooks.extra_loss(model)
        loss.backward(); optimizer.step()
        hooks.after_optimizer_step(model, step)
        optimizer.zero_grad()

A method supplies hooks by giving its config a `training_hooks(model) -> list[TrainingHook]`.
A hook implements any subset of the three methods. Hooks hold no math: they call the method's
own functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from . import inject


class TrainingHook(Protocol):
    """Any subset of these methods; missing ones are skipped."""

    def before_training(self, model: nn.Module, batches: Iterable[Any]) -> None: ...

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...

    def after_optimizer_step(self, model: nn.Module, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Hooks:
    """Calls each hook's method in order; what the trainer (or your loop) talks to."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = list(hooks)

    def _each(self, method: str):
        for hook in self.hooks:
            fn = getattr(hook, method, None)
            if callable(fn):
                yield fn

    def before_training(self, model: nn.Module, batches: Iterable[Any]) -> None:
        for fn in self._each("before_training"):
            fn(model, batches)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | float:
        """Sum of the hooks' extra loss terms (0.0 when none)."""
        total: torch.Tensor | float = 0.0
        for fn in self._each("extra_loss"):
            term = fn(model)
            if term is not None:
                total = total + term
        return total

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        for fn in self._each("after_optimizer_step"):
            fn(model, step)

    def state_dict(self) -> list[dict[str, Any]]:
        """Each hook's state (for checkpoints, so that resume continues exactly)."""
        return [hook.state_dict() if callable(getattr(hook, "state_dict", None)) else {} for hook in self.hooks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.hooks):
            raise ValueError(f"checkpoint has state for {len(states)} training hooks, the model has {len(self.hooks)}")
        for hook, state in zip(self.hooks, states):
            if callable(getattr(hook, "load_state_dict", None)):
                hook.load_state_dict(state)

    def __bool__(self) -> bool:
        return bool(self.hooks)


def training_hooks(model: nn.Module) -> Hooks:
    """The training hooks of the model's adapter method (empty for plain LoRA)."""
    config = inject.adapter_config(model)
    make = getattr(config, "training_hooks", None)
    return Hooks(make(model) if callable(make) else [])
