"""Resumable checkpoints, written atomically.

A checkpoint is a directory `<run>/checkpoints/step-000050/` holding

- `adapter/`: the adapter as `lorakit.save` writes it (safetensors, PEFT layout), with its config:
  the layout the run had reached (e.g. ranks decided in training) is what `--resume` rebuilds;
- `adapter_state.safetensors`: every adapter tensor exactly as the model holds it (the PEFT file may
  hold less: AdaLoRA's keeps only the triplets it kept, while the pruned ones still shape the
  regulariser and the optimizer's moments), so a resume continues bit for bit;
- `rng.safetensors`: the torch CPU (and CUDA) random-number-generator states;
- `optimizer.pt`: optimizer and learning-rate scheduler state (tensors and numbers only; read back
  with `torch.load(weights_only=True)`, which never unpickles arbitrary objects);
- `hooks.pt`: the training hooks' state, same rules;
- `state.json`: step, tokens seen, the metric before training, elapsed time.

Everything is written into a hidden temporary directory first, then renamed into place with
`os.replace`: a crash mid-save leaves the previous checkpoints untouched, and a half-written
directory is never taken for a checkpoint (its name starts with `.tmp-`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import files, inject, io
from ..errors import LorakitError, short_repr
from ..methods.base import config_from_dict

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{i}"] = s
    return state


def merge_rank_rng_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The random states of every process of a run, in one file: process 0's as `torch`, the others
    as `rank1.torch`, ..."""
    merged = dict(states[0])
    for rank, state in enumerate(states[1:], start=1):
        merged.update({f"rank{rank}.{key}": value for key, value in state.items()})
    return merged


