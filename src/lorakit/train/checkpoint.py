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

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import io
from ..errors import LorakitError

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
    own = {k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)}
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
    """Write the checkpoint for `step` under `directory` atomically; keep the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    if final.exists():  # the same step was saved already (e.g. Ctrl-C right after a save)
        return final
    exact = exact_adapter_state(model)
    if not all(bool(torch.isfinite(t).all()) for t in exact.values() if t.is_floating_point()):
        raise LorakitError(f"refusing to write checkpoint {final.name}: the adapter weights are not finite")
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-{checkpoint_name(step)}-"))
    try:
        io.save(model, tmp / "adapter")
        save_file(exact, str(tmp / "adapter_state.safetensors"))
        save_file(rng if rng is not None else rng_state(), str(tmp / "rng.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(hooks.state_dict(), tmp / "hooks.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            kept = list_checkpoints(directory)
            raise LorakitError(f"the disk is full: checkpoint {final.name} was not written"
                               + (f"; {kept[-1]} is kept" if kept else "")) from None
        raise
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)  # every checkpoint kept is finite: written only from finite weights
    return final


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
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
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
        raise LorakitError(f"checkpoint adapter state does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, value in saved.items():
        if own[key].shape != value.shape:
            raise LorakitError(f"checkpoint adapter state {key}: shape {tuple(value.shape)} != model {tuple(own[key].shape)}")
        own[key].copy_(value)


def load_checkpoint(
    checkpoint: str | Path, model: nn.Module, hooks: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Restore hook state and adapter tensors into an adapted `model`.

    Returns (state.json, optimizer+scheduler state, rng state); the caller loads the optimizer
    state once it has built the optimizer, and sets the RNG state last, just before training.
    """
    checkpoint = Path(checkpoint)
    hooks.load_state_dict(torch.load(checkpoint / "hooks.pt", weights_only=True))
    try:
        saved = io.read_tensors(checkpoint / "adapter" / io.WEIGHTS_NAME)
    except ValueError as err:
        raise LorakitError(f"checkpoint {checkpoint} is damaged: {err}") from None
    io.load_adapter_state(model, saved)
    exact = checkpoint / "adapter_state.safetensors"
    if exact.is_file():
        load_exact_adapter_state(model, load_file(str(exact)))
    state = json.loads((checkpoint / "state.json").read_text())
    optim_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    return state, optim_state, load_file(str(checkpoint / "rng.safetensors"))
