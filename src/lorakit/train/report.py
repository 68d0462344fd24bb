"""What a finished run reports: `RunResult`, its table (printed at the end of a run) and the report
files (`report.json`, `report.txt`) beside the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import files

PERCENT_METRICS = ("exact_match", "accuracy", "f1")


def format_metrics(metrics: dict[str, float]) -> str:
    """`exact_match 93.0%, eval_loss 0.0312`: percentages for accuracies."""
    return (
        ", ".join(f"{k} {100 * v:.1f}%" if k in PERCENT_METRICS else f"{k} {v:.4f}" for k, v in metrics.items())
        or "no held-out data"
    )


@dataclass
class RunResult:
    """What a finished run reports (also written to `runs/<name>/report.json`)."""

    run_dir: Path
    steps: int
    metric: str
    before: dict[str, float]
    after: dict[str, float]
    method: str
    trainable_params: int
    total_params: int
    adapter_bytes: int
    peak_memory_mb: float
    tokens_per_s: float
    train_seconds: float
    wall_seconds: float
    final_loss: float
    lr: float = 0.0  # the peak learning rate (given, or the method's recipe)
    # --measure-limit: the limit's median step time and the median of the paired step / limit ratios
    limit_step_seconds: float | None = None
    step_vs_limit: float | None = None

    def table(self) -> str:
        """The summary table printed at the end of a run."""
        b, a = self.before.get(self.metric), self.after.get(self.metric)
        fmt = (lambda v: f"{100 * v:.1f}%") if self.metric in PERCENT_METRICS else (lambda v: f"{v:.4f}")
        rows = [
            ("method", self.method),
            (
                "trainable params",
                f"{self.trainable_params:,} of {self.total_params:,} ({100 * self.trainable_params / max(self.total_params, 1):.3f}%)",
            ),
            ("adapter size on disk", f"{self.adapter_bytes / 2**20:.2f} MiB"),
            ("peak memory", f"{self.peak_memory_mb:,.0f} MiB"),
            ("tokens/s", f"{self.tokens_per_s:,.0f}"),
            ("steps", f"{self.steps} ({self.train_seconds:.0f} s of training), peak learning rate {self.lr:g}"),
            *(
                [
                    (
                        "step / limit",
                        f"{self.step_vs_limit:.3f} (the frozen base's forward + backward: {self.limit_step_seconds:.3f} s, "
                        "timed beside the run's steps)",
                    )
                ]
                if self.step_vs_limit is not None
                else []
            ),
            ("wall time", f"{self.wall_seconds:.0f} s (load, evaluation before and after, training, saving)"),
            ("final train loss", f"{self.final_loss:.4f}"),
        ]
        if b is not None and a is not None:
            rows.append((f"{self.metric} (held-out)", f"{fmt(b)} -> {fmt(a)}"))
        if self.metric != "eval_loss" and "eval_loss" in self.after and "eval_loss" in self.before:
            rows.append(("eval loss", f"{self.before['eval_loss']:.4f} -> {self.after['eval_loss']:.4f}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_report(result: RunResult, datasets: Any, strategy: Any, adapter_config: Any) -> None:
    """`report.json` (the result, the data's labels and held-out counts, the processes, and what
    training decided of the adapter's layout) and `report.txt` (the table) in the run directory."""
    report = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
    if datasets.labels:
        report["labels"] = datasets.labels
    report["eval_examples"] = {"scored": len(datasets.eval), "of": datasets.eval_total, "source": datasets.eval_source}
    report["processes"] = strategy.world_size
    report["distributed"] = strategy.kind
    layout = {
        name: getattr(adapter_config, name) for name in adapter_config.layout_fields if getattr(adapter_config, name)
    }
    if layout:  # what training decided: AdaLoRA's final ranks, LoRA-drop's plan
        report["adapter_layout"] = layout
    files.atomic_write_text(result.run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    files.atomic_write_text(result.run_dir / "report.txt", result.table() + "\n")
