"""kill -9 at random moments of `train`, `export`, `merge`, `inspect` and `compare`, seeded.

For each command: one run to the end gives the reference output; then a chain of runs, each killed
(SIGKILL, the command's own process only: a child must end with it) after a random delay drawn from
`random.Random(seed)` over the reference run's length, each starting from what the one before left;
then a last run to the end. After every kill, what the user had before is whole (the earlier file,
or the complete new one: never half of either) and no process of the command is left running; after
the last run, the work is done as the reference did it and no temporary file is left anywhere.

Also seeded `--nproc` settings, each with bad settings beside it: refused in one line before any
process starts.

Marked `fuzz` (they start some thirty processes): `pytest -m 'not fuzz'` skips them; the default run
(CI) runs them. A failure names the command, the seed and the delays, which replay it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorakit import files
from lorakit.train import checkpoint as ckpt
from small_disk import snapshot
from tiny_lm import save_tiny_llama, write_jsonl

pytestmark = pytest.mark.fuzz
KILLS = 3  # killed runs per command, chained
SEEDS = {"train": 11, "export": 12, "merge": 13, "inspect": 14, "compare": 15}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = save_tiny_llama(root / "model")
    data = write_jsonl(root / "pc.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i} {i + 1}"} for i in range(24)])
    run_flags = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
        "--lr",
        "1e-2",
        "--no-progress",
    ]
    done = lorakit_run(["train", *run_flags, "--out-dir", str(root / "runs"), "--name", "a"])
    assert done.returncode == 0, done.stderr[-3000:]
    return root, run_flags, root / "runs" / "a"


def lorakit_run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, timeout=600)


def timed_run(argv: list[str]) -> float:
    started = time.monotonic()
    done = lorakit_run(argv)
    assert done.returncode == 0, (argv, done.stderr[-3000:])
    return time.monotonic() - started


def descendants(pid: int) -> list[int]:
    """Every process started (directly or not) by `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_after(argv: list[str], delay: float) -> str:
    """Start `argv`, SIGKILL its own process after `delay` s (unless it ended first); wait until every
    process it started has ended too. Returns how it ended."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lorakit", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + delay
    family: set[int] = set()
    while time.monotonic() < deadline and process.poll() is None:
        family.update(descendants(process.pid))
        time.sleep(0.05)
    if process.poll() is not None:
        stderr = process.stderr.read().decode(errors="replace")
        assert process.returncode == 0, stderr[-3000:]
        return "finished"
    family.update(descendants(process.pid))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    give_up = time.monotonic() + 30
    while any(running(pid) for pid in family):
        assert time.monotonic() < give_up, f"processes {[p for p in family if running(p)]} outlived the killed command"
        time.sleep(0.1)
    return "killed"


def temporaries(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if files.is_temporary(p) or p.name.startswith(".tmp-") or p.name.endswith(".tmp")
    )


def chain(
    command: str, argv: Callable[[], list[str]], reference_seconds: float, check: Callable[[], None], area: Path
) -> list[float]:
    """KILLS runs killed at random moments, each checked; returns the delays (for the message)."""
    rng = random.Random(SEEDS[command])
    delays = []
    for _ in range(KILLS):
        delays.append(round(rng.uniform(0.35, 1.05) * reference_seconds, 2))  # the first third: mostly imports
        outcome = kill_after(argv(), delays[-1])
        try:
            check()
        except AssertionError as err:
            raise AssertionError(f"{command}, seed {SEEDS[command]}, delays {delays} ({outcome}): {err}") from None
    return delays


def test_train_killed_at_random_resumes_to_the_uninterrupted_result(world, tmp_path):
    root, flags, reference = world
    run = tmp_path / "run"
    (tmp_path / "notes.txt").write_text("the user's notes")
    seconds = timed_run(["train", *flags, "--out-dir", str(tmp_path), "--name", "timing"])

    def argv() -> list[str]:  # what a user would type next: resume once a checkpoint exists, else start again
        if ckpt.list_checkpoints(run / "checkpoints"):
            return ["train", "--resume", str(run), "--no-progress"]
        return ["train", *flags, "--out-dir", str(tmp_path), "--name", "run", "--overwrite"]

    def check() -> None:
        assert (tmp_path / "notes.txt").read_text() == "the user's notes"
        for found in ckpt.list_checkpoints(run / "checkpoints"):
            assert ckpt.is_finite(found) and json.loads((found / "state.json").read_text())["step"] > 0
        if (run / "config.yaml").exists():
            assert "method: lora" in (run / "config.yaml").read_text()  # never empty or torn
        if (run / "adapter").exists():
            assert (run / "adapter" / "adapter_model.safetensors").is_file() and (
                run / "adapter" / "lorakit.json"
            ).is_file()

    delays = chain("train", argv, seconds, check, tmp_path)
    if not (run / "report.json").is_file():
        done = lorakit_run(argv())
        assert done.returncode == 0, (delays, done.stderr[-3000:])
    assert snapshot(run / "adapter") == snapshot(reference / "adapter"), delays  # bit for bit
    mine, theirs = json.loads((run / "report.json").read_text()), json.loads((reference / "report.json").read_text())
    assert mine["final_loss"] == pytest.approx(theirs["final_loss"], abs=1e-6), delays
    assert temporaries(tmp_path) == [], delays


def test_export_killed_at_random_keeps_the_earlier_file_or_writes_the_whole_new_one(world, tmp_path):
    _, _, run = world
    out = tmp_path / "a.gguf"
    seconds = timed_run(["export", "--adapter", str(run), "--out", str(tmp_path / "reference.gguf")])
    new = (tmp_path / "reference.gguf").read_bytes()
    out.write_bytes(b"the earlier export")
    argv = ["export", "--adapter", str(run), "--out", str(out), "--overwrite"]

    def check() -> None:
        assert out.read_bytes() in (b"the earlier export", new)

    delays = chain("export", lambda: argv, seconds, check, tmp_path)
    assert lorakit_run(argv).returncode == 0
    assert out.read_bytes() == new and temporaries(tmp_path) == [], delays


def test_merge_killed_at_random_keeps_the_earlier_model_or_writes_the_whole_new_one(world, tmp_path):
    root, _, run = world
    out = tmp_path / "merged"
    seconds = timed_run(["merge", "--adapter", str(run), "--out", str(tmp_path / "reference")])
    new = snapshot(tmp_path / "reference")
    shutil.copytree(root / "model", out)  # an earlier model directory
    old = snapshot(out)
    argv = ["merge", "--adapter", str(run), "--out", str(out), "--overwrite"]

    def check() -> None:
        assert snapshot(out) in (old, new)

    delays = chain("merge", lambda: argv, seconds, check, tmp_path)
    assert lorakit_run(argv).returncode == 0
    assert snapshot(out) == new and temporaries(tmp_path) == [], delays


def test_inspect_killed_at_random_keeps_the_earlier_files_or_writes_whole_new_ones(world, tmp_path):
    _, _, run = world
    seconds = timed_run(["inspect", str(run), "--json", str(tmp_path / "reference.json"), "--no-html"])
    new = (tmp_path / "reference.json").read_text()
    out = tmp_path / "all.json"
    out.write_text("the earlier numbers")
    argv = ["inspect", str(run), "--json", str(out), "--no-html", "--overwrite"]

    def check() -> None:
        assert out.read_text() in ("the earlier numbers", new)

    delays = chain("inspect", lambda: argv, seconds, check, tmp_path)
    assert lorakit_run(argv).returncode == 0
    assert out.read_text() == new and temporaries(tmp_path) == [], delays


def test_compare_killed_at_random_leaves_no_orphan_and_a_rerun_finishes(world, tmp_path):
    root, flags, reference = world
    argv = ["compare", "--methods", "lora,dora", *flags, "--out-dir", str(tmp_path), "--no-html", "--name", "cmp"]
    seconds = timed_run([*argv[:-1], "timing"])
    directory = tmp_path / "cmp"

    def check() -> None:  # every run directory consistent; the comparison's files whole where present
        for method in ("lora", "dora"):
            for found in ckpt.list_checkpoints(directory / method / "checkpoints"):
                assert ckpt.is_finite(found)
        if (directory / "compare.json").exists():
            json.loads((directory / "compare.json").read_text())

    delays = chain("compare", lambda: argv, seconds, check, tmp_path)
    done = lorakit_run(argv)
    assert done.returncode == 0, (delays, done.stderr[-3000:])
    records = {r["method"]: r for r in json.loads((directory / "compare.json").read_text())["methods"]}
    assert records["lora"]["status"] == records["dora"]["status"] == "done", delays
    lora = json.loads((reference / "report.json").read_text())
    assert records["lora"]["final_loss"] == pytest.approx(lora["final_loss"], abs=1e-6), (
        delays
    )  # the same run, resumed exactly
    assert temporaries(tmp_path) == [], delays


NPROC_VALUES = ["0", "-1", "abc", "2.5", "", "1e3", str(10**6), "9" * 30, "2", "2", "2"]


def test_nproc_settings_at_random_are_one_line_before_any_process_starts(world, tmp_path, capsys, monkeypatch):
    """Seeded `--nproc` values, each with one or two bad settings (a valid --nproc always with one): the
    launcher refuses in one line, exit 2, without starting a process or writing anything."""
    import torch

    from lorakit import cli
    from lorakit.train import launch

    root, run_flags, run = world
    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail(f"processes started for {a}"))
    bad = [
        ["--data", str(tmp_path / "missing.jsonl")],
        ["--model", str(tmp_path / "no-model")],
        ["--lr", "inf"],
        ["--r", "0"],
        ["--method", "nosuch"],
        ["--resume", str(run)],
        ["--name", "a/b"],
        ["--steps", "-1"],
        ["--batch-size", "0"],
        ["--out-dir", str(root / "pc.jsonl")],
        ["--checkpoint-every", "x"],
    ]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    rng = random.Random(16)
    out = tmp_path / "out"
    out.mkdir()
    for trial in range(40):
        value = rng.choice(NPROC_VALUES)
        extras = rng.sample(bad, rng.randint(1, 2) if value == "2" else rng.randint(0, 2))
        if value == "2" and not extras:
            continue
        argv = [
            "train",
            *run_flags,
            "--out-dir",
            str(out),
            "--name",
            f"t{trial}",
            "--nproc",
            value,
            *[flag for extra in extras for flag in extra],
        ]
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        where = f"seed 16, trial {trial}: {argv[len(run_flags) + 1 :]}"
        assert code == 2, (where, code, err)
        assert len(err) == 1 and err[0].startswith("error: "), (where, err)
        assert list(out.iterdir()) == [], (where, list(out.iterdir()))
