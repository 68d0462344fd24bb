"""Training on several processes (torch.distributed over gloo on CPU, DDP and FSDP2), started by the
test through torchrun as a user would: the same adapter as one process with the same global batch,
an exact resume after a process is killed, and clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit import base_layers, inject, io
from lorakit.train import LorakitError, distributed, train
from lorakit.train import checkpoint as ckpt
from tiny_lm import save_tiny_llama, write_jsonl

WORDS = "apple river stone cloud tiger green lamp piano honey fox dog movie".split()
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this PyTorch build has no torch.distributed gloo backend",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def pc_data(tmp_path_factory):
    # completions of different lengths: the loss must be the mean over the global batch's tokens
    records = [
        {
            "prompt": f"Reverse: {WORDS[i % 12]} {WORDS[(i * 5) % 12]}\nAnswer:",
            "completion": " " + " ".join([WORDS[(i * 5) % 12], WORDS[i % 12]] * (1 + i % 3)),
        }
        for i in range(40)
    ]
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "pc.jsonl", records))


METHOD_FLAGS = {
    "lora": [],
    "dora": [],
    "delta-lora": ["--method-arg", "start_step=1"],
    "adalora": ["--method-arg", "init_r=4", "--method-arg", "target_r=2", "--method-arg", "tfinal=1"],
    "qlora": ["--r", "4"],  # LoRA over an NF4 base: FSDP shards the packed 4-bit storage
}
DDP_METHODS = ("adalora", "delta-lora", "dora", "lora")


def common_flags(tiny_model, pc_data, out_dir, method) -> list[str]:
    return [
        "--model",
        tiny_model,
        "--data",
        pc_data,
        "--out-dir",
        str(out_dir),
        "--method",
        method,
        "--steps",
        "6",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--grad-accum",
        "2",
        "--checkpoint-every",
        "2",
        "--no-progress",
        *(["--dropout", "0"] if method != "adalora" else []),
        *METHOD_FLAGS[method],
    ]


def torchrun(args: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`lorakit train --nproc 2 ...`: lorakit starts the processes (`lorakit.train.launch`)."""
    full_env = {**os.environ, **(env or {})}
    if env and "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):  # added to, not replacing, the caller's path
        full_env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--nproc", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tiny_model, pc_data, tmp_path_factory):
    """method -> the run directory of one process with the global batch (4), trained once per module."""
    from lorakit.cli import build_parser, resolve_train_config

    out, done = tmp_path_factory.mktemp("one"), {}

    def run(method: str):
        if method not in done:
            args = build_parser().parse_args(
                ["train", *common_flags(tiny_model, pc_data, out, method), "--batch-size", "4", "--name", method]
            )
            done[method] = train(resolve_train_config(args), echo=lambda *_: None).run_dir
        return done[method]

    return run


def assert_same_run(two_dir, one_dir) -> None:
    """The multi-process run's adapter equals one process's (float tolerance), it trained, its
    decided layout is the same, and only the main process logged."""
    mine, reference = adapter(two_dir), adapter(one_dir)
    assert mine.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(mine[key], reference[key], atol=2e-5, rtol=1e-4), (
            key,
            (mine[key] - reference[key]).abs().max(),
        )
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in reference.values())  # it trained
    report, own = json.loads((two_dir / "report.json").read_text()), json.loads((one_dir / "report.json").read_text())
    assert report["processes"] == 2
    assert (report["trainable_params"], report["total_params"]) == (own["trainable_params"], own["total_params"])
    assert report.get("adapter_layout") == json.loads((one_dir / "report.json").read_text()).get("adapter_layout")
    metrics = [json.loads(line) for line in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))  # one writer: the main process


