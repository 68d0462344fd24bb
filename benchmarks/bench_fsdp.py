"""Tokens/s and peak memory per process (per GPU) of lorakit's multi-process training, 1..N processes,
DDP (every process holds the whole base) against FSDP2 (`--distributed fsdp`: the base sharded).

Each condition is one launch of this script's worker (`lorakit.train.launch`, as `--nproc` starts
them): every process builds the same random-weight Llama-shaped model (quantized to NF4 with --quantize, as QLoRA), adapts it with LoRA
on the seven projections, hands it to lorakit's strategy (`lorakit.train.distributed.DataParallel`
or `FullyShard`, exactly what `lorakit train` uses), and times optimizer steps on random tokens, each
process taking its own --batch-size rows (the global batch grows with N: weak scaling, the usual
multi-GPU measure). Peak memory is `torch.cuda.max_memory_allocated` per process from after the
model is placed (built, quantized, sharded) to the end of the timed steps; the table shows the
largest over processes. On a CPU the memory column is the process's peak RSS (whole process,
including the import of torch), and only the time means anything.

    python benchmarks/bench_fsdp.py                       # CPU smoke: tiny shape, 1 and 2 processes (gloo)
    python benchmarks/bench_fsdp.py --preset qlora-8b     # GPU: Llama-3-8B shape, NF4, r=16, 1 x 2048 tokens,
                                                          # gradient checkpointing, 1 2 4 8 GPUs, DDP and FSDP
    python benchmarks/bench_fsdp.py --shape llama-1b --device cuda --nproc 1 2 --distributed fsdp

The 8B QLoRA preset answers: how much memory does each GPU need for QLoRA on an 8B model when FSDP
shards it over N GPUs (the NF4 base, ~5 GiB, divided by N; activations and the LoRA optimizer state
are per process)? Not measured yet: this machine has no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qlora_big import SEVEN_PROJECTIONS, SHAPES  # noqa: E402  (benchmarks/ is not a package)

PRESETS = {
    "cpu-smoke": dict(
        shape="tiny",
        device="cpu",
        nproc=[1, 2],
        distributed=["ddp", "fsdp"],
        quantize=True,
        r=8,
        seq=128,
        batch_size=2,
        steps=6,
        warmup=2,
        checkpointing=False,
    ),
    "qlora-8b": dict(
        shape="llama-8b",
        device="cuda",
        nproc=[1, 2, 4, 8],
        distributed=["ddp", "fsdp"],
        quantize=True,
        r=16,
        seq=2048,
        batch_size=1,
        steps=10,
        warmup=3,
        checkpointing=True,
    ),
}


# --- one process of one condition (started by the launcher) --------------------------------------


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The random-weight model, NF4 with --quantize, LoRA on the seven projections, built on `device`.
    Built whole on the device under FSDP too (then sharded): random init and quantization of an 8B
    model on the CPU would take minutes per process and the host memory of N copies; `lorakit
    train --distributed fsdp` loads the base on the CPU instead. The peak is measured after sharding."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import lorakit

    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    if args.quantize:
        lorakit.quantize(model, targets=SEVEN_PROJECTIONS, compute_dtype=dtype)
    lorakit.adapt(model, lorakit.LoRA(r=args.r, alpha=2 * args.r, targets=SEVEN_PROJECTIONS))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    from lorakit.train.distributed import DataParallel, FullyShard

    strategy = FullyShard() if args.distributed == "fsdp" else DataParallel()
    device = strategy.device(args.device)
    model = build(args, device)
    strategy.place(model, device)
    step_module = strategy.wrap(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1 + strategy.rank)  # each process its own rows
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch_size, args.seq), generator=generator).to(
            device
        )
        strategy.barrier()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = step_module(input_ids=ids, labels=ids).loss
        loss.backward()
        strategy.reduce_gradients(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    found = strategy.gather(
        {"rank": strategy.rank, "peak_bytes": peak_bytes(device), "step_s": statistics.median(times)}
    )
    if strategy.is_main:
        step_s = max(r["step_s"] for r in found)
        tokens = args.batch_size * args.seq * strategy.world_size
        print(
            "RESULT "
            + json.dumps(
                {
                    "processes": strategy.world_size,
                    "distributed": args.distributed,
                    "step_s": step_s,
                    "tokens_per_s": tokens / step_s,
                    "peak_gib_per_process": max(r["peak_bytes"] for r in found) / 2**30,
                    "per_process": found,
                }
            )
        )
    strategy.close()


# --- the driver ---------------------------------------------------------------------------------


def run_condition(nproc: int, distributed: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        "--worker",
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--distributed-kind",
        distributed,
        "--lora-r",
        str(args.r),
        "--seq",
        str(args.seq),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    argv += ["--quantize"] if args.quantize else []
    argv += ["--checkpointing"] if args.checkpointing else []
    cmd = [
        sys.executable,
        "-m",
        "lorakit.train.launch",
        str(nproc),
        __file__,
        *argv,
    ]  # as `lorakit train --nproc` starts them
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {
            "processes": nproc,
            "distributed": distributed,
            "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300],
        }
    return json.loads(lines[-1].removeprefix("RESULT "))


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| distributed | processes | tokens/s (global) | step | peak memory per process (max) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['distributed']} | {r['processes']} | failed: {r['error']} | | |")
        else:
            rows.append(
                f"| {r['distributed']} | {r['processes']} | {r['tokens_per_s']:,.0f} | {1000 * r['step_s']:.0f} ms | "
                f"{r['peak_gib_per_process']:.2f} GiB |"
            )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smoke")
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--nproc", type=int, nargs="+")
    parser.add_argument("--distributed", nargs="+", choices=("ddp", "fsdp"))
    parser.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=None, help="NF4 base (QLoRA)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--lora-r", dest="r", type=int, help="LoRA rank")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch-size", type=int, help="rows per process")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--distributed-kind", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():  # flags override the preset
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        args.distributed = args.distributed_kind
        worker(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA GPU here (the CPU smoke run: python benchmarks/bench_fsdp.py)")
    results = [run_condition(n, kind, args) for kind in args.distributed for n in args.nproc]
    print(table(results))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "distributed_kind")}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
