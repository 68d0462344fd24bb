"""`lorakit merge`: base + adapter written as one plain Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LorakitError
from .adapters import adapter_dir_and_config, chosen_task, load_adapted, trained_labels


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
    from .. import inject

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    out = Path(args.out)
    check_merge_target(out, model_spec, adapter)  # before any model is loaded
    task = chosen_task(args.task, cfg, adapter)
    from ..train.loading import num_outputs

    model, tokenizer = load_adapted(model_spec, adapter, task, num_outputs(task, trained_labels(adapter)))
    try:
        inject.merge_and_unload(model)
    except ValueError as err:  # e.g. an adapter on a tied output head
        raise LorakitError(str(err)) from None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}/ (loads with transformers' from_pretrained)")
    return 0
