"""Where a command writes, checked before it does anything slow: the one rule of every command that
writes a file.

- A target that already holds something (a file; a directory with anything in it) is replaced only
  with `--overwrite`.
- A target that is one of the command's own inputs (the base model's files, the adapter's, the data)
  is refused even with `--overwrite`: a directory target may not be, hold or lie inside an input.
- A target that cannot be written (a broken symbolic link, a directory where a file goes, a
  read-only place) is refused in one line (`lorakit.files`).

The writes themselves are atomic (`lorakit.files`): a kill or a full disk leaves the earlier file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .. import files
from ..errors import LorakitError


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


Inputs = Iterable[tuple[str, Path]]  # (what it is, in words; where)


def model_inputs(model_spec: str | None, task: str) -> list[tuple[str, Path]]:
    """The base model on disk (a local or packaged directory, or .gguf file), as `Inputs`."""
    from .. import models

    try:
        directory, gguf_file = models.resolve_model_path(model_spec, task)
    except (FileNotFoundError, ValueError, LorakitError):
        return []  # the command's own loading says what is wrong with it
    return (
        [("the base model's own file", directory / gguf_file)]
        if gguf_file
        else [("the base model's own directory", directory)]
    )


def adapter_inputs(adapter: Path) -> list[tuple[str, Path]]:
    """The adapter directory and, for a run's adapter, the run directory, as `Inputs`."""
    found = [("the adapter's own directory", adapter)]
    if adapter.name == "adapter":
        found.append(("the adapter's run directory", adapter.parent))
    return found


def holds_anything(directory: Path) -> bool:
    """Whether `directory` holds anything but lorakit's own lock and a killed writer's temporaries."""
    return directory.is_dir() and any(
        p.name != files.LOCK_NAME and not files.is_temporary(p) for p in directory.iterdir()
    )


def check_output_file(
    path: str | os.PathLike,
    flag: str,
    overwrite: bool,
    inputs: Inputs = (),
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """The file to write for `flag` (a symbolic link's target): refused if it is one of `inputs` (or an
    existing file inside an input directory), if it exists and neither `overwrite` nor
    `replaceable(path)` (a file this command wrote itself) allows replacing it, or if it cannot be
    written. A character device or pipe (`--json /dev/stdout`) is written into."""
    target = files.check_file_target(path, flag)
    for label, given in inputs:
        source, where = _resolved(Path(given)), _resolved(target)
        if where == source:
            raise LorakitError(f"{flag} {path} is {label}, an input of this command; give another file name")
        if target.exists() and _within(where, source):
            raise LorakitError(
                f"{flag} {path} is a file of {label} ({given}), an input of this command; give another file name"
            )
    stream = files.is_stream(target)  # /dev/stdout, a FIFO: written into, it holds nothing to lose
    if target.exists() and not stream and not overwrite and not (replaceable is not None and replaceable(target)):
        raise LorakitError(f"{flag} {path} exists; give another file name, or --overwrite to replace it")
    return target


def check_output_directory(
    path: str | os.PathLike,
    flag: str,
    overwrite: bool,
    inputs: Inputs = (),
    replaceable: Callable[[Path], bool] | None = None,
    what: str = "its output",
) -> Path:
    """The directory to write for `flag`: refused if it is, holds or lies inside one of `inputs`; if
    it holds anything, unless `overwrite` (and `replaceable(directory)`, when given: what `--overwrite`
    may replace, e.g. a model directory, never a directory of the user's other files); or if it
    cannot be written. Returns its resolved path."""
    target = files.check_directory_target(path, flag)
    inputs = list(inputs)
    for label, given in inputs:
        if target == _resolved(Path(given)):
            raise LorakitError(f"{flag} {path} is {label}, an input of this command; give another directory")
    for label, given in inputs:
        source = _resolved(Path(given))
        if _within(target, source) or _within(source, target):
            relation = "lies inside" if _within(target, source) else "holds"
            raise LorakitError(
                f"{flag} {path} {relation} {label} ({given}), an input of this command; give another directory"
            )
    if holds_anything(target):
        if not overwrite:
            raise LorakitError(
                f"{flag} {path} already holds files; give a new or empty directory, or --overwrite to replace {what}"
            )
        if replaceable is not None and not replaceable(target):
            raise LorakitError(
                f"{flag} {path} holds files that are not {what}; --overwrite replaces only {what}: "
                "give a new or empty directory"
            )
    return target
