"""What a Trainer checkpoint holds of lorakit, and how a resume restores it.

`checkpoint-N/` (next to the optimizer, scheduler, RNG and trainer-state files `Trainer` writes):

- the adapter(s) in PEFT's layout, as `lorakit.save` writes them (`adapter_model.safetensors`,
  `adapter_config.json`, `lorakit.json`; other named adapters in sub-directories);
- `lorakit_adapter_state.safetensors`: every adapter tensor exactly as the model holds it (the PEFT
  file may hold less: AdaLoRA's keeps only the triplets it kept, while the pruned ones still shape
  its regulariser and the optimizer's moments), so a resume continues bit for bit;
- `lorakit_hooks.pt`: the training hooks' state (AdaLoRA's importance averages, Delta-LoRA's previous
  factors); tensors and numbers only, read back with `torch.load(weights_only=True)`.

No full-model weights file: the frozen base is the one the run started from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import files, inject, io
from ..errors import LorakitError
from ..train.checkpoint import exact_adapter_state, keep_own_selection, load_exact_adapter_state

EXACT_STATE_NAME = "lorakit_adapter_state.safetensors"
HOOKS_STATE_NAME = "lorakit_hooks.pt"


def finite_exact_state(model: nn.Module, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every adapter tensor as the model holds it; a checkpoint is never written from non-finite ones."""
    exact = exact_adapter_state(model)
    if not all(bool(torch.isfinite(t).all()) for t in exact.values() if t.is_floating_point()):
        raise LorakitError(
            f"refusing to write checkpoint {directory}: the adapter weights are not finite (the run "
            "diverged; try a lower learning rate)"
        )
    return exact


def save_training_state(
    directory: str | os.PathLike, model: nn.Module, hooks: Any, exact: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the exact adapter tensors and the hooks' state into `directory` (beside the adapter)."""
    directory = Path(directory)
    exact = finite_exact_state(model, directory) if exact is None else exact
    files.clean_temporaries(directory)  # what a save killed in this checkpoint left behind
    files.atomic_write(directory / EXACT_STATE_NAME, lambda tmp: save_file(exact, str(tmp), metadata={"format": "pt"}))
    state = hooks.state_dict() if hooks is not None else []
    files.atomic_write(directory / HOOKS_STATE_NAME, lambda tmp: torch.save(state, tmp))


def _layout(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.layout_fields}


def _adapter_trainable(model: nn.Module, name: str) -> bool:
    return any(
        p.requires_grad for _, layer in inject.adapted_layers(model, name) for p in layer.adapters[name].parameters()
    )


def restore_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike, may_rebuild: bool = True
) -> list[dict[str, Any]]:
    """Load a Trainer checkpoint's adapters into the adapted `model`, exactly; returns the saved hook
    state, for the hooks built when training starts.

    Every adapter in the checkpoint must already be on the model (the script adapts the model the
    same way before resuming). Where training had decided a layout (AdaLoRA's final ranks, LoRA-drop's
    plan) the model's adapter is rebuilt to it first, which replaces its parameters: only possible
    before an optimizer holds them (`may_rebuild`).
    """
    path = Path(checkpoint)
    found = io.find_adapters(path)
    if not found:
        raise LorakitError(f"{path} holds no lorakit adapter to resume from (adapter_model.safetensors + lorakit.json)")
    names = inject.adapter_names(model)
    missing = [n for n in found if n not in names]
    if missing:
        raise LorakitError(
            f"{path} holds adapter(s) {missing} that the model does not have (it has {names}): adapt "
            "the model as the run that wrote the checkpoint did before resuming"
        )
    state = inject.lorakit_state(model)
    active = state.active
    # `adapt` freezes everything but the new adapter (and its train_modules): put back what was trainable
    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, adapter_dir in found.items():
        try:
            saved_config, _ = io.read_config(adapter_dir)
        except ValueError as err:
            raise LorakitError(f"cannot resume from {path}: {err}") from None
        current = inject.adapter_config(model, name)
        if type(saved_config) is not type(current):
            raise LorakitError(
                f"cannot resume from {path}: adapter {name!r} is {saved_config.method!r} there, "
                f"{current.method!r} on the model"
            )
        if _layout(saved_config) != _layout(current):
            # what training decided (ranks, a plan) shapes the adapter: rebuild it as saved
            if not may_rebuild:
                raise LorakitError(
                    f"cannot resume from {path}: adapter {name!r} must be rebuilt to the layout training "
                    "had reached, but an optimizer built before the resume holds its parameters; let "
                    "the trainer build its optimizer"
                )
            trainable = _adapter_trainable(model, name)
            inject.remove(model, name)
            io.adapt_as_saved(model, saved_config, name)
            try:
                keep_own_selection(model, adapter_dir, name)  # the adapter files of an uninterrupted run
            except ValueError as err:
                raise LorakitError(
                    f"cannot resume from {path}: {adapter_dir / io.LORAKIT_CONFIG_NAME} is damaged ({err})"
                ) from None
            for _, layer in inject.adapted_layers(model, name):
                for p in layer.adapters[name].parameters():
                    p.requires_grad_(trainable)
            for param_name, p in model.named_parameters():
                if param_name in was_trainable:
                    p.requires_grad_(was_trainable[param_name])
        try:
            io.load_adapter_state(model, io.read_tensors(adapter_dir / io.WEIGHTS_NAME), name)
        except (ValueError, FileNotFoundError) as err:
            raise LorakitError(f"cannot resume from {path}: {' '.join(str(err).split())[:400]}") from None
    inject.set_active(model, active)
    exact, hooks = path / EXACT_STATE_NAME, path / HOOKS_STATE_NAME
    absent = [p.name for p in (exact, hooks) if not p.is_file()]
    if absent:
        raise LorakitError(
            f"checkpoint {path} is incomplete ({', '.join(absent)} missing): it was cut short while being "
            "written, or was not written during a run with lorakit's trainer integration; resume from "
            "an earlier checkpoint"
        )
    try:
        tensors = load_file(str(exact))
        hook_state = torch.load(hooks, weights_only=True)
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise their own error types
        raise LorakitError(f"checkpoint {path} is damaged ({' '.join(str(err).split())[:200]})") from None
    load_exact_adapter_state(model, tensors)
    return hook_state
