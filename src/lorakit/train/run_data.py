"""A run's data: training and held-out examples (read, checked, tokenized), and the held-out metrics.

The reading, column mapping and tokenization are `lorakit.train.data`'s; this module picks what a
run uses (its data, a held-out split or file, or the built-in task) and scores the model on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LorakitError
from . import data as data_mod
from . import evaluate, tasks
from .config import TrainConfig
from .loading import SEQUENCE_TASKS


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


def _records(
    spec: str, cfg: TrainConfig, split: str | None, split_flag: str = "--split"
) -> tuple[list[data_mod.Record], str, str]:
    """(records with roles, their layout, how columns were mapped) of one data spec."""
    records, summary = data_mod.map_columns(
        data_mod.read_table(spec, split, split_flag, cfg.columns), cfg.columns, cfg.task, spec
    )
    return records, data_mod.check_records(records, spec), data_mod.describe_mapping(summary)


def build_datasets(cfg: TrainConfig, tokenizer, labels: list[str] | None = None, encode_train: bool = True) -> Datasets:
    """Read, check and tokenize train and held-out data (or generate the built-in task).

    `labels`: the classes of an already trained classifier (default: those of the training data).
    `encode_train=False` (evaluation): the training data is read (the held-out split depends on it)
    but not tokenized; `train` is then empty."""
    columns = ""
    if cfg.data is None:
        if cfg.task in SEQUENCE_TASKS:
            raise LorakitError(
                f"--task {cfg.task} needs --data (text + label columns: .tsv/.csv, .jsonl, .parquet, ...)"
            )
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
    common = dict(
        task=cfg.task, eval_total=eval_total, eval_source=eval_source, columns=columns, metric=default_metric(cfg)
    )
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
    train_ex = (
        data_mod.encode_causal(train, fmt, tokenizer, cfg.max_length, cfg.train_on_prompt, cfg.prompt_template, skipped)
        if encode_train
        else []
    )
    eval_ex = data_mod.encode_causal(
        held, fmt, tokenizer, cfg.max_length, cfg.train_on_prompt, cfg.prompt_template, skipped
    )
    if skipped:
        if encode_train and not train_ex:
            raise LorakitError(
                f"no example has completion tokens within max_length={cfg.max_length} (e.g. {skipped[0]}): "
                "raise --max-length"
            )
        common["notes"] = [
            f"left out {len(skipped)} example(s) whose prompt fills max_length={cfg.max_length} "
            f"(first: {skipped[0]}); raise --max-length to keep them"
        ]
    if common["metric"] == "exact_match" and eval_ex and any(e.answer is None for e in eval_ex):
        raise LorakitError(f"exact_match compares generated completions: {fmt} data has none (use --metric eval_loss)")
    return Datasets(train_ex, eval_ex, name, answer_pattern=cfg.answer_pattern, **common)


def measure(
    datasets: Datasets,
    model: nn.Module,
    tokenizer,
    examples: list[data_mod.Example],
    device: torch.device,
    bf16: bool,
    batch_size: int,
    progress: bool = False,
) -> dict[str, float]:
    """The held-out metrics of the task (empty without held-out data); `progress`: a bar on stderr
    (a terminal only)."""
    if not examples:
        return {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if datasets.task == "classify":
        return evaluate.classify_scores(model, examples, pad, batch_size, device, bf16, len(datasets.labels), progress)
    if datasets.task == "regress":
        return evaluate.regress_scores(model, examples, pad, batch_size, device, bf16, progress)
    result = evaluate.causal_lm_loss(model, examples, pad, batch_size, device, bf16, progress)
    if datasets.metric == "exact_match":
        result.update(
            evaluate.exact_match(
                model, tokenizer, examples, batch_size, device, bf16, datasets.answer_pattern, progress
            )
        )
    return result


def describe_eval(datasets: Datasets) -> str:
    """`accuracy on 200 of 277 held-out examples (dev.tsv)`."""
    count = (
        f"{len(datasets.eval)} of {datasets.eval_total}"
        if len(datasets.eval) < datasets.eval_total
        else f"{len(datasets.eval)}"
    )
    return f"{datasets.metric} on {count} held-out examples ({datasets.eval_source})"
