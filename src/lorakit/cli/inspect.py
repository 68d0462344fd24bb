"""`lorakit inspect`: what an adapter changed, module by module (`lorakit.analysis`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import files
from ..errors import LorakitError
from .adapters import adapter_dir_and_config, base_weight_snapshot, chosen_task, load_adapted, trained_labels
from .outputs import check_output_file, model_inputs


def cmd_inspect(args: argparse.Namespace) -> int:
    """What the adapter changed, per module (lorakit.analysis): terminal summary, --json for all numbers."""
    import json

    from .. import analysis, io
    from ..train.loading import num_outputs

    adapter, cfg = adapter_dir_and_config(args.adapter)
    model_spec = args.model if args.model is not None else cfg.model
    task = chosen_task(args.task, cfg, adapter)
    try:
        config, _ = io.read_config(adapter)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise LorakitError(f"cannot read adapter {adapter}: {' '.join(str(err).split())}") from None
    # where it writes, checked before the slow part (the base's inputs: its files, the adapter's, the run's)
    inputs = [("the adapter's own directory", adapter), *model_inputs(model_spec, task)]
    if adapter.name == "adapter":
        inputs += [
            ("the run's config", adapter.parent / "config.yaml"),
            ("the run's report", adapter.parent / "report.json"),
        ]
    json_out = check_output_file(args.json, "--json", args.overwrite, inputs) if args.json else None
    if json_out is not None and args.html and os.path.realpath(args.html) == os.path.realpath(json_out):
        raise LorakitError(f"--json and --html name the same file ({args.json}); give each its own")
    page = args.html or (
        str(adapter.parent / "inspect.html") if adapter.name == "adapter" and not args.no_html else None
    )
    # the run's own inspect.html is this command's output from before: written again without asking
    own = None if args.html else own_report
    html_out = check_output_file(page, "--html", args.overwrite, inputs, replaceable=own) if page else None
    for out in (json_out, html_out):  # what a killed inspect left beside them
        if out is not None:
            files.clean_temporaries(out.parent, out.name)
    original: dict = {}

    snapshot = base_weight_snapshot(config, adapter, model_spec, original)

    model, _ = load_adapted(model_spec, adapter, task, num_outputs(task, trained_labels(adapter)), before_load=snapshot)
    found = analysis.changes(model, original, progress=args.progress)
    print(f"{adapter} ({config.method}) on {model_spec or 'the built-in model'}")
    print(analysis.summary_text(found))
    if json_out is not None:
        files.make_directory(json_out.parent, "--json")
        files.atomic_write_text(json_out, json.dumps(analysis.report(found), indent=2) + "\n")
        print(f"all numbers: {args.json}")
    if html_out is not None:
        title = f"lorakit inspect: {adapter.parent.name if adapter.name == 'adapter' else adapter.name}"
        files.make_directory(html_out.parent, "--html")
        files.atomic_write(html_out, lambda tmp: analysis.write_html(found, tmp, title))
        print(f"report: {page}")
    return 0


def own_report(path: Path) -> bool:
    """Whether `path` is a report `lorakit inspect` wrote (its page title says so)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"<title>lorakit inspect: " in head
