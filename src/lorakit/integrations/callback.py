"""`LorakitCallback`: lorakit's training-time behaviour inside `transformers.Trainer` and every trainer
built on it (TRL's `SFTTrainer`, `DPOTrainer`, ...), as one `TrainerCallback`.

Where each piece runs, by the Trainer's own events (transformers 5)::

    on_init_end          the model's `save_pretrained` writes its adapters (PEFT layout), so the
                         Trainer's checkpoints and `trainer.save_model(dir)` hold the adapter, never
                         the whole model
    on_train_begin       the training hooks, with the run's length from the trainer's state
                         (`state.max_steps`); gradient checkpointing made to reach the adapters
    on_step_begin        each optimizer step, once: the gradient of the method's extra loss
                         (AdaLoRA's orthogonality term), weight 1 whatever the gradient accumulation
    on_pre_optimizer_step  the first step: every adapter got a gradient (else stop, saying why)
    on_optimizer_step    after `optimizer.step()`, while the gradients exist: `after_optimizer_step`
                         (AdaLoRA's rank allocation, Delta-LoRA's base update)

Why the extra loss goes in as a gradient instead of a loss term: the Trainer divides, sums and rescales
the loss in ways that depend on the model, the trainer subclass and the process count
(`num_items_in_batch`, `average_tokens_across_devices`, a `compute_loss` override); the gradient of a
term that depends only on the adapter weights is the same whatever that arithmetic is. Under DDP
every process adds the same gradient before the all-reduce averages it, so it counts once.

What a callback cannot reach is in `lorakit.integrations.trainer`: resuming (the Trainer loads a
checkpoint before any callback runs), LoRA+ (the optimizer is built before `on_train_begin`) and
LoRA-drop's probe (it rebuilds the adapters, so it must run before the optimizer exists).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .. import adapted_layer, inject, io
from ..errors import LorakitError
from ..hooks import Hooks, training_hooks
from .checkpoints import finite_exact_state, save_training_state

logger = logging.getLogger("lorakit")


def require_adapted(model: nn.Module | None) -> nn.Module:
    """The model, or a clear error when it carries no lorakit adapter."""
    if model is None or not inject.adapter_names(model):
        raise LorakitError(
            "LorakitCallback: the trainer's model carries no lorakit adapter; call "
            "lorakit.adapt(model, lorakit.LoRA(...)) (or lorakit.load) before building the trainer"
        )
    return model


class AdapterSavePretrained:
    """`model.save_pretrained` of a model carrying adapters: writes the adapters (PEFT layout, what
    `lorakit.save` writes) instead of the whole model, as a PEFT model's `save_pretrained` does.
    During a run it also writes the training state a resume needs (exact tensors, hook state).

    The Trainer saves every checkpoint and `save_model` through the model's `save_pretrained`; this
    is how a callback decides what those hold. A model with no adapter left (after
    `lorakit.merge_and_unload`) saves itself in full through the original method.
    """

    def __init__(self, model: nn.Module, original: Any, callback: LorakitCallback) -> None:
        self.model, self.original, self.callback = model, original, callback

    def __call__(
        self, save_directory: str, *args: Any, is_main_process: bool = True, state_dict: Any = None, **kwargs: Any
    ) -> None:
        if not inject.adapter_names(self.model):
            return self.original(
                save_directory, *args, is_main_process=is_main_process, state_dict=state_dict, **kwargs
            )
        if not is_main_process:
            return None
        exact = finite_exact_state(self.model, save_directory) if self.callback.training else None
        config = getattr(self.model, "config", None)
        base = getattr(config, "name_or_path", None) or None
        io.save(self.model, save_directory, base_model_name_or_path=base)
        if exact is not None:
            save_training_state(save_directory, self.model, self.callback.hooks, exact)
        return None


def gradient_checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def make_inputs_require_grad(model: nn.Module) -> None:
    """Reentrant checkpointing gives no gradient to anything inside a checkpointed block when none of
    the block's inputs requires one, which is the case when the whole base is frozen: the adapters
    there silently never train. The input embeddings' output is made to require a gradient (what
    PEFT does); transformers does it itself for models whose main input is `input_ids` (5.x), not for
    the others, nor before version 5."""
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None:
        return
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()


class LorakitCallback(TrainerCallback):
    """lorakit's training hooks, adapter-only checkpoints and gradient checkpointing, inside any
    `transformers.Trainer`:

        model = lorakit.adapt(model, lorakit.AdaLoRA(init_r=12, target_r=4))
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, callbacks=[LorakitCallback()])

    Args:
        loraplus_ratio: LoRA+'s `lr_B / lr_A` (about 16), or None for plain learning rates. The
            parameter groups are the optimizer's, which a callback cannot build: a trainer made with
            `lorakit.integrations.lorakit_trainer` builds them from this value; with a plain trainer,
            the callback checks the optimizer has them (`optimizers=(AdamW(lorakit.param_groups(...)),
            None)`) and stops otherwise.

    Attributes:
        hooks: the training hooks of the current run (built at its start).
        extra_losses: the method's extra loss of each optimizer step since the trainer last logged
            (a lorakit trainer logs their mean as `extra_loss`).
    """

    def __init__(self, loraplus_ratio: float | None = None) -> None:
        if loraplus_ratio is not None:
            if (
                isinstance(loraplus_ratio, bool)
                or not isinstance(loraplus_ratio, (int, float))
                or not math.isfinite(loraplus_ratio)
                or loraplus_ratio <= 0
            ):
                raise LorakitError(f"loraplus_ratio must be a positive number (or None), got {loraplus_ratio!r}")
            loraplus_ratio = float(loraplus_ratio)
        self.loraplus_ratio = loraplus_ratio
        self.hooks: Hooks | None = None
        self.extra_losses: list[float] = []
        self.training = False
        self.resumed_hook_state: list[dict[str, Any]] | None = None  # set by a lorakit trainer's resume
        self.resumed = False
        self.probed = False  # before_training ran (a lorakit trainer runs it before building its optimizer)
        self.managed = False  # a lorakit trainer (LorakitTrainerMixin) does what a callback cannot
        self._layout_version = 0
        self._gradients_checked = False

    # --- set-up -----------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Make the model's `save_pretrained` write its adapters (idempotent)."""
        require_adapted(model)
        current = model.__dict__.get("save_pretrained")
        if isinstance(current, AdapterSavePretrained):
            current.callback = self
            return
        original = getattr(model, "save_pretrained", None)
        if not callable(original):
            raise LorakitError(
                f"LorakitCallback: {type(model).__name__} has no save_pretrained for the Trainer to call"
            )
        model.save_pretrained = AdapterSavePretrained(model, original, self)

    def build_hooks(self, model: nn.Module, total_steps: int) -> Hooks:
        """The run's training hooks (once per run), with the hook state of a resumed checkpoint."""
        if self.hooks is None:
            try:
                self.hooks = training_hooks(model, total_steps if total_steps and total_steps > 0 else None)
            except ValueError as err:  # e.g. AdaLoRA's schedule longer than the run
                raise LorakitError(str(err)) from None
            if self.resumed_hook_state is not None:
                try:
                    self.hooks.load_state_dict(self.resumed_hook_state)
                except (ValueError, KeyError) as err:
                    raise LorakitError(f"cannot resume the training hooks: {err}") from None
        return self.hooks

    def resume_with(self, hook_state: list[dict[str, Any]] | None) -> None:
        """Called by a lorakit trainer after it restored a checkpoint's adapters."""
        self.resumed, self.resumed_hook_state = True, hook_state

    # --- the Trainer's events -------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.install(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        model = require_adapted(model)
        merged = adapted_layer.merged_trainable(model)
        if merged:
            raise LorakitError(adapted_layer.MERGED_TRAINING.format(names=merged))
        self.install(model)  # a model swapped in since (model_init)
        if getattr(args, "load_best_model_at_end", False) and not self.managed:
            raise LorakitError(
                "load_best_model_at_end loads the best checkpoint's weights where a plain Trainer looks "
                "for the whole model: build the trainer with lorakit.integrations.lorakit_trainer(...)"
            )
        self.training, self._gradients_checked, self.extra_losses = True, False, []
        hooks = self.build_hooks(model, state.max_steps)
        if state.global_step > 0 and not self.resumed and any(hooks.state_dict()):
            raise LorakitError(
                "resuming without the training hooks' state (AdaLoRA's importance, Delta-LoRA's previous "
                "factors): build the trainer with lorakit.integrations.lorakit_trainer(...) so that its "
                "resume restores them"
            )
        if state.global_step == 0 and not self.resumed and not self.probed and has_before_training(hooks):
            self._run_before_training_late(model, hooks, args, train_dataloader)
        self._layout_version = inject.lorakit_state(model).layout_version  # what the optimizer was built on
        if self.loraplus_ratio is not None:
            check_loraplus_groups(optimizer, self.loraplus_ratio)
        if gradient_checkpointing_on(model):
            make_inputs_require_grad(model)

    def _run_before_training_late(self, model: nn.Module, hooks: Hooks, args, train_dataloader) -> None:
        """A plain trainer built its optimizer already: a hook may look (and decide nothing new), but
        one that rebuilds adapters (LoRA-drop's plan) would leave the optimizer on dead parameters."""
        from ..hooks import Probe

        batches = []
        for batch in train_dataloader or []:
            batches.append(batch)
            if len(batches) >= 4:
                break
        version = inject.lorakit_state(model).layout_version
        hooks.before_training(model, Probe(batches, lr=args.learning_rate))
        self.probed = True
        if inject.lorakit_state(model).layout_version != version:
            raise LorakitError(
                "this method decides its layout before training (LoRA-drop's probe), which rebuilds the "
                "adapters after a plain Trainer has built its optimizer: build the trainer with "
                "lorakit.integrations.lorakit_trainer(...), which probes first"
            )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.hooks:
            self.add_extra_loss_gradient(model, optimizer)

    def add_extra_loss_gradient(self, model: nn.Module, optimizer: Any = None) -> float | None:
        """Add the gradient of the hooks' extra loss to the adapters' `.grad` (scaled as the task loss
        is under fp16's gradient scaler); returns the extra loss, or None when the method has none."""
        extra = self.hooks.extra_loss(model)
        if not isinstance(extra, torch.Tensor) or not extra.requires_grad:
            return None
        value = float(extra.detach())
        if not math.isfinite(value):
            raise LorakitError(f"the method's extra loss became {value}; stopped (try a lower learning rate)")
        params = [p for _, p in inject.adapter_parameters(model)]
        grads = torch.autograd.grad(extra, params, allow_unused=True)
        scaler = getattr(optimizer, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        with torch.no_grad():
            for p, grad in zip(params, grads):
                if grad is None:
                    continue
                grad = grad * scale if scale != 1.0 else grad
                if p.grad is None:
                    p.grad = grad.to(p.dtype)
                else:
                    p.grad.add_(grad.to(p.grad.dtype))
        self.extra_losses.append(value)
        return value

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._gradients_checked:
            self._gradients_checked = True
            check_adapter_gradients(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.hooks:
            return
        self.hooks.after_optimizer_step(model, state.global_step + 1)  # the Trainer counts the step after this event
        if inject.lorakit_state(model).layout_version != self._layout_version:
            raise LorakitError(
                "a training hook rebuilt adapters in the middle of the run (lorakit.inject.reconfigure); the "
                "Trainer's optimizer cannot follow: train this method with `lorakit train`"
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        self.hooks = None  # a later train() call builds its own
        self.resumed, self.resumed_hook_state, self.probed = False, None, False

    def pop_extra_loss(self) -> float | None:
        """The mean extra loss since the last call (None when there was none)."""
        if not self.extra_losses:
            return None
        mean = sum(self.extra_losses) / len(self.extra_losses)
        self.extra_losses = []
        return mean


def has_before_training(hooks: Hooks) -> bool:
    return any(callable(getattr(hook, "before_training", None)) for hook in hooks.hooks)


def check_loraplus_groups(optimizer: Any, ratio: float) -> None:
    """The optimizer must hold LoRA+'s groups (`lorakit.param_groups`: named "A"/"B"...)."""
    groups = getattr(optimizer, "param_groups", None) or []
    names = {g.get("name") for g in groups}
    if not names & {"B", "B/no_decay"} or not all(isinstance(n, str) for n in names):
        raise LorakitError(
            f"loraplus_ratio={ratio:g}: the trainer's optimizer does not hold LoRA+'s parameter groups; "
            "build the trainer with lorakit.integrations.lorakit_trainer(...), or pass "
            "optimizers=(torch.optim.AdamW(lorakit.param_groups(model, lr, loraplus_ratio)), None)"
        )
    fast = [g["lr"] for g in groups if g.get("name", "").startswith("B")]
    slow = [g["lr"] for g in groups if g.get("name", "").startswith("A")]
    if fast and slow and not math.isclose(fast[0], ratio * slow[0], rel_tol=1e-6):
        raise LorakitError(
            f"loraplus_ratio={ratio:g}, but the optimizer's groups have lr_B / lr_A = {fast[0] / slow[0]:g}"
        )


def check_adapter_gradients(model: nn.Module) -> None:
    """After the first backward: every trainable adapter parameter should have a gradient. Missing
    ones under gradient checkpointing with nothing before the blocks requiring a gradient are the
    silent failure of reentrant checkpointing (the adapters inside the blocks never train), and none
    at all is always wrong: both stop the run. Otherwise some may be missing legitimately (an expert
    no token was routed to): logged."""
    params = [(name, p) for name, p in inject.adapter_parameters(model) if ".adapters." in name]
    missing = [name for name, p in params if p.grad is None]
    if not missing:
        return
    frozen_inputs = gradient_checkpointing_on(model) and not (
        getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None
    )
    if len(missing) == len(params) or frozen_inputs:
        hint = (
            " Gradient checkpointing is on and nothing before the checkpointed blocks requires a gradient: reentrant "
            "checkpointing then gives none inside them. Call model.enable_input_require_grads(), or use "
            "gradient_checkpointing_kwargs={'use_reentrant': False}."
            if frozen_inputs
            else ""
        )
        raise LorakitError(
            f"{len(missing)} of {len(params)} trainable adapter parameters received no gradient in the "
            f"first step (e.g. {missing[0]}): they would never train." + hint
        )
    logger.warning(
        "%d of %d trainable adapter parameters received no gradient in the first step (e.g. %s)",
        len(missing),
        len(params),
        missing[0],
    )
