"""`--measure-limit`: the limit no method can beat, timed beside a run's own steps (what `lorakit
compare` reports every method against).

The limit is the frozen base model's forward and backward on the step's own micro-batches, adapters
off, backward through the activations only. A run with `--measure-limit` gets a `LimitProbe`, a
small hook the step loop calls after each step; it times the limit after about `LIMIT_PROBES` steps
spread over the run and keeps the pairs in the run's state (so a resumed run keeps them too).
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import inject
from . import evaluate
from .config import TrainConfig
from .distributed import SingleProcess

if TYPE_CHECKING:
    from .loop import Run

LIMIT_PROBES = 8  # limit timings per run with --measure-limit


class LimitProbe:
    """The step loop's hook for `--measure-limit`: `after_step(step, seconds)` after every optimizer step."""

    def __init__(self, run: Run) -> None:
        self.run = run
        if not limit_measurable(run.cfg, run.strategy):
            run.echo(
                "--measure-limit: the limit is timed in one eager process only; not measured in this run "
                f"({'--compile' if run.cfg.compile else f'{run.strategy.world_size} processes'})"
            )

    def after_step(self, step: int, seconds: float) -> None:
        """Time the limit on `step`'s micro-batches where `probe_limit_at` says so, paired with the
        step's own `seconds`."""
        limit_seconds = time_limit_step(self.run, step) if probe_limit_at(self.run, step) else None
        if limit_seconds is not None:
            self.run.state.setdefault("limit_probes", []).append([step, seconds, limit_seconds])


def limit_measurable(cfg: TrainConfig, strategy: SingleProcess) -> bool:
    """Whether `--measure-limit` can time the limit in this run: one process, eager."""
    return not cfg.compile and strategy.world_size == 1


def probe_limit_at(run: Run, step: int) -> bool:
    """Whether `--measure-limit` times the limit after `step`: about LIMIT_PROBES steps spread over
    the run, never the first (it pays for warm-up)."""
    if not run.cfg.measure_limit or not limit_measurable(run.cfg, run.strategy) or step == 1:
        return False
    every = max(1, (run.total_steps - 1) // LIMIT_PROBES)
    return (step - 1) % every == 0 or step == run.total_steps


def time_limit_step(run: Run, step: int) -> float | None:
    """Seconds of the limit on `step`'s own micro-batches: the same forward (loss included) with every
    adapter off, and backward through the activations only (to the input embeddings' output; no
    parameter gradient is formed or touched). The random state is restored afterwards, so a run
    trains the same with and without the probes. None for a model without input embeddings."""
    cfg = run.cfg
    inputs: list[torch.Tensor] = []
    embeddings = run.model.get_input_embeddings() if hasattr(run.model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        return None

    def leaf_embeddings(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        inputs.append(output.detach().requires_grad_(True))
        return inputs[-1]

    handle = embeddings.register_forward_hook(leaf_embeddings)
    devices = [run.device] if run.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), inject.disabled(run.model):
            start = time.perf_counter()
            for micro in range(cfg.grad_accum):
                batch = run.micro_batch(step, micro)
                with evaluate.autocast(run.device, run.bf16):
                    loss = run.forward(**batch).loss
                if not inputs:
                    return None  # the forward does not go through get_input_embeddings()
                torch.autograd.grad(loss, inputs[-1])
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            return time.perf_counter() - start
    finally:
        handle.remove()


def limit_summary(state: dict[str, Any]) -> tuple[float | None, float | None]:
    """(median limit step seconds, median of the paired step / limit ratios) of the run's probes."""
    probes = state.get("limit_probes") or []
    if not probes:
        return None, None
    return (statistics.median(p[2] for p in probes), statistics.median(p[1] / max(p[2], 1e-12) for p in probes))
