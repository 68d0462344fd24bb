"""`lorakit train`: the training loop, written out.

    set_up:      load model + data -> metric before -> adapt -> hooks.before_training -> optimizer
    train_steps: for each step:
                     for each micro-batch (this process's share): loss x its share of the step's label tokens
                         (+ hooks.extra_loss on the last) -> backward
                     clip -> optimizer.step -> scheduler.step -> hooks.after_optimizer_step -> zero_grad
                     log; checkpoint every N steps; stop cleanly on Ctrl-C; stop on a non-finite loss
    finish:      metric after -> save adapter, config, metrics, report

A strategy (`distributed.SingleProcess`, or `DataParallel` / `FullyShard` under torchrun) owns what
depends on the number of processes: model placement and wrapping (FSDP2 shards the base), each
process's share of a batch, sums over processes, and which process writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import resource
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import inject, io, losses, models
from ..hooks import Hooks, Probe, training_hooks
from ..methods import METHODS
from ..optim import param_groups
from ..quant import load_quantized_causal_lm, quantize
from ..param_summary import parameter_counts
from . import checkpoint as ckpt
from . import data as data_mod
from . import evaluate, tasks
from .config import TrainConfig, to_yaml, validate, with_resolved_paths
from .distributed import SingleProcess, strategy_for
from .errors import LorakitError

CLASSIFIER_HEADS = ("classifier", "score")
SEQUENCE_TASKS = ("classify", "regress")  # a head over an encoder's (or decoder's) sequence output


class TrainingDiverged(LorakitError):
    """The loss or gradient became NaN or infinite."""


class TrainingInterrupted(LorakitError):
    """Ctrl-C: a checkpoint was saved and the run can be resumed."""


# --- building blocks ----------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """The device of a single-process run (`lorakit eval`, `generate`)."""
    return SingleProcess().device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: on GPU by default, anywhere when asked for."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def load_tokenizer(spec: str | None, task: str):
    try:
        return models.load_tokenizer(spec, task)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise LorakitError(str(err).splitlines()[0]) from None


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF loader draws its own tqdm bar per tensor, ignoring its logging switch."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(spec: str | None, task: str, num_labels: int, tokenizer, quantization: dict | None = None) -> nn.Module:
    """The base model for the task; any loading problem becomes a one-line error.

    `quantization` (the keyword arguments of `lorakit.quantize`, e.g. `{"method": "nf4"}`)
    gives a 4-bit base: a causal LM is then streamed into NF4 tensor by tensor
    (`lorakit.quant.load_quantized_causal_lm`, the same bits as quantizing after a dense load),
    so the full-precision model never sits in memory.
    """
    try:
        with _no_gguf_progress_bar():
            if quantization and task not in SEQUENCE_TASKS:
                return load_quantized_causal_lm(spec, **quantization)
            model = _load_model(spec, task, num_labels, tokenizer)
            if quantization:
                quantize(model, **quantization)
            return model
    except (FileNotFoundError, ValueError, OSError, TypeError) as err:
        raise LorakitError(str(err).splitlines()[0]) from None


def num_outputs(task: str, labels: list[str]) -> int:
    """The head's width: one per class, one for a regression target."""
    return 1 if task == "regress" else max(2, len(labels))


