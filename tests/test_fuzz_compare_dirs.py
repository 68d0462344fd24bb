"""Seeded fuzzing of the run directories `lorakit compare` reuses: a finished method's report.json and
metrics.jsonl with wrong types, missing keys, huge or odd numbers, deep JSON and damaged bytes.

The contract: each method is "done" (its numbers read) or "failed" with a one-line reason naming the
file; the table, compare.json, compare.csv and the HTML report are then written for every mix of
methods without an exception. Nothing is trained (every method's directory holds a finished run).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lorakit import compare
from test_fuzz import Raw, deep, dump_json, mutate_bytes, one_line, report, run_isolated

CASES = 30
GOOD = {
    "steps": 20,
    "train_seconds": 12.5,
    "trainable_params": 4096,
    "total_params": 1_000_000,
    "adapter_bytes": 16384,
    "peak_memory_mb": 512.0,
    "tokens_per_s": 900.0,
    "final_loss": 0.75,
    "metric": "accuracy",
    "lr": 1e-3,
    "step_vs_limit": 1.8,
    "before": {"accuracy": 0.5, "eval_loss": 0.7},
    "after": {"accuracy": 0.8, "eval_loss": 0.4},
}
ODD = [
    0,
    -1,
    1e308,
    -1e308,
    10**400,
    Raw("1e999"),
    Raw("NaN"),
    Raw("-Infinity"),
    True,
    None,
    "12",
    "",
    [],
    {},
    [1],
    {"a": 1},
    deep(50),
    2**63,
    1e-320,
    "accuracy",
]


def odd_report(rng: random.Random) -> tuple[dict, list[str]]:
    rep, done = json.loads(json.dumps(GOOD)), []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(GOOD) + ["extra"])
        what = rng.random()
        if what < 0.15:
            rep.pop(key, None)
            done.append(f"drop {key}")
        elif what < 0.35 and key in ("before", "after"):
            rep[key] = {rng.choice(["accuracy", "eval_loss", "", "f1"]): rng.choice(ODD)}
            done.append(f"{key}={rep[key]!r:.60}")
        else:
            rep[key] = rng.choice(ODD)
            done.append(f"{key}={rep[key]!r:.60}")
    return rep, done


def metrics_lines(rng: random.Random) -> str:
    lines = []
    for step in range(1, rng.randint(0, 12)):
        roll = rng.random()
        if roll < 0.7:
            lines.append(json.dumps({"step": step, "loss": rng.choice([0.5, 1.0 / step, 3.0])}))
        else:
            lines.append(dump_json({"step": rng.choice([step, "x", None, 10**400, -1, 1.5]), "loss": rng.choice(ODD)}))
    return "\n".join(lines) + "\n"


def write_run(rng: random.Random, run_dir: Path) -> list[str]:
    run_dir.mkdir(parents=True)
    if rng.random() < 0.3:
        rep, done = json.loads(json.dumps(GOOD)), ["intact"]
    else:
        rep, done = odd_report(rng)
    raw = dump_json(rep).encode()
    if rng.random() < 0.25:
        raw, how = mutate_bytes(rng, raw)
        done.append(f"bytes:{how}")
    (run_dir / "report.json").write_bytes(raw)
    metrics = metrics_lines(rng).encode()
    if rng.random() < 0.2:
        metrics, how = mutate_bytes(rng, metrics)
        done.append(f"metrics:{how}")
    (run_dir / "metrics.jsonl").write_bytes(metrics)
    return done


def compare_directory(rng: random.Random, directory: Path, html: bool) -> str | None:
    """None when reading and reporting `directory`'s runs keeps the contract, else what broke it."""
    methods = rng.sample(["lora", "dora", "vera", "adalora"], rng.randint(1, 4))
    results = []
    for method in methods:
        write_run(rng, directory / method)
        result = compare.run_method(None, method, directory, lambda *a: None)  # a finished run: nothing is trained
        if result.status == "failed" and not (one_line(result.reason) and "report.json" in result.reason):
            return f"{method}: failed without a one-line reason naming the file: {result.reason[:200]!r}"
        if result.status not in ("done", "failed"):
            return f"{method}: status {result.status}"
        results.append(result)
    records = compare.rows(results, rng.choice([None, 0.05]))
    compare.table(records)
    json.dumps({"methods": records})
    compare.write_csv(records, directory / "compare.csv")
    if html:
        compare.write_html(results, records, None, directory / "compare.html", "fuzz")
    return None


def test_reused_run_directories_compare_or_fail_in_one_line(tmp_path):
    html = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        html = False
    failures = []
    for n in range(CASES):
        rng = random.Random(f"compare-dir:{n}")
        directory = tmp_path / str(n)
        outcome = run_isolated(lambda: compare_directory(rng, directory, html and n % 4 == 0), 60)
        problem = (
            outcome[1]
            if outcome[0] == "ok"
            else (
                f"{outcome[1]}: {outcome[2][:300]!r} at {outcome[3]}"
                if outcome[0] == "raised"
                else f"{outcome[0]}: {outcome[1]}"
            )
        )
        if problem:
            failures.append(f"[compare-dir:{n}]: {problem}")
    report(failures, "compare directory", CASES)


def test_an_intact_run_is_read_as_done(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "report.json").write_text(json.dumps(GOOD))
    (tmp_path / "lora" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    result = compare.run_method(None, "lora", tmp_path, lambda *a: None)
    assert result.status == "done" and result.losses == [(1, 2.0), (2, 1.0)]
    assert compare.rows([result], None)[0]["metric_after"] == pytest.approx(0.8)
