"""`lorakit train`: the config from defaults, a resumed run, `--config` and flags; several processes
through torchrun (`--nproc`); `--print-config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import yaml

from ..errors import LorakitError
from ..train import config as config_mod
from ..train.config import TrainConfig


def parse_method_args(pairs: list[str]) -> dict[str, Any]:
    """['init_r=12', 'lr_ratio=0.5'] -> {'init_r': 12, 'lr_ratio': 0.5} (values read as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LorakitError(f"--method-arg expects KEY=VALUE, got {pair!r}")
        if ":" in key:  # METHOD:KEY=VALUE picks one of several methods: only compare trains several
            raise LorakitError(
                f"--method-arg {pair!r}: the METHOD:KEY=VALUE form is for lorakit compare; "
                "lorakit train takes KEY=VALUE"
            )
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
            raise LorakitError(
                f"--method-arg {pair!r}: {method.strip()!r} is not one of --methods ({', '.join(methods)})"
            )
        per_method.setdefault(method.strip(), []).append(rest)
    return common, {method: parse_method_args(given) for method, given in per_method.items()}


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- the resumed run's config.yaml <- --config file <- flags."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if "method_args" in given:
        given["method_args"] = parse_method_args(given["method_args"])
    if "columns" in given:
        from ..train.data import parse_columns

        given["columns"] = {k: v for text in given["columns"] for k, v in parse_columns(text).items()}
    cfg = TrainConfig()
    saved_cfg = None
    if given.get("resume"):
        from ..train.checkpoint import find_checkpoint, run_dir_of

        saved = run_dir_of(find_checkpoint(given["resume"])) / "config.yaml"
        if saved.is_file():
            cfg = saved_cfg = config_mod.from_dict(config_mod.load_yaml(saved), cfg)
    if args.config:
        cfg = config_mod.from_dict(config_mod.load_yaml(args.config), cfg)
    cfg = config_mod.from_dict(given, cfg)
    if saved_cfg is not None:
        saved_values, new_values = config_mod.with_resolved_paths(saved_cfg), config_mod.with_resolved_paths(cfg)
        changed = [
            f"{name} ({getattr(saved_cfg, name)!r} -> {getattr(cfg, name)!r})"
            for name in (f.name for f in dataclasses.fields(TrainConfig))
            if name not in RESUME_MAY_CHANGE and getattr(new_values, name) != getattr(saved_values, name)
        ]
        if changed:
            raise LorakitError(
                f"--resume continues the run as {saved} configures it; a resume cannot change "
                f"{', '.join(changed)}: drop those settings, or start a new run with another --name"
            )
    return cfg


# what a resumed run may set anew: its length, where and how it runs, what it reports
# (--distributed too: a checkpoint holds whole tensors under DDP and FSDP alike)
RESUME_MAY_CHANGE = {
    "resume",
    "steps",
    "epochs",
    "progress",
    "keep_checkpoints",
    "checkpoint_every",
    "device",
    "distributed",
    "max_eval_examples",
    "compile",
    "gradient_checkpointing",
    "overwrite",
    "eval_batch_size",
    "metric",
    "answer_pattern",
    "chunked_loss",
    "measure_limit",
}


def launch_processes(args: argparse.Namespace) -> int:
    """`lorakit train --nproc N ...`: the same command on N processes (DDP), on this machine's loopback."""
    from ..train.launch import launch

    argv = list(args.argv)
    for i, arg in enumerate(argv):  # drop --nproc N / --nproc=N
        if arg == "--nproc":
            del argv[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    return launch(args.nproc, [sys.executable, "-m", "lorakit", *argv])


def check_before_launch(cfg: TrainConfig, nproc: int) -> None:
    """What one process would refuse at once, refused before `--nproc` starts several: the settings,
    the device (and enough of them), the data files, the model's path, the run directory, a resumed
    run's process count."""
    from .. import models
    from ..train.data import data_files
    from ..train.distributed import SingleProcess
    from ..train.method_config import check_config
    from ..train.run_dir import check_new_run_dir

    cfg = check_config(cfg)
    device = SingleProcess().device(cfg.device)
    if device.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise LorakitError(
                f"--nproc {nproc}: this machine has {torch.cuda.device_count()} CUDA GPU(s); one process a GPU"
            )
    elif nproc > max(2, os.cpu_count() or 1):  # one a core (two anywhere, to try several processes out)
        raise LorakitError(
            f"--nproc {nproc}: this machine has {os.cpu_count()} CPU cores; at most one process a core on the CPU"
        )
    if cfg.resume:
        from ..train import checkpoint as ckpt

        saved = ckpt.find_checkpoint(cfg.resume)
        state = ckpt.check_state(saved, ckpt.read_state(saved))
        if state.get("world_size", 1) != nproc:
            raise LorakitError(
                f"{saved} was written by a run on {state.get('world_size', 1)} process(es); resume it on the "
                f"same number (--nproc {state.get('world_size', 1)}): the data order and random streams are per process"
            )
    if cfg.data:
        data_files(cfg.data)
    try:
        models.resolve_model_path(cfg.model, cfg.task)
    except (FileNotFoundError, ValueError) as err:
        raise LorakitError(str(err)) from None
    if not cfg.resume and cfg.name:
        check_new_run_dir(cfg)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.distributed import launched_by_torchrun

    if args.nproc and args.nproc > 1 and not args.print_config and not launched_by_torchrun():
        # a bad flag or setting is one error here, before any process starts
        check_before_launch(resolve_train_config(args), args.nproc)
        return launch_processes(args)
    cfg = resolve_train_config(args)
    if args.print_config:
        from ..train.method_config import check_config

        checked = check_config(cfg)  # a printed config is a valid one
        if cfg.lr is None:
            from ..train.recipes import describe

            cfg = dataclasses.replace(cfg, lr=checked.lr)
            print(f"# lr: the {cfg.method} recipe, {describe(cfg.method)}")
        print(config_mod.to_yaml(cfg), end="")
        return 0
    from ..train.loop import train

    result = train(cfg, echo=lambda msg: print(msg, file=sys.stderr, flush=True))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # the main process reports
    print()
    print(result.table())
    print()
    print(f"saved to {result.run_dir}/: adapter/, config.yaml, metrics.jsonl, report.txt, checkpoints/")
    return 0
