"""A run's life beyond one clean process: finished by a resume, resumed from damaged checkpoint files,
one process at a time in a run directory, children that end with their parent, and `--nproc` runs
that fail in one line and stay on the loopback interface."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lorakit import cli
from lorakit.train import TrainConfig, train
from lorakit.train import checkpoint as ckpt
from tiny_lm import save_tiny_llama, write_jsonl

SLOW_STEPS = """
import os, time
if os.environ.get("LORAKIT_TEST_STEP_SECONDS"):
    from lorakit.train import loop
    _original = loop.accumulate_gradients

    def _slow(run, step):
        time.sleep(float(os.environ["LORAKIT_TEST_STEP_SECONDS"]))
        return _original(run, step)

    loop.accumulate_gradients = _slow
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    model = save_tiny_llama(root / "model")
    data = write_jsonl(root / "pc.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i} {i + 1}"} for i in range(24)])
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(textwrap.dedent(SLOW_STEPS))
    return root, str(model), str(data)


def config(world, out_dir: Path, **overrides) -> TrainConfig:
    _, model, data = world
    base = dict(
        model=model,
        data=data,
        out_dir=str(out_dir),
        name="run",
        steps=4,
        batch_size=4,
        lr=1e-2,
        checkpoint_every=2,
        progress=False,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4."""
    return train(config(world, tmp_path_factory.mktemp("finished")), echo=lambda *_: None).run_dir


def cut_after_last_checkpoint(run: Path, to: Path) -> Path:
    """A copy of `run` as a kill after its last checkpoint leaves it: no adapter/, no report."""
    shutil.copytree(
        run,
        to,
        ignore=lambda d, names: [n for n in names if Path(d) == run and n in ("adapter", "report.json", "report.txt")],
    )
    return to


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert sum(line.startswith("error: ") for line in lines) == 1, captured.err
    return lines[-1]


def test_a_run_finished_by_resume_reports_the_checkpoints_final_loss(world, finished, tmp_path):
    expected = json.loads((finished / "report.json").read_text())["final_loss"]
    cut = cut_after_last_checkpoint(finished, tmp_path / "cut")
    result = train(config(world, tmp_path, resume=str(cut)), echo=lambda *_: None)
    assert result.final_loss == pytest.approx(expected, abs=1e-6)
    assert json.loads((cut / "report.json").read_text())["final_loss"] == pytest.approx(expected, abs=1e-6)
    assert "nan" not in (cut / "report.txt").read_text()
    # a checkpoint from before the loss was kept in it: the metrics log has the step's loss
    older = cut_after_last_checkpoint(finished, tmp_path / "older")
    state_file = ckpt.list_checkpoints(older / "checkpoints")[-1] / "state.json"
    state = json.loads(state_file.read_text())
    del state["loss"]
    state_file.write_text(json.dumps(state))
    assert train(config(world, tmp_path, resume=str(older)), echo=lambda *_: None).final_loss == pytest.approx(
        expected, abs=1e-5
    )


def _weights_only_refuses(path: Path) -> None:
    path.write_bytes(pickle.dumps({"optimizer": Path("/etc/passwd"), "scheduler": {}}))  # an object, not tensors


DAMAGE = {
    "optimizer.pt truncated": ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])),
    "optimizer.pt refused unread": ("optimizer.pt", _weights_only_refuses),
    "optimizer.pt of another run": (
        "optimizer.pt",
        lambda p: torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}, p),
    ),
    "optimizer.pt missing": ("optimizer.pt", lambda p: p.unlink()),
    "rng.safetensors truncated": ("rng.safetensors", lambda p: p.write_bytes(p.read_bytes()[:40])),
    "rng.safetensors of the wrong kind": (
        "rng.safetensors",
        lambda p: __import__("safetensors.torch").torch.save_file({"torch": torch.zeros(3)}, str(p)),
    ),
    "hooks.pt truncated": ("hooks.pt", lambda p: p.write_bytes(p.read_bytes()[:10])),
    "state.json step a string": (
        "state.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "4"})),
    ),
    "state.json before a list": (
        "state.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "before": [1]})),
    ),
    "state.json not JSON": ("state.json", lambda p: p.write_text('{"step": 4,')),
    "state.json a list": ("state.json", lambda p: p.write_text("[4]")),
    "adapter_state truncated": ("adapter_state.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "adapter weights truncated": ("adapter/adapter_model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "adapter config damaged": ("adapter/lorakit.json", lambda p: p.write_text("{")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_file_is_named_and_the_one_before_offered(damage, world, finished, tmp_path, capsys):
    name, spoil = DAMAGE[damage]
    cut = cut_after_last_checkpoint(finished, tmp_path / "cut")
    newest, previous = ckpt.list_checkpoints(cut / "checkpoints")[-1], ckpt.list_checkpoints(cut / "checkpoints")[0]
    spoil(newest / name)
    assert cli.main(["train", "--resume", str(cut), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert f"{newest / name.split('/')[0]}" in line and "is damaged" in line, line
    assert f"lorakit train --resume {previous}" in line, line
    # the offer works: from the checkpoint before it, the run ends where the undamaged one did
    assert cli.main(["train", "--resume", str(previous), "--no-progress"]) == 0
    capsys.readouterr()
    reference = json.loads((finished / "report.json").read_text())
    assert json.loads((cut / "report.json").read_text())["final_loss"] == pytest.approx(
        reference["final_loss"], abs=1e-6
    )
    assert ckpt.find_checkpoint(cut) == newest  # replaced by a good one
    assert json.loads((newest / "state.json").read_text())["step"] == 4


def test_without_an_earlier_checkpoint_the_message_says_start_again(world, tmp_path, capsys):
    run = train(config(world, tmp_path, steps=2, checkpoint_every=0), echo=lambda *_: None).run_dir
    only = ckpt.list_checkpoints(run / "checkpoints")[-1]
    (only / "optimizer.pt").write_bytes(b"PK\x03\x04 not really")
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "no earlier checkpoint is left: start the run again with --overwrite" in one_error_line(capsys)


def slow_train(
    world, out_dir: Path, name: str, seconds: float = 0.4, steps: int = 400, extra: tuple = ()
) -> subprocess.Popen:
    root, model, data = world
    env = {
        **os.environ,
        "LORAKIT_TEST_STEP_SECONDS": str(seconds),
        "PYTHONPATH": os.pathsep.join([str(root / "hook"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            "--model",
            model,
            "--data",
            data,
            "--steps",
            str(steps),
            "--batch-size",
            "4",
            "--checkpoint-every",
            "2",
            "--out-dir",
            str(out_dir),
            "--name",
            name,
            "--no-progress",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for(condition, seconds: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.2)


def lock_holder(directory: Path) -> int | None:
    text = (directory / ".lock").read_text().strip() if (directory / ".lock").is_file() else ""
    return int(text) if text.isdigit() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_one_process_at_a_time_trains_in_a_run_directory(world, tmp_path, capsys):
    first = slow_train(world, tmp_path, "busy")
    try:
        run = tmp_path / "busy"
        wait_for(lambda: ckpt.list_checkpoints(run / "checkpoints"), what="the first checkpoint")
        holder = lock_holder(run)
        assert holder == first.pid
        # a resume of the same run, and a new run of the same name, are refused while it trains
        assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
        assert f"{run} is being trained by process {first.pid}" in one_error_line(capsys)
        _, model, data = world
        assert (
            cli.main(
                [
                    "train",
                    "--model",
                    model,
                    "--data",
                    data,
                    "--out-dir",
                    str(tmp_path),
                    "--name",
                    "busy",
                    "--overwrite",
                    "--no-progress",
                ]
            )
            == 2
        )
        assert f"is being trained by process {first.pid}" in one_error_line(capsys)
        assert first.poll() is None  # and the first run trains on
    finally:
        first.kill()
        first.wait()
    from lorakit.files import DirectoryLock

    DirectoryLock.check(tmp_path / "busy")  # once it is gone, the lock goes with it


def test_killing_compare_stops_its_training_child_and_a_rerun_finishes(world, tmp_path):
    root, model, data = world
    argv = [
        sys.executable,
        "-m",
        "lorakit",
        "compare",
        "--methods",
        "lora",
        "--model",
        model,
        "--data",
        data,
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
        "--out-dir",
        str(tmp_path),
        "--name",
        "cmp",
        "--no-progress",
        "--no-html",
    ]
    env = {
        **os.environ,
        "LORAKIT_TEST_STEP_SECONDS": "1.5",
        "PYTHONPATH": os.pathsep.join([str(root / "hook"), os.environ.get("PYTHONPATH", "")]),
    }
    parent = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    run = tmp_path / "cmp" / "lora"
    try:
        wait_for(lambda: ckpt.list_checkpoints(run / "checkpoints"), what="the child's first checkpoint")
        child = lock_holder(run)
        assert child is not None and child != parent.pid and alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not alive(child), seconds=20, what="the orphaned child to end")
    finally:
        parent.kill()
        parent.wait()
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "lora: resuming" in rerun.stderr
    records = json.loads((tmp_path / "cmp" / "compare.json").read_text())["methods"]
    assert records[0]["status"] == "done" and records[0]["final_loss"] == records[0]["final_loss"]  # not NaN
    assert not [p for p in (tmp_path / "cmp").rglob("*") if ".tmp" in p.name]


def nproc(args: list[str], timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--nproc", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def test_nproc_with_a_bad_setting_is_one_line(world, tmp_path):
    _, model, data = world
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    for flags, words in (
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--model", str(tmp_path / "no-model")], "does not exist"),
        (["--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:2"),
    ):  # found by the processes themselves
        if "cuda" in flags and torch.cuda.is_available():
            continue
        done = nproc(
            ["--model", model, "--data", data, "--steps", "1", "--out-dir", str(tmp_path), "--no-progress", *flags]
        )
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1 and words in errors[0], done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr and "[process" not in errors[0]


def test_killing_the_nproc_launcher_stops_its_processes(world, tmp_path):
    root, model, data = world
    env = {
        **os.environ,
        "LORAKIT_TEST_STEP_SECONDS": "0.5",
        "PYTHONPATH": os.pathsep.join([str(root / "hook"), os.environ.get("PYTHONPATH", "")]),
    }
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            "--nproc",
            "2",
            "--model",
            model,
            "--data",
            data,
            "--steps",
            "400",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "2",
            "--out-dir",
            str(tmp_path),
            "--name",
            "ddp",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: ckpt.list_checkpoints(tmp_path / "ddp" / "checkpoints"), seconds=180, what="the first checkpoint"
        )
        ranks = [
            int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == launcher.pid
        ]
        assert len(ranks) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        wait_for(lambda: not any(alive(pid) for pid in ranks), seconds=20, what="both processes to end")
    finally:
        launcher.kill()
        launcher.wait()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_nproc_asks_no_name_server(world, tmp_path):
    """Every connection of a 2-process run is to 127.0.0.1 (or a local socket): none to a name server
    (port 53), and no reverse lookup (in-addr.arpa) leaves the machine."""
    _, model, data = world
    trace = tmp_path / "trace.txt"
    done = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=connect,sendto,sendmsg,sendmmsg",
            "-s",
            "64",
            "-o",
            str(trace),
            sys.executable,
            "-m",
            "lorakit",
            "train",
            "--nproc",
            "2",
            "--model",
            model,
            "--data",
            data,
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out-dir",
            str(tmp_path),
            "--name",
            "ddp",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-3000:]
    text = trace.read_text()
    assert "htons(53)" not in text and "in-addr" not in text and "ip6.arpa" not in text
    addresses = set(re.findall(r'inet_addr\("([\d.]+)"\)', text)) | set(
        re.findall(r'inet_pton\(AF_INET6, "([^"]+)"', text)
    )
    assert addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "0.0.0.0", "::1", "::"}, addresses


def test_a_run_finished_by_resume_writes_the_adapter_files_of_an_uninterrupted_run(world, finished, tmp_path):
    """Its lorakit.json keeps the run's own target selection (`all-linear`, not the list of modules it chose)."""
    from small_disk import snapshot

    cut = cut_after_last_checkpoint(finished, tmp_path / "cut")
    train(config(world, tmp_path, resume=str(cut)), echo=lambda *_: None)
    assert json.loads((cut / "adapter" / "lorakit.json").read_text())["config"]["targets"] == "all-linear"
    assert snapshot(cut / "adapter") == snapshot(finished / "adapter")
