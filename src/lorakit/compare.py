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

import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import files
from .children import child_environment
from .compare_table import (  # noqa: F401  (the table's names stay reachable as compare.NAME)
    LIMIT_ONCE,
    LIMIT_PAIRED,
    PERCENT,
    MethodResult,
    limit_note,
    rows,
    table,
    write_csv,
    write_html,
)
from .errors import LorakitError
from .train.config import TrainConfig, from_dict, to_yaml, with_resolved_paths

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
        raise LorakitError(
            f"--method-arg {method}:{fixed[0]}=...: every method of a comparison has the same {fixed[0]}; "
            f"per method: {', '.join(PER_METHOD_FIELDS)} and the method's own settings"
        )
    fields = {k: overrides.pop(k) for k in list(overrides) if k.replace("-", "_") in PER_METHOD_FIELDS}
    try:
        with_fields = from_dict(fields, cfg) if fields else cfg
    except LorakitError as err:
        raise LorakitError(f"--method-arg {method}:{err}") from None
    return dataclasses.replace(with_fields, method=method, method_args={**cfg.method_args, **overrides})


def run_method(cfg: TrainConfig, method: str, directory: Path, echo, fresh: bool = False) -> MethodResult:
    """Train (or resume, or reuse) `method` in its own `lorakit train` process, with the settings
    `cfg` (from `method_run_config`); `fresh`: train it again, replacing an earlier run."""
    run_dir = directory / method
    if (run_dir / "report.json").is_file() and not fresh:
        echo(f"{method}: already trained, reusing {run_dir}")
        try:
            return collect(method, run_dir)
        except LorakitError as err:  # one damaged run: the others still compare
            return MethodResult(method, "failed", f"{err}; remove {run_dir} to train {method} again")
    config_file = directory / f".{method}.yaml"
    method_cfg = dataclasses.replace(
        with_resolved_paths(cfg), method=method, name=method, out_dir=str(directory), resume=None, overwrite=False
    )
    files.atomic_write_text(config_file, to_yaml(method_cfg))
    command = [sys.executable, "-m", "lorakit", "train", "--config", str(config_file)]
    if (run_dir / "checkpoints").is_dir() and (run_dir / "config.yaml").is_file() and not fresh:
        command = [sys.executable, "-m", "lorakit", "train", "--resume", str(run_dir)]
        echo(f"{method}: resuming {run_dir}")
    elif run_dir.exists():
        command.append("--overwrite")  # a run that failed before its first checkpoint starts again
    returncode, stderr_tail = run_showing_progress(command)
    if returncode == 130:
        return MethodResult(method, "interrupted", "interrupted (run the same command again to continue)")
    if returncode < 0:  # killed from outside (kill -9, the out-of-memory killer): its checkpoints stand
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return MethodResult(
            method, "failed", f"its process was stopped by {name}; run the same command again to resume it"
        )
    if returncode != 0:
        lines = [line.strip() for line in stderr_tail.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        reason = errors[-1].removeprefix("error: ") if errors else (lines or [f"exit status {returncode}"])[-1]
        return MethodResult(method, "failed", reason[:300])
    return collect(method, run_dir)


def run_showing_progress(command: list[str]) -> tuple[int, str]:
    """Run `command`, passing its stderr (messages and progress bar) through as it comes; returns
    (exit status, the last few KB of stderr, for the reason of a failure)."""
    # the child ends with this process (kill -9 included): no orphan trains on in a run directory
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_environment())
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
REPORT_NUMBERS = (
    "steps",
    "train_seconds",
    "trainable_params",
    "total_params",
    "adapter_bytes",
    "peak_memory_mb",
    "tokens_per_s",
    "final_loss",
)


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
    batch = evaluate.to_device(
        data_mod.collate(data_mod.micro_batch(datasets.train, 0, cfg.batch_size, cfg.seed), pad), device
    )
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


def settings_text(cfg: TrainConfig, per_method: dict[str, dict[str, Any]]) -> str:
    """What `compare.yaml` holds: the settings every method shares, and each method's own; a
    directory holding other settings is another comparison."""
    mine = to_yaml(
        dataclasses.replace(
            with_resolved_paths(cfg), method="lora", name=None, out_dir="", resume=None, overwrite=False, progress=True
        )
    )
    if any(per_method.values()):  # a method's own settings are part of what the directory holds
        mine += yaml.safe_dump(
            {"per_method": {m: per_method[m] for m in sorted(per_method) if per_method[m]}}, sort_keys=True
        )
    return mine


def compare(
    cfg: TrainConfig,
    methods: list[str],
    directory: Path,
    echo=print,
    html_report: bool = True,
    per_method: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
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
        raise LorakitError(
            f"per-method settings for {strangers[0]!r}, which is not one of the methods ({', '.join(methods)})"
        )
    with files.DirectoryLock.acquire(directory, "compared"):  # one comparison at a time in a directory
        files.clean_temporaries(directory)
        return _compare(cfg, methods, directory, echo, html_report, per_method)


def _compare(
    cfg: TrainConfig,
    methods: list[str],
    directory: Path,
    echo,
    html_report: bool,
    per_method: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    configs = {
        m: dataclasses.replace(method_run_config(cfg, m, per_method.get(m)), measure_limit=True) for m in methods
    }
    settings = directory / "compare.yaml"
    mine = settings_text(cfg, per_method)
    earlier = settings.read_text() if settings.is_file() else None
    if earlier is not None and earlier != mine and not cfg.overwrite:
        raise LorakitError(
            f"{directory} holds a comparison with other settings ({settings}): pick another --name, "
            "or --overwrite to train every method again"
        )
    if earlier != mine:
        files.atomic_write_text(settings, mine)
    results = []
    for i, method in enumerate(methods, start=1):
        echo(f"compare [{i}/{len(methods)}] {method} ...")
        result = run_method(configs[method], method, directory, echo, fresh=cfg.overwrite)
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
    # each written whole or not at all: a kill or a full disk leaves the earlier file
    files.atomic_write_text(
        directory / "compare.json",
        json.dumps(
            {"limit_step_seconds": limit_s, "methods": records, "config": yaml.safe_load(to_yaml(cfg))}, indent=2
        )
        + "\n",
    )
    files.atomic_write(directory / "compare.csv", lambda tmp: write_csv(records, tmp))
    if html_report:
        title = f"lorakit compare: {', '.join(methods)}"
        files.atomic_write(directory / "compare.html", lambda tmp: write_html(results, records, limit_s, tmp, title))
    return records
