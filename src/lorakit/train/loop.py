"""`lorakit train`: the training recipe, written out, top to bottom.

    set_up:      check the config -> tokenizer, data -> model (4-bit if asked) -> metric before
                 -> adapt (or the checkpoint's layout) -> hooks.before_training -> optimizer
    train_steps: for each step:
                     for each micro-batch (this process's share): loss x its share of the step's label tokens
                         (+ hooks.extra_loss on the last) -> backward
                     clip -> optimizer.step -> scheduler.step -> hooks.after_optimizer_step -> zero_grad
                     log; checkpoint every N steps; stop cleanly on Ctrl-C; stop on a non-finite loss
    finish:      metric after -> save adapter, config, metrics, report

A strategy (`distributed.SingleProcess`, or `DataParallel` / `FullyShard` under torchrun) owns what
depends on the number of processes: model placement and wrapping (FSDP2 shards the base), each
process's share of a batch, sums over processes, and which process writes files. The pieces a
recipe calls live beside it: `loading` (tokenizer, model), `method_config` (the adapter config from
the flags), `run_data` (examples and held-out metrics), `run_dir` (the run's directory and metrics
log), `report` (what a finished run reports), `limit` (`--measure-limit`), `checkpoint`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import files, inject, io, models
from ..errors import LorakitError
from ..hooks import Hooks, training_hooks
from ..methods import METHODS
from ..param_summary import parameter_counts
from . import allocator, evaluate
from . import checkpoint as ckpt
from . import data as data_mod
from . import run_dir as run_dir_mod
from .config import TrainConfig
from .distributed import SingleProcess, strategy_for
from .limit import LimitProbe, limit_summary
from .loading import (
    SEQUENCE_TASKS,
    enable_checkpointing,
    fit_max_length,
    load_model,
    load_tokenizer,
    num_outputs,
    use_bf16,
)
from .method_config import check_config, method_config
from .optimizer import lr_factor, make_optimizer, make_scheduler, rebuild_optimizer  # noqa: F401  (loop.lr_factor)
from .probe import run_probe
from .report import RunResult, dir_size, format_metrics, peak_memory_mb, write_report
from .run_data import Datasets, build_datasets, describe_eval, measure
from .run_dir import HeldRunDir, new_run_dir, open_metrics_log, prepare_run_dir, resumed_run_dir
from .step import TrainingDiverged, _last_good, accumulate_gradients, forward_module, loss_items  # noqa: F401
from .stop import StopFlag


class TrainingInterrupted(LorakitError):
    """Ctrl-C: a checkpoint was saved and the run can be resumed."""


@dataclass
class Run:
    """Everything a run holds between set-up, the step loop and the finish."""

    cfg: TrainConfig
    strategy: SingleProcess
    device: torch.device
    bf16: bool
    datasets: Datasets
    model: nn.Module
    tokenizer: Any
    hooks: Hooks
    run_dir: Path
    total_steps: int
    start_step: int
    before: dict[str, float]
    state: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    forward: nn.Module  # what a step calls: the model, compiled and/or wrapped by the strategy
    builtin: str
    pad_id: int
    eval_batch: int
    wall_start: float
    held: HeldRunDir | None = None  # the run directory's lock (main process)
    log: Any = print  # where the main process's messages go
    loss_value: float = float("nan")  # the last step's loss (a resumed run: the checkpoint's)
    saved_step: int = -1  # the step of the last checkpoint this process wrote or resumed from

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def echo(self, message: str) -> None:
        if self.strategy.is_main:
            self.log(message)

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This process's share of micro-batch `micro` of optimizer step `step`, collated, on the device."""
        cfg = self.cfg
        examples = data_mod.micro_batch(
            self.datasets.train,
            (step - 1) * cfg.grad_accum + micro,
            cfg.batch_size * self.strategy.world_size,
            cfg.seed,
        )
        return evaluate.to_device(data_mod.collate(self.strategy.shard(examples), self.pad_id), self.device)


def train(cfg: TrainConfig, echo=print, strategy: SingleProcess | None = None) -> RunResult:
    """Run `lorakit train` for a resolved config; returns the result (see `RunResult`).

    Started by torchrun with several processes, it trains with DDP, or with FSDP2 for
    `distributed="fsdp"` (`lorakit.train.distributed`).
    Raises `LorakitError` for bad input, `TrainingDiverged` on a non-finite loss (the last good
    checkpoint is left as it was) and `TrainingInterrupted` after saving a checkpoint on Ctrl-C.
    """
    own = strategy is None
    strategy = strategy or strategy_for(cfg.distributed, cfg.device)
    try:
        run = set_up(cfg, echo, strategy)
        try:
            train_steps(run)
            return finish(run)
        finally:
            if run.held is not None:
                run.held.release(failed=False)
    finally:
        if own:
            strategy.close()


