"""`lorakit compare`: train several methods on the same data, steps and seed, side by side.

Each method is one `lorakit train` run in its own process (its peak memory is its own, a crash in
one does not stop the others), under `<out-dir>/<name>/<method>/`. A method whose run finished is
not trained again; one that was interrupted is resumed; so running the same command again after
Ctrl-C continues the comparison. Each method's run also times the frozen base's forward + backward
(the limit no method can beat) beside its own steps, on the same micro-batches (`measure_limit`),
so its step time is also given as a ratio to the limit that holds on a busy machine; runs reused
from before that option are set against the limit timed here, once, after the methods. A method
may have settings of its own (`method_run_config`: its learning rate, rank, ... from
`--method-arg METHOD:KEY=VALUE`); data, budget and seed are the same for all.

Writes `compare.json` and `compare.csv` (every number), and `compare.html` when matplotlib (the
`plots` extra) is installed: loss curves, held-out metric against trainable parameters, memory and
speed bars, and the table, in one file that opens offline.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import html_report
from .errors import LorakitError
from .train.config import TrainConfig, from_dict, to_yaml, with_resolved_paths

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


# settings one method of a comparison may have of its own (`--method-arg vera:lr=1e-2`); the data,
# budget and seed stay the same for all, or the comparison would not be one
PER_METHOD_FIELDS = ("lr", "r", "alpha", "dropout", "loraplus_ratio", "init", "quantize", "targets")


def method_run_config(cfg: TrainConfig, method: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The settings `method` trains with: `cfg`, with the method's own overrides ({key: value} from
    `--method-arg METHOD:KEY=VALUE`): a PER_METHOD_FIELDS key sets that field, any other key is one
    of the method's config fields (added to the shared method_args)."""
    overrides = dict(overrides or {})
    shared = {f.name for f in dataclasses.fields(TrainConfig)} - set(PER_METHOD_FIELDS) - {"method_args"}
    fixed = sorted(k for k in overrides if k.replace("-", "_") in shared)
    if fixed:
        raise LorakitError(f"--method-arg {method}:{fixed[0]}=...: every method of a comparison has the same {fixed[0]}; "
                           f"per method: {', '.join(PER_METHOD_FIELDS)} and the method's own settings")
    fields = {k: overrides.pop(k) for k in list(overrides) if k.replace("-", "_") in PER_METHOD_FIELDS}
    try:
        with_fields = from_dict(fields, cfg) if fields else cfg
    except LorakitError as err:
        raise LorakitError(f"--method-arg {method}:{err}") from None
    return dataclasses.replace(with_fields, method=method, method_args={**cfg.method_args, **overrides})


