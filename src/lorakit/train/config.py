"""The training configuration: one typed dataclass, read from flags and from YAML.

Each field's docstring (the string literal under it) is its `--help` text, as in litgpt. A YAML
file given with `--config` sets fields by name; flags override the file; `--print-config`
prints the resolved result, which is also what a run saves as `runs/<name>/config.yaml`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import textwrap
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import LorakitError, closest, did_you_mean, short_repr


@dataclass
class TrainConfig:
    """Everything `lorakit train` needs; defaults run the built-in job."""

    model: str | None = None
    """Base model: a local Hugging Face directory, a .gguf file, or a built-in name ('smollm2', 'minilm'). Default: the built-in model for the task."""
    task: str = "causal-lm"
    """'causal-lm' (instruction / chat / text data), 'classify' (text or a sentence pair + a class label; encoder models) or 'regress' (text or a pair + a number: one output, MSE loss)."""
    data: str | None = None
    """Training data: .jsonl/.json (Alpaca, chat messages, prompt/completion, text; or text + label), .csv/.tsv, .parquet, .arrow, or a directory written by datasets' save_to_disk; several files as a comma-separated list or a glob. Default: the built-in generated task."""
    eval_data: str | None = None
    """Held-out data, read like --data. Default: the 'validation' split of a saved DatasetDict given as --data, else an --eval-fraction of --data."""
    split: str | None = None
    """The split of a saved DatasetDict (--data DIR) to train on. Default: 'train' (or its only split)."""
    eval_split: str | None = None
    """The split of a saved DatasetDict to evaluate on (of --eval-data, else of --data). Default: 'validation' when there is one."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map your data's columns onto lorakit's: ROLE=COLUMN, comma separated (e.g. prompt=question,completion=answer; text=premise,text_pair=hypothesis,label=gold). Roles: prompt, completion, instruction, input, output, messages, text, text_pair, label. Well-known names (GLUE's sentence1/sentence2, question/sentence, question1/question2, a score column, GSM8K's question/answer) need no mapping. A CSV/TSV file without a header row: columns by position, counted from 1 (e.g. text=4,label=2); GLUE's CoLA files need none."""
    prompt_template: str | None = None
    """How a prompt is shown to the model. Default: as given, then the completion right after it (no separator is added: end the prompt with a space or newline if the completion needs one), then end-of-sequence. 'chat': the prompt as a user turn in the tokenizer's chat template. Or a template over the record's columns, e.g. 'Question: {question}\\nAnswer: ' ({prompt} is the mapped prompt; \\n is a newline)."""
    eval_fraction: float = 0.1
    """Fraction of --data held out for evaluation when --eval-data is not given."""
    max_eval_examples: int = 200
    """At most this many held-out examples are evaluated (before and after training), spread evenly over the held-out set."""
    eval_batch_size: int | None = None
    """Examples per evaluation batch. Default: --batch-size."""
    metric: str | None = None
    """The held-out metric shown before -> after (all of the task's metrics are reported). Default: accuracy (classify), pearson (regress), exact_match for the built-in task or with --answer-pattern, else eval_loss."""
    answer_pattern: str | None = None
    """Exact match compares only the answer extracted from the generated and the reference completion: 'gsm8k' (the number after ####), 'last-number', or a regular expression (its group 1, or the whole match). Implies --metric exact_match."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: only on completion / assistant tokens)."""

    method: str = "lora"
    """Adapter method, one of lorakit.methods, or 'qlora' (LoRA r=64, alpha=16, dropout 0.05 over an NF4 base)."""
    r: int | None = None
    """Rank, for methods that have one. Default: the method's own default."""
    alpha: float | None = None
    """Scale numerator, for methods that have one. Default: the method's own default."""
    dropout: float | None = None
    """Adapter input dropout, for methods that have one. Default: the method's own default."""
    targets: str = "all-linear"
    """Modules to adapt: 'all-linear', module names or name suffixes separated by commas (e.g. q_proj,v_proj), or a regular expression matched against full module names."""
    train_modules: list[str] | None = None
    """Modules trained in full and saved with the adapter. Default: the classification head for --task classify."""
    method_args: dict[str, Any] = field(default_factory=dict)
    """Other fields of the method's config, as KEY=VALUE (repeat the flag), e.g. --method-arg init_r=12."""
    loraplus_ratio: float | None = None
    """LoRA+: learning rate of the B matrices = lr x this ratio (e.g. 16)."""
    quantize: str | None = None
    """Quantize the frozen base before adapting ('nf4' = QLoRA)."""
    init: str | None = None
    """How the adapter starts (LoRA, LoRA-FA, DoRA): 'default' (B = 0: the base model's outputs), or 'loftq' with --quantize (s·B·A starts as the best rank-r fit of the 4-bit base's rounding error, LoftQ)."""

    lr: float | None = None
    """Peak learning rate. Default: the method's recipe (lorakit.train.recipes): LoRA's 2e-3, times 3 for LoRA-FA, 10 for AdaLoRA, 30 for VeRA (ratios measured on SST-2)."""
    schedule: str = "cosine"
    """Learning-rate decay after warmup: 'cosine', 'linear' or 'constant'."""
    warmup_steps: int = 10
    """Steps of linear warmup from 0 to --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: float = 1.0
    """Passes over the training data (ignored when --steps is given)."""
    steps: int | None = None
    """Optimizer steps to train (overrides --epochs)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum)."""
    max_length: int = 512
    """Examples longer than this many tokens are truncated."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this value (none to disable)."""
    seed: int = 0
    """Seed for the adapter init, data order and dropout (and the built-in task's data)."""
    precision: str = "auto"
    """'auto' (bf16 autocast on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    distributed: str = "auto"
    """How several processes (--nproc N, or torchrun) share the work: 'ddp' (every process holds the whole model; gradients averaged) or 'fsdp' (FSDP2: the frozen base, 4-bit included, is sharded over the processes, the adapters stay whole). 'auto': ddp under torchrun with more than one process, else one process."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    compile: bool = False
    """Run the model through torch.compile."""
    chunked_loss: bool = True
    """Causal LMs: compute the output head and cross-entropy a chunk of tokens at a time, never holding the full (tokens x vocabulary) logits (the same loss and gradients; used where the model's head is a plain linear layer). --no-chunked-loss: the model's own loss."""
    measure_limit: bool = False
    """Also time the limit (the frozen base's forward + backward through the activations, no adapter, no optimizer) on the same micro-batches as about eight of the run's steps, each right after its step, in this process: the report's step_vs_limit is the median of these paired ratios, so it holds on a busy machine. One process, without --compile (else not measured). `lorakit compare` turns it on."""

    name: str | None = None
    """Run name: results go to <out-dir>/<name>/. Default: derived from the task, method and time."""
    out_dir: str = "runs"
    """Directory holding the runs."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (0: only at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep."""
    resume: str | None = None
    """Continue a run from its latest checkpoint: give the run directory (or one checkpoint directory)."""
    overwrite: bool = False
    """Start afresh in a run directory that already holds a run (its checkpoints, adapter, metrics and reports are replaced); without it such a directory is refused."""
    progress: bool = True
    """Show the progress bar."""


