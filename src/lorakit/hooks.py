"""Training hooks: how a method acts during training without owning the loop.

Fixed points of a training step, in order:

    before_training(model, probe)        once, before the first step (LoRA-drop's probe); never
                                          again on resume: what it decided is in the adapter's
                                          config (`lorakit.inject.reconfigure`) and the hooks' state
    loss = task_loss + extra_loss(model)  every step (AdaLoRA's orthogonality term), once per
                                          optimizer step with weight 1, whatever the gradient
                                          accumulation
    loss.backward(); clip; optimizer.step()
    after_optimizer_step(model, step)     while .grad still exists (Delta-LoRA's base update,
                                          AdaLoRA's rank allocation)
    optimizer.zero_grad()

lorakit's trainer calls these; a user with their own loop calls them the same way:

    hooks = lorakit.training_hooks(model)
    hooks.before_training(model, lorakit.hooks.Probe(sample_batches))   # a list of batches is fine too
    for step, batch in enumerate(batches, start=1):
        loss = model(**batch).loss + hooks.extra_loss(model)
        loss.backward(); optimizer.step()
        hooks.after_optimizer_step(model, step)
        optimizer.zero_grad()

A method supplies hooks through its config's `training_hooks(model, name) -> list[TrainingHook]`
(one call per active adapter). A hook implements any subset of the methods below. Hooks hold no
math: they call the method's own functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from . import adapted_layer, inject
from .errors import LorakitError
from .optim import adamw


def model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss of a batch as Hugging Face models compute it: `model(**batch).loss`."""
    return model(**batch).loss


@dataclass
class Probe:
    """What `before_training` gets: a sample of the training data, the run's loss, and a way to
    train on the sample briefly (LoRA-drop trains plain LoRA on a sample before deciding)."""

    batches: list[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor] = model_loss
    lr: float | None = None  # the run's learning rate
    sampler: Callable[[float], list[Any]] | None = None  # fraction of the training data -> batches

    def sample(self, fraction: float) -> list[Any]:
        """Batches covering `fraction` of the training data (evenly spread over it), or the probe's
        own batches when it has no access to the data set."""
        return self.sampler(fraction) if self.sampler is not None else list(self.batches)

    def train(
        self,
        model: nn.Module,
        steps: int,
        lr: float,
        params: Iterable[nn.Parameter] | None = None,
        batches: list[Any] | None = None,
    ) -> list[float]:
        """`steps` AdamW steps over `batches` (default: the probe's; cycling) on `params` (default:
        every trainable parameter); returns the losses. The optimizer is thrown away afterwards."""
        batches = self.batches if batches is None else batches
        if not batches:
            raise ValueError("the probe holds no batches to train on")
        params = list(params) if params is not None else [p for _, p in inject.adapter_parameters(model)]
        optimizer = adamw(params, lr=lr)
        losses = []
        for step in range(steps):
            loss = self.loss(model, batches[step % len(batches)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses


class TrainingHook(Protocol):
    """Any subset of these methods; missing ones are skipped."""

    def before_training(self, model: nn.Module, probe: Probe) -> None: ...

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

    def before_training(self, model: nn.Module, probe: Probe | Iterable[Any]) -> None:
        """Run each hook's `before_training` (a plain list of batches is wrapped in a `Probe`)."""
        if not isinstance(probe, Probe):
            probe = Probe(list(probe))
        for fn in self._each("before_training"):
            fn(model, probe)

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


def training_hooks(model: nn.Module, total_steps: int | None = None) -> Hooks:
    """The training hooks of the model's active adapters, in order (empty for plain LoRA).
    `total_steps`: the run's optimizer steps (AdaLoRA's budget schedule needs them)."""
    state = inject.lorakit_state(model)
    if state is None or not state.configs:
        inject.adapter_config(model)  # the usual "no adapter" error
    merged = adapted_layer.merged_trainable(model)
    if merged:
        raise LorakitError(adapted_layer.MERGED_TRAINING.format(names=merged))
    hooks: list[Any] = []
    for name in state.active:
        hooks.extend(state.configs[name].training_hooks(model, name, total_steps))
    return Hooks(hooks)