@pytest.mark.distributed
@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_processes_train_the_same_adapter_as_one_with_the_same_global_batch(
    method, tiny_model, pc_data, tmp_path, one_process
):
    two = torchrun(common_flags(tiny_model, pc_data, tmp_path, method) + ["--batch-size", "2", "--name", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_run(tmp_path / "two", one_process(method))
    assert json.loads((tmp_path / "two" / "report.json").read_text())["distributed"] == "ddp"


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


@pytest.mark.distributed
def test_a_killed_process_stops_the_run_and_resume_continues_it_exactly(tiny_model, pc_data, tmp_path, capsys):
    flags = common_flags(tiny_model, pc_data, tmp_path, "lora") + ["--batch-size", "2", "--dropout", "0.1"]
    whole = torchrun(flags + ["--name", "whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    started = time.monotonic()
    killed = torchrun(
        flags + ["--name", "cut"],
        env={
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]),
            "LORAKIT_TEST_KILL_STEP": "5",
        },
    )
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
    with pytest.raises(
        LorakitError, match=r"needs torchrun's environment .*torchrun --nproc_per_node N -m lorakit train"
    ):
        distributed.DataParallel()
    assert isinstance(distributed.strategy_for(), distributed.SingleProcess)
    if not torch.distributed.is_nccl_available():
        env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(
            LorakitError, match="the nccl backend is not available in this PyTorch build; available: gloo"
        ):
            distributed.DataParallel(backend="nccl")


def test_shards_split_each_global_micro_batch_in_rank_order():
    class Fake(distributed.DataParallel):
        def __init__(self, rank, world_size):
            self.rank, self.world_size = rank, world_size

    batch = list(range(8))
    assert [Fake(r, 2).shard(batch) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(LorakitError, match="cannot be split over 4 processes"):
        Fake(0, 4).shard([1, 2, 3])


@pytest.mark.distributed
def test_lora_drop_plan_is_decided_once_and_shared(tiny_model, pc_data, tmp_path):
    """LoRA-drop's probe runs on the main process; the others take its sharing plan (a process that
    kept its own plan would hold other parameters, and DDP would refuse to start)."""
    flags = [
        "--model",
        tiny_model,
        "--data",
        pc_data,
        "--out-dir",
        str(tmp_path),
        "--name",
        "drop",
        "--method",
        "lora-drop",
        "--method-arg",
        "threshold=0.5",
        "--method-arg",
        "probe_steps=2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    done = torchrun(flags)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "drop" / "report.json").read_text())
    assert report["processes"] == 2 and report["adapter_layout"]


# --- FSDP2 --------------------------------------------------------------------------------------


def fsdp_flags(tiny_model, pc_data, out_dir, method) -> list[str]:
    return common_flags(tiny_model, pc_data, out_dir, method) + [
        "--batch-size",
        "2",
        "--distributed",
        "fsdp",
        "--name",
        method,
    ]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_model, pc_data, tmp_path_factory):
    """Every method of METHOD_FLAGS trained under FSDP2 on 2 processes, in one launch
    (tests/distributed_runs.py): their run directories by method."""
    out = tmp_path_factory.mktemp("fsdp")
    runs = out / "runs.json"
    runs.write_text(json.dumps([fsdp_flags(tiny_model, pc_data, out, method) for method in sorted(METHOD_FLAGS)]))
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "distributed_runs.py")
    command = [
        sys.executable,
        "-m",
        "lorakit.train.launch",
        "2",
        script,
        str(runs),
    ]  # as --nproc starts them: on loopback
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return {method: out / method for method in METHOD_FLAGS}


@pytest.mark.distributed
@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_fsdp_on_two_processes_trains_the_same_adapter_as_one_process(method, fsdp_runs, one_process, tiny_model):
    """The base sharded over 2 processes (a 4-bit one too); Delta-LoRA's moved base weights (in its
    file) moved exactly as in one process; the saved adapter loads in one process, unchanged."""
    run_dir = fsdp_runs[method]
    assert_same_run(run_dir, one_process(method))
    assert json.loads((run_dir / "report.json").read_text())["distributed"] == "fsdp"
    saved = adapter(run_dir)
    if method == "delta-lora":
        moved = {k: v for k, v in saved.items() if k.endswith(".base_weight")}
        assert moved, "Delta-LoRA's file holds the moved base weights"
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
        key = next(iter(moved))
        original = base[key.removeprefix("base_model.model.").replace(".base_weight", ".weight")]
        assert not torch.allclose(moved[key], original)  # the base weight did move

    from lorakit.cli import load_adapted

    model, _ = load_adapted(tiny_model, run_dir / "adapter", "causal-lm")
    loaded = io.adapter_state_dict(model, inject.DEFAULT_NAME)
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key].detach().cpu(), value), key


