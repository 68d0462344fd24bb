"""`lorakit explain`: the command line's part (arguments, loading the run, writing the reports).

lorakit explain --adapter runs/<name> "Reverse the order of the words: red fox blue\\nAnswer:"
lorakit explain --adapter runs/<name> --prompts prompts.jsonl --html explain.html --json explain.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import files
from ..errors import LorakitError, check_text, did_you_mean, short_repr
from .outputs import Inputs, check_output_file, model_inputs

TASKS = ("causal-lm", "classify", "regress")
MAX_NEW_TOKENS = 1024
JOB_KEYS = ("prompt", "text", "completion", "text_pair", "label")
MAX_TOKENS = 2048  # prompt + completion: the attribution's backward passes keep every activation


@dataclass
class Job:
    """One input to explain, as the command line or a --prompts line gives it."""

    prompt: str
    where: str  # "the prompt" or "FILE:LINE", for error messages
    completion: str | None = None
    text_pair: str | None = None
    label: str | int | None = None
    record: dict[str, Any] | None = None  # a --prompts line's fields (for the run's prompt template)


def count(limit: int | None = None):
    """An argparse type: an integer from 1 (to `limit`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < 1 or (limit is not None and value > limit):
            raise argparse.ArgumentTypeError(
                f"must be from 1 to {limit}, got {value}" if limit else f"must be positive, got {value}"
            )
        return value

    return parse


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `lorakit explain` on the command line's subparsers."""
    parser = subparsers.add_parser(
        "explain",
        help="what an adapter does to one prompt, token by token",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run base and adapted model on a prompt and show, token by token: the output change (top tokens and "
        "the chosen token's log-probability, base vs adapted), where the adapter acts (||ΔW x|| / ||W0 x|| per token and "
        "module), which modules matter (integrated gradients over a scale on each module's update; the parts add up to "
        "the total within a stated tolerance) and which rank components fire. Prints a summary; --html writes a "
        "self-contained report, --json every number. A causal LM's prompt is shown to the model as the run trained "
        "it (its --prompt-template).",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt (a classifier's text); or --prompts")
    parser.add_argument("--adapter", required=True, help="adapter directory or run directory (runs/<name>)")
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help='JSONL, one input per line: {"prompt" (or "text"), '
        '"completion", "text_pair", "label"} (only "prompt" required), or plain text lines',
    )
    parser.add_argument("--completion", help="causal LM: explain this completion instead of the adapted model's own")
    parser.add_argument("--text-pair", help="classifier or regressor: the second text of a sentence-pair task")
    parser.add_argument("--label", help="classifier: explain this class (name or index) instead of the predicted one")
    parser.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    parser.add_argument("--task", choices=TASKS, help="default: the run's task")
    parser.add_argument(
        "--max-new-tokens",
        type=count(MAX_NEW_TOKENS),
        default=16,
        help="the most tokens generated (greedy, by the adapted model) when no completion is given",
    )
    parser.add_argument("--top", type=count(100), default=5, help="tokens or classes listed per output")
    parser.add_argument("--components", type=count(4096), default=8, help="rank components kept per module")
    parser.add_argument(
        "--steps",
        type=count(1024),
        help="integration steps of the attribution (default: 8, doubled up to "
        "64 until the parts add up to the total within the tolerance)",
    )
    parser.add_argument("--html", metavar="FILE", help="write the HTML report here")
    parser.add_argument("--json", metavar="FILE", help="write every number as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --html / --json files")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.set_defaults(func=run)
    return parser


def check_outputs(args: argparse.Namespace, adapter: Path, inputs: Inputs = ()) -> dict[str, Path]:
    """The output files, checked before anything loads: writable, distinct, not replaced without
    --overwrite, and never one of the inputs (the adapter's files, the --prompts file, `inputs`).
    Returns the file to write for each flag given."""
    targets: dict[str, Path] = {}
    outputs = [Path(p) for p in (args.html, args.json) if p is not None]
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise LorakitError(f"--html and --json name the same file {outputs[0]}; give two files")
    for path, flag in zip(outputs, [f for f in ("--html", "--json") if getattr(args, f[2:]) is not None]):
        if path.resolve().parent == adapter.resolve():
            raise LorakitError(f"{flag} {path} is inside the adapter directory {adapter}; write the report elsewhere")
        if args.prompts is not None and path.resolve() == Path(args.prompts).resolve():
            raise LorakitError(f"{flag} {path} is the --prompts file; give another file name")
        if path.is_dir():
            raise LorakitError(f"{flag} {path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise LorakitError(f"{flag} {path}: the directory {path.parent} does not exist")
        # the rest as every command that writes: never the base model's files, a broken link, a read-only place
        targets[flag] = check_output_file(path, flag, args.overwrite, inputs)  # a symbolic link's target
        files.clean_temporaries(targets[flag].parent, targets[flag].name)  # what a killed explain left beside it
    return targets


def read_jobs(args: argparse.Namespace) -> list[Job]:
    """The inputs: the positional prompt, or each line of --prompts."""
    if args.prompts is None:
        if args.prompt is None:
            raise LorakitError('give a prompt (lorakit explain --adapter RUN "PROMPT") or --prompts FILE')
        if not args.prompt.strip():
            raise LorakitError("the prompt is empty")
        for text, what in (
            (args.prompt, "the prompt"),
            (args.completion, "--completion"),
            (args.text_pair, "--text-pair"),
            (args.label, "--label"),
        ):
            if text is not None:
                check_text(text, what)
        return [Job(args.prompt, "the prompt", args.completion, args.text_pair, args.label)]
    if args.prompt is not None:
        raise LorakitError("--prompts takes the prompts from the file: drop the positional prompt")
    if args.completion is not None or args.label is not None or args.text_pair is not None:
        raise LorakitError(
            'with --prompts, give each line\'s "completion", "text_pair" or "label" in the file, not as a flag'
        )
    path = Path(args.prompts)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first line
    except (OSError, UnicodeDecodeError) as err:
        raise LorakitError(f"cannot read --prompts {path}: {err}") from None
    jobs = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            jobs.append(Job(line, where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LorakitError(f"{where}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise LorakitError(f"{where}: JSON nested too deeply") from None
        except ValueError:  # an integer of more digits than Python converts
            raise LorakitError(
                f"{where}: a number with too many digits (over {sys.get_int_max_str_digits()})"
            ) from None
        if not isinstance(record, dict):  # `{} []`-like lines fail to parse; kept for safety
            raise LorakitError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get("prompt", record.get("text"))
        if not isinstance(prompt, str) or not prompt.strip():
            typo = (
                did_you_mean(next(iter(record), ""), JOB_KEYS)
                if "prompt" not in record and "text" not in record
                else ""
            )
            raise LorakitError(
                f'{where}: needs a non-empty string "prompt" (or "text"), got {short_repr(prompt)}{typo}'
            )
        for key in ("completion", "text_pair"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise LorakitError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
        label = record.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise LorakitError(f'{where}: "label" must be a class name or index, got {short_repr(label)}')
        for key in ("prompt", "text", "completion", "text_pair", "label"):
            if isinstance(record.get(key), str):
                check_text(record[key], f'{where}: "{key}"')
        jobs.append(Job(prompt, where, record.get("completion"), record.get("text_pair"), label, record))
    if not jobs:
        raise LorakitError(f"{path}: no prompts")
    return jobs


def check_jobs(jobs: list[Job], task: str) -> None:
    """Fields that do not fit the task are errors, not silently ignored."""
    for job in jobs:
        if task != "causal-lm" and job.completion is not None:
            raise LorakitError(f"{job.where}: a completion is for causal LMs; this run's task is {task}")
        if task != "classify" and job.label is not None:
            raise LorakitError(f"{job.where}: a label is for classifiers; this run's task is {task}")
        if task == "causal-lm" and job.text_pair is not None:
            raise LorakitError(f"{job.where}: a text_pair is for classifiers and regressors; this run's task is {task}")
        if job.completion is not None and not job.completion:
            raise LorakitError(f"{job.where}: the completion is empty")


def label_index(label: str | int | None, names: list[str], where: str) -> int | None:
    """A class given by name (the run's labels) or index."""
    if label is None:
        return None
    if isinstance(label, str) and label in names:
        return names.index(label)
    try:
        return int(label)
    except ValueError:
        known = f"the run's classes: {', '.join(names)}" if names else "give the class index"
        raise LorakitError(f"{where}: unknown label {label!r}; {known}") from None


def shown_prompt(job: Job, template: str | None, tokenizer) -> str:
    """The prompt as the run showed it to the model in training (its prompt template)."""
    from ..train.data import Record, apply_prompt_template

    record = Record({"prompt": job.prompt}, job.where, dict(job.record or {}))
    return apply_prompt_template(template, record, job.prompt, tokenizer)


def check_lengths(jobs: list[Job], prompts: list[str], tokenizer, model, task: str, max_new_tokens: int) -> None:
    """A causal LM's prompt + completion must fit the model and explain's limit (`MAX_TOKENS`)."""
    if task != "causal-lm":
        return  # a classifier's input is truncated to the model's length, as in training
    limit = min(getattr(getattr(model, "config", None), "max_position_embeddings", None) or MAX_TOKENS, MAX_TOKENS)
    for job, prompt in zip(jobs, prompts):
        completion = (
            len(tokenizer(job.completion, add_special_tokens=False)["input_ids"])
            if job.completion is not None
            else max_new_tokens
        )
        length = len(tokenizer(prompt)["input_ids"]) + completion
        if length > limit:
            raise LorakitError(
                f"{job.where}: prompt and completion reach {length} tokens; explain reads at most {limit} "
                "(the attribution keeps every activation of a forward pass)"
            )


def run(args: argparse.Namespace) -> int:
    """`lorakit explain`: everything checked first, then the model loads once for all inputs."""
    from .. import io
    from ..explain import core, page, summary
    from ..train.loading import num_outputs, pick_device
    from .adapters import adapter_dir_and_config, base_weight_snapshot, chosen_task, load_adapted, trained_labels

    adapter, cfg = adapter_dir_and_config(args.adapter)
    task = chosen_task(args.task, cfg, adapter)
    inputs = [
        ("the adapter's own directory", adapter),
        *model_inputs(args.model if args.model is not None else cfg.model, task),
    ]
    if adapter.name == "adapter":
        inputs += [
            ("the run's config", adapter.parent / "config.yaml"),
            ("the run's report", adapter.parent / "report.json"),
        ]
    outputs = check_outputs(args, adapter, inputs)
    jobs = read_jobs(args)
    check_jobs(jobs, task)
    try:
        config, _ = io.read_config(adapter)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise LorakitError(f"cannot read adapter {adapter}: {' '.join(str(err).split())}") from None
    model_spec = args.model if args.model is not None else cfg.model
    original: dict = {}

    snapshot = base_weight_snapshot(config, adapter, model_spec, original) if config.moves_base_weights else None

    labels = trained_labels(adapter)
    classes = [label_index(job.label, labels, job.where) for job in jobs]  # unknown names: before the model loads
    model, tokenizer = load_adapted(model_spec, adapter, task, num_outputs(task, labels), before_load=snapshot)
    model.to(pick_device(args.device))
    prompts = [shown_prompt(job, cfg.prompt_template, tokenizer) if task == "causal-lm" else job.prompt for job in jobs]
    check_lengths(
        jobs, prompts, tokenizer, model, task, args.max_new_tokens
    )  # every input, before the first is explained
    found = []
    for number, (job, prompt, label) in enumerate(zip(jobs, prompts, classes), start=1):
        try:
            found.append(
                core.explain(
                    model,
                    tokenizer,
                    prompt,
                    task=task,
                    completion=job.completion,
                    text_pair=job.text_pair,
                    label=label,
                    label_names=labels,
                    max_new_tokens=args.max_new_tokens,
                    top=args.top,
                    components=args.components,
                    steps=args.steps,
                    original=original or None,
                )
            )
        except ValueError as err:
            raise LorakitError(f"{job.where}: {' '.join(str(err).split())}") from None
        if number > 1:
            print("\n" + "-" * 100 + "\n")
        print(summary.summary_text(found[-1], f"{adapter} on {model_spec or 'the built-in model'}"), flush=True)
    run_name = adapter.parent.name if adapter.name == "adapter" else adapter.name
    title = f"lorakit explain: {run_name} ({config.method})"
    try:
        if args.html:
            page.write_html(found, outputs["--html"], title)
            print(f"report: {args.html}")
        if args.json:
            page.write_json(
                found, outputs["--json"], {"adapter": str(adapter), "model": model_spec, "method": config.method}
            )
            print(f"all numbers: {args.json}")
    except OSError as err:  # a full disk, a read-only directory: an existing file is left as it was
        raise LorakitError(f"cannot write {err.filename or 'the report'}: {err.strerror or err}") from None
    if not outputs:
        print("(--html FILE writes the report with the grids per token; --json FILE every number)")
    return 0