# method names that are LoRA with other settings (expanded by lorakit.train.method_config.expand_aliases)
ALIASES = ("qlora", "lora-plus")
# the methods lorakit registers (`lorakit.methods.METHODS`; tests hold the two equal): named here so that
# `--help` lists them without importing the methods, and torch with them
BUILTIN_METHODS = ("adalora", "delta-lora", "dora", "lora", "lora-drop", "lora-fa", "vera")


def method_names(registered: Iterable[str] = BUILTIN_METHODS) -> list[str]:
    """The names `--method` takes: the registered methods (default: lorakit's own), then the aliases.
    `--help` and every unknown-method error list these."""
    return sorted(set(registered)) + [a for a in ALIASES if a not in registered]


def unknown_method(name: Any, registered: Iterable[str], flag: str = "method") -> LorakitError:
    """The error for a method name that is not one: the names there are, and the closest."""
    names = method_names(registered)
    return LorakitError(
        f"unknown {flag} {short_repr(name)}; choose from: {', '.join(names)}{did_you_mean(name, names)}"
    )


# the names transformers' TrainingArguments and PEFT's LoraConfig give lorakit's fields (a config file
# written for them gets the lorakit name in its error)
HF_NAMES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_train_epochs": "epochs",
    "output_dir": "out_dir",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_grad_norm": "grad_clip",
    "lr_scheduler_type": "schedule",
    "target_modules": "targets",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "modules_to_save": "train_modules",
    "rank": "r",
    "max_seq_length": "max_length",
    "use_rslora": "method_args",
    "save_steps": "checkpoint_every",
}

CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("causal-lm", "classify", "regress"),
    "metric": ("accuracy", "f1", "mcc", "pearson", "spearman", "exact_match", "eval_loss", "perplexity"),
    "init": ("default", "loftq"),
    "schedule": ("cosine", "linear", "constant"),
    "precision": ("auto", "bf16", "fp32"),
    "device": ("auto", "cpu", "cuda"),
    "distributed": ("auto", "ddp", "fsdp"),
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source, as litgpt does)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `list[str] | None` -> list; the type a flag's value converts to."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]
    return typing.get_origin(annotation) or annotation


def field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def optional_fields() -> set[str]:
    """Fields whose declared type admits None (`int | None`): the others must hold a value."""
    hints = typing.get_type_hints(TrainConfig)
    return {name for name, hint in hints.items() if type(None) in typing.get_args(hint)}


def convert(name: str, value: Any) -> Any:
    """Check and convert one field's value (from YAML or a flag), or raise a one-line error."""
    kind = field_types()[name]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and kind is not str):
        if name not in optional_fields():
            raise LorakitError(f"{name}: needs a value ({kind.__name__}), got none")
        return None
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            value = value.lower() in ("true", "1", "yes")
        elif kind is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                value = list(value)
            else:
                raise ValueError(value)
        elif kind is dict:
            if name == "columns" and isinstance(value, str):
                from .data import parse_columns

                value = parse_columns(value)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(value)
        elif kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise LorakitError(f"{name}: {short_repr(value)} is out of range") from None
            if not math.isfinite(value):
                raise LorakitError(f"{name}: must be a finite number, got {value!r}")
        elif (
            kind is int and not isinstance(value, bool) and (isinstance(value, int) or str(value).lstrip("-").isdigit())
        ):
            if isinstance(value, str) and len(value.lstrip("-")) > 12:
                raise LorakitError(f"{name}: {short_repr(value)} is out of range")
            value = int(value)
            if abs(value) >= 2**31:
                raise LorakitError(f"{name}: {short_repr(value)} is out of range")
        elif isinstance(value, bool) and kind is not bool:
            raise ValueError(value)
        elif not isinstance(value, kind):
            raise ValueError(value)
    except ValueError:
        raise LorakitError(f"{name}: expected {kind.__name__}, got {short_repr(value)}") from None
    if name in CHOICES and value not in CHOICES[name]:
        raise LorakitError(
            f"{name}: {short_repr(value)} is not one of {', '.join(CHOICES[name])}{did_you_mean(value, CHOICES[name])}"
        )
    return value


