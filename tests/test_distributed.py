"""Training on several processes (torch.distributed, DDP over gloo on CPU), started by the test
through torchrun as a user would: the same adapter as one process with the same global batch,
an exact resume after a process is killed, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import save_tiny_llama, write_jsonl

from lorakit.train import LorakitError, train
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed

WORDS = "apple river stone cloud tiger green lamp piano honey fox dog movie".split()
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this PyTorch build has no torch.distributed gloo backend")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def pc_data(tmp_path_factory):
    # completions of different lengths: the loss must be the mean over the global batch's tokens
    records = [{"prompt": f"Reverse: {WORDS[i % 12]} {WORDS[(i * 5) % 12]}\nAnswer:",
                "completion": " " + " ".join([WORDS[(i * 5) % 12], WORDS[i % 12]] * (1 + i % 3))} for i in range(40)]
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "pc.jsonl", records))


METHOD_FLAGS = {
    "lora": [],
    "dora": [],
    "delta-lora": ["--method-arg", "start_step=1"],
    "adalora": ["--method-arg", "init_r=4", "--method-arg", "target_r=2", "--method-arg", "tfinal=1"],
}


def common_flags(tiny_model, pc_data, out_dir, method) -> list[str]:
    return ["--model", tiny_model, "--data", pc_data, "--out-dir", str(out_dir), "--method", method, "--steps", "6",
            "--lr", "1e-2", "--warmup-steps", "2", "--grad-accum", "2", "--checkpoint-every", "2", "--no-progress",
            *(["--dropout", "0"] if method != "adalora" else []), *METHOD_FLAGS[method]]


def torchrun(args: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`lorakit train --nproc 2 ...`: lorakit starts torchrun, torchrun starts the processes."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorakit", "train", "--nproc", "2", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_two_processes_train_the_same_adapter_as_one_with_the_same_global_batch(method, tiny_model, pc_data, tmp_path):
    two = torchrun(common_flags(tiny_model, pc_data, tmp_path, method) + ["--batch-size", "2", "--name", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    from lorakit.cli import build_parser, resolve_train_config

    args = build_parser().parse_args(["train", *common_flags(tiny_model, pc_data, tmp_path, method), "--batch-size", "4", "--name", "one"])
    one = train(resolve_train_config(args), echo=lambda *_: None)
    mine, reference = adapter(tmp_path / "two"), adapter(one.run_dir)
    assert mine.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(mine[key], reference[key], atol=2e-5, rtol=1e-4), (key, (mine[key] - reference[key]).abs().max())
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in reference.values())  # it trained
    import json

    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["processes"] == 2
    assert report.get("adapter_layout") == json.loads((one.run_dir / "report.json").read_text()).get("adapter_layout")
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))  # one writer: the main process


SITECUSTOMIZE = """
import os, signal
if os.environ.get("LORAKIT_TEST_KILL_STEP"):
    from lorakit.train import loop
    _original = loop.accumulate_gradients

    def _killing(run, step):
        if run.strategy.rank == 1 and step == int(os.environ["LORAKIT_TEST_KILL_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _original(run, step)

    loop.accumulate_gradients = _killing
"""


def test_a_killed_process_stops_the_run_and_resume_continues_it_exactly(tiny_model, pc_data, tmp_path, capsys):
    flags = common_flags(tiny_model, pc_data, tmp_path, "lora") + ["--batch-size", "2", "--dropout", "0.1"]
    whole = torchrun(flags + ["--name", "whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    started = time.monotonic()
    killed = torchrun(flags + ["--name", "cut"], env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]),
                                                           "LORAKIT_TEST_KILL_STEP": "5"})
    assert killed.returncode != 0 and time.monotonic() - started < 200  # the other process did not hang
    cut = tmp_path / "cut"
    assert not (cut / "adapter").exists()
    assert [p.name for p in ckpt.list_checkpoints(cut / "checkpoints")] == ["step-000002", "step-000004"]

    resumed = torchrun(["--resume", str(cut), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mine, reference = adapter(cut), adapter(tmp_path / "whole")
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key

    # the run was written by 2 processes: one process cannot continue its random streams
    from lorakit import cli

    code = cli.main(["train", "--resume", str(ckpt.list_checkpoints(cut / "checkpoints")[0]), "--no-progress"])
    assert code == 2 and "written by a run on 2 process(es); resume it on the same number" in capsys.readouterr().err


def test_clear_errors_without_torchrun_or_backend(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LorakitError, match=r"needs torchrun's environment .*torchrun --nproc_per_node N -m lorakit train"):
        distributed.DataParallel()
    assert isinstance(distributed.strategy_for(), distributed.SingleProcess)
    if not torch.distributed.is_nccl_available():
        env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(LorakitError, match="the nccl backend is not available in this PyTorch build; available: gloo"):
            distributed.DataParallel(backend="nccl")


def test_shards_split_each_global_micro_batch_in_rank_order():
    class Fake(distributed.DataParallel):
        def __init__(self, rank, world_size):
            self.rank, self.world_size = rank, world_size

    batch = list(range(8))
    assert [Fake(r, 2).shard(batch) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(LorakitError, match="cannot be split over 4 processes"):
        Fake(0, 4).shard([1, 2, 3])


def test_lora_drop_plan_is_decided_once_and_shared(tiny_model, pc_data, tmp_path):
    """LoRA-drop's probe runs on the main process; the others take its sharing plan (a process that
    kept its own plan would hold other parameters, and DDP would refuse to start)."""
    flags = ["--model", tiny_model, "--data", pc_data, "--out-dir", str(tmp_path), "--name", "drop", "--method", "lora-drop",
             "--method-arg", "threshold=0.5", "--method-arg", "probe_steps=2", "--steps", "2", "--batch-size", "2",
             "--no-progress"]
    done = torchrun(flags)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "drop" / "report.json").read_text())
    assert report["processes"] == 2 and report["adapter_layout"]
