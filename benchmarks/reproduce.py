"""Each method against its paper: `lorakit compare` on SST-2 (MiniLM) and on the Alpaca subset
(SmolLM2-135M-Instruct), next to what each method's paper reports.

    python benchmarks/reproduce.py                                 # both parts, the default budgets
    python benchmarks/reproduce.py --part sst2 --sst2-steps 20     # one part, a smaller budget
    python benchmarks/reproduce.py --alpaca-methods lora,dora,vera # fewer methods on the slow part

Every method runs with its recipe (no --lr: `lorakit.train.recipes`), its own defaults (VeRA
r=256, QLoRA r=64 over NF4, ...), the same data, steps and seed, through the same code as `lorakit
compare` (`lorakit.compare.compare`; runs under `--out-dir`, so a second call reuses finished
methods). Budgets follow benchmarks/quality_sst2.py (1,600 training sentences drawn with seed 0,
50 steps x batch 32, max length 64, all 872 dev sentences) and benchmarks/quality_alpaca.py (200
train / 100 held-out examples, 25 steps x batch 8, max length 256).

Writes benchmarks/results/reproduce-<time>.json (every number of both comparisons, the reference
numbers and the command) and prints the table the documentation shows (benchmarks/tables.py makes
it, there and here). The papers trained other models (RoBERTa, DeBERTa, LLaMA) for thousands of
steps, so the comparable quantity is each method's difference to LoRA, not the absolute metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from lorakit.compare import compare
from lorakit.train import TrainConfig
from tables import PAPERS, reproduction_table

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SST2 = SHARED / "sst2"
ALPACA = SHARED / "alpaca" / "alpaca_5000.json"

ALL_METHODS = "lora,lora-fa,vera,dora,delta-lora,lora-plus,qlora,adalora,lora-drop"


def sample_sst2(directory: Path, size: int, seed: int) -> Path:
    """`size` training sentences drawn as quality_sst2.py draws them, as a GLUE-layout TSV."""
    with open(SST2 / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = random.Random(seed).sample(rows, size) if size < len(rows) else rows
    path = directory / f"sst2-train-{size}.tsv"
    # GLUE's own layout: no quoting (sentences hold bare quotes), tab separated, a header row
    path.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    return path


def split_alpaca(directory: Path, train: int, held_out: int, seed: int) -> tuple[Path, Path]:
    """The fixed split quality_alpaca.py uses, as two JSONL files."""
    rows = json.loads(ALPACA.read_text())
    random.Random(seed).shuffle(rows)
    paths = directory / f"alpaca-train-{train}.jsonl", directory / f"alpaca-eval-{held_out}.jsonl"
    for path, part in zip(paths, (rows[:train], rows[train : train + held_out])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def sst2_config(args, data_dir: Path) -> TrainConfig:
    return TrainConfig(
        model="minilm",
        task="classify",
        data=str(sample_sst2(data_dir, args.sst2_train, args.seed)),
        eval_data=str(SST2 / "dev.tsv"),
        max_eval_examples=872,
        steps=args.sst2_steps,
        batch_size=32,
        max_length=64,
        warmup_steps=max(1, round(0.06 * args.sst2_steps)),
        schedule="linear",
        seed=args.seed,
        out_dir=str(args.out_dir),
        name=f"sst2-{args.sst2_steps}",
        progress=False,
    )


def alpaca_config(args, data_dir: Path) -> TrainConfig:
    train, held_out = split_alpaca(data_dir, args.alpaca_train, args.alpaca_eval, args.seed)
    return TrainConfig(
        model="smollm2",
        data=str(train),
        eval_data=str(held_out),
        max_eval_examples=args.alpaca_eval,
        metric="eval_loss",
        steps=args.alpaca_steps,
        batch_size=8,
        max_length=256,
        warmup_steps=max(1, args.alpaca_steps // 10),
        seed=args.seed,
        out_dir=str(args.out_dir),
        name=f"alpaca-{args.alpaca_steps}",
        progress=False,
    )


def run_part(name: str, cfg: TrainConfig, methods: list[str], collect_only: bool = False) -> dict:
    """One comparison; its compare.json (records and the limit) plus how long it took.
    `collect_only`: read the compare.json an earlier call wrote, train and time nothing."""
    started = time.perf_counter()
    if not collect_only:
        compare(
            cfg,
            methods,
            Path(cfg.out_dir) / cfg.name,
            echo=lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True),
        )
    saved = json.loads((Path(cfg.out_dir) / cfg.name / "compare.json").read_text())
    return {**saved, "wall_seconds": None if collect_only else time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("both", "sst2", "alpaca"), default="both")
    parser.add_argument("--sst2-methods", default=ALL_METHODS, help=f"comma separated (default: {ALL_METHODS})")
    parser.add_argument("--alpaca-methods", default=ALL_METHODS, help="comma separated (default: the same nine)")
    parser.add_argument("--sst2-steps", type=int, default=50)
    parser.add_argument("--sst2-train", type=int, default=1600, help="training sentences drawn from train.tsv")
    parser.add_argument("--alpaca-steps", type=int, default=25)
    parser.add_argument("--alpaca-train", type=int, default=200)
    parser.add_argument("--alpaca-eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/reproduce-<time>.json")
    parser.add_argument("--notes", type=Path, help="JSON {method: text} for the table's last column")
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="no training: the table from the compare.json files earlier calls left under --out-dir",
    )
    args = parser.parse_args()
    missing = [str(p) for p in (SST2 / "train.tsv", ALPACA) if not p.is_file()]
    if missing:
        print(f"error: data not found: {', '.join(missing)} (it lives in ../shared/datasets)", file=sys.stderr)
        return 2
    data_dir = args.out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    command = "python " + " ".join(sys.argv)
    path = args.json or RESULTS / f"reproduce-{time.strftime('%Y%m%dT%H%MZ', time.gmtime())}.json"
    out: dict = {
        "command": command,
        "machine": machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "papers": PAPERS,
    }
    if args.part in ("both", "sst2"):
        out["sst2"] = run_part("sst2", sst2_config(args, data_dir), args.sst2_methods.split(","), args.collect_only)
    if args.part in ("both", "alpaca"):
        out["alpaca"] = run_part(
            "alpaca", alpaca_config(args, data_dir), args.alpaca_methods.split(","), args.collect_only
        )
    notes = json.loads(args.notes.read_text()) if args.notes else {}
    out["table"] = reproduction_table(out.get("sst2"), out.get("alpaca"))
    if notes:
        out["table"] += "\n\n" + "\n\n".join(f"**{method}.** {text}" for method, text in notes.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"command: {command}\nmachine: {machine}\n")
    print(out["table"])
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
