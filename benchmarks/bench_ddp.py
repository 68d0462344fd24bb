"""Tokens/s of `lorakit train` on 1 and N processes (DDP through torchrun), same global batch.

Each condition is a real `lorakit train` run (the built-in model and task unless --model/--data),
started the way a user starts it (`lorakit train --nproc N`); tokens/s and peak memory come from the
runs' report.json (tokens of the global batch over training seconds, measured on the main process).

    python benchmarks/bench_ddp.py                         # CPU: SmolLM2-135M, 1 vs 2 processes (gloo)
    python benchmarks/bench_ddp.py --nproc 1 2 4 8 --device cuda --batch-size 8 --steps 50   # GPU (NCCL)

On a CPU, N processes share the same cores: torchrun gives each process one intra-op thread where a
single process uses all cores, so the scaling to expect is ~1x (the work per step is the same; what
is measured is the all-reduce and process overhead). GPU scaling needs one device per process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, args: argparse.Namespace, out_dir: Path, repeat: int) -> dict:
    name = f"n{nproc}-r{repeat}"
    per_process = args.batch_size // nproc
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        "--nproc",
        str(nproc),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(per_process),
        "--out-dir",
        str(out_dir),
        "--name",
        name,
        "--no-progress",
        "--device",
        args.device,
        "--max-eval-examples",
        "1",
        "--checkpoint-every",
        "0",
    ]
    if args.model:
        cmd += ["--model", args.model]
    if args.data:
        cmd += ["--data", args.data]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out_dir / name / "report.json").read_text())
    return {"tokens_per_s": report["tokens_per_s"], "peak_memory_mb": report["peak_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="runs per condition (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.rounds):  # interleaved: every round runs each condition once
            for nproc in args.nproc:
                rows.setdefault(nproc, []).append(run(nproc, args, Path(tmp), repeat))
    base = statistics.median(r["tokens_per_s"] for r in rows[args.nproc[0]])
    print(
        f"| processes | tokens/s (median of {args.rounds}) | x {args.nproc[0]} process(es) | peak memory, main process |"
    )
    print("|---|---|---|---|")
    summary = {}
    for nproc, found in rows.items():
        tps = statistics.median(r["tokens_per_s"] for r in found)
        mem = statistics.median(r["peak_memory_mb"] for r in found)
        summary[nproc] = {"tokens_per_s": tps, "ratio": tps / base, "peak_memory_mb": mem}
        print(f"| {nproc} | {tps:,.0f} | {tps / base:.2f}x | {mem:,.0f} MiB |")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": summary}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
