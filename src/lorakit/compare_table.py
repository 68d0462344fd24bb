"""The comparison's results: one record per method, the terminal table, the CSV and the HTML page.

`lorakit compare` (`compare.py`) runs the methods; this module only turns what they reported into
the tables and the page, so a report can be redrawn from `compare.json` without running anything.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

from . import html_report

PERCENT = ("accuracy", "exact_match", "f1")
# how a record's "x limit" was measured (its `limit_timed`)
LIMIT_PAIRED = "beside the run's steps"  # by the run itself (`measure_limit`), paired with its steps
LIMIT_ONCE = "after the methods"  # once, in this process, for runs reused from before that option


@dataclasses.dataclass
class MethodResult:
    method: str
    status: str  # "done", "failed", "interrupted"
    reason: str = ""
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def rows(results: list[MethodResult], limit_s: float | None) -> list[dict[str, Any]]:
    """One flat record per method (the CSV, the table and the plots read these)."""
    out = []
    for r in results:
        row: dict[str, Any] = {"method": r.method, "status": r.status, "reason": r.reason}
        if r.status == "done":
            rep = r.report
            metric = rep.get("metric")
            step_s = rep["train_seconds"] / max(rep["steps"], 1)
            paired = rep.get("step_vs_limit")
            row.update(
                {
                    "lr": rep.get("lr"),  # the methods' recipes differ: the rate each one ran at
                    "trainable_params": rep["trainable_params"],
                    "total_params": rep["total_params"],
                    "trainable_percent": 100 * rep["trainable_params"] / max(rep["total_params"], 1),
                    "adapter_mib": rep["adapter_bytes"] / 2**20,
                    "peak_memory_mib": rep["peak_memory_mb"],
                    "step_seconds": step_s,
                    "step_vs_limit": paired if paired is not None else (step_s / limit_s if limit_s else None),
                    "limit_timed": LIMIT_PAIRED if paired is not None else (LIMIT_ONCE if limit_s else None),
                    "tokens_per_s": rep["tokens_per_s"],
                    "final_loss": rep["final_loss"],
                    "metric": metric,
                    "metric_before": rep["before"].get(metric),
                    "metric_after": rep["after"].get(metric),
                }
            )
        out.append(row)
    return out


def _fmt_metric(name: str | None, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if name in PERCENT else f"{value:.4f}"


def _fmt_lr(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def table(records: list[dict[str, Any]]) -> str:
    """The terminal table."""
    header = [
        "method",
        "lr",
        "trainable params",
        "adapter",
        "peak memory",
        "step",
        "x limit",
        "tokens/s",
        "final loss",
        "held-out",
    ]
    lines = [header]
    for r in records:
        if r["status"] != "done":
            lines.append([r["method"], f"{r['status']}: {r['reason']}"] + [""] * (len(header) - 2))
            continue
        lines.append(
            [
                r["method"],
                _fmt_lr(r["lr"]),
                f"{r['trainable_params']:,} ({r['trainable_percent']:.3f}%)",
                f"{r['adapter_mib']:.2f} MiB",
                f"{r['peak_memory_mib']:,.0f} MiB",
                f"{r['step_seconds']:.2f} s",
                f"{r['step_vs_limit']:.3f}" if r["step_vs_limit"] else "-",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['final_loss']:.4f}",
                f"{r['metric']} {_fmt_metric(r['metric'], r['metric_before'])} -> {_fmt_metric(r['metric'], r['metric_after'])}",
            ]
        )
    widths = [
        max(
            len(str(line[i]))
            for line in lines
            if i < len(line) and not (line[1].startswith(("failed", "interrupted")) and i == 1)
        )
        for i in range(len(header))
    ]
    out = []
    for line in lines:
        if line[1].startswith(("failed:", "interrupted:")):
            out.append(f"{line[0]:<{widths[0]}}  {line[1]}")
        else:
            out.append("  ".join(f"{str(cell):<{widths[i]}}" for i, cell in enumerate(line)))
    return "\n".join(out)


def limit_note(records: list[dict[str, Any]], limit_s: float | None) -> str:
    """How the table's "x limit" column was measured, in words."""
    timed = {r["limit_timed"] for r in records if r["status"] == "done" and r.get("limit_timed")}
    if timed == {LIMIT_PAIRED}:
        return "timed in each method's run beside its own steps (the median of about eight paired ratios)"
    if not timed:
        return "not measured"
    once = f"timed once in this process after the methods ({limit_s:.3f} s a step)" if limit_s else ""
    if timed == {LIMIT_ONCE}:
        return once + ": on a busy machine the column follows the load"
    return "timed in each run beside its steps, except the runs reused from before (" + once + ")"


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def write_html(
    results: list[MethodResult], records: list[dict[str, Any]], limit_s: float | None, path: Path, title: str
) -> None:
    """One self-contained page: loss curves, metric against trainable parameters, memory and speed
    bars (embedded PNGs) and the table; no external request."""
    plt = html_report.pyplot("the HTML report (compare.json and compare.csv were written)")
    done = [r for r in records if r["status"] == "done"]
    images = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, r in enumerate(r for r in results if r.losses):
        # each its own dash and marker: a curve drawn over another (lora-fa on lora) still shows
        ax.plot(
            [s for s, _ in r.losses],
            [v for _, v in r.losses],
            label=r.method,
            **html_report.line_style(index, len(r.losses)),
        )
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    if ax.get_lines():
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the curves, not over them
    images.append(("Training loss of every method", html_report.png(fig)))
    if done and any(r["metric_after"] is not None for r in done):
        fig, ax = plt.subplots(figsize=(7, 4))
        shown = [r for r in done if r["metric_after"] is not None]
        for index, r in enumerate(shown):
            ax.scatter(
                r["trainable_params"],
                r["metric_after"],
                s=40,
                marker=html_report.MARKERS[index % len(html_report.MARKERS)],
            )
        html_report.parameter_axis(ax, [r["trainable_params"] for r in shown])
        html_report.place_labels(
            ax, [r["trainable_params"] for r in shown], [r["metric_after"] for r in shown], [r["method"] for r in shown]
        )
        ax.set(
            xlabel="trainable parameters" + (" (log scale)" if ax.get_xscale() == "log" else ""),
            ylabel=f"held-out {done[0]['metric']}",
            title="Held-out metric against trainable parameters",
        )
        images.append(("Held-out metric against trainable parameters", html_report.png(fig)))
    if done:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)  # the method names once, at the left
        names = [r["method"] for r in done]
        left.barh(names, [r["peak_memory_mib"] for r in done])
        left.set(xlabel="peak memory (MiB)", title="Peak memory")
        right.barh(names, [r["step_vs_limit"] or r["step_seconds"] for r in done])
        timed = all(r["step_vs_limit"] for r in done)
        right.set(xlabel="step time / limit" if timed else "step time (s)", title="Speed")
        if timed:
            right.axvline(1.0, color="black", linestyle="--", linewidth=1)
        images.append(("Peak memory and step time", html_report.png(fig)))
    head = [
        "method",
        "status",
        "lr",
        "trainable params",
        "trainable %",
        "adapter MiB",
        "peak MiB",
        "step s",
        "x limit",
        "tokens/s",
        "final loss",
        "metric",
        "before",
        "after",
    ]
    body = []
    for r in records:
        if r["status"] != "done":
            body.append([r["method"], f"{r['status']}: {r['reason']}"] + [""] * (len(head) - 2))
            continue
        body.append(
            [
                r["method"],
                r["status"],
                _fmt_lr(r["lr"]),
                f"{r['trainable_params']:,}",
                f"{r['trainable_percent']:.3f}",
                f"{r['adapter_mib']:.2f}",
                f"{r['peak_memory_mib']:,.0f}",
                f"{r['step_seconds']:.3f}",
                f"{r['step_vs_limit']:.3f}" if r["step_vs_limit"] else "-",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['final_loss']:.4f}",
                r["metric"] or "-",
                _fmt_metric(r["metric"], r["metric_before"]),
                _fmt_metric(r["metric"], r["metric_after"]),
            ]
        )
    intro = (
        "Every method trained with the same data, steps and seed. x limit: the step time over the limit's (the frozen "
        "base's forward + backward on the same micro-batches, which no method can beat), "
        + limit_note(records, limit_s)
        + "."
    )
    path.write_text(html_report.page(title, intro, html_report.table(head, body), images))