def set_up(cfg: TrainConfig, echo, strategy: SingleProcess) -> Run:
    """Check the config, read the data, load and adapt the model, restore a checkpoint, build the
    optimizer: everything before the first step. Only the main process writes files or prints. The
    run directory is locked from the moment it is known (`Run.held`); set-up failing releases it
    (and removes it again if it was made for this run)."""
    held = HeldRunDir()
    try:
        return _set_up(cfg, echo, strategy, held)
    except BaseException:
        held.release(failed=True)
        raise


def _set_up(cfg: TrainConfig, echo, strategy: SingleProcess, held: HeldRunDir) -> Run:
    say = echo if strategy.is_main else (lambda *_: None)
    wall_start = time.perf_counter()
    cfg = check_config(cfg)
    device = strategy.device(cfg.device)
    allocator.return_freed_memory_to_system(device.type)  # before the model: its load frees large blocks too
    if cfg.resume:  # one process at a time in a run directory: locked before anything slow
        resumed_run_dir(ckpt.run_dir_of(ckpt.find_checkpoint(cfg.resume)), strategy, held)
    elif strategy.is_main:
        files.check_directory_target(Path(cfg.out_dir), "--out-dir")  # before anything slow
    bf16 = use_bf16(cfg.precision, device)

    resume_from = ckpt.find_checkpoint(cfg.resume) if cfg.resume else None
    cfg, note = fit_max_length(cfg)
    if note:
        say(f"note: {note}")
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    datasets = build_datasets(cfg, tokenizer)
    if datasets.columns:
        say(f"data columns: {datasets.columns}")
    for note in datasets.notes:
        say(f"note: {note}")
    if not datasets.train:
        raise LorakitError(f"{cfg.data}: no training examples left after holding out the evaluation split")
    run_dir = held.path if resume_from is not None else new_run_dir(cfg, datasets.name, strategy, held)

    builtin = models.DEFAULT_ENCODER if cfg.task in SEQUENCE_TASKS else models.DEFAULT_CAUSAL_LM
    say(f"loading model {cfg.model or builtin} ...")
    quantization = {"method": cfg.quantize} if cfg.quantize else None
    if quantization and cfg.init == "loftq":
        quantization["loftq_rank"] = cfg.r if cfg.r is not None else getattr(METHODS.get(cfg.method), "r", 0)
    # seeded before the load too: a classifier's head is drawn at random while the model loads, and
    # runs with one seed (compare's methods) must start from the same head
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.task, num_outputs(cfg.task, datasets.labels), tokenizer, quantization)
    if not strategy.sharded:  # a sharded base reaches the device shard by shard (strategy.place)
        model.to(device)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    global_batch = cfg.batch_size * strategy.world_size
    per_epoch = max(1, len(datasets.train) // global_batch)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))

    torch.manual_seed(cfg.seed)
    try:
        if resume_from is not None:
            # the layout the run had reached (e.g. ranks decided during training), not the flags' start
            ckpt.adapt_as_checkpointed(model, resume_from)
        else:
            inject.adapt(model, method_config(cfg, model))
    except ValueError as err:  # e.g. --targets that match no module: the message lists the candidates
        raise LorakitError(str(err)) from None
    if cfg.gradient_checkpointing:  # before sharding: FSDP's units then wrap the checkpointed blocks
        enable_checkpointing(model)
    strategy.place(model, device)
    before: dict[str, float] = {}
    if resume_from is None and (strategy.is_main or strategy.sharded):  # a sharded forward needs every process
        # The adapted model at step 0: the base itself for most inits, LoftQ's corrected start with --init loftq.
        say(f"measuring {describe_eval(datasets)} before training ...")
        t0 = time.perf_counter()
        before = measure(
            datasets, model, tokenizer, datasets.eval, device, bf16, eval_batch, cfg.progress and strategy.is_main
        )
        say(f"before: {format_metrics(before)} ({time.perf_counter() - t0:.0f} s)")
    try:
        hooks: Hooks = training_hooks(model, total_steps)
    except ValueError as err:  # e.g. AdaLoRA's schedule longer than --steps
        raise LorakitError(str(err)) from None

    state: dict[str, Any] = {"tokens": 0, "train_seconds": 0.0, "world_size": strategy.world_size}
    optim_state = rng = None
    if resume_from is not None:
        try:
            state, optim_state, rng = ckpt.load_checkpoint(resume_from, model, hooks)
        except (ValueError, KeyError) as err:  # e.g. resumed onto another base model (a damaged file says so itself)
            raise LorakitError(f"cannot resume from {resume_from}: {' '.join(str(err).split())}") from None
        saved_world = state.get("world_size", 1)
        if saved_world != strategy.world_size:
            raise LorakitError(
                f"{resume_from} was written by a run on {saved_world} process(es); resume it on the same "
                f"number (this run has {strategy.world_size}): the data order and random streams are per process"
            )
        before = state["before"]
        say(f"resuming from {resume_from} (step {state['step']})")
    elif hooks:
        run_probe(cfg, model, hooks, datasets, pad_id, device, bf16, strategy)
    start_step = state.get("step", 0)
    if start_step > total_steps:
        raise LorakitError(
            f"{resume_from} is at step {start_step}, past --steps {total_steps}: raise --steps to train further"
        )
    # start_step == total_steps: the run was cut after its last checkpoint; resuming finishes it
    # (evaluation, adapter/, reports) without training

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    if optim_state is not None:
        ckpt.restore_optimizer(resume_from, optimizer, scheduler, optim_state)
    if rng is not None:
        ckpt.restore_rng_state(resume_from, ckpt.rank_rng_state(rng, strategy.rank))
    elif strategy.world_size > 1:
        torch.manual_seed(cfg.seed + 1_000_003 * strategy.rank)  # each process its own dropout masks

    if strategy.is_main:
        prepare_run_dir(run_dir, cfg)  # only now: a run that fails while setting up leaves no run directory behind
    # a run resumed at its last step trains no step: its final loss is the checkpoint's
    loss = state.get("loss", run_dir_mod.logged_loss(run_dir / "metrics.jsonl", start_step) if start_step else None)
    run = Run(
        cfg=cfg,
        strategy=strategy,
        device=device,
        bf16=bf16,
        datasets=datasets,
        model=model,
        tokenizer=tokenizer,
        hooks=hooks,
        run_dir=run_dir,
        total_steps=total_steps,
        start_step=start_step,
        before=before,
        state=state,
        optimizer=optimizer,
        scheduler=scheduler,
        forward=model,
        builtin=builtin,
        pad_id=pad_id,
        eval_batch=eval_batch,
        wall_start=wall_start,
        held=held,
        log=echo,
        loss_value=float("nan") if loss is None else loss,
        saved_step=start_step if resume_from is not None else -1,
    )
    run.forward = forward_module(run)
    return run


def train_steps(run: Run) -> None:
    """The step loop: micro-batches -> backward -> clip -> optimizer step -> hooks; logging and
    checkpoints on the main process; a stop (Ctrl-C, a non-finite value) agreed by all processes."""
    cfg, strategy = run.cfg, run.strategy
    metrics_log = open_metrics_log(run.run_dir / "metrics.jsonl", run.start_step) if strategy.is_main else None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=run.total_steps,
        initial=run.start_step,
        unit="step",
        disable=not (cfg.progress and strategy.is_main),
        dynamic_ncols=True,
        desc="train",
    )
    trainable = [p for _, p in inject.adapter_parameters(run.model)]
    layout_version = inject.lorakit_state(run.model).layout_version
    limit = LimitProbe(run) if cfg.measure_limit else None
    run.model.train()
    try:
        with StopFlag() as stop:
            for step in range(run.start_step + 1, run.total_steps + 1):
                t0 = time.perf_counter()
                step_loss, step_tokens, extra_value = accumulate_gradients(run, step)
                strategy.reduce_gradients(trainable)  # FSDP: the adapters' (DDP reduced them in backward)
                grad_norm = None
                if cfg.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
                    if not math.isfinite(grad_norm):  # the same on every process: gradients are reduced
                        raise TrainingDiverged(
                            f"gradient norm became {grad_norm} at step {step}; stopped. " + _last_good(run.checkpoints)
                        )
                lr = run.optimizer.param_groups[0]["lr"]
                run.optimizer.step()
                if trainable and not bool(
                    torch.stack([torch.isfinite(p).all() for p in trainable]).all()
                ):  # one host sync
                    # a finite loss can still leave non-finite weights (--lr inf, --lr 1e6): never checkpoint them
                    raise TrainingDiverged(
                        f"the adapter weights became non-finite at step {step}; stopped. "
                        + _last_good(run.checkpoints)
                        + " Try a lower --lr or --grad-clip."
                    )
                run.scheduler.step()
                run.hooks.after_optimizer_step(run.model, step)
                run.optimizer.zero_grad(set_to_none=True)
                if inject.lorakit_state(run.model).layout_version != layout_version:
                    # a hook rebuilt adapters (lorakit.inject.reconfigure): optimize (and reduce) the new parameters
                    run.optimizer, run.scheduler = rebuild_optimizer(
                        run.optimizer,
                        run.scheduler,
                        make_optimizer(run.model, cfg),
                        lambda o: make_scheduler(o, cfg, run.total_steps),
                    )
                    trainable = [p for _, p in inject.adapter_parameters(run.model)]
                    layout_version = inject.lorakit_state(run.model).layout_version
                    run.forward = forward_module(run)

                seconds = time.perf_counter() - t0
                if limit is not None:
                    limit.after_step(step, seconds)
                run.state["tokens"] += step_tokens
                run.state["train_seconds"] += seconds
                run.loss_value = step_loss
                tokens_per_s = run.state["tokens"] / max(run.state["train_seconds"], 1e-9)
                if metrics_log is not None:
                    record = {
                        "step": step,
                        "loss": round(step_loss, 6),
                        "lr": lr,
                        "tokens": run.state["tokens"],
                        "tokens_per_s": round(tokens_per_s, 1),
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = round(grad_norm, 6)
                    if extra_value is not None:
                        record["extra_loss"] = round(extra_value, 6)
                    try:
                        metrics_log.write(json.dumps(record) + "\n")
                        metrics_log.flush()
                    except OSError as err:  # e.g. the disk filled up: say so, and which checkpoint is kept
                        kept = ckpt.list_checkpoints(run.checkpoints)
                        raise LorakitError(
                            f"{files.write_error(err, run.run_dir / 'metrics.jsonl')} (at step {step}"
                            + (f"; {kept[-1]} is kept)" if kept else ")")
                        ) from None
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                bar.update(1)

                if strategy.any(stop.requested):
                    path = save(run, step)
                    raise TrainingInterrupted(
                        f"interrupted at step {step}; checkpoint saved to {path or run.checkpoints}. "
                        f"Resume with: lorakit train --resume {run.run_dir}"
                    )
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.total_steps:
                    save(run, step)
    finally:
        bar.close()
        if metrics_log is not None:
            metrics_log.close()
    save(run, run.total_steps)


def save(run: Run, step: int) -> Path | None:
    """A checkpoint of `step`, written by the main process (with every process's random state)."""
    if run.saved_step == step:  # e.g. Ctrl-C right after a save, or a resume at the last step
        return run.checkpoints / ckpt.checkpoint_name(step) if run.strategy.is_main else None
    run.saved_step = step
    rng = run.strategy.gather(ckpt.rng_state())
    with run.strategy.gathered(run.model):  # sharded base weights the file holds (Delta-LoRA's), gathered by all
        if not run.strategy.is_main:
            return None
        keep = {**run.state, "before": run.before, "step": step, "loss": run.loss_value}
        return ckpt.save_checkpoint(
            run.checkpoints,
            step,
            run.model,
            run.optimizer,
            run.scheduler,
            run.hooks,
            keep,
            run.cfg.keep_checkpoints,
            rng=ckpt.merge_rank_rng_states(rng),
        )


def finish(run: Run) -> RunResult:
    """Evaluate after training, save the adapter and the reports (main process), print nothing."""
    cfg, strategy = run.cfg, run.strategy
    after: dict[str, float] = {}
    if strategy.is_main or strategy.sharded:  # a sharded forward needs every process
        run.echo(f"measuring {describe_eval(run.datasets)} after training ...")
        t0 = time.perf_counter()
        after = measure(
            run.datasets,
            run.model,
            run.tokenizer,
            run.datasets.eval,
            run.device,
            run.bf16,
            run.eval_batch,
            run.cfg.progress and run.strategy.is_main,
        )
        run.echo(f"after: {format_metrics(after)} ({time.perf_counter() - t0:.0f} s)")
    with strategy.gathered(run.model):  # sharded base weights the adapter file holds (Delta-LoRA's)
        if strategy.is_main:
            # the base it needs, as PEFT records it; written whole or not at all (a kill, a full disk)
            with files.atomic_directory(run.run_dir / "adapter", replace=True) as adapter_tmp:
                io.save(run.model, adapter_tmp, base_model_name_or_path=cfg.model or run.builtin)
    strategy.barrier()
    adapter_dir = run.run_dir / "adapter"
    trainable_count, total_count = parameter_counts(run.model)
    result = RunResult(
        run_dir=run.run_dir,
        steps=run.total_steps,
        metric=run.datasets.metric,
        before=run.before,
        after=after,
        method=cfg.method,
        trainable_params=trainable_count,
        total_params=total_count,
        adapter_bytes=dir_size(adapter_dir),
        peak_memory_mb=peak_memory_mb(run.device),
        tokens_per_s=run.state["tokens"] / max(run.state["train_seconds"], 1e-9),
        train_seconds=run.state["train_seconds"],
        wall_seconds=time.perf_counter() - run.wall_start,
        final_loss=run.loss_value,
        lr=cfg.lr,
    )
    result.limit_step_seconds, result.step_vs_limit = limit_summary(run.state)
    if strategy.is_main:
        write_report(result, run.datasets, strategy, inject.adapter_config(run.model))
    return result


# --- what the recipe calls -----------------------------------------------------------------------
