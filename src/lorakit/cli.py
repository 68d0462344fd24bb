"""The `lorakit` command line: train, eval, generate, merge, export, inspect, explain, compare.

    lorakit train                                # the built-in job: SmolLM2-135M learns a task
    lorakit train --data my.jsonl --method dora --r 16 --steps 300
    lorakit train --config run.yaml --lr 1e-3    # flags override the file
    lorakit train --print-config                 # the resolved config, as YAML
    lorakit eval --adapter runs/<name>
    lorakit generate --adapter runs/<name> "Reverse the order of the words: a b c"
    lorakit generate --adapter sql=runs/a --adapter chat=runs/b --prompts prompts.jsonl   # per-prompt adapter
    lorakit merge --adapter runs/<name> --out merged/
    lorakit export --adapter runs/<name> --format gguf           # a LoRA adapter for llama.cpp (--lora FILE)
    lorakit inspect runs/<name>                  # what the adapter changed, module by module
    lorakit explain --adapter runs/<name> "..."  # what the adapter does to one prompt, token by token
    lorakit compare --methods lora,dora,vera     # the same job with each method: table + HTML report

Errors in the user's input print one line, `error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from .train import config as config_mod
from .train.config import TrainConfig
from .train.errors import LorakitError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --- train --------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, per_method: bool = False) -> None:
    """One flag per TrainConfig field, help from the field's docstring. Defaults are left out of
    the namespace (SUPPRESS) so that only flags actually given override the config file.
    `per_method`: --method-arg also takes METHOD:KEY=VALUE (lorakit compare)."""
    docs = config_mod.field_docs(TrainConfig)
    kinds = config_mod.field_types()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        help_text = docs.get(f.name, "")
        default = getattr(defaults, f.name)
        if f.name in config_mod.CHOICES:
            help_text += f" Choices: {', '.join(config_mod.CHOICES[f.name])}."
        if f.name == "method":
            from .methods import METHODS
            from .train.config import ALIASES

            help_text += f" Choices: {', '.join(sorted(METHODS) + list(ALIASES))}."
        shown_default = "" if default is None else f" (default: {default})"  # a None default is explained in prose
        if kinds[f.name] is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text}{shown_default}")
        elif f.name == "method_args":
            if per_method:
                from .compare import PER_METHOD_FIELDS

                help_text += (" METHOD:KEY=VALUE sets it for that method only (e.g. vera:r=512); KEY may also be one of "
                              f"{', '.join(PER_METHOD_FIELDS)} for that method.")
            parser.add_argument("--method-arg", dest=f.name, action="append", metavar="[METHOD:]KEY=VALUE" if per_method else "KEY=VALUE",
                                default=argparse.SUPPRESS, help=help_text)
        elif kinds[f.name] is dict:  # --columns a=b,c=d (repeatable)
            parser.add_argument(_flag(f.name), dest=f.name, action="append", metavar="ROLE=COLUMN", default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, metavar=f.name.upper(), default=argparse.SUPPRESS,
                                help=f"{help_text}{shown_default}")


def parse_method_args(pairs: list[str]) -> dict[str, Any]:
    """['init_r=12', 'lr_ratio=0.5'] -> {'init_r': 12, 'lr_ratio': 0.5} (values read as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LorakitError(f"--method-arg expects KEY=VALUE, got {pair!r}")
        if ":" in key:  # METHOD:KEY=VALUE picks one of several methods: only compare trains several
            raise LorakitError(f"--method-arg {pair!r}: the METHOD:KEY=VALUE form is for lorakit compare; "
                               "lorakit train takes KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def split_method_args(pairs: list[str], methods: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """compare's --method-arg: (the KEY=VALUE pairs for every method, {method: {key: value}} from
    the METHOD:KEY=VALUE pairs). A method that is not among `methods` is an error."""
    common, per_method = [], {}
    for pair in pairs:
        if ":" not in pair.partition("=")[0]:
            common.append(pair)
            continue
        method, _, rest = pair.partition(":")
        if method.strip() not in methods:
            raise LorakitError(f"--method-arg {pair!r}: {method.strip()!r} is not one of --methods ({', '.join(methods)})")
        per_method.setdefault(method.strip(), []).append(rest)
    return common, {method: parse_method_args(given) for method, given in per_method.items()}


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- the resumed run's config.yaml <- --config file <- flags."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "method_args" in given:
        given["method_args"] = parse_method_args(given["method_args"])
    if "columns" in given:
        from .train.data import parse_columns

        given["columns"] = {k: v for text in given["columns"] for k, v in parse_columns(text).items()}
    cfg = TrainConfig()
    saved_cfg = None
    if given.get("resume"):
        from .train.checkpoint import find_checkpoint, run_dir_of

        saved = run_dir_of(find_checkpoint(given["resume"])) / "config.yaml"
        if saved.is_file():
            cfg = saved_cfg = config_mod.from_dict(config_mod.load_yaml(saved), cfg)
    if args.config:
        cfg = config_mod.from_dict(config_mod.load_yaml(args.config), cfg)
    cfg = config_mod.from_dict(given, cfg)
    if saved_cfg is not None:
        saved_values, new_values = config_mod.with_resolved_paths(saved_cfg), config_mod.with_resolved_paths(cfg)
        changed = [f"{name} ({getattr(saved_cfg, name)!r} -> {getattr(cfg, name)!r})"
                   for name in (f.name for f in dataclasses.fields(TrainConfig))
                   if name not in RESUME_MAY_CHANGE and getattr(new_values, name) != getattr(saved_values, name)]
        if changed:
            raise LorakitError(f"--resume continues the run as {saved} configures it; a resume cannot change "
                               f"{', '.join(changed)}: drop those settings, or start a new run with another --name")
    return cfg


# what a resumed run may set anew: its length, where and how it runs, what it reports
# (--distributed too: a checkpoint holds whole tensors under DDP and FSDP alike)
RESUME_MAY_CHANGE = {"resume", "steps", "epochs", "progress", "keep_checkpoints", "checkpoint_every", "device", "distributed",
                     "max_eval_examples", "compile", "gradient_checkpointing", "overwrite", "eval_batch_size", "metric",
                     "answer_pattern", "chunked_loss", "measure_limit"}


def launch_processes(args: argparse.Namespace) -> int:
    """`lorakit train --nproc N ...`: the same command under torchrun, N processes (DDP)."""
    import subprocess

    from .train.distributed import torchrun_command

    argv = list(args.argv)
    for i, arg in enumerate(argv):  # drop --nproc N / --nproc=N
        if arg == "--nproc":
            del argv[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    return subprocess.call(torchrun_command(args.nproc, argv))


def cmd_train(args: argparse.Namespace) -> int:
    from .train.distributed import launched_by_torchrun

    if args.nproc and args.nproc > 1 and not args.print_config and not launched_by_torchrun():
        from .train.loop import check_config

        # a bad flag or setting is one error here, not one per process (and no torchrun traceback)
        check_config(resolve_train_config(args))
        return launch_processes(args)
    cfg = resolve_train_config(args)
    if args.print_config:
        from .train.loop import check_config

        checked = check_config(cfg)  # a printed config is a valid one
        if cfg.lr is None:
            from .train.recipes import describe

            cfg = dataclasses.replace(cfg, lr=checked.lr)
            print(f"# lr: the {cfg.method} recipe, {describe(cfg.method)}")
        print(config_mod.to_yaml(cfg), end="")
        return 0
    from .train.loop import train

    result = train(cfg, echo=lambda msg: print(msg, file=sys.stderr, flush=True))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # the main process reports
    print()
    print(result.table())
    print()
    print(f"saved to {result.run_dir}/: adapter/, config.yaml, metrics.jsonl, report.txt, checkpoints/")
    return 0


# --- eval / generate / merge: a base model plus a saved adapter ---------------------------------


def adapter_dir_and_config(adapter: str | None) -> tuple[Path | None, TrainConfig]:
    """The adapter directory for `--adapter` (an adapter or a run directory) and the run's config
    (defaults when the adapter was not written by `lorakit train`)."""
    if adapter is None:
        return None, TrainConfig()
    path = Path(adapter)
    if not path.exists():
        raise LorakitError(f"adapter path {path} does not exist")
    run_dir = path
    if (path / "adapter").is_dir():
        path = path / "adapter"
    elif (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        raise LorakitError(f"{path} has no adapter/ yet (the run did not finish): `lorakit train --resume {path}` "
                           "finishes it")
    else:
        run_dir = path.parent
    cfg = TrainConfig()
    if (run_dir / "config.yaml").is_file():
        cfg = config_mod.from_dict(config_mod.load_yaml(run_dir / "config.yaml"))
    return path, cfg


def load_adapted(model_spec: str | None, adapter: Path | None, task: str, num_labels: int = 2,
                 extra: dict[str, Path] | None = None, before_load=None):
    """(model, tokenizer): the base model with the adapter loaded for inference (and the `extra`
    adapters, name -> directory, beside it on the same base). `before_load(model)` runs on the base
    just before the adapters load (inspect takes its snapshot there)."""
    from . import io
    from .train.loop import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_spec, task)
    quantization = None
    first = adapter if adapter is not None else next(iter((extra or {}).values()), None)
    if first is not None and (first / io.LORAKIT_CONFIG_NAME).is_file():
        try:
            _, meta = io.read_config(first)  # a QLoRA adapter: stream the base into 4 bits directly
        except (ValueError, KeyError) as err:
            raise LorakitError(f"cannot load adapter {first}: {' '.join(str(err).split())}") from None
        quantization = meta.get("quantization")
    model = load_model(model_spec, task, num_labels, tokenizer, quantization)
    if before_load is not None:
        before_load(model)
    named = {None: adapter} if adapter is not None else {}
    named.update(extra or {})
    for name, path in named.items():
        warn_if_other_base(path, model_spec, task)
        try:
            io.load(model, path, name=name) if name is not None else io.load(model, path)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise LorakitError(f"cannot load adapter {path}: {' '.join(str(err).split())}") from None
    model.eval()
    return model, tokenizer


def warn_if_other_base(adapter: Path, model_spec: str | None, task: str) -> None:
    """A warning (not an error: a moved or renamed base is fine) when the adapter records another base."""
    from . import io, models

    recorded = io.recorded_base(adapter)
    loading = model_spec or (models.DEFAULT_ENCODER if task in ("classify", "regress") else models.DEFAULT_CAUSAL_LM)
    if recorded is None:
        return
    same = recorded == loading or (Path(recorded).exists() and Path(loading).exists()
                                   and Path(recorded).resolve() == Path(loading).resolve())
    if not same:
        print(f"warning: {adapter} was trained on {recorded}; loading it onto {loading}", file=sys.stderr)


def named_adapters(specs: list[str]) -> dict[str, Path]:
    """`--adapter` values (`PATH` or `NAME=PATH`, an adapter or run directory) -> name -> adapter
    directory. A bare PATH is named after its run (the directory's name)."""
    from .inject import BASE_NAME, check_name

    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        directory, _ = adapter_dir_and_config(path)
        if not name:
            run = directory.parent if directory.name == "adapter" else directory
            name = run.name.replace(".", "_") or "default"
        try:
            check_name(name)
        except ValueError as err:
            raise LorakitError(f"--adapter {spec}: {err} (write NAME=PATH)") from None
        if name in named or name == BASE_NAME:
            raise LorakitError(f"--adapter {spec}: the name {name!r} is taken; write NAME=PATH with another name")
        named[name] = directory
    return named


def trained_labels(adapter: Path | None) -> list[str]:
    """The class names a classifier was trained with (its run's report), in index order."""
    import json

    if adapter is None or not (adapter.parent / "report.json").is_file():
        return []
    try:
        labels = json.loads((adapter.parent / "report.json").read_text()).get("labels", [])
    except (ValueError, AttributeError):
        raise LorakitError(f"{adapter.parent / 'report.json'} is not valid JSON") from None
    return labels if isinstance(labels, list) and all(isinstance(x, str) for x in labels) else []


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.loop import build_datasets, describe_eval, format_metrics, load_tokenizer, measure, num_outputs, pick_device, use_bf16

    adapter, cfg = adapter_dir_and_config(args.adapter)
    overrides = {k: v for k, v in {"model": args.model, "task": args.task, "data": args.data, "eval_data": args.data,
                                   "split": args.split, "eval_split": args.split, "columns": args.columns,
                                   "metric": args.metric, "answer_pattern": args.answer_pattern,
                                   "max_eval_examples": args.max_examples, "device": args.device}.items() if v is not None}
    if args.data is not None:
        overrides["eval_fraction"] = 0.0
        # --data is the data to score: the training data's settings do not apply to it
        overrides.setdefault("columns", {})
        overrides.setdefault("split", None)
        overrides.setdefault("eval_split", None)
    cfg = config_mod.from_dict(overrides, cfg)
    config_mod.validate(cfg)
    # a classifier keeps the label order it was trained with; unknown labels are an error
    labels = trained_labels(adapter)
    datasets = build_datasets(cfg, load_tokenizer(cfg.model, cfg.task), labels or None, encode_train=False)
    examples = datasets.eval  # with --data: the whole file (it is also the "eval data")
    model, tokenizer = load_adapted(cfg.model, adapter, cfg.task, num_outputs(cfg.task, datasets.labels))
    device = pick_device(cfg.device)
    model.to(device)
    result = measure(datasets, model, tokenizer, examples, device, use_bf16(cfg.precision, device),
                     args.batch_size or cfg.eval_batch_size or cfg.batch_size)
    print(f"{describe_eval(datasets)}: {format_metrics(result)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train several methods side by side (lorakit.compare)."""
    import json
    import time

    from .compare import compare, limit_note, table

    if hasattr(args, "method"):
        raise LorakitError("compare trains the methods given by --methods (comma separated); drop --method")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    per_method: dict[str, dict[str, Any]] = {}
    if hasattr(args, "method_args"):
        args.method_args, per_method = split_method_args(args.method_args, methods)
    cfg = resolve_train_config(args)
    from .compare import method_run_config
    from .train.data import data_files
    from .train.loop import check_config

    for method in methods:  # every method's settings are checked before anything trains
        check_config(method_run_config(cfg, method, per_method.get(method)))
    name = cfg.name or f"compare-{data_files(cfg.data)[0].stem if cfg.data else 'reverse-words'}"
    directory = Path(cfg.out_dir) / name
    started = time.perf_counter()
    records = compare(cfg, methods, directory, echo=lambda msg: print(msg, file=sys.stderr, flush=True),
                      html_report=not args.no_html, per_method=per_method)
    print()
    print(table(records))
    limit_s = json.loads((directory / "compare.json").read_text()).get("limit_step_seconds")
    print(f"x limit: {limit_note(records, limit_s)}")
    print()
    written = "compare.json, compare.csv" + ("" if args.no_html else ", compare.html")
    print(f"{len(methods)} methods in {time.perf_counter() - started:.0f} s; saved to {directory}/: {written}, one run per method")
    return 2 if any(r["status"] != "done" for r in records) else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """What the adapter changed, per module (lorakit.analysis): terminal summary, --json for all numbers."""
    import json

    from . import analysis, inject, io
    from .train.loop import num_outputs

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    task = args.task or cfg.task
    try:
        config, _ = io.read_config(adapter)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise LorakitError(f"cannot read adapter {adapter}: {' '.join(str(err).split())}") from None
    original: dict = {}

    def snapshot(model) -> None:  # before loading: Delta-LoRA moves the base itself
        try:
            names = inject.select_targets(model, config)
        except ValueError as err:
            raise LorakitError(f"{adapter} does not fit {model_spec or 'the built-in model'}: "
                               f"{' '.join(str(err).split())}") from None
        original.update(analysis.snapshot_base_weights(model, names))

    model, _ = load_adapted(model_spec, adapter, task, num_outputs(task, trained_labels(adapter)), before_load=snapshot)
    found = analysis.changes(model, original)
    print(f"{adapter} ({config.method}) on {model_spec or 'the built-in model'}")
    print(analysis.summary_text(found))
    if args.json:
        Path(args.json).write_text(json.dumps(analysis.report(found), indent=2) + "\n")
        print(f"all numbers: {args.json}")
    page = args.html or (str(adapter.parent / "inspect.html") if adapter.name == "adapter" and not args.no_html else None)
    if page:
        analysis.write_html(found, Path(page), f"lorakit inspect: {adapter.parent.name if adapter.name == 'adapter' else adapter.name}")
        print(f"report: {page}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from .inject import BASE_NAME, per_sample_adapters
    from .train.data import has_chat_template, render_chat

    adapters = named_adapters(args.adapter or [])
    first = next(iter(adapters.values()), None)
    _, cfg = adapter_dir_and_config(str(first) if first is not None else None)
    model_spec = args.model if args.model is not None else cfg.model
    jobs = prompt_jobs(args, list(adapters))
    model, tokenizer = load_adapted(model_spec, None, "causal-lm", extra=adapters)

    def encode(prompt: str) -> list[int]:
        if args.chat and has_chat_template(tokenizer):
            return tokenizer(render_chat(tokenizer, [{"role": "user", "content": prompt}], True), add_special_tokens=False)["input_ids"]
        return tokenizer(prompt)["input_ids"]

    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    if args.prompts is None:  # one prompt: streamed
        (name, prompt), = jobs
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([encode(prompt)])
        with torch.no_grad(), per_sample_adapters(model, [name]) if adapters else _nothing():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                           streamer=streamer, pad_token_id=pad_id, **sampling)
        return 0
    # several prompts, each with its own adapter: left-padded batches of --batch-size
    import json

    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        encoded = [encode(prompt) for _, prompt in chunk]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.no_grad(), per_sample_adapters(model, [name for name, _ in chunk]) if adapters else _nothing():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=pad_id, **sampling)
        for (name, prompt), row in zip(chunk, out[:, width:]):
            completion = tokenizer.decode(row, skip_special_tokens=True)
            print(json.dumps({"adapter": name if adapters else BASE_NAME, "prompt": prompt, "completion": completion}), flush=True)
    return 0


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def prompt_jobs(args: argparse.Namespace, names: list[str]) -> list[tuple[str, str]]:
    """(adapter name, prompt) for each prompt: the positional prompt (or stdin) with `--use`, or
    each line of `--prompts` (a JSONL file of {"prompt": ..., "adapter": ...}, or plain lines)."""
    import json

    from .inject import BASE_NAME

    known = names + [BASE_NAME]
    default = names[0] if names else BASE_NAME

    def check(name: str, where: str) -> str:
        if name not in known:
            raise LorakitError(f"{where}: no adapter named {name!r}; loaded: {', '.join(known)}")
        return name

    if args.prompts is None:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        return [(check(args.use or default, "--use"), prompt)]
    if args.prompt is not None or args.use is not None:
        raise LorakitError("--prompts takes the prompts (and their adapters) from the file: drop the positional prompt and --use")
    path = Path(args.prompts)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LorakitError(f"cannot read --prompts {path}: {err}") from None
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LorakitError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record.get("prompt"), str):
                raise LorakitError(f"{path}:{number}: needs a string \"prompt\" (and optionally \"adapter\")")
            adapter = record.get("adapter", default)
            if not isinstance(adapter, str):
                raise LorakitError(f"{path}:{number}: \"adapter\" must be a name, got {adapter!r}")
            jobs.append((check(adapter, f"{path}:{number}"), record["prompt"]))
        else:
            jobs.append((default, line))
    if not jobs:
        raise LorakitError(f"{path}: no prompts")
    return jobs


def check_merge_target(out: Path, model_spec: str | None, adapter: Path) -> None:
    """`--out` must be a directory that is neither the base model's nor the adapter's."""
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is an existing file; give a directory for the merged model")
    resolved = out.resolve()
    if model_spec is not None and Path(model_spec).exists():
        base = Path(model_spec).resolve()
        if resolved == base:
            raise LorakitError(f"--out {out} is the base model's own directory: merging there would overwrite the base; "
                               "give another directory")
    if resolved in (adapter.resolve(), adapter.resolve().parent):
        raise LorakitError(f"--out {out} is the adapter's (or its run's) directory; give another directory")


def cmd_merge(args: argparse.Namespace) -> int:
    from . import inject

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    out = Path(args.out)
    check_merge_target(out, model_spec, adapter)  # before any model is loaded
    task = args.task or cfg.task
    from .train.loop import num_outputs

    model, tokenizer = load_adapted(model_spec, adapter, task, num_outputs(task, trained_labels(adapter)))
    try:
        inject.merge_and_unload(model)
    except ValueError as err:  # e.g. an adapter on a tied output head
        raise LorakitError(str(err)) from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}/ (loads with transformers' from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import gguf_export, inject, models

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    if cfg.task != "causal-lm":
        raise LorakitError(f"GGUF export is for causal language models (what llama.cpp runs); this run's task is {cfg.task}")
    outtypes = gguf_export.MERGED_OUTTYPES if args.merged else gguf_export.ADAPTER_OUTTYPES
    outtype = args.outtype or ("f16" if args.merged else "f32")
    if outtype not in outtypes:
        raise LorakitError(f"--outtype {outtype} is not available {'for a merged model' if args.merged else 'for an adapter'}: "
                           f"choose {', '.join(outtypes)}" + ("" if args.merged else " (or --merged)"))
    try:
        model_dir, gguf_file = models.resolve_model_path(model_spec, cfg.task)
    except (FileNotFoundError, ValueError) as err:
        raise LorakitError(str(err)) from None
    run = adapter.parent if adapter.name == "adapter" else adapter
    out = Path(args.out) if args.out else run / (f"merged-{outtype}.gguf" if args.merged else "adapter.gguf")
    check_export_target(out, model_dir / gguf_file if gguf_file else None, args.overwrite)
    if args.merged:
        gguf_export.require_gguf_base(model_dir / gguf_file if gguf_file else None)  # before the model loads
    model, _ = load_adapted(model_spec, adapter, cfg.task)
    layout = gguf_export.gguf_layout(model, model_dir, gguf_file)
    if not args.merged:
        summary = gguf_export.export_adapter(model, layout, out, outtype, description=f"lorakit adapter {run.name}")
        if inject.lorakit_state(model).quantization is not None:
            summary.notes.append("trained on the 4-bit (NF4) base: llama.cpp applies it to the base file's own weights; "
                                 "--merged writes the weights it was trained against")
    else:
        method = type(inject.adapter_config(model)).__name__
        quantized = inject.lorakit_state(model).quantization is not None
        adapted = sum(1 for _ in inject.adapted_layers(model))
        try:
            inject.merge_and_unload(model)
        except ValueError as err:  # e.g. an adapter on a tied output head
            raise LorakitError(str(err)) from None
        notes = [f"{method}: {adapted} adapted weights merged; the other weights as lorakit ran them; "
                 f"tokenizer and metadata from {layout.base_file.name}"]
        if quantized:
            notes.append("QLoRA: merged into the dequantized 4-bit (NF4) base weights it was trained against, "
                         "not the base file's original weights")
        summary = gguf_export.export_merged(model, layout, out, outtype, notes)
    for line in summary.lines():
        print(line)
    return 0


def check_export_target(out: Path, base_file: Path | None, overwrite: bool) -> None:
    """`--out` must be a file path that is not the base model's file; an existing file only with --overwrite."""
    if out.is_dir():
        raise LorakitError(f"--out {out} is a directory; give a file name (e.g. {out / 'model.gguf'})")
    if base_file is not None and out.exists() and out.resolve() == base_file.resolve():
        raise LorakitError(f"--out {out} is the base model's own file; give another file name")
    if out.exists() and not overwrite:
        raise LorakitError(f"--out {out} exists; give another file name, or --overwrite to replace it")


# --- the parser ---------------------------------------------------------------------------------


def _columns(text: str) -> dict[str, str]:
    from .train.data import parse_columns

    try:
        return parse_columns(text)
    except LorakitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (`error: ...`, exit 2) like every other."""

    def error(self, message: str):  # noqa: D102 -- argparse's hook
        self.exit(EXIT_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="lorakit", description="Fine-tune with the LoRA family; evaluate, generate, merge, export to GGUF.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    train = sub.add_parser("train", help="fine-tune a model with an adapter (no arguments: the built-in demo job)",
                           description="Fine-tune a model with an adapter. With no arguments, SmolLM2-135M learns the built-in "
                           "reverse-words task on CPU in a few minutes. Flags override --config.")
    train.add_argument("--config", metavar="YAML", help="YAML file of config fields (flags override it)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    train.add_argument("--nproc", type=positive_int, metavar="N",
                       help="train on N processes with torch.distributed (DDP, or FSDP2 with --distributed fsdp; gloo "
                       "on CPU, NCCL on GPU): the same as "
                       "`torchrun --nproc_per_node N -m lorakit train ...`. The global batch is --batch-size x N x "
                       "--grad-accum")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out metrics of a base model or base + adapter", formatter_class=fmt)
    ev.add_argument("--adapter", help="adapter directory or run directory (runs/<name>)")
    ev.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    ev.add_argument("--task", choices=config_mod.CHOICES["task"], help="default: the run's task")
    ev.add_argument("--data", help="evaluation data, read like train's --data (default: the run's held-out data)")
    ev.add_argument("--split", help="the split of a saved DatasetDict given as --data")
    ev.add_argument("--columns", type=_columns, help="map the data's columns: ROLE=COLUMN,... (as for train)")
    ev.add_argument("--metric", choices=config_mod.CHOICES["metric"], help="the headline metric (default: the run's)")
    ev.add_argument("--answer-pattern", help="exact match of extracted answers: gsm8k, last-number or a regex")
    ev.add_argument("--max-examples", type=int, help="evaluate at most this many examples (spread over the data)")
    ev.add_argument("--batch-size", type=positive_int, help="examples per batch (default: the run's)")
    ev.add_argument("--device", choices=config_mod.CHOICES["device"])
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser("compare", help="train several methods on the same data, steps and seed; table + HTML report",
                         description="Train each method of --methods in its own process with the same settings (any train "
                         "flag), then print a table and write compare.json, compare.csv and compare.html (plots need "
                         "matplotlib: the plots extra). Running the same command again reuses finished methods and "
                         "resumes an interrupted one.")
    cmp.add_argument("--methods", required=True, help="comma-separated methods, e.g. lora,dora,vera,qlora")
    cmp.add_argument("--config", metavar="YAML", help="YAML file of train settings (flags override it)")
    cmp.add_argument("--no-html", action="store_true", help="skip the HTML report (no matplotlib needed)")
    add_config_flags(cmp, per_method=True)
    cmp.set_defaults(func=cmd_compare)

    ins = sub.add_parser("inspect", help="what an adapter changed inside the model, module by module", formatter_class=fmt,
                         description="Per adapted module: ||ΔW|| / ||W0|| (a layers x modules grid), the effective rank of "
                         "ΔW, magnitude vs direction change (DoRA's view), and a warning for modules that did not change.")
    ins.add_argument("adapter", help="adapter directory or run directory (runs/<name>)")
    ins.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    ins.add_argument("--task", choices=config_mod.CHOICES["task"], help="default: the run's task")
    ins.add_argument("--json", metavar="FILE", help="write every number (per module) as JSON")
    ins.add_argument("--html", metavar="FILE", help="write the HTML report here (default: <run>/inspect.html for a run directory)")
    ins.add_argument("--no-html", action="store_true", help="no HTML report (no matplotlib needed)")
    ins.set_defaults(func=cmd_inspect)

    from .explain import command as explain_command
    explain_command.add_parser(sub)

    gen = sub.add_parser("generate", help="generate text with base + adapter, streamed", formatter_class=fmt)
    gen.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    gen.add_argument("--adapter", action="append", metavar="[NAME=]PATH",
                     help="adapter or run directory; repeat to load several on one base (named NAME, or after the run)")
    gen.add_argument("--use", metavar="NAME", help="the adapter for the prompt (default: the first; __base__ for none)")
    gen.add_argument("--prompts", metavar="FILE", help="JSONL of {\"prompt\": ..., \"adapter\": NAME} (or plain lines): "
                     "generated in one batch, each prompt through its own adapter; prints JSONL")
    gen.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together with --prompts")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                     help="wrap the prompt in the tokenizer's chat template")
    gen.set_defaults(func=cmd_generate)

    merge = sub.add_parser("merge", help="write base + adapter as one plain Hugging Face model directory", formatter_class=fmt)
    merge.add_argument("--adapter", required=True, help="adapter directory or run directory (runs/<name>)")
    merge.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    merge.add_argument("--task", choices=config_mod.CHOICES["task"], help="default: the run's task")
    merge.add_argument("--out", required=True, help="output directory")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser("export", help="write an adapter (or base + adapter merged) as a GGUF file for llama.cpp",
                            formatter_class=fmt)
    export.add_argument("--adapter", required=True, help="adapter directory or run directory (runs/<name>)")
    export.add_argument("--format", choices=["gguf"], default="gguf", help="file format (llama.cpp's)")
    export.add_argument("--merged", action="store_true",
                        help="write the whole model with the adapter merged (DoRA, Delta-LoRA; or one file to ship)")
    export.add_argument("--outtype", choices=["f32", "f16", "q8_0"],
                        help="tensor type: adapter f32 (default) or f16; merged f16 (default), f32 or q8_0")
    export.add_argument("--model", help="base model (default: the run's model, else the built-in one)")
    export.add_argument("--out", help="output file (default: runs/<name>/adapter.gguf or merged-<outtype>.gguf)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lorakit` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)  # inside: --help imports the methods (and torch)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return args.func(args)
    except LorakitError as err:
        from .train.loop import TrainingInterrupted

        rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
        where = f"[process {rank}] " if rank else ""
        print(f"error: {where}{err}" if not isinstance(err, TrainingInterrupted) else str(err), file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(err, TrainingInterrupted) else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
