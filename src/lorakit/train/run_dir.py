"""A run's directory: its name, what `--overwrite` clears, the resolved config written into it, and
the metrics log (`metrics.jsonl`), trimmed to the checkpoint on resume.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..errors import LorakitError
from . import checkpoint as ckpt
from .config import TrainConfig, to_yaml, with_resolved_paths
from .distributed import SingleProcess

RUN_FILES = ("checkpoints", "adapter", "metrics.jsonl", "report.json", "report.txt", "config.yaml")


def default_run_name(cfg: TrainConfig, data_name: str) -> str:
    return f"{data_name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(cfg: TrainConfig, data_name: str, strategy: SingleProcess) -> Path:
    """The directory of a new run (named by the main process); an existing run in it is refused
    unless --overwrite, which clears it."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LorakitError(f"--out-dir {out_dir} is a file, not a directory")
    run_dir = out_dir / strategy.broadcast(cfg.name or default_run_name(cfg, data_name))
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"{run_dir} is a file, not a run directory: pick another --name or --out-dir")
    holds_files = run_dir.is_dir() and any(run_dir.iterdir())
    strategy.barrier()  # every process has looked before the main one clears anything
    if holds_files:
        if not cfg.overwrite:
            raise LorakitError(f"{run_dir} already holds files: resume the run with --resume {run_dir}, replace it "
                               "with --overwrite, or pick another --name")
        if strategy.is_main:
            clear_run_dir(run_dir)
    return run_dir


def clear_run_dir(run_dir: Path) -> None:
    """What a run writes, removed for --overwrite; anything else the user put there stays."""
    import shutil

    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Create the run directory (only once set-up succeeded: a run that fails before leaves none behind),
    clear a checkpoint a crash left half-written, and write the resolved config that runs it again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_leftovers(run_dir / "checkpoints")
    (run_dir / "config.yaml").write_text(
        f"# The resolved config of this run. Run it again with: lorakit train --config {run_dir / 'config.yaml'} --name <new>\n"
        f"# or continue it with: lorakit train --resume {run_dir}\n" + to_yaml(dataclasses.replace(with_resolved_paths(cfg), resume=None))
    )


def _metrics_record(line: str) -> dict | None:
    """One metrics line, or None for a line a crash tore (it is dropped, not fatal)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step", 0), int) else None


def open_metrics_log(path: Path, start_step: int):
    """The JSONL metrics log, opened for appending; on resume, lines for steps after the
    checkpoint (logged by the interrupted run, about to be trained again) are dropped."""
    if start_step and path.is_file():
        kept = [line for line in path.read_text(errors="replace").splitlines(keepends=True)
                if (record := _metrics_record(line)) is not None and record.get("step", 0) <= start_step]
        path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept))
    elif path.is_file():
        path.unlink()
    return open(path, "a")
