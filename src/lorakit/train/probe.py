"""The probe before training: what hooks that decide before the first step (LoRA-drop's stage 1) get.

`run_probe` builds a `lorakit.hooks.Probe` from the run's training data (a few batches, evenly spread
samples of any fraction, the run's own loss and learning rate), lets the hooks decide on the main
process, and hands every other process the decision (the adapter layout and the hooks' state).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import inject
from ..errors import LorakitError
from ..hooks import Hooks, Probe
from . import data as data_mod
from . import evaluate
from .config import TrainConfig
from .distributed import SingleProcess
from .run_data import Datasets


def run_probe(
    cfg: TrainConfig,
    model: nn.Module,
    hooks: Hooks,
    datasets: Datasets,
    pad_id: int,
    device: torch.device,
    bf16: bool,
    strategy: SingleProcess,
) -> None:
    """Hooks that probe the model before training (LoRA-drop) decide on the main process; the
    others take its decision (the adapter layout; the tensors follow when DDP wraps the model)."""
    per_epoch = max(1, len(datasets.train) // cfg.batch_size)
    probe = [
        data_mod.collate(data_mod.micro_batch(datasets.train, i, cfg.batch_size, cfg.seed), pad_id)
        for i in range(min(4, per_epoch))
    ]

    def sample(fraction: float) -> list[dict[str, torch.Tensor]]:
        chosen = data_mod.evenly_spaced(datasets.train, fraction)
        return [
            evaluate.to_device(data_mod.collate(chosen[i : i + cfg.batch_size], pad_id), device)
            for i in range(0, len(chosen), cfg.batch_size)
        ]

    if strategy.is_main:
        try:
            hooks.before_training(
                model,
                Probe(
                    [evaluate.to_device(batch, device) for batch in probe],
                    functools.partial(task_loss, device=device, bf16=bf16),
                    cfg.lr,
                    sample,
                ),
            )
        except ValueError as err:  # e.g. LoRA-drop's stage 1 measured nothing
            error = f"{cfg.method} before training: {err}"
        else:
            error = None
    else:
        error = None
    error = strategy.broadcast(error)
    if error is not None:
        raise LorakitError(error)
    if strategy.world_size > 1:
        name = inject.lorakit_state(model).active[0]
        config = inject.adapter_config(model, name)
        layout = strategy.broadcast({field: getattr(config, field) for field in config.layout_fields})
        if any(getattr(config, field) != value for field, value in layout.items()):
            inject.reconfigure(model, name, **layout)
        hooks.load_state_dict(strategy.broadcast(hooks.state_dict()))


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool) -> torch.Tensor:
    """The run's training loss of one batch (what the step loop computes), for hooks' probes."""
    with evaluate.autocast(device, bf16):
        return model(**batch).loss
