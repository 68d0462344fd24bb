"""Held-out loss on the Alpaca subset with SmolLM2-135M-Instruct, before and after a short run.

    python benchmarks/quality_alpaca.py                       # LoRA, QLoRA (NF4 base), QLoRA + LoftQ init
    python benchmarks/quality_alpaca.py --methods lora --train-size 400
    python benchmarks/quality_alpaca.py --quick               # smoke run: 16 train / 8 held-out, 2 steps
    python benchmarks/quality_alpaca.py --train-size 400 --seeds 0 1 --threads 1   # noise: 2 training seeds

Reads ../shared/datasets/alpaca/alpaca_5000.json (CC BY-NC 4.0: used here for evaluation only,
never shipped). A fixed random split gives `--train-size` training and `--eval-size` held-out
examples; each condition runs `lorakit.train` (the same loop as `lorakit train`) with the same
data, order and budget (`--train-size` examples x 1 epoch unless `--steps` is given), and reports
the held-out loss on completion tokens before and after. `--seeds` repeats every condition with
other training seeds (adapter initialisation, dropout, data order) on the same split, so the
run-to-run spread of LoRA itself is measured next to the QLoRA - LoRA gap. Results are saved to
benchmarks/results/quality-alpaca-<time>.json after every condition, so an interrupted run keeps
what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alpaca" / "alpaca_5000.json"

CONDITIONS = {
    "lora": {"method": "lora", "r": 16, "alpha": 32.0},
    "qlora": {"method": "lora", "r": 16, "alpha": 32.0, "quantize": "nf4"},
    # the same, the pair starting at the rank-16 SVD of each layer's rounding error (LoftQ)
    "qlora-loftq": {"method": "lora", "r": 16, "alpha": 32.0, "quantize": "nf4", "init": "loftq"},
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--train-size", type=int, default=200)
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="default: one epoch over --train-size")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 train / 8 held-out examples, 2 steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: --seed)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument(
        "--no-chunked-loss",
        action="store_true",
        help="the model's own loss (full logits), to compare peak memory with the chunked loss",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_size, args.eval_size, args.steps, args.batch_size = 16, 8, 2, 4
    if args.steps is None:
        args.steps = max(1, args.train_size // args.batch_size)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} CPU, "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    )
    command = "python " + " ".join(sys.argv)
    path = args.json or RESULTS / f"quality-alpaca-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    if not ALPACA.is_file():
        print(f"Alpaca subset not found at {ALPACA}", file=sys.stderr)
        return 2
    rows = json.loads(ALPACA.read_text())
    random.Random(args.seed).shuffle(rows)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_jsonl(tmp_path / "train.jsonl", rows[: args.train_size])
        write_jsonl(tmp_path / "eval.jsonl", rows[args.train_size : args.train_size + args.eval_size])
        for seed in args.seeds or [args.seed]:
            for name in args.methods:
                config = TrainConfig(
                    data=str(tmp_path / "train.jsonl"),
                    eval_data=str(tmp_path / "eval.jsonl"),
                    max_eval_examples=args.eval_size,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    max_length=args.max_length,
                    lr=args.lr,
                    warmup_steps=max(1, args.steps // 10),
                    seed=seed,
                    out_dir=str(tmp_path / "runs"),
                    name=f"{name}-{seed}",
                    progress=False,
                    chunked_loss=not args.no_chunked_loss,
                    gradient_checkpointing=args.gradient_checkpointing,
                    **CONDITIONS[name],
                )
                result = train(config, echo=lambda *a, **k: None)
                results.append(
                    {
                        "condition": name,
                        "seed": seed,
                        "before": result.before,
                        "after": result.after,
                        "train_seconds": result.train_seconds,
                        "wall_seconds": result.wall_seconds,
                        "peak_memory_mb": result.peak_memory_mb,
                        "final_loss": result.final_loss,
                    }
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(
                    json.dumps(
                        {
                            "command": command,
                            "machine": machine,
                            "args": {k: str(v) for k, v in vars(args).items()},
                            "results": results,
                        },
                        indent=1,
                    )
                )
                print(
                    f"{name} (seed {seed}): eval loss {result.before['eval_loss']:.4f} -> {result.after['eval_loss']:.4f}",
                    flush=True,
                )

    print(
        f"\nAlpaca subset, SmolLM2-135M-Instruct: {args.train_size} train / {args.eval_size} held-out examples, "
        f"{args.steps} steps x batch {args.batch_size}, max length {args.max_length}, lr {args.lr}, seed {args.seed}"
    )
    print(f"command: {command}")
    print(f"machine: {machine}\n")
    print(
        "| condition | seed | held-out loss before | after | perplexity before -> after | train time | wall time | peak memory |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        b, a = r["before"], r["after"]
        print(
            f"| {r['condition']} | {r['seed']} | {b['eval_loss']:.4f} | {a['eval_loss']:.4f} "
            f"| {b['perplexity']:.2f} -> {a['perplexity']:.2f} | {r['train_seconds']:.0f} s | {r['wall_seconds']:.0f} s "
            f"| {r['peak_memory_mb']:,.0f} MiB |"
        )
    after = {(r["condition"], r["seed"]): r["after"]["eval_loss"] for r in results}
    seeds = sorted({r["seed"] for r in results})
    for name in args.methods:
        values = [after[name, s] for s in seeds]
        spread = (
            f", spread over {len(values)} seeds (max - min) {max(values) - min(values):.4f}" if len(values) > 1 else ""
        )
        print(f"\n{name}: mean held-out loss after training {statistics.mean(values):.4f}{spread}", end="")
    print()
    for quantized in ("qlora", "qlora-loftq"):
        if "lora" in args.methods and quantized in args.methods:
            gaps = [after[quantized, s] - after["lora", s] for s in seeds]
            print(f"{quantized} - lora held-out loss after training, per seed: {', '.join(f'{g:+.4f}' for g in gaps)}")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
