"""`lorakit inspect`: what an adapter changed, module by module (`lorakit.analysis`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LorakitError
from .adapters import adapter_dir_and_config, chosen_task, load_adapted, trained_labels


def cmd_inspect(args: argparse.Namespace) -> int:
    """What the adapter changed, per module (lorakit.analysis): terminal summary, --json for all numbers."""
    import json

    from .. import analysis, inject, io
    from ..train.loading import num_outputs

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    task = chosen_task(args.task, cfg, adapter)
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
    found = analysis.changes(model, original, progress=args.progress)
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