def from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config from `base` (default: the defaults) with the fields in `data` replaced."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise LorakitError(f"config field names are words, got {short_repr(odd[0])}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        hints = [
            f"{HF_NAMES.get(k) or closest(k, known)!r} for {k!r}" for k in unknown if k in HF_NAMES or closest(k, known)
        ]
        raise LorakitError(
            f"unknown config field(s) {short_repr(unknown)}; known: {', '.join(sorted(known))}"
            + (f" (did you mean {'; '.join(hints)}?)" if hints else "")
        )
    return dataclasses.replace(base or TrainConfig(), **{k: convert(k, v) for k, v in data.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path}: not UTF-8 text (byte at position {err.start}); save the config as UTF-8") from None
    except yaml.YAMLError as err:
        raise LorakitError(f"{path}: invalid YAML: {' '.join(str(err).split())[:300]}") from None
    except RecursionError:
        raise LorakitError(f"{path}: nested too deeply to be a config") from None
    except ValueError as err:  # e.g. an integer of thousands of digits
        raise LorakitError(f"{path}: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def with_resolved_paths(config: TrainConfig) -> TrainConfig:
    """The config with its file and directory fields absolute, so a saved run config means the same
    from any working directory: the model where it names an existing path (built-in names stay as
    they are), each file or glob of a data list."""
    resolved = {}
    if config.model is not None and Path(config.model).exists():
        resolved["model"] = str(Path(config.model).resolve())
    for name in ("data", "eval_data"):
        value = getattr(config, name)
        if value is None:
            continue
        parts = [value] if Path(value).exists() else [p.strip() for p in value.split(",") if p.strip()]
        resolved[name] = ",".join(str(Path(p).resolve()) if Path(p).exists() else os.path.abspath(p) for p in parts)
    return dataclasses.replace(config, **resolved)


def to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML, every field in declaration order."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the optimizer applies its step sizes to float32 weights


def _check_step_sizes(config: TrainConfig) -> None:
    """Learning rates (and the products the optimizer forms from them) that a float32 weight can take:
    1e39 is a finite number in the config, and an overflow error in the first optimizer step."""
    if config.lr is None:
        return
    sizes = {"lr": config.lr}
    if config.loraplus_ratio is not None:
        sizes["lr x loraplus_ratio"] = config.lr * config.loraplus_ratio
    if config.weight_decay:
        sizes["lr x weight_decay"] = config.lr * config.weight_decay
    for name, value in sizes.items():
        if value > FLOAT32_MAX:
            raise LorakitError(
                f"{name} = {value:g} is larger than the float32 weights can take ({FLOAT32_MAX:.3g}): the "
                "first optimizer step would overflow; learning rates are typically 1e-5 to 1e-2"
            )


def validate(config: TrainConfig) -> None:
    """Checks that need more than one field, or ranges; raises a one-line error."""
    if config.steps is not None and config.steps <= 0:
        raise LorakitError(f"steps must be positive, got {config.steps}")
    if config.steps is None and config.epochs <= 0:
        raise LorakitError(f"epochs must be positive, got {config.epochs}")
    for name in ("batch_size", "grad_accum", "max_length", "max_eval_examples", "eval_batch_size"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise LorakitError(f"{name} must be positive, got {getattr(config, name)}")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise LorakitError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.lr is not None and config.lr <= 0:
        raise LorakitError(f"lr must be positive, got {config.lr}")
    _check_step_sizes(config)
    if config.name is not None and (
        not config.name
        or config.name in (".", "..")
        or any(c in config.name for c in "/\\")
        or not config.name.isprintable()
    ):
        raise LorakitError(
            f"name {config.name!r} must be a plain directory name (no path separators, no control "
            "characters): runs stay inside --out-dir"
        )
    if config.grad_clip is not None and config.grad_clip <= 0:
        raise LorakitError(f"grad_clip must be positive (or none to turn clipping off), got {config.grad_clip}")
    if config.loraplus_ratio is not None and config.loraplus_ratio <= 0:
        raise LorakitError(f"loraplus_ratio must be positive, got {config.loraplus_ratio}")
    if config.weight_decay < 0:
        raise LorakitError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if config.quantize not in (None, "nf4"):
        raise LorakitError(f"quantize: {config.quantize!r} is not supported (use nf4)")
    from . import data, metrics

    data.check_column_roles(config.columns)
    data.check_prompt_template(config.prompt_template)
    sequence_metrics = {
        "classify": ("accuracy", "f1", "mcc", "eval_loss"),
        "regress": ("pearson", "spearman", "eval_loss"),
    }
    allowed = sequence_metrics.get(config.task, ("exact_match", "eval_loss", "perplexity"))
    if config.metric is not None and config.metric not in allowed:
        raise LorakitError(
            f"metric {config.metric!r} does not apply to --task {config.task}; its metrics: {', '.join(allowed)}"
        )
    if config.answer_pattern is not None:
        if config.task != "causal-lm":
            raise LorakitError("answer_pattern applies to generation (--task causal-lm)")
        if config.metric not in (None, "exact_match"):
            raise LorakitError(f"answer_pattern scores exact_match; it does not go with --metric {config.metric}")
        try:
            metrics.compile_answer_pattern(config.answer_pattern)
        except ValueError as err:
            raise LorakitError(f"answer_pattern: {err}") from None
    if config.distributed == "fsdp":
        if config.compile:
            raise LorakitError(
                "compile: torch.compile over an FSDP-sharded model is not supported by lorakit yet; "
                "drop --compile, or use --distributed ddp"
            )
        if config.method == "lora-drop":
            raise LorakitError(
                "method lora-drop: its probe trains on one process before training and its adapters are "
                "shared across layers, which a sharded model cannot do; use --distributed ddp"
            )
    if config.init == "loftq" and not config.quantize:
        raise LorakitError(
            "init: 'loftq' starts from the rounding error of a 4-bit base: add --quantize nf4 (or use --method qlora)"
        )