@pytest.mark.distributed
def test_fsdp_run_killed_resumes_to_the_uninterrupted_result(fsdp_runs, tiny_model, pc_data, tmp_path):
    """Under FSDP2: one process killed mid-run stops the run without a partial checkpoint; the resume
    (2 processes, from whole-tensor checkpoints) ends exactly where the uninterrupted run did."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    flags = fsdp_flags(tiny_model, pc_data, tmp_path, "delta-lora")
    started = time.monotonic()
    killed = torchrun(flags, env={"PYTHONPATH": str(tmp_path / "hook"), "LORAKIT_TEST_KILL_STEP": "5"})
    assert killed.returncode != 0 and time.monotonic() - started < 200
    cut = tmp_path / "delta-lora"
    assert not (cut / "adapter").exists()
    assert [p.name for p in ckpt.list_checkpoints(cut / "checkpoints")] == ["step-000002", "step-000004"]

    resumed = torchrun(["--resume", str(cut), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mine, reference = adapter(cut), adapter(fsdp_runs["delta-lora"])
    assert mine.keys() == reference.keys()
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key


def test_fsdp_needs_torchrun_and_refuses_what_it_cannot_shard(monkeypatch, tmp_path, capsys):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LorakitError, match=r"needs torchrun's environment"):
        distributed.strategy_for("fsdp")
    from lorakit import cli

    for flags, message in (
        (["--compile"], "torch.compile over an FSDP-sharded model"),
        (["--method", "lora-drop"], "method lora-drop: .* use --distributed ddp"),
        (["--distributed", "zero3"], "'zero3' is not one of auto, ddp, fsdp"),
    ):
        code = cli.main(["train", "--distributed", "fsdp", *flags, "--out-dir", str(tmp_path), "--print-config"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(message, err), err
    # with --nproc the settings are checked before torchrun starts: one line, not one per process
    code = cli.main(["train", "--nproc", "2", "--distributed", "fsdp", "--compile", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "torch.compile over an FSDP-sharded model" in err, err


def test_repeated_blocks_are_the_decoder_layers():
    from conftest import tiny_gpt2, tiny_llama

    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert distributed.repeated_blocks(llama) == list(llama.model.layers)
    assert distributed.repeated_blocks(gpt2) == list(gpt2.transformer.h)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
    assert distributed.repeated_blocks(plain) == list(plain[1])


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process (FSDP2 runs on it: every weight is a DTensor)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists already")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_shards_the_base_and_keeps_adapters_and_vera_projections_whole(one_process_group, monkeypatch):
    """The one door on a sharded model: base weights are DTensors, read whole and written back through
    base_layers; adapters stay plain; VeRA's shared projections stay one plain buffer for every layer."""
    from conftest import tiny_llama
    from lorakit.methods import METHODS

    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(key, value)
    model = tiny_llama()
    inject.adapt(model, METHODS["vera"](r=8))
    layers = [layer for _, layer in inject.adapted_layers(model)]
    before = base_layers.dense_weight(layers[0].base_layer).clone()
    distributed.FullyShard(backend="gloo").place(model, torch.device("cpu"))
    assert all(base_layers.is_sharded(layer.base_layer.weight) for layer in layers)
    assert not any(base_layers.is_sharded(p) for _, p in inject.adapter_parameters(model))
    projections = {id(layer.adapters["default"].projections.vera_A) for layer in layers}
    assert len(projections) == 1 and not base_layers.is_sharded(layers[0].adapters["default"].projections.vera_A)

    whole = base_layers.dense_weight(layers[0].base_layer)
    assert not base_layers.is_sharded(whole) and torch.equal(whole, before)
    base_layers.set_dense_weight(layers[0].base_layer, whole + 1)
    assert torch.equal(base_layers.dense_weight(layers[0].base_layer), before + 1)
    ids = torch.randint(0, 128, (2, 6))
    assert torch.isfinite(model(input_ids=ids).logits).all()  # FSDP gathers in forward


def test_fsdp_merge_and_4bit_storage_go_through_the_one_door(one_process_group, monkeypatch):
    """On a sharded model (one process: every weight a DTensor): merging gathers each base weight and
    writes it back in place, the same outputs as unmerged; a 4-bit layer's packed storage is sharded
    as parameters, read whole through dense_weight and re-quantized in place."""
    from conftest import perturb_trainable, tiny_llama
    from lorakit.methods import METHODS
    from lorakit.quant import quantize
    from lorakit.quant.linear4bit import Linear4bit

    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(key, value)
    model = tiny_llama()
    quantize(model, method="nf4", targets=["q_proj"])
    inject.adapt(model, METHODS["lora"](targets=["q_proj", "v_proj"]))
    perturb_trainable(model)
    four_bit = model.model.layers[0].self_attn.q_proj.base_layer
    dense_before = base_layers.dense_weight(four_bit).clone()
    distributed.FullyShard(backend="gloo").place(model, torch.device("cpu"))
    assert isinstance(four_bit, Linear4bit) and base_layers.is_sharded(four_bit.weight_packed)
    assert torch.equal(base_layers.dense_weight(four_bit), dense_before)
    base_layers.set_dense_weight(four_bit, dense_before.flip(0))
    assert base_layers.is_sharded(four_bit.weight_packed)  # the same (sharded) parameters, written in place
    assert torch.allclose(
        base_layers.dense_weight(four_bit), dense_before.flip(0), atol=0.05 * dense_before.abs().max()
    )

    ids = torch.randint(0, 128, (2, 6))
    v_proj = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        unmerged, w0 = model(input_ids=ids).logits, base_layers.dense_weight(v_proj.base_layer).clone()
        v_proj.merge(["default"])  # (a 4-bit layer refuses merging in place: merge the dense v_proj)
        assert base_layers.is_sharded(v_proj.base_layer.weight)
        assert not torch.allclose(base_layers.dense_weight(v_proj.base_layer), w0)  # the merge was written
        assert torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-5)
        v_proj.unmerge()
        assert torch.allclose(base_layers.dense_weight(v_proj.base_layer), w0, atol=1e-6)


def test_device_cpu_on_a_gpu_machine_uses_gloo(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    strategy = distributed.strategy_for("ddp", device="cpu")
    try:
        assert strategy.backend == "gloo" and strategy.device("cpu") == torch.device("cpu")
    finally:
        strategy.close()
