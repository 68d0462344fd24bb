"""One optimizer step's forward and backward: the module a step calls, its micro-batches' losses
weighted by their label tokens, and the stop on a non-finite loss (naming the last good checkpoint)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import losses
from ..errors import LorakitError
from . import checkpoint as ckpt
from . import data as data_mod
from . import evaluate
from .loading import SEQUENCE_TASKS

if TYPE_CHECKING:
    from .loop import Run


class TrainingDiverged(LorakitError):
    """The loss or gradient became NaN or infinite."""


def loss_items(batch: dict[str, torch.Tensor], task: str) -> int:
    """What a micro-batch's loss is a mean over: its label tokens (a causal LM predicts token t + 1
    at position t, so the first label never counts), or its examples (classify, regress)."""
    if task in SEQUENCE_TASKS:
        return int(batch["labels"].shape[0])
    return int((batch["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum())


def accumulate_gradients(run: Run, step: int) -> tuple[float, int, float | None]:
    """Forward and backward over the step's micro-batches (this process's share of each).

    The step's loss is the mean over all its label tokens (a sequence task's: over its examples),
    however they are split into micro-batches and processes: as one batch of them all would give it.
    Each micro-batch's own mean is weighted by its share of the step's tokens (times the process
    count, which the gradient average over processes undoes).

    Returns (that loss, tokens in the global batch, the method's extra loss or None). A non-finite
    loss in any process stops every process."""
    cfg, strategy = run.cfg, run.strategy
    batches = [run.micro_batch(step, micro) for micro in range(cfg.grad_accum)]
    counts = [loss_items(batch, cfg.task) for batch in batches]
    step_items = strategy.sum([float(sum(counts))])[0]
    loss_sum, tokens = 0.0, 0
    extra_value = None
    for micro, (batch, count) in enumerate(zip(batches, counts)):
        last = micro == cfg.grad_accum - 1
        with strategy.no_sync(run.forward, last):
            with evaluate.autocast(run.device, run.bf16):
                loss = run.forward(**batch).loss
            total = loss * (count * strategy.world_size / step_items)
            if last and run.hooks:
                # a method's own loss term (AdaLoRA's regulariser) counts once per optimizer step with
                # weight 1, whatever --grad-accum is, and is logged apart from the task loss; it is the
                # same on every process (the weights are), so DDP's average leaves it as it is
                extra = run.hooks.extra_loss(run.model)
                if isinstance(extra, torch.Tensor):
                    extra_value = extra.item()
                    total = total + extra
            total.backward()
        loss_sum += loss.item() * count
        tokens += int(batch["attention_mask"].sum())
    loss_sum, tokens_all = strategy.sum([loss_sum, float(tokens)])
    step_loss = loss_sum / step_items
    if not math.isfinite(step_loss):
        raise TrainingDiverged(
            f"loss became {step_loss} at step {step}; stopped. "
            + _last_good(run.checkpoints)
            + " Try a lower --lr or --grad-clip."
        )
    if extra_value is not None and not math.isfinite(extra_value):
        raise TrainingDiverged(
            f"the method's extra loss became {extra_value} at step {step}; stopped. " + _last_good(run.checkpoints)
        )
    return step_loss, int(tokens_all), extra_value


def forward_module(run: Run) -> nn.Module:
    """The module a step calls: the model (with the chunked loss where it applies), compiled with
    --compile, then wrapped by the strategy (DDP)."""
    module = run.model
    # not under FSDP: the chunked loss reads the output head's weight outside the model's forward,
    # where FSDP holds only this process's rows of it
    if (
        run.cfg.chunked_loss
        and not run.strategy.sharded
        and run.cfg.task not in SEQUENCE_TASKS
        and losses.plain_head(module) is not None
    ):
        module = losses.ChunkedLossModel(module)
    module = torch.compile(module) if run.cfg.compile else module
    return run.strategy.wrap(module)


def _last_good(checkpoints: Path) -> str:
    """Names the newest checkpoint whose adapter tensors are all finite (checked, not assumed)."""
    for found in reversed(ckpt.list_checkpoints(checkpoints)):
        if ckpt.is_finite(found):
            return f"The last good checkpoint is {found}."
    return "No good checkpoint was written yet."
