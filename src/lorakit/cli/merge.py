"""`lorakit merge`: base + adapter written as one plain Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import files
from ..errors import LorakitError
from .adapters import adapter_dir_and_config, chosen_task, load_adapted, trained_labels
from .outputs import adapter_inputs, check_output_directory, model_inputs


def check_merge_target(out: Path, model_spec: str | None, adapter: Path, task: str, overwrite: bool) -> Path:
    """`--out` must be a directory that is, holds and lies inside none of the merge's inputs (the base
    model's, the adapter's, its run's); one that holds files only with --overwrite, and only when it is
    a model directory (a merged model from before), never a directory of other files."""
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is an existing file; give a directory for the merged model")
    return check_output_directory(
        out,
        "--out",
        overwrite,
        inputs=[*model_inputs(model_spec, task), *adapter_inputs(adapter)],
        replaceable=lambda d: (d / "config.json").is_file(),
        what="a model directory",
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from .. import inject

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    task = chosen_task(args.task, cfg, adapter)
    out = check_merge_target(Path(args.out), model_spec, adapter, task, args.overwrite)  # before any model is loaded
    files.clean_temporaries(out.parent, out.name)  # what a killed merge into it left
    from ..train.loading import num_outputs

    model, tokenizer = load_adapted(model_spec, adapter, task, num_outputs(task, trained_labels(adapter)))
    try:
        inject.merge_and_unload(model)
    except ValueError as err:  # e.g. an adapter on a tied output head
        raise LorakitError(str(err)) from None
    files.make_directory(out.parent, "--out")
    # written whole or not at all: a kill or a full disk leaves no partial model (and the earlier one)
    with files.atomic_directory(out, replace=True) as building:
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
    print(f"merged model written to {args.out.rstrip('/')}/ (loads with transformers' from_pretrained)")
    return 0
