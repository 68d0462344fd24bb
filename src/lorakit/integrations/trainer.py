"""What a callback cannot reach, as a small `Trainer` mixin: exact resume, LoRA+ and LoRA-drop's probe.

    from lorakit.integrations import lorakit_trainer
    trainer = lorakit_trainer(SFTTrainer)(model=model, args=args, train_dataset=data)   # was SFTTrainer(...)

`lorakit_trainer(cls)` is `class LorakitSFTTrainer(LorakitTrainerMixin, SFTTrainer)`, with a
`LorakitCallback` added when the caller passed none. Each override exists because the Trainer does
the thing before any callback event fires (transformers 5, `Trainer.train`)::

    train()
      _load_from_checkpoint(ckpt)     <- resume: the Trainer would look for full-model weights (or a PEFT
                                         model) here and fail on an adapter-only checkpoint
      _inner_training_loop
        create_optimizer()            <- LoRA+'s parameter groups; LoRA-drop's probe, which rebuilds
                                         the adapters, so it must come before the optimizer (and the
                                         DDP wrapper) take hold of their parameters
        accelerator.prepare (DDP), the scheduler, the optimizer's saved state
        on_train_begin                <- the first callback event of a run
        ...
      log(logs)                       <- the method's extra loss, logged beside the task loss
      _load_best_model()              <- load_best_model_at_end: the best checkpoint's adapter (the
                                         Trainer would look for full-model weights there)

`create_optimizer` and `log` are the Trainer's documented extension points ("subclass and
override"); `_load_from_checkpoint` and `_load_best_model` are not public, but they are the places
the Trainer loads a checkpoint's weights (PEFT models go through them too), so lorakit overrides them
and falls back to them for checkpoints that hold no lorakit adapter.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from .. import inject, io
from ..errors import LorakitError
from ..hooks import Probe
from ..optim import param_groups
from .callback import LorakitCallback, has_before_training
from .checkpoints import restore_checkpoint


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class LorakitTrainerMixin:
    """Mix into any `transformers.Trainer` subclass, first: `class T(LorakitTrainerMixin, SFTTrainer)`.

    Adds to what `LorakitCallback` does (and adds one when none was passed):

    - `train(resume_from_checkpoint=...)` restores the checkpoint's adapters exactly (the layout
      training had reached, every tensor as the model held it, the training hooks' state);
    - the optimizer the trainer builds has LoRA+'s parameter groups when the callback's
      `loraplus_ratio` is set (any method: `lorakit.param_groups`), the trainer's optimizer class
      and settings otherwise unchanged;
    - hooks that decide before training (LoRA-drop's probe) run before the optimizer is built, on
      the main process, their decision sent to the others;
    - logs carry `extra_loss` (the method's own term, e.g. AdaLoRA's regulariser) beside `loss`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise LorakitError(
                "lorakit's trainer integration covers one process and DDP (accelerate, torchrun); for "
                "FSDP use `lorakit train --distributed fsdp`"
            )
        if self.lorakit_callback is None:
            callback = LorakitCallback()
            self.add_callback(callback)
            callback.install(self.model)  # on_init_end has fired already
        self.lorakit_callback.managed = True

    @property
    def lorakit_callback(self) -> LorakitCallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, LorakitCallback)), None)

    # --- resume ---------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.model if model is None else model
        if not inject.adapter_names(target) or not io.find_adapters(resume_from_checkpoint):
            # not lorakit's checkpoint (e.g. full weights written without the callback): the Trainer's own
            # load; the callback then refuses to go on without the hooks' state, where the method has any
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        hook_state = restore_checkpoint(target, resume_from_checkpoint, may_rebuild=self.optimizer is None)
        self.lorakit_callback.resume_with(hook_state)
        return None

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: the Trainer would look for full-model weights in the best checkpoint."""
        best = self.state.best_model_checkpoint
        if not inject.adapter_names(self.model) or not best or not io.find_adapters(best):
            return super()._load_best_model()
        restore_checkpoint(self.model, best, may_rebuild=True)  # training is over: the optimizer no longer matters
        return None

    # --- the optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        callback = self.lorakit_callback
        if self.optimizer is not None or not inject.adapter_names(opt_model):
            return super().create_optimizer(model)
        hooks = callback.build_hooks(opt_model, self.state.max_steps)
        if self.state.global_step == 0 and not callback.resumed and has_before_training(hooks):
            self._lorakit_before_training(opt_model, hooks)
            callback.probed = True
        if callback.loraplus_ratio is None:
            return super().create_optimizer(model)
        optimizer_cls, optimizer_kwargs = (
            self.optimizer_cls_and_kwargs
            if self.optimizer_cls_and_kwargs is not None
            else self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        )
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or {
            "params",
            "model",
            "optimizer_dict",
        } & set(optimizer_kwargs):
            raise LorakitError(
                f"loraplus_ratio needs an optimizer built from parameter groups; {self.args.optim!r} builds "
                "its own: pick a torch optimizer (e.g. optim='adamw_torch')"
            )
        groups = param_groups(
            opt_model, self.args.learning_rate, callback.loraplus_ratio, weight_decay=self.args.weight_decay
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _lorakit_before_training(self, model: nn.Module, hooks: Any) -> None:
        """The hooks' look before training (LoRA-drop's probe) on the main process; the other
        processes take its decision: the adapters' layout and the hooks' state (the adapter tensors
        follow when DDP wraps the model: it broadcasts process 0's)."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        error = None
        if not distributed or dist.get_rank() == 0:
            try:
                hooks.before_training(
                    model, Probe(self._lorakit_sample(0.0), lr=self.args.learning_rate, sampler=self._lorakit_sample)
                )
            except ValueError as err:  # e.g. LoRA-drop's stage 1 measured nothing
                error = str(err)
        if distributed:
            names = inject.adapter_names(model)
            message = [
                error,
                {
                    n: {
                        f: getattr(inject.adapter_config(model, n), f)
                        for f in inject.adapter_config(model, n).layout_fields
                    }
                    for n in names
                },
                hooks.state_dict(),
            ]
            dist.broadcast_object_list(message, src=0)
            error, layouts, hook_state = message
            if error is None and dist.get_rank() != 0:
                for name, layout in layouts.items():
                    config = inject.adapter_config(model, name)
                    if any(getattr(config, f) != v for f, v in layout.items()):
                        inject.reconfigure(model, name, **layout)
                hooks.load_state_dict(hook_state)
        if error is not None:
            raise LorakitError(f"before training: {error}")

    def _lorakit_sample(self, fraction: float) -> list[Any]:
        """Batches covering `fraction` of the training data, evenly spread over it (at least one
        batch), batched at the run's global batch size: the same batches whatever the process count."""
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise LorakitError(
                "this method looks at the training data before training: it needs a train_dataset "
                "with a length (not an IterableDataset)"
            )
        collator = self.data_collator
        try:
            import datasets
        except ImportError:  # pragma: no cover - transformers' Trainer data usually comes from it
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="lorakit probe")
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description="lorakit probe")
        count = min(len(dataset), max(1, round(fraction * len(dataset))))
        step = len(dataset) / count
        indices = [min(len(dataset) - 1, int(i * step)) for i in range(count)]
        batch_size = self.args.per_device_train_batch_size * max(1, self.args.world_size)
        chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        return [_to_device(collator([dataset[i] for i in chunk]), self.args.device) for chunk in chunks]

    # --- logging --------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        callback = self.lorakit_callback
        extra = callback.pop_extra_loss() if callback is not None and "loss" in logs else None
        if extra is not None and math.isfinite(extra):
            logs = {**logs, "extra_loss": round(extra, 6)}
        return super().log(logs, *args, **kwargs)


@functools.cache
def lorakit_trainer(trainer_class: type) -> type:
    """`trainer_class` (transformers' `Trainer` or any subclass: TRL's `SFTTrainer`, ...) with
    `LorakitTrainerMixin` mixed in first. The same class object for the same argument."""
    from transformers import Trainer

    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise LorakitError(f"lorakit_trainer takes a transformers.Trainer class, got {trainer_class!r}")
    if issubclass(trainer_class, LorakitTrainerMixin):
        return trainer_class
    return type(
        f"Lorakit{trainer_class.__name__}",
        (LorakitTrainerMixin, trainer_class),
        {
            "__module__": __name__,
            "__doc__": f"{trainer_class.__name__} with lorakit's checkpoints, resume, LoRA+ "
            "and training hooks (LorakitTrainerMixin).",
        },
    )
