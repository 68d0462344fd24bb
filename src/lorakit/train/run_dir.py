"""A run's directory: its name, its lock (one process trains in it at a time), what `--overwrite`
clears, the resolved config written into it, and the metrics log (`metrics.jsonl`), trimmed to the
checkpoint on resume.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .. import files
from ..errors import LorakitError
from . import checkpoint as ckpt
from .config import TrainConfig, to_yaml, with_resolved_paths
from .distributed import SingleProcess

RUN_FILES = ("checkpoints", "adapter", "metrics.jsonl", "report.json", "report.txt", "config.yaml")


def default_run_name(cfg: TrainConfig, data_name: str) -> str:
    return f"{data_name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def _own_entry(path: Path) -> bool:
    """A file lorakit keeps in a run directory for itself (its lock, a killed writer's temporary)."""
    return path.name == files.LOCK_NAME or files.is_temporary(path)


def holds_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(not _own_entry(p) for p in run_dir.iterdir())


def check_new_run_dir(cfg: TrainConfig, run_dir: Path | None = None, locked: bool = False) -> Path:
    """The directory of a new run, checked without touching it: a directory that can be made, not
    locked by a run in progress (unless `locked`: by this process), empty unless --overwrite."""
    out_dir = Path(cfg.out_dir)
    files.check_directory_target(out_dir, "--out-dir")
    run_dir = run_dir or out_dir / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"{run_dir} is a file, not a run directory: pick another --name or --out-dir")
    files.check_directory_target(run_dir, "--name")
    if run_dir.is_dir():
        if not locked:
            files.DirectoryLock.check(run_dir)
        if holds_files(run_dir) and not cfg.overwrite:
            raise LorakitError(
                f"{run_dir} already holds files: resume the run with --resume {run_dir}, replace it "
                "with --overwrite, or pick another --name"
            )
    return run_dir


@dataclasses.dataclass
class HeldRunDir:
    """The run directory this process trains in (`path`, once known), locked by the main process for
    as long as it does."""

    path: Path | None = None
    lock: files.DirectoryLock | None = None
    created: bool = False  # made for this run: removed again if set-up fails

    def release(self, failed: bool) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self.created and self.path.is_dir() and not holds_files(self.path):
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)
        self.created = False


def _on_main(strategy: SingleProcess, work) -> None:
    """`work()` on the main process; its one-line error raised in every process."""
    error = None
    if strategy.is_main:
        try:
            work()
        except LorakitError as err:
            error = str(err)
    error = strategy.broadcast(error)
    if error is not None:
        raise LorakitError(error)


def new_run_dir(cfg: TrainConfig, data_name: str, strategy: SingleProcess, held: HeldRunDir) -> Path:
    """The directory of a new run (named by the main process), locked into `held`; an existing run in
    it is refused unless --overwrite, which clears it. The directory is made now (it holds the lock)
    and removed again if set-up fails (`HeldRunDir.release`)."""
    held.path = Path(cfg.out_dir) / strategy.broadcast(cfg.name or default_run_name(cfg, data_name))

    def take() -> None:
        run_dir = held.path
        files.check_directory_target(Path(cfg.out_dir), "--out-dir")
        if run_dir.exists() and not run_dir.is_dir():
            raise LorakitError(f"{run_dir} is a file, not a run directory: pick another --name or --out-dir")
        held.created = not run_dir.exists()
        files.make_directory(run_dir, "--out-dir")
        held.lock = files.DirectoryLock.acquire(run_dir)
        check_new_run_dir(cfg, run_dir, locked=True)
        if holds_files(run_dir):
            clear_run_dir(run_dir)  # --overwrite (else check_new_run_dir refused)
        files.clean_temporaries(run_dir)

    _on_main(strategy, take)
    return held.path


def resumed_run_dir(run_dir: Path, strategy: SingleProcess, held: HeldRunDir) -> None:
    """The run directory of a resumed run, locked into `held` by the main process."""
    held.path = run_dir

    def take() -> None:
        held.lock = files.DirectoryLock.acquire(run_dir)

    _on_main(strategy, take)


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
    """Clear what a killed run left half-written (a checkpoint, a temporary file), and write the
    resolved config that runs it again (atomically: a full disk keeps the earlier one)."""
    files.make_directory(run_dir, "--out-dir")
    ckpt.clean_leftovers(run_dir / "checkpoints")
    files.clean_temporaries(run_dir)
    files.atomic_write_text(
        run_dir / "config.yaml",
        f"# The resolved config of this run. Run it again with: lorakit train --config {run_dir / 'config.yaml'} --name <new>\n"
        f"# or continue it with: lorakit train --resume {run_dir}\n"
        + to_yaml(dataclasses.replace(with_resolved_paths(cfg), resume=None)),
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
        kept = [
            line
            for line in path.read_text(errors="replace").splitlines(keepends=True)
            if (record := _metrics_record(line)) is not None and record.get("step", 0) <= start_step
        ]
        files.atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
    elif path.is_file():
        path.unlink()
    try:
        return open(path, "a")
    except OSError as err:
        raise files.write_error(err, path) from None


def logged_loss(path: Path, step: int) -> float | None:
    """The training loss the metrics log holds for `step` (None when it holds none)."""
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(errors="replace").splitlines():
        record = _metrics_record(line)
        if record is not None and record.get("step") == step and isinstance(record.get("loss"), (int, float)):
            found = float(record["loss"])
    return found
