"""`lorakit compare`: several methods trained side by side (`lorakit.compare`), a table and reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import files
from ..errors import LorakitError
from .outputs import check_output_directory, model_inputs
from .train import resolve_train_config, split_method_args


def cmd_compare(args: argparse.Namespace) -> int:
    """Train several methods side by side (lorakit.compare)."""
    import json
    import time

    from ..compare import compare, limit_note, table

    if hasattr(args, "method"):
        raise LorakitError("compare trains the methods given by --methods (comma separated); drop --method")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    per_method: dict[str, dict[str, Any]] = {}
    if hasattr(args, "method_args"):
        args.method_args, per_method = split_method_args(args.method_args, methods)
    cfg = resolve_train_config(args)
    from ..compare import method_run_config
    from ..train.data import data_files
    from ..train.method_config import check_config

    for method in methods:  # every method's settings are checked before anything trains
        check_config(method_run_config(cfg, method, per_method.get(method)))
    name = cfg.name or f"compare-{data_files(cfg.data)[0].stem if cfg.data else 'reverse-words'}"
    directory = Path(cfg.out_dir) / name
    # a directory of the user's files is not taken over without --overwrite; an earlier comparison
    # with the same settings continues; its inputs are never written into
    inputs = [("the data", path) for path in (data_files(cfg.data) if cfg.data else [])]
    inputs += model_inputs(cfg.model, cfg.task) + ([("the --config file", Path(args.config))] if args.config else [])
    check_output_directory(
        directory,
        "--name",
        cfg.overwrite or (directory / "compare.yaml").is_file(),
        inputs,
        what="what a comparison writes there (compare.*, a run directory per method)",
    )
    files.make_directory(directory, "--name")
    started = time.perf_counter()
    records = compare(
        cfg,
        methods,
        directory,
        echo=lambda msg: print(msg, file=sys.stderr, flush=True),
        html_report=not args.no_html,
        per_method=per_method,
    )
    print()
    print(table(records))
    limit_s = json.loads((directory / "compare.json").read_text()).get("limit_step_seconds")
    print(f"x limit: {limit_note(records, limit_s)}")
    print()
    written = "compare.json, compare.csv" + ("" if args.no_html else ", compare.html")
    print(
        f"{len(methods)} methods in {time.perf_counter() - started:.0f} s; saved to {directory}/: {written}, one run per method"
    )
    return 2 if any(r["status"] != "done" for r in records) else 0
