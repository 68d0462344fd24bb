"""Seeded fuzzing of the data sources beside text files: Parquet files whose columns hold other types
than lorakit's roles take, and directories written by `save_to_disk` with damaged files.

The contract (as tests/test_fuzz.py, whose machinery this reuses): the records with their roles and a
checked layout, every text role a string, or a `LorakitError` of one line; never a traceback, a crash
or a hang (each case runs in a forked child under a time limit).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorakit.errors import LorakitError
from lorakit.train import data
from test_fuzz import mutate_bytes, one_line, report, run_isolated

CASES = 16  # per family: datasets takes about a second a file
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

LAYOUTS = {
    "classify": ("text", "label"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
}


def column_values(rng: random.Random, n: int) -> Any:
    """n values of one column, of a type chosen at random (the wrong ones on purpose)."""
    kind = rng.choice(
        [
            "str",
            "str",
            "int",
            "float",
            "bool",
            "null",
            "list",
            "struct",
            "binary",
            "mixed-null",
            "timestamp",
            "nan",
            "large-str",
            "dictionary",
        ]
    )
    if kind == "str":
        return pa.array([rng.choice(["good", "bad", "a b c", "", " ", "é✓", "x" * 50]) for _ in range(n)])
    if kind == "large-str":
        return pa.array([f"text {i}" for i in range(n)], type=pa.large_string())
    if kind == "int":
        return pa.array([rng.randint(-3, 3) for _ in range(n)])
    if kind == "float":
        return pa.array([rng.random() for _ in range(n)])
    if kind == "nan":
        return pa.array([float("nan")] * n)
    if kind == "bool":
        return pa.array([rng.random() < 0.5 for _ in range(n)])
    if kind == "null":
        return pa.nulls(n)
    if kind == "mixed-null":
        return pa.array([None if i % 2 else "fine" for i in range(n)])
    if kind == "list":
        return pa.array([[rng.randint(0, 3)] * rng.randint(0, 2) for _ in range(n)])
    if kind == "struct":
        return pa.array([{"role": "user", "content": "hi"} for _ in range(n)])
    if kind == "binary":
        return pa.array([bytes([rng.randrange(256)]) * 3 for _ in range(n)], type=pa.binary())
    if kind == "dictionary":
        return pa.array(["pos", "neg"] * (n // 2) + ["pos"] * (n % 2)).dictionary_encode()
    return pa.array([0] * n, type=pa.timestamp("s"))


def check_records(records: list) -> str | None:
    for record in records:
        for role, value in record.data.items():
            if role in (
                "text",
                "text_pair",
                "prompt",
                "completion",
                "instruction",
                "input",
                "output",
            ) and not isinstance(value, str):
                return f"{record.source}: role {role} holds {type(value).__name__}"
    return None


def read(path: Path, task: str) -> str | None:
    """Read `path` as a run would; None when the outcome keeps the contract, else what broke it."""
    try:
        records, _ = data.map_columns(data.read_table(path), {}, task, str(path))
        data.check_records(records, str(path))
        if task == "classify":
            data.label_names(records)
    except LorakitError as err:
        return None if one_line(str(err)) else f"error of several lines: {str(err)[:200]!r}"
    return check_records(records)


def outcome_problem(result: tuple) -> str | None:
    if result[0] == "ok":
        return result[1]
    if result[0] == "raised":
        return f"{result[1]}: {result[2][:200]!r} at {result[3]}"
    return f"{result[0]}: {result[1]}"


def test_parquet_files_with_wrong_types(tmp_path):
    failures = []
    for n in range(CASES):
        rng = random.Random(f"parquet:{n}")
        layout = rng.choice(list(LAYOUTS))
        rows = rng.randint(1, 6)
        columns = {name: column_values(rng, rows) for name in LAYOUTS[layout] if rng.random() < 0.9}
        if rng.random() < 0.3:
            columns[rng.choice(["extra", "label", "text", "messages"])] = column_values(rng, rows)
        if not columns:
            columns["other"] = column_values(rng, rows)
        path = tmp_path / f"{n}.parquet"
        pq.write_table(pa.table(columns), path)
        task = "classify" if layout == "classify" else "causal-lm"
        problem = outcome_problem(run_isolated(lambda: read(path, task), 60))
        if problem:
            types = {k: str(v.type) for k, v in columns.items()}
            failures.append(f"[parquet:{n}] {types}: {problem}")
    report(failures, "Parquet", CASES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    rows = {"text": ["good", "bad", "fine", "ugly"] * 3, "label": ["1", "0", "1", "0"] * 3}
    single, split = root / "single", root / "dict"
    datasets.Dataset.from_dict(rows).save_to_disk(single)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(split)
    return {"single": single, "dict": split}


def damage(rng: random.Random, directory: Path) -> list[str]:
    """A few damages to a saved dataset directory: its JSON files, its Arrow files, missing files."""
    done = []
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for _ in range(rng.randint(1, 3)):
        target = rng.choice(files)
        kind = rng.choice(["bytes", "bytes", "json-value", "remove", "empty", "swap"])
        if not target.exists():
            continue
        if kind == "remove":
            target.unlink()
        elif kind == "empty":
            target.write_bytes(b"")
        elif kind == "swap":
            other = rng.choice(files)
            if other.exists() and other != target:
                shutil.copyfile(other, target)
        elif kind == "json-value" and target.suffix == ".json":
            try:
                value = json.loads(target.read_text())
            except ValueError:
                value = {}
            key = rng.choice(list(value) or ["splits"]) if isinstance(value, dict) else "splits"
            replacement = rng.choice([None, 5, "train", [], [1], ["train", "train"], {"a": 1}, "../x", 1e308, [[[]]]])
            value = {**value, key: replacement} if isinstance(value, dict) else replacement
            target.write_text(json.dumps(value))
        else:
            raw, how = mutate_bytes(rng, target.read_bytes())
            target.write_bytes(raw)
            kind = f"bytes:{how}"
        done.append(f"{target.relative_to(directory)}:{kind}")
    return done


def test_damaged_save_to_disk_directories(tmp_path, saved):
    failures = []
    for n in range(CASES):
        rng = random.Random(f"saved:{n}")
        which = rng.choice(["single", "dict"])
        directory = tmp_path / f"{n}"
        shutil.copytree(saved[which], directory)
        done = damage(rng, directory)
        problem = outcome_problem(run_isolated(lambda: read(directory, "classify"), 60))
        if problem:
            failures.append(f"[saved:{n}] {which} {done}: {problem}")
    report(failures, "saved-dataset", CASES)