def run_method(cfg: TrainConfig, method: str, directory: Path, echo) -> MethodResult:
    """Train (or resume, or reuse) `method` in its own `lorakit train` process, with the settings
    `cfg` (from `method_run_config`)."""
    run_dir = directory / method
    if (run_dir / "report.json").is_file():
        echo(f"{method}: already trained, reusing {run_dir}")
        try:
            return collect(method, run_dir)
        except LorakitError as err:  # one damaged run: the others still compare
            return MethodResult(method, "failed", f"{err}; remove {run_dir} to train {method} again")
    config_file = directory / f".{method}.yaml"
    method_cfg = dataclasses.replace(with_resolved_paths(cfg), method=method, name=method, out_dir=str(directory),
                                     resume=None, overwrite=False)
    config_file.write_text(to_yaml(method_cfg))
    command = [sys.executable, "-m", "lorakit", "train", "--config", str(config_file)]
    if (run_dir / "checkpoints").is_dir() and (run_dir / "config.yaml").is_file():
        command = [sys.executable, "-m", "lorakit", "train", "--resume", str(run_dir)]
        echo(f"{method}: resuming {run_dir}")
    elif run_dir.exists():
        command.append("--overwrite")  # a run that failed before its first checkpoint starts again
    returncode, stderr_tail = run_showing_progress(command)
    if returncode == 130:
        return MethodResult(method, "interrupted", "interrupted (run the same command again to continue)")
    if returncode != 0:
        lines = [line.strip() for line in stderr_tail.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        reason = errors[-1].removeprefix("error: ") if errors else (lines or [f"exit status {returncode}"])[-1]
        return MethodResult(method, "failed", reason[:300])
    return collect(method, run_dir)


def run_showing_progress(command: list[str]) -> tuple[int, str]:
    """Run `command`, passing its stderr (messages and progress bar) through as it comes; returns
    (exit status, the last few KB of stderr, for the reason of a failure)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = b""
    assert process.stderr is not None
    try:
        while chunk := process.stderr.read1(4096) if hasattr(process.stderr, "read1") else process.stderr.read(4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-8192:]
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save its checkpoint
        process.wait()
        raise
    return process.wait(), tail.decode("utf-8", errors="replace")


# what `rows` reads of a run's report.json: numbers (final_loss may be NaN: a run that diverged at its end)
REPORT_NUMBERS = ("steps", "train_seconds", "trainable_params", "total_params", "adapter_bytes", "peak_memory_mb",
                  "tokens_per_s", "final_loss")


def read_report(run_dir: Path) -> dict[str, Any]:
    """A finished run's report.json, checked for what the comparison reads, or a one-line error naming the file."""
    import math

    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise LorakitError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    except (ValueError, RecursionError):
        raise LorakitError(f"{path} is damaged (not valid JSON)") from None

    def number(value: Any, finite: bool = True) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if isinstance(value, int):
            return abs(value) < 2**63  # a 400-digit integer is no count (and no float)
        return math.isfinite(value) or not finite

    def scores(value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and number(v, False) for k, v in value.items())

    if not isinstance(report, dict):
        raise LorakitError(f"{path} is damaged (a JSON {type(report).__name__}, not a run's report)")
    wrong = [k for k in REPORT_NUMBERS if not number(report.get(k), finite=k != "final_loss")]
    wrong += [k for k in ("before", "after") if not scores(report.get(k))]
    wrong += [k for k in ("lr", "step_vs_limit") if report.get(k) is not None and not number(report[k])]
    if report.get("metric") is not None and not isinstance(report["metric"], str):
        wrong.append("metric")
    if wrong:
        raise LorakitError(f"{path} is damaged: {', '.join(wrong)} missing or of the wrong type")
    return report


def collect(method: str, run_dir: Path) -> MethodResult:
    report = read_report(run_dir)
    losses = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            try:  # a damaged line (a kill mid-write, an edit) costs its point of the curve, nothing more
                record = json.loads(line)
                step, loss = int(record["step"]), float(record["loss"])
                if 0 <= step < 2**53:  # a step no float can plot is no step of this run
                    losses.append((step, loss))
            except (ValueError, KeyError, TypeError, IndexError, RecursionError, OverflowError):
                continue
    return MethodResult(method, "done", report=report, losses=losses)


def time_limit(cfg: TrainConfig, steps: int = 3) -> float | None:
    """Median seconds of the frozen base's forward + backward (through the activations only, to
    the input embeddings) on one training micro-batch: the limit of any adapter method's step."""
    import torch

    from .train import data as data_mod
    from .train import evaluate
    from .train.loading import load_model, load_tokenizer, num_outputs, use_bf16
    from .train.method_config import check_config
    from .train.run_data import build_datasets

    cfg = check_config(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    datasets = build_datasets(cfg, tokenizer)
    model = load_model(cfg.model, cfg.task, num_outputs(cfg.task, datasets.labels), tokenizer)
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model.to(device).train()
    for p in model.parameters():
        p.requires_grad_(False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = evaluate.to_device(data_mod.collate(data_mod.micro_batch(datasets.train, 0, cfg.batch_size, cfg.seed), pad), device)
    embed = model.get_input_embeddings()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        inputs = embed(batch["input_ids"]).detach().requires_grad_(True)
        with evaluate.autocast(device, use_bf16(cfg.precision, device)):
            loss = model(inputs_embeds=inputs, **{k: v for k, v in batch.items() if k != "input_ids"}).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * cfg.grad_accum  # a step is grad_accum micro-batches


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
            row.update({
                "lr": rep.get("lr"),  # the methods' recipes differ: the rate each one ran at
                "trainable_params": rep["trainable_params"], "total_params": rep["total_params"],
                "trainable_percent": 100 * rep["trainable_params"] / max(rep["total_params"], 1),
                "adapter_mib": rep["adapter_bytes"] / 2**20, "peak_memory_mib": rep["peak_memory_mb"],
                "step_seconds": step_s,
                "step_vs_limit": paired if paired is not None else (step_s / limit_s if limit_s else None),
                "limit_timed": LIMIT_PAIRED if paired is not None else (LIMIT_ONCE if limit_s else None),
                "tokens_per_s": rep["tokens_per_s"], "final_loss": rep["final_loss"], "metric": metric,
                "metric_before": rep["before"].get(metric), "metric_after": rep["after"].get(metric),
            })
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
    header = ["method", "lr", "trainable params", "adapter", "peak memory", "step", "x limit", "tokens/s", "final loss", "held-out"]
    lines = [header]
    for r in records:
        if r["status"] != "done":
            lines.append([r["method"], f"{r['status']}: {r['reason']}"] + [""] * (len(header) - 2))
            continue
        lines.append([
            r["method"], _fmt_lr(r["lr"]), f"{r['trainable_params']:,} ({r['trainable_percent']:.3f}%)", f"{r['adapter_mib']:.2f} MiB",
            f"{r['peak_memory_mib']:,.0f} MiB", f"{r['step_seconds']:.2f} s",
            f"{r['step_vs_limit']:.3f}" if r["step_vs_limit"] else "-", f"{r['tokens_per_s']:,.0f}", f"{r['final_loss']:.4f}",
            f"{r['metric']} {_fmt_metric(r['metric'], r['metric_before'])} -> {_fmt_metric(r['metric'], r['metric_after'])}",
        ])
    widths = [max(len(str(line[i])) for line in lines if i < len(line) and not (line[1].startswith(("failed", "interrupted")) and i == 1))
              for i in range(len(header))]
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


def write_html(results: list[MethodResult], records: list[dict[str, Any]], limit_s: float | None, path: Path,
               title: str) -> None:
    """One self-contained page: loss curves, metric against trainable parameters, memory and speed
    bars (embedded PNGs) and the table; no external request."""
    plt = html_report.pyplot("the HTML report (compare.json and compare.csv were written)")
    done = [r for r in records if r["status"] == "done"]
    images = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, r in enumerate(r for r in results if r.losses):
        # each its own dash and marker: a curve drawn over another (lora-fa on lora) still shows
        ax.plot([s for s, _ in r.losses], [v for _, v in r.losses], label=r.method, **html_report.line_style(index, len(r.losses)))
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    if ax.get_lines():
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the curves, not over them
    images.append(("Training loss of every method", html_report.png(fig)))
    if done and any(r["metric_after"] is not None for r in done):
        fig, ax = plt.subplots(figsize=(7, 4))
        shown = [r for r in done if r["metric_after"] is not None]
        for index, r in enumerate(shown):
            ax.scatter(r["trainable_params"], r["metric_after"], s=40, marker=html_report.MARKERS[index % len(html_report.MARKERS)])
        html_report.parameter_axis(ax, [r["trainable_params"] for r in shown])
        html_report.place_labels(ax, [r["trainable_params"] for r in shown], [r["metric_after"] for r in shown],
                                 [r["method"] for r in shown])
        ax.set(xlabel="trainable parameters" + (" (log scale)" if ax.get_xscale() == "log" else ""), ylabel=f"held-out {done[0]['metric']}",
               title="Held-out metric against trainable parameters")
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
    head = ["method", "status", "lr", "trainable params", "trainable %", "adapter MiB", "peak MiB", "step s", "x limit",
            "tokens/s", "final loss", "metric", "before", "after"]
    body = []
    for r in records:
        if r["status"] != "done":
            body.append([r["method"], f"{r['status']}: {r['reason']}"] + [""] * (len(head) - 2))
            continue
        body.append([r["method"], r["status"], _fmt_lr(r["lr"]), f"{r['trainable_params']:,}", f"{r['trainable_percent']:.3f}", f"{r['adapter_mib']:.2f}",
                     f"{r['peak_memory_mib']:,.0f}", f"{r['step_seconds']:.3f}", f"{r['step_vs_limit']:.3f}" if r["step_vs_limit"] else "-",
                     f"{r['tokens_per_s']:,.0f}", f"{r['final_loss']:.4f}", r["metric"] or "-",
                     _fmt_metric(r["metric"], r["metric_before"]), _fmt_metric(r["metric"], r["metric_after"])])
    intro = ("Every method trained with the same data, steps and seed. x limit: the step time over the limit's (the frozen "
             "base's forward + backward on the same micro-batches, which no method can beat), "
             + limit_note(records, limit_s) + ".")
    path.write_text(html_report.page(title, intro, html_report.table(head, body), images))


def compare(cfg: TrainConfig, methods: list[str], directory: Path, echo=print, html_report: bool = True,
            per_method: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run the comparison (see the module docstring); returns the per-method records. `per_method`:
    {method: {key: value}}, that method's own settings (see `method_run_config`)."""
    per_method = per_method or {}
    from .methods import METHODS
    from .train.config import ALIASES, method_names, unknown_method

    unknown = [m for m in methods if m not in METHODS and m not in ALIASES]
    if unknown:
        raise unknown_method(unknown[0], METHODS, "--methods entry")
    if not methods:
        raise LorakitError(f"--methods: none given; choose from {', '.join(method_names(METHODS))}")
    directory.mkdir(parents=True, exist_ok=True)
    strangers = sorted(set(per_method) - set(methods))
    if strangers:
        raise LorakitError(f"per-method settings for {strangers[0]!r}, which is not one of the methods ({', '.join(methods)})")
    configs = {m: dataclasses.replace(method_run_config(cfg, m, per_method.get(m)), measure_limit=True) for m in methods}
    settings = directory / "compare.yaml"
    mine = to_yaml(dataclasses.replace(with_resolved_paths(cfg), method="lora", name=None, out_dir="", resume=None,
                                       overwrite=False, progress=True))
    if any(per_method.values()):  # a method's own settings are part of what the directory holds
        mine += yaml.safe_dump({"per_method": {m: per_method[m] for m in sorted(per_method) if per_method[m]}}, sort_keys=True)
    if settings.is_file() and settings.read_text() != mine:
        raise LorakitError(f"{directory} holds a comparison with other settings ({settings}): pick another --name, "
                           "or delete that directory")
    settings.write_text(mine)
    results = []
    for i, method in enumerate(methods, start=1):
        echo(f"compare [{i}/{len(methods)}] {method} ...")
        result = run_method(configs[method], method, directory, echo)
        results.append(result)
        if result.status == "interrupted":
            raise LorakitError(f"compare interrupted during {method}; run the same command again to continue")
        if result.status == "failed":
            echo(f"{method} failed: {result.reason}")
    limit_s = None
    if any(r.status == "done" and r.report.get("step_vs_limit") is None for r in results):
        echo("timing the limit (the frozen base's forward + backward) for runs that did not time it ...")
        try:
            limit_s = time_limit(cfg)
        except Exception as err:  # noqa: BLE001 -- the comparison stands without the ratio
            echo(f"could not time the limit: {err}")
    records = rows(results, limit_s)
    (directory / "compare.json").write_text(json.dumps({"limit_step_seconds": limit_s, "methods": records,
                                                        "config": yaml.safe_load(to_yaml(cfg))}, indent=2) + "\n")
    write_csv(records, directory / "compare.csv")
    if html_report:
        write_html(results, records, limit_s, directory / "compare.html", f"lorakit compare: {', '.join(methods)}")
    return records