def rank_rng_state(merged: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Process `rank`'s random state from `merge_rank_rng_states`' file."""
    if rank == 0:
        return {k: v for k, v in merged.items() if not k.startswith("rank")}
    prefix = f"rank{rank}."
    own = {k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)}
    if "torch" not in own:
        raise LorakitError(f"the checkpoint holds no random state for process {rank}")
    return own


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hooks: Any,
    state: dict[str, Any],
    keep: int = 2,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint for `step` under `directory` atomically; keep the newest `keep`. One there
    already for `step` (a damaged one a resume from the checkpoint before it reached again) is
    replaced once the new one is complete."""
    directory = Path(directory)
    files.make_directory(directory, "checkpoints")
    final = directory / checkpoint_name(step)
    exact = exact_adapter_state(model)
    if not all(bool(torch.isfinite(t).all()) for t in exact.values() if t.is_floating_point()):
        raise LorakitError(f"refusing to write checkpoint {final.name}: the adapter weights are not finite")
    try:
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-{checkpoint_name(step)}-"))
    except OSError as err:
        raise _not_written(err, final, directory) from None
    try:
        io.save(model, tmp / "adapter")
        save_file(exact, str(tmp / "adapter_state.safetensors"))
        save_file(rng if rng is not None else rng_state(), str(tmp / "rng.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(hooks.state_dict(), tmp / "hooks.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
        for written in tmp.rglob("*"):
            if written.is_file():
                with open(written, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)  # the same step again: the new one is complete, the old one goes
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _not_written(err, final, directory) from None
        raise
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)  # every checkpoint kept is finite: written only from finite weights
    return final


def _not_written(err: OSError, final: Path, directory: Path) -> LorakitError:
    """A checkpoint that could not be written (a full disk, ...): one line naming the one kept."""
    kept = list_checkpoints(directory)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"the disk is full: checkpoint {final.name} was not written"
    else:
        reason = f"checkpoint {final.name} was not written: {files.write_error(err, final)}"
    return LorakitError(reason + (f"; {kept[-1]} is kept" if kept else ""))


def clean_leftovers(directory: Path) -> None:
    """Remove what a crash can leave among the checkpoints: temporary `.tmp-step-*` directories of a
    save that never finished, and `step-*` directories a rotation half deleted (no state.json).
    Complete checkpoints are never touched."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        partial_save = path.name.startswith(".tmp-step-")
        half_deleted = STEP_DIR.match(path.name) is not None and not (path / "state.json").is_file()
        if path.is_dir() and not path.is_symlink() and (partial_save or half_deleted):
            shutil.rmtree(path, ignore_errors=True)


def is_finite(checkpoint: Path) -> bool:
    """Whether a checkpoint's adapter tensors are all finite (read back from disk)."""
    for name in ("adapter_state.safetensors", f"adapter/{io.WEIGHTS_NAME}"):
        path = checkpoint / name
        if path.is_file():
            try:
                tensors = load_file(str(path))
            except Exception:  # noqa: BLE001 - an unreadable checkpoint is not a good one
                return False
            return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    return False


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: `path` itself, or the newest one in a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise LorakitError(f"no checkpoint to resume from in {path}")
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/step-N`)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def exact_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and persistent buffers) by its name in the model."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items() if ".adapters." in k}


@torch.no_grad()
def load_exact_adapter_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy `exact_adapter_state` back; the names and shapes must be the model's exactly."""
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if ".adapters." in k}
    if set(own) != set(saved):
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        raise LorakitError(
            f"checkpoint adapter state does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, value in saved.items():
        if own[key].shape != value.shape:
            raise LorakitError(
                f"checkpoint adapter state {key}: shape {tuple(value.shape)} != model {tuple(own[key].shape)}"
            )
        own[key].copy_(value)


def damaged(checkpoint: Path, name: str, why: str) -> LorakitError:
    """One line for a checkpoint file that cannot be read: which file, why, and what to do instead
    (resume from the checkpoint before it, or start again)."""
    found = STEP_DIR.match(checkpoint.name)
    earlier = [
        c
        for c in list_checkpoints(checkpoint.parent)
        if found and int(STEP_DIR.match(c.name).group(1)) < int(found.group(1))
    ]
    if earlier:
        instead = f"resume from the checkpoint before it: lorakit train --resume {earlier[-1]}"
    else:
        instead = "no earlier checkpoint is left: start the run again with --overwrite"
    return LorakitError(f"checkpoint file {checkpoint / name} is damaged ({why}); {instead}")


def _why(err: BaseException) -> str:
    """A short reason for a read that failed (the libraries' messages run to many lines)."""
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return "it holds objects other than tensors and numbers, so it was not loaded"
    if isinstance(err, FileNotFoundError):
        return "missing"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return short_repr(first).strip("'\"") if len(first) > 160 else first


def _read(checkpoint: Path, name: str, read):
    """`read(path)` of the checkpoint's file `name`, any failure as `damaged` (and the readers' warnings
    about a file they then refuse kept out of the way of that one line)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read(checkpoint / name)
    except Exception as err:  # noqa: BLE001 -- whatever the reader says, the file cannot be used
        raise damaged(checkpoint, name, _why(err)) from None


def check_state(checkpoint: Path, state: Any) -> dict[str, Any]:
    """state.json holds what `save_checkpoint` writes: a step, token and time counters, the metric
    before training (and the last loss and the limit's probes, where the run had them)."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62

    problem = None
    if not isinstance(state, dict):
        problem = f"it holds {type(state).__name__}, not an object"
    elif not count(state.get("step")):
        problem = f"step is {short_repr(state.get('step'))}, not a step number"
    elif not count(state.get("tokens", 0)) or not number(state.get("train_seconds", 0.0)):
        problem = "tokens or train_seconds is not a number"
    elif not count(state.get("world_size", 1)) or state.get("world_size", 1) < 1:
        problem = f"world_size is {short_repr(state.get('world_size'))}, not a process count"
    elif not isinstance(state.get("before"), dict) or not all(
        isinstance(k, str) and number(v) for k, v in state["before"].items()
    ):
        problem = "before is not a mapping of metric names to numbers"
    elif "loss" in state and not number(state["loss"]):
        problem = f"loss is {short_repr(state['loss'])}, not a number"
    elif not isinstance(state.get("limit_probes", []), list) or not all(
        isinstance(p, list) and len(p) == 3 and all(number(x) for x in p) for p in state.get("limit_probes", [])
    ):
        problem = "limit_probes is not a list of [step, seconds, seconds]"
    if problem:
        raise damaged(checkpoint, "state.json", problem)
    return state


def read_state(checkpoint: Path) -> Any:
    """The checkpoint's state.json as read (`check_state` checks it); unreadable: `damaged`."""
    return _read(checkpoint, "state.json", lambda p: json.loads(p.read_text()))


def saved_adapter_config(checkpoint: Path) -> Any:
    """The adapter config the checkpoint's run had reached (its layout), a damaged one named."""
    try:
        return io.read_config(checkpoint / "adapter")[0]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        name = io.LORAKIT_CONFIG_NAME if (checkpoint / "adapter" / io.LORAKIT_CONFIG_NAME).exists() else ""
        raise damaged(checkpoint, f"adapter/{name}".rstrip("/"), _why(err)) from None


def adapt_as_checkpointed(model: nn.Module, checkpoint: Path) -> None:
    """Adapt `model` as the checkpoint's run had it: the same modules, and the layout training had
    reached (AdaLoRA's ranks, LoRA-drop's plan), recorded with the run's own selection
    (`keep_own_selection`)."""
    io.adapt_as_saved(model, saved_adapter_config(checkpoint))
    try:
        keep_own_selection(model, checkpoint / "adapter")
    except ValueError as err:
        raise damaged(checkpoint, f"adapter/{io.LORAKIT_CONFIG_NAME}", str(err)) from None


def keep_own_selection(model: nn.Module, adapter_dir: Path, name: str = inject.DEFAULT_NAME) -> None:
    """Record adapter `name`'s config with the module selection its lorakit.json was written with
    (`all-linear`, not the list of modules it chose, which `io.read_config` hands back to adapt the
    same modules), so that a run finished by a resume writes the files an uninterrupted run writes."""
    written = adapter_dir / io.LORAKIT_CONFIG_NAME
    if not written.is_file():
        return  # PEFT's layout: its target_modules are what it chose
    try:
        own = config_from_dict(json.loads(written.read_text(encoding="utf-8"))["config"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(_why(err)) from None  # the reason; the caller names the file
    state = inject.lorakit_state(model)
    state.configs[name] = dataclasses.replace(
        state.configs[name], targets=own.targets, layers=own.layers, exclude=own.exclude
    )


def load_checkpoint(
    checkpoint: str | Path, model: nn.Module, hooks: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Restore hook state and adapter tensors into an adapted `model`.

    Returns (state.json, optimizer+scheduler state, rng state); the caller loads the optimizer
    state once it has built the optimizer (`restore_optimizer`), and sets the RNG state last, just
    before training (`restore_rng_state`). A file that cannot be read is named (`damaged`).
    """
    checkpoint = Path(checkpoint)
    state = check_state(checkpoint, read_state(checkpoint))
    optim_state = _read(checkpoint, "optimizer.pt", lambda p: torch.load(p, weights_only=True))
    if not isinstance(optim_state, dict) or not {"optimizer", "scheduler"} <= set(optim_state):
        raise damaged(checkpoint, "optimizer.pt", "it holds no optimizer and scheduler state")
    rng = _read(checkpoint, "rng.safetensors", lambda p: load_file(str(p)))
    hook_state = _read(checkpoint, "hooks.pt", lambda p: torch.load(p, weights_only=True))
    try:
        hooks.load_state_dict(hook_state)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:
        raise damaged(checkpoint, "hooks.pt", _why(err)) from None
    saved = _read(checkpoint, f"adapter/{io.WEIGHTS_NAME}", io.read_tensors)
    io.load_adapter_state(model, saved)
    if (checkpoint / "adapter_state.safetensors").is_file():
        load_exact_adapter_state(model, _read(checkpoint, "adapter_state.safetensors", lambda p: load_file(str(p))))
    return state, optim_state, rng


def restore_optimizer(
    checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any, optim_state: dict[str, Any]
) -> None:
    """The optimizer's and scheduler's state from `load_checkpoint`, into the ones just built."""
    try:
        optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise damaged(checkpoint, "optimizer.pt", f"it does not fit this run's optimizer: {_why(err)}") from None


def restore_rng_state(checkpoint: Path, state: dict[str, torch.Tensor]) -> None:
    """`set_rng_state`, with a state that does not fit named."""
    try:
        set_rng_state(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise damaged(checkpoint, "rng.safetensors", _why(err)) from None