def _load_model(spec: str | None, task: str, num_labels: int, tokenizer) -> nn.Module:
    if task in SEQUENCE_TASKS:
        model = models.load_classifier(spec, num_labels=num_labels, regression=task == "regress")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers need it
        return model
    return models.load_causal_lm(spec)


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The config with aliases expanded, every value and the method's settings checked: before
    anything slow (a model load) happens, so a typo costs no waiting."""
    named = cfg.method  # the recipe is the named method's (LoRA+ is LoRA with its own rate)
    cfg = expand_aliases(cfg)
    validate(cfg)
    if cfg.lr is None:
        from .recipes import learning_rate

        cfg = dataclasses.replace(cfg, lr=learning_rate(named))
    method_config(cfg, nn.Module())  # the method exists and takes these settings (targets need the model)
    return cfg


def expand_aliases(cfg: TrainConfig) -> TrainConfig:
    """`--method qlora` is LoRA over an NF4 base (QLoRA's defaults where not given); `--method
    lora-plus` is LoRA with B's learning rate 16x A's (LoRA+'s ratio, unless --loraplus-ratio)."""
    if cfg.method == "lora-plus":
        return dataclasses.replace(cfg, method="lora", loraplus_ratio=cfg.loraplus_ratio or 16.0)
    if cfg.method != "qlora":
        return cfg
    return dataclasses.replace(
        cfg,
        method="lora",
        quantize=cfg.quantize or "nf4",
        r=cfg.r if cfg.r is not None else 64,
        alpha=cfg.alpha if cfg.alpha is not None else 16.0,
        dropout=cfg.dropout if cfg.dropout is not None else 0.05,
    )


def method_config(cfg: TrainConfig, model: nn.Module):
    """The adapter config for `cfg.method`, built from the registry by dataclass fields, so a
    newly registered method works without changes here. Common flags (r, alpha, dropout,
    targets, train_modules) are passed only to methods that have such fields."""
    if cfg.method not in METHODS:
        raise LorakitError(f"unknown method {cfg.method!r}; choose from: {', '.join(sorted(METHODS))}")
    cls = METHODS[cfg.method]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    targets: Any = cfg.targets
    if isinstance(targets, str) and targets != "all-linear" and ("," in targets or re.fullmatch(r"[\w.]+", targets)):
        # names ("q_proj", "q_proj,v_proj") match a full module name or a name suffix;
        # anything else is a regular expression matched against full names
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    train_modules = cfg.train_modules
    if train_modules is None:
        train_modules = [h for h in CLASSIFIER_HEADS if hasattr(model, h)][:1] if cfg.task in SEQUENCE_TASKS else []
    kwargs: dict[str, Any] = {"targets": targets, "train_modules": list(train_modules)}
    for flag in ("r", "alpha", "dropout", "init"):
        value = getattr(cfg, flag)
        if value is None:
            continue
        name = cls.flag_fields.get(flag, flag)
        if name not in fields:
            raise LorakitError(f"method {cfg.method!r} has no {flag!r} setting; its settings: {', '.join(fields)}")
        kwargs[name] = value
    for name, value in cfg.method_args.items():
        if name not in fields:
            raise LorakitError(f"method {cfg.method!r} has no setting {name!r}; its settings: {', '.join(fields)}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise LorakitError(f"method {cfg.method}: {err}") from None


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


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing through transformers (renamed in transformers 5)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise LorakitError(f"{type(model).__name__} does not support gradient checkpointing")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class StopFlag:
    """Ctrl-C sets a flag the loop checks between steps (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Datasets:
    train: list[data_mod.Example]
    eval: list[data_mod.Example]
    name: str  # for the run name
    metric: str  # the headline metric (--metric or the task's default)
    task: str = "causal-lm"
    labels: list[str] = field(default_factory=list)  # classify: the class names, in index order
    eval_total: int = 0  # held-out examples before --max-eval-examples
    eval_source: str = ""  # what the held-out examples are, for messages
    answer_pattern: str | None = None
    columns: str = ""  # how the data's columns were mapped (for the log)
    notes: list[str] = field(default_factory=list)  # what the reader left out, for the log


def default_metric(cfg: TrainConfig) -> str:
    if cfg.metric is not None:
        return cfg.metric
    if cfg.task == "classify":
        return "accuracy"
    if cfg.task == "regress":
        return "pearson"
    return "exact_match" if cfg.data is None or cfg.answer_pattern is not None else "eval_loss"


def _records(spec: str, cfg: TrainConfig, split: str | None, split_flag: str = "--split") -> tuple[list[data_mod.Record], str, str]:
    """(records with roles, their layout, how columns were mapped) of one data spec."""
    records, summary = data_mod.map_columns(data_mod.read_table(spec, split, split_flag, cfg.columns), cfg.columns, cfg.task, spec)
    return records, data_mod.check_records(records, spec), data_mod.describe_mapping(summary)


def build_datasets(cfg: TrainConfig, tokenizer, labels: list[str] | None = None, encode_train: bool = True) -> Datasets:
    """Read, check and tokenize train and held-out data (or generate the built-in task).

    `labels`: the classes of an already trained classifier (default: those of the training data).
    `encode_train=False` (evaluation): the training data is read (the held-out split depends on it)
    but not tokenized; `train` is then empty."""
    columns = ""
    if cfg.data is None:
        if cfg.task in SEQUENCE_TASKS:
            raise LorakitError(f"--task {cfg.task} needs --data (text + label columns: .tsv/.csv, .jsonl, .parquet, ...)")
        train_rec, eval_rec = tasks.generate(cfg.seed)
        train = [data_mod.Record(r, f"{tasks.NAME}[{i}]") for i, r in enumerate(train_rec)]
        held = [data_mod.Record(r, f"{tasks.NAME}[eval {i}]") for i, r in enumerate(eval_rec)]
        fmt, name, eval_source = "prompt-completion", tasks.NAME, f"{tasks.NAME} (held-out word lists)"
    else:
        train, fmt, columns = _records(cfg.data, cfg, cfg.split)
        name = data_mod.data_files(cfg.data)[0].stem
        eval_spec, eval_split = cfg.eval_data, cfg.eval_split
        if eval_spec is None and (eval_split is not None or "validation" in data_mod.saved_splits(cfg.data)):
            eval_spec, eval_split = cfg.data, eval_split or "validation"  # a DatasetDict's own held-out split
        if eval_spec is not None:
            if eval_split is None and "validation" in data_mod.saved_splits(eval_spec):
                eval_split = "validation"
            held, eval_fmt, _ = _records(eval_spec, cfg, eval_split, "--eval-split")
            if eval_fmt != fmt:
                raise LorakitError(f"{eval_spec} is {eval_fmt} data but {cfg.data} is {fmt}")
            eval_source = f"{eval_spec}" + (f" (split {eval_split})" if eval_split else "")
        else:
            train, held = data_mod.split_held_out(train, cfg.eval_fraction, cfg.seed)
            eval_source = f"{cfg.eval_fraction:g} of {cfg.data} held out"
    eval_total = len(held)
    if len(held) > cfg.max_eval_examples:  # spread over the whole set: a file sorted by label stays balanced
        held = data_mod.evenly_spaced(held, cfg.max_eval_examples / len(held))[: cfg.max_eval_examples]
    common = dict(task=cfg.task, eval_total=eval_total, eval_source=eval_source, columns=columns, metric=default_metric(cfg))
    if cfg.task == "classify":
        labels = labels or data_mod.label_names(train)
        if len(labels) < 2:
            raise LorakitError(f"{cfg.data}: classification needs at least 2 labels, found {labels}")
        train_ex = data_mod.encode_classify(train, fmt, tokenizer, cfg.max_length, labels) if encode_train else []
        eval_ex = data_mod.encode_classify(held, fmt, tokenizer, cfg.max_length, labels)
        return Datasets(train_ex, eval_ex, name, labels=labels, **common)
    if cfg.task == "regress":
        train_ex = data_mod.encode_regress(train, fmt, tokenizer, cfg.max_length) if encode_train else []
        eval_ex = data_mod.encode_regress(held, fmt, tokenizer, cfg.max_length)
        return Datasets(train_ex, eval_ex, name, **common)
    skipped: list[str] = []
    train_ex = (data_mod.encode_causal(train, fmt, tokenizer, cfg.max_length, cfg.train_on_prompt, cfg.prompt_template, skipped)
                if encode_train else [])
    eval_ex = data_mod.encode_causal(held, fmt, tokenizer, cfg.max_length, cfg.train_on_prompt, cfg.prompt_template, skipped)
    if skipped:
        if encode_train and not train_ex:
            raise LorakitError(f"no example has completion tokens within max_length={cfg.max_length} (e.g. {skipped[0]}): "
                               "raise --max-length")
        common["notes"] = [f"left out {len(skipped)} example(s) whose prompt fills max_length={cfg.max_length} "
                           f"(first: {skipped[0]}); raise --max-length to keep them"]
    if common["metric"] == "exact_match" and eval_ex and any(e.answer is None for e in eval_ex):
        raise LorakitError(f"exact_match compares generated completions: {fmt} data has none (use --metric eval_loss)")
    return Datasets(train_ex, eval_ex, name, answer_pattern=cfg.answer_pattern, **common)


def measure(datasets: Datasets, model: nn.Module, tokenizer, examples: list[data_mod.Example], device: torch.device,
            bf16: bool, batch_size: int) -> dict[str, float]:
    """The held-out metrics of the task (empty without held-out data)."""
    if not examples:
        return {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if datasets.task == "classify":
        return evaluate.classify_scores(model, examples, pad, batch_size, device, bf16, len(datasets.labels))
    if datasets.task == "regress":
        return evaluate.regress_scores(model, examples, pad, batch_size, device, bf16)
    result = evaluate.causal_lm_loss(model, examples, pad, batch_size, device, bf16)
    if datasets.metric == "exact_match":
        result.update(evaluate.exact_match(model, tokenizer, examples, batch_size, device, bf16, datasets.answer_pattern))
    return result


def describe_eval(datasets: Datasets) -> str:
    """`accuracy on 200 of 277 held-out examples (dev.tsv)`."""
    count = f"{len(datasets.eval)} of {datasets.eval_total}" if len(datasets.eval) < datasets.eval_total else f"{len(datasets.eval)}"
    return f"{datasets.metric} on {count} held-out examples ({datasets.eval_source})"


PERCENT_METRICS = ("exact_match", "accuracy", "f1")


def format_metrics(metrics: dict[str, float]) -> str:
    """`exact_match 93.0%, eval_loss 0.0312`: percentages for accuracies."""
    return ", ".join(f"{k} {100 * v:.1f}%" if k in PERCENT_METRICS else f"{k} {v:.4f}" for k, v in metrics.items()) or "no held-out data"


# --- the run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a finished run reports (also written to `runs/<name>/report.json`)."""

    run_dir: Path
    steps: int
    metric: str
    before: dict[str, float]
    after: dict[str, float]
    method: str
    trainable_params: int
    total_params: int
    adapter_bytes: int
    peak_memory_mb: float
    tokens_per_s: float
    train_seconds: float
    wall_seconds: float
    final_loss: float
    lr: float = 0.0  # the peak learning rate (given, or the method's recipe)
    # --measure-limit: the limit's median step time and the median of the paired step / limit ratios
    limit_step_seconds: float | None = None
    step_vs_limit: float | None = None

    def table(self) -> str:
        """The summary table printed at the end of a run."""
        b, a = self.before.get(self.metric), self.after.get(self.metric)
        fmt = (lambda v: f"{100 * v:.1f}%") if self.metric in PERCENT_METRICS else (lambda v: f"{v:.4f}")
        rows = [
            ("method", self.method),
            ("trainable params", f"{self.trainable_params:,} of {self.total_params:,} ({100 * self.trainable_params / max(self.total_params, 1):.3f}%)"),
            ("adapter size on disk", f"{self.adapter_bytes / 2**20:.2f} MiB"),
            ("peak memory", f"{self.peak_memory_mb:,.0f} MiB"),
            ("tokens/s", f"{self.tokens_per_s:,.0f}"),
            ("steps", f"{self.steps} ({self.train_seconds:.0f} s of training), peak learning rate {self.lr:g}"),
            *([("step / limit", f"{self.step_vs_limit:.3f} (the frozen base's forward + backward: {self.limit_step_seconds:.3f} s, "
                                "timed beside the run's steps)")] if self.step_vs_limit is not None else []),
            ("wall time", f"{self.wall_seconds:.0f} s (load, evaluation before and after, training, saving)"),
            ("final train loss", f"{self.final_loss:.4f}"),
        ]
        if b is not None and a is not None:
            rows.append((f"{self.metric} (held-out)", f"{fmt(b)} -> {fmt(a)}"))
        if self.metric != "eval_loss" and "eval_loss" in self.after and "eval_loss" in self.before:
            rows.append(("eval loss", f"{self.before['eval_loss']:.4f} -> {self.after['eval_loss']:.4f}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def default_run_name(cfg: TrainConfig, data_name: str) -> str:
    return f"{data_name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    log: Any = print  # where the main process's messages go
    loss_value: float = float("nan")

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def echo(self, message: str) -> None:
        if self.strategy.is_main:
            self.log(message)


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
        train_steps(run)
        return finish(run)
    finally:
        if own:
            strategy.close()


def set_up(cfg: TrainConfig, echo, strategy: SingleProcess) -> Run:
    """Check the config, read the data, load and adapt the model, restore a checkpoint, build the
    optimizer: everything before the first step. Only the main process writes files or prints."""
    say = echo if strategy.is_main else (lambda *_: None)
    wall_start = time.perf_counter()
    cfg = check_config(cfg)
    device = strategy.device(cfg.device)
    bf16 = use_bf16(cfg.precision, device)

    resume_from = ckpt.find_checkpoint(cfg.resume) if cfg.resume else None
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    datasets = build_datasets(cfg, tokenizer)
    if datasets.columns:
        say(f"data columns: {datasets.columns}")
    for note in datasets.notes:
        say(f"note: {note}")
    if not datasets.train:
        raise LorakitError(f"{cfg.data}: no training examples left after holding out the evaluation split")
    if resume_from is not None:
        run_dir = ckpt.run_dir_of(resume_from)
    else:
        run_dir = new_run_dir(cfg, datasets.name, strategy)

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
            io.adapt_as_saved(model, io.read_config(resume_from / "adapter")[0])
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
        before = measure(datasets, model, tokenizer, datasets.eval, device, bf16, eval_batch)
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
        except (ValueError, KeyError) as err:  # e.g. resumed onto another base model
            raise LorakitError(f"cannot resume from {resume_from}: {' '.join(str(err).split())}") from None
        saved_world = state.get("world_size", 1)
        if saved_world != strategy.world_size:
            raise LorakitError(f"{resume_from} was written by a run on {saved_world} process(es); resume it on the same "
                               f"number (this run has {strategy.world_size}): the data order and random streams are per process")
        before = state["before"]
        say(f"resuming from {resume_from} (step {state['step']})")
    elif hooks:
        run_probe(cfg, model, hooks, datasets, pad_id, device, bf16, strategy)
    start_step = state.get("step", 0)
    if start_step > total_steps:
        raise LorakitError(f"{resume_from} is at step {start_step}, past --steps {total_steps}: raise --steps to train further")
    # start_step == total_steps: the run was cut after its last checkpoint; resuming finishes it
    # (evaluation, adapter/, reports) without training

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
    if rng is not None:
        ckpt.set_rng_state(ckpt.rank_rng_state(rng, strategy.rank))
    elif strategy.world_size > 1:
        torch.manual_seed(cfg.seed + 1_000_003 * strategy.rank)  # each process its own dropout masks

    if strategy.is_main:
        # created only now: a run that fails while setting up leaves no empty run directory behind
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_leftovers(run_dir / "checkpoints")
        (run_dir / "config.yaml").write_text(
            f"# The resolved config of this run. Run it again with: lorakit train --config {run_dir / 'config.yaml'} --name <new>\n"
            f"# or continue it with: lorakit train --resume {run_dir}\n" + to_yaml(dataclasses.replace(with_resolved_paths(cfg), resume=None))
        )
    run = Run(cfg=cfg, strategy=strategy, device=device, bf16=bf16, datasets=datasets, model=model, tokenizer=tokenizer,
              hooks=hooks, run_dir=run_dir, total_steps=total_steps, start_step=start_step, before=before, state=state,
              optimizer=optimizer, scheduler=scheduler, forward=model, builtin=builtin, pad_id=pad_id,
              eval_batch=eval_batch, wall_start=wall_start, log=echo)
    run.forward = forward_module(run)
    return run


def new_run_dir(cfg: TrainConfig, data_name: str, strategy: SingleProcess) -> Path:
    """The directory of a new run (named by the main process); an existing run in it is refused
    unless --overwrite, which clears it."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LorakitError(f"--out-dir {out_dir} is a file, not a directory")
    run_dir = out_dir / strategy.broadcast(cfg.name or default_run_name(cfg, data_name))
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"{run_dir} is a file, not a run directory: pick another --name or --out-dir")
    holds_files = run_dir.is_dir() and any(run_dir.iterdir())
    strategy.barrier()  # every process has looked before the main one clears anything
    if holds_files:
        if not cfg.overwrite:
            raise LorakitError(f"{run_dir} already holds files: resume the run with --resume {run_dir}, replace it "
                               "with --overwrite, or pick another --name")
        if strategy.is_main:
            clear_run_dir(run_dir)
    return run_dir


def run_probe(cfg: TrainConfig, model: nn.Module, hooks: Hooks, datasets: Datasets, pad_id: int, device: torch.device,
              bf16: bool, strategy: SingleProcess) -> None:
    """Hooks that probe the model before training (LoRA-drop) decide on the main process; the
    others take its decision (the adapter layout; the tensors follow when DDP wraps the model)."""
    per_epoch = max(1, len(datasets.train) // cfg.batch_size)
    probe = [data_mod.collate(data_mod.micro_batch(datasets.train, i, cfg.batch_size, cfg.seed), pad_id) for i in range(min(4, per_epoch))]

    def sample(fraction: float) -> list[dict[str, torch.Tensor]]:
        chosen = data_mod.evenly_spaced(datasets.train, fraction)
        return [evaluate.to_device(data_mod.collate(chosen[i:i + cfg.batch_size], pad_id), device)
                for i in range(0, len(chosen), cfg.batch_size)]

    if strategy.is_main:
        try:
            hooks.before_training(model, Probe([evaluate.to_device(batch, device) for batch in probe],
                                               functools.partial(task_loss, device=device, bf16=bf16), cfg.lr, sample))
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.lr, cfg.loraplus_ratio, weight_decay=cfg.weight_decay), lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.schedule))


def forward_module(run: Run) -> nn.Module:
    """The module a step calls: the model (with the chunked loss where it applies), compiled with
    --compile, then wrapped by the strategy (DDP)."""
    module = run.model
    # not under FSDP: the chunked loss reads the output head's weight outside the model's forward,
    # where FSDP holds only this process's rows of it
    if (run.cfg.chunked_loss and not run.strategy.sharded and run.cfg.task not in SEQUENCE_TASKS
            and losses.plain_head(module) is not None):
        module = losses.ChunkedLossModel(module)
    module = torch.compile(module) if run.cfg.compile else module
    return run.strategy.wrap(module)


def save(run: Run, step: int) -> Path | None:
    """A checkpoint of `step`, written by the main process (with every process's random state)."""
    rng = run.strategy.gather(ckpt.rng_state())
    with run.strategy.gathered(run.model):  # sharded base weights the file holds (Delta-LoRA's), gathered by all
        if not run.strategy.is_main:
            return None
        keep = {**run.state, "before": run.before, "step": step}
        return ckpt.save_checkpoint(run.checkpoints, step, run.model, run.optimizer, run.scheduler, run.hooks, keep,
                                    run.cfg.keep_checkpoints, rng=ckpt.merge_rank_rng_states(rng))


def train_steps(run: Run) -> None:
    """The step loop: micro-batches -> backward -> clip -> optimizer step -> hooks; logging and
    checkpoints on the main process; a stop (Ctrl-C, a non-finite value) agreed by all processes."""
    cfg, strategy = run.cfg, run.strategy
    metrics_log = open_metrics_log(run.run_dir / "metrics.jsonl", run.start_step) if strategy.is_main else None
    from tqdm.auto import tqdm

    bar = tqdm(total=run.total_steps, initial=run.start_step, unit="step", disable=not (cfg.progress and strategy.is_main),
               dynamic_ncols=True, desc="train")
    trainable = [p for _, p in inject.adapter_parameters(run.model)]
    layout_version = inject.lorakit_state(run.model).layout_version
    if cfg.measure_limit and not limit_measurable(cfg, strategy) and strategy.is_main:
        run.echo("--measure-limit: the limit is timed in one eager process only; not measured in this run "
                 f"({'--compile' if cfg.compile else f'{strategy.world_size} processes'})")
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
                        raise TrainingDiverged(f"gradient norm became {grad_norm} at step {step}; stopped. " + _last_good(run.checkpoints))
                lr = run.optimizer.param_groups[0]["lr"]
                run.optimizer.step()
                if trainable and not bool(torch.stack([torch.isfinite(p).all() for p in trainable]).all()):  # one host sync
                    # a finite loss can still leave non-finite weights (--lr inf, --lr 1e6): never checkpoint them
                    raise TrainingDiverged(f"the adapter weights became non-finite at step {step}; stopped. "
                                           + _last_good(run.checkpoints) + " Try a lower --lr or --grad-clip.")
                run.scheduler.step()
                run.hooks.after_optimizer_step(run.model, step)
                run.optimizer.zero_grad(set_to_none=True)
                if inject.lorakit_state(run.model).layout_version != layout_version:
                    # a hook rebuilt adapters (lorakit.reconfigure): optimize (and reduce) the new parameters
                    run.optimizer, run.scheduler = rebuild_optimizer(run.optimizer, run.scheduler, make_optimizer(run.model, cfg),
                                                                     lambda o: make_scheduler(o, cfg, run.total_steps))
                    trainable = [p for _, p in inject.adapter_parameters(run.model)]
                    layout_version = inject.lorakit_state(run.model).layout_version
                    run.forward = forward_module(run)

                seconds = time.perf_counter() - t0
                limit_seconds = time_limit_step(run, step) if probe_limit_at(run, step) else None
                if limit_seconds is not None:
                    run.state.setdefault("limit_probes", []).append([step, seconds, limit_seconds])
                run.state["tokens"] += step_tokens
                run.state["train_seconds"] += seconds
                run.loss_value = step_loss
                tokens_per_s = run.state["tokens"] / max(run.state["train_seconds"], 1e-9)
                if metrics_log is not None:
                    record = {"step": step, "loss": round(step_loss, 6), "lr": lr, "tokens": run.state["tokens"],
                              "tokens_per_s": round(tokens_per_s, 1)}
                    if grad_norm is not None:
                        record["grad_norm"] = round(grad_norm, 6)
                    if extra_value is not None:
                        record["extra_loss"] = round(extra_value, 6)
                    metrics_log.write(json.dumps(record) + "\n")
                    metrics_log.flush()
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                bar.update(1)

                if strategy.any(stop.requested):
                    path = save(run, step)
                    raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved to {path or run.checkpoints}. "
                                              f"Resume with: lorakit train --resume {run.run_dir}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.total_steps:
                    save(run, step)
    finally:
        bar.close()
        if metrics_log is not None:
            metrics_log.close()
    save(run, run.total_steps)


LIMIT_PROBES = 8  # limit timings per run with --measure-limit


def limit_measurable(cfg: TrainConfig, strategy: SingleProcess) -> bool:
    """Whether `--measure-limit` can time the limit in this run: one process, eager."""
    return not cfg.compile and strategy.world_size == 1


def probe_limit_at(run: Run, step: int) -> bool:
    """Whether `--measure-limit` times the limit after `step`: about LIMIT_PROBES steps spread over
    the run, never the first (it pays for warm-up)."""
    if not run.cfg.measure_limit or not limit_measurable(run.cfg, run.strategy) or step == 1:
        return False
    every = max(1, (run.total_steps - 1) // LIMIT_PROBES)
    return (step - 1) % every == 0 or step == run.total_steps


def time_limit_step(run: Run, step: int) -> float | None:
    """Seconds of the limit on `step`'s own micro-batches: the same forward (loss included) with every
    adapter off, and backward through the activations only (to the input embeddings' output; no
    parameter gradient is formed or touched). The random state is restored afterwards, so a run
    trains the same with and without the probes. None for a model without input embeddings."""
    cfg = run.cfg
    inputs: list[torch.Tensor] = []
    embeddings = run.model.get_input_embeddings() if hasattr(run.model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        return None

    def leaf_embeddings(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        inputs.append(output.detach().requires_grad_(True))
        return inputs[-1]

    handle = embeddings.register_forward_hook(leaf_embeddings)
    devices = [run.device] if run.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), inject.disabled(run.model):
            start = time.perf_counter()
            for micro in range(cfg.grad_accum):
                batch = step_micro_batch(run, step, micro)
                with evaluate.autocast(run.device, run.bf16):
                    loss = run.forward(**batch).loss
                if not inputs:
                    return None  # the forward does not go through get_input_embeddings()
                torch.autograd.grad(loss, inputs[-1])
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            return time.perf_counter() - start
    finally:
        handle.remove()


def limit_summary(state: dict[str, Any]) -> tuple[float | None, float | None]:
    """(median limit step seconds, median of the paired step / limit ratios) of the run's probes."""
    probes = state.get("limit_probes") or []
    if not probes:
        return None, None
    return (statistics.median(p[2] for p in probes), statistics.median(p[1] / max(p[2], 1e-12) for p in probes))


def step_micro_batch(run: Run, step: int, micro: int) -> dict[str, torch.Tensor]:
    """This process's share of micro-batch `micro` of optimizer step `step`, collated, on the device."""
    cfg = run.cfg
    examples = data_mod.micro_batch(run.datasets.train, (step - 1) * cfg.grad_accum + micro,
                                    cfg.batch_size * run.strategy.world_size, cfg.seed)
    return evaluate.to_device(data_mod.collate(run.strategy.shard(examples), run.pad_id), run.device)


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
    batches = [step_micro_batch(run, step, micro) for micro in range(cfg.grad_accum)]
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
        raise TrainingDiverged(f"loss became {step_loss} at step {step}; stopped. " + _last_good(run.checkpoints)
                               + " Try a lower --lr or --grad-clip.")
    if extra_value is not None and not math.isfinite(extra_value):
        raise TrainingDiverged(f"the method's extra loss became {extra_value} at step {step}; stopped. " + _last_good(run.checkpoints))
    return step_loss, int(tokens_all), extra_value


def finish(run: Run) -> RunResult:
    """Evaluate after training, save the adapter and the reports (main process), print nothing."""
    cfg, strategy = run.cfg, run.strategy
    after: dict[str, float] = {}
    if strategy.is_main or strategy.sharded:  # a sharded forward needs every process
        run.echo(f"measuring {describe_eval(run.datasets)} after training ...")
        t0 = time.perf_counter()
        after = measure(run.datasets, run.model, run.tokenizer, run.datasets.eval, run.device, run.bf16, run.eval_batch)
        run.echo(f"after: {format_metrics(after)} ({time.perf_counter() - t0:.0f} s)")
    with strategy.gathered(run.model):  # sharded base weights the adapter file holds (Delta-LoRA's)
        if strategy.is_main:
            # the base it needs, as PEFT records it
            io.save(run.model, run.run_dir / "adapter", base_model_name_or_path=cfg.model or run.builtin)
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
        report = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
        if run.datasets.labels:
            report["labels"] = run.datasets.labels
        report["eval_examples"] = {"scored": len(run.datasets.eval), "of": run.datasets.eval_total, "source": run.datasets.eval_source}
        report["processes"] = strategy.world_size
        report["distributed"] = strategy.kind
        adapter_config = inject.adapter_config(run.model)
        layout = {name: getattr(adapter_config, name) for name in adapter_config.layout_fields if getattr(adapter_config, name)}
        if layout:  # what training decided: AdaLoRA's final ranks, LoRA-drop's plan
            report["adapter_layout"] = layout
        (run.run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (run.run_dir / "report.txt").write_text(result.table() + "\n")
    return result


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool) -> torch.Tensor:
    """The run's training loss of one batch (what the step loop computes), for hooks' probes."""
    with evaluate.autocast(device, bf16):
        return model(**batch).loss


def rebuild_optimizer(old: torch.optim.Optimizer, old_scheduler: Any, new: torch.optim.Optimizer, make_scheduler) -> tuple:
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


RUN_FILES = ("checkpoints", "adapter", "metrics.jsonl", "report.json", "report.txt", "config.yaml")


def clear_run_dir(run_dir: Path) -> None:
    """What a run writes, removed for --overwrite; anything else the user put there stays."""
    import shutil

    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _metrics_record(line: str) -> dict | None:
    """One metrics line, or None for a line a crash tore (it is dropped, not fatal)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step", 0), int) else None


def open_metrics_log(path: Path, start_step: int):
    """The JSONL metrics log, opened for appending; on resume, lines for steps after the
    checkpoint (logged by the interrupted run, about to be trained again) are dropped."""
    if start_step and path.is_file():
        kept = [line for line in path.read_text(errors="replace").splitlines(keepends=True)
                if (record := _metrics_record(line)) is not None and record.get("step", 0) <= start_step]
        path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept))
    elif path.is_file():
        path.unlink()
    return open(path, "a")


def _last_good(checkpoints: Path) -> str:
    """Names the newest checkpoint whose adapter tensors are all finite (checked, not assumed)."""
    for found in reversed(ckpt.list_checkpoints(checkpoints)):
        if ckpt.is_finite(found):
            return f"The last good checkpoint is {found}."
    return "No good checkpoint was written yet."
