"""Quality on SST-2 with the all-MiniLM-L6-v2 encoder: every method, the same budget.

    python benchmarks/quality_sst2.py                     # all conditions, default budget
    python benchmarks/quality_sst2.py --methods full lora --steps 100
    python benchmarks/quality_sst2.py --quick             # smoke run: 10 steps, 320 train sentences
    python benchmarks/quality_sst2.py --methods lora-fa vera --lrs 1e-3 3e-3 1e-2 3e-2   # a learning-rate sweep

Reads ../shared/datasets/sst2 (train.tsv, dev.tsv). Each condition trains the same number of
steps on the same fixed subsample of train, in the same order, then reports dev accuracy (all
872 sentences), trainable parameters, adapter size on disk and time. The classifier head trains
fully in every condition (PEFT's `modules_to_save`). LoRA+ is LoRA with `loraplus_ratio=16`; for
it the script also reports the first step where the smoothed training loss reaches the level
plain LoRA ends at. The default budget (50 steps x batch 32 on 1,600 sentences) takes about 8 minutes
on 2 CPU cores; use one thread per process (`--threads 1`) when another job shares the cores, since
oversubscribed OpenMP threads slow both jobs several-fold.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit import models

RESULTS = Path(__file__).resolve().parent / "results"

SST2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

# name -> (adapter config or None for full fine-tuning, learning rate, LoRA+ ratio)
CONDITIONS = {
    "full": (None, 5e-5, None),
    "lora": (lambda: lorakit.LoRA(r=8, alpha=16, targets=TARGETS, train_modules=["classifier"]), 1e-3, None),
    "lora-plus": (lambda: lorakit.LoRA(r=8, alpha=16, targets=TARGETS, train_modules=["classifier"]), 2.5e-4, 16.0),
    # LoRA-FA and VeRA at their recipes' multiples of LoRA's rate (lorakit.train.recipes: 3x, 30x), from
    # the sweep `--methods lora-fa vera --lrs 1e-3 3e-3 1e-2 3e-2` (at LoRA's 1e-3 they stay at the majority class)
    "lora-fa": (lambda: lorakit.LoRAFA(r=8, alpha=16, targets=TARGETS, train_modules=["classifier"]), 3e-3, None),
    "dora": (lambda: lorakit.DoRA(r=8, alpha=16, targets=TARGETS, train_modules=["classifier"]), 1e-3, None),
    "delta-lora": (lambda: lorakit.DeltaLoRA(r=8, alpha=16, targets=TARGETS, train_modules=["classifier"]), 1e-3, None),
    "vera": (lambda: lorakit.VeRA(r=256, targets=TARGETS, train_modules=["classifier"]), 3e-2, None),
    # AdaLoRA: 12 triplets a module at the start, 8 on average at the end (LoRA r=8's final budget);
    # allocation from 10 % of the steps, frozen for the last 20 %; gamma 0.1 as the paper
    "adalora": (
        lambda: lorakit.AdaLoRA(
            init_r=12, target_r=8, alpha=16, targets=TARGETS, train_modules=["classifier"], orth_reg_weight=0.1
        ),
        1e-3,
        None,
    ),
    # the same at 10x the learning rate: P and Q start at std 0.02 and E at 0, so the update starts far
    # smaller than LoRA's and 1e-3 barely moves it in a short run
    "adalora-lr1e-2": (
        lambda: lorakit.AdaLoRA(
            init_r=12, target_r=8, alpha=16, targets=TARGETS, train_modules=["classifier"], orth_reg_weight=0.1
        ),
        1e-2,
        None,
    ),
    # LoRA-drop: stage 1 on 10 % of the training sentences, keep modules up to 90 % of the importance
    "lora-drop": (
        lambda: lorakit.LoRADrop(
            r=8, alpha=16, targets=TARGETS, train_modules=["classifier"], sample_fraction=0.1, threshold=0.9
        ),
        1e-3,
        None,
    ),
    # LoRA over the encoder's adapted linears stored in NF4 + double quantization
    "qlora": (lambda: lorakit.LoRA(r=8, alpha=16, targets=TARGETS, train_modules=["classifier"]), 1e-3, None),
    # the same, the pair starting at the rank-8 SVD of each layer's rounding error (LoftQ)
    "qlora-loftq": (
        lambda: lorakit.LoRA(r=8, alpha=16, targets=TARGETS, train_modules=["classifier"], init="loftq"),
        1e-3,
        None,
    ),
}
QUANTIZED = {"qlora", "qlora-loftq"}

# Hugging Face PEFT's own LoRA and DoRA on the same model, targets, budget and learning rate: the same
# method through the reference library, so that quality can be compared with PEFT's, not only with LoRA
PEFT_CONDITIONS = {
    "peft-lora": ({"r": 8, "lora_alpha": 16}, 1e-3),
    "peft-dora": ({"r": 8, "lora_alpha": 16, "use_dora": True}, 1e-3),
}


def read_tsv(path: Path, limit: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def batches(rows, tokenizer, batch_size: int, max_length: int):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer(
            [s for s, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([label for _, label in chunk])
        yield enc


@torch.no_grad()
def accuracy(model, rows, tokenizer, max_length: int) -> float:
    model.eval()
    correct = 0
    for batch in batches(rows, tokenizer, 128, max_length):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def peft_model(model, settings: dict):
    """PEFT's adapter over `model` (PEFT is a benchmark reference, never a lorakit dependency)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(target_modules=TARGETS, modules_to_save=["classifier"], **settings))


def run(name: str, train_rows, dev_rows, tokenizer, args) -> dict:
    if name.split("@")[0] in PEFT_CONDITIONS:
        return run_peft(name, train_rows, dev_rows, tokenizer, args)
    make_config, lr, ratio = CONDITIONS[name.split("@")[0]]
    if "@" in name:  # a sweep point: "method@lr"
        lr = float(name.split("@")[1])
    wall0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = models.load_classifier(num_labels=2)
    if name in QUANTIZED:
        lorakit.quantize(model, targets=TARGETS, loftq_rank=8 if name.endswith("loftq") else 0)
    if make_config is None:
        params = [{"params": list(model.parameters()), "lr": lr}]
        hooks = lorakit.hooks.Hooks([])
    else:
        config = make_config()
        if isinstance(config, lorakit.AdaLoRA):
            config.tinit, config.tfinal = max(1, args.steps // 10), max(1, args.steps // 5)
        lorakit.adapt(model, config)
        hooks = lorakit.training_hooks(model, total_steps=args.steps)

        # before the optimizer exists: a method may rebuild its adapters here (LoRA-drop's stage 1)
        def sample(fraction: float) -> list:
            return list(
                batches(train_rows[:: max(1, round(1 / fraction))], tokenizer, args.batch_size, args.max_length)
            )

        hooks.before_training(
            model,
            lorakit.hooks.Probe(
                list(batches(train_rows[: 4 * args.batch_size], tokenizer, args.batch_size, args.max_length)),
                lr=lr,
                sampler=sample,
            ),
        )
        params = lorakit.param_groups(model, lr, loraplus_ratio=ratio)
    losses, train_seconds = train_loop(model, params, lr, hooks, train_rows, tokenizer, args)
    acc = accuracy(model, dev_rows, tokenizer, args.max_length)
    trainable = sum(p.numel() for g in params for p in g["params"])
    size = None
    if make_config is not None:
        with tempfile.TemporaryDirectory() as tmp:
            lorakit.save(model, tmp)
            size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    layout = {}
    if make_config is not None:
        config = lorakit.inject.adapter_config(model)
        if isinstance(config, lorakit.LoRADrop):
            layout = {"kept": config.plan["kept"], "shared_groups": sorted(set(config.plan["groups"].values()))}
        elif isinstance(config, lorakit.AdaLoRA):
            layout = {"final_ranks": {m: sum(k) for m, k in config.rank_pattern.items()}}
        full_lora = sum(
            layer.in_features * 8 + layer.out_features * 8 for _, layer in lorakit.inject.adapted_layers(model)
        )
        layout["adapter_params_vs_lora_r8"] = (
            sum(p.numel() for n, p in lorakit.adapter_parameters(model) if ".adapters." in n) / full_lora
        )
    return {
        "condition": name,
        "dev_accuracy": acc,
        "trainable": trainable,
        "adapter_bytes": size,
        "layout": layout,
        "lr": lr,
        "loraplus_ratio": ratio,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        "losses": losses,
    }


def train_loop(model, params, lr: float, hooks, train_rows, tokenizer, args) -> tuple[list[float], float]:
    """The same loop for every condition: AdamW, linear warmup and decay, the seed's data order."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    steps_per_epoch = len(train_rows) // args.batch_size
    warmup = max(1, int(0.06 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - max(0, s - warmup) / max(1, args.steps - warmup))
    )
    order = random.Random(args.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    step = 0
    while step < args.steps:
        rows = train_rows[:]
        order.shuffle(rows)
        for batch in batches(rows[: steps_per_epoch * args.batch_size], tokenizer, args.batch_size, args.max_length):
            loss = model(**batch).loss + hooks.extra_loss(model)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            hooks.after_optimizer_step(model, step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step >= args.steps:
                break
    return losses, time.perf_counter() - t0


def run_peft(name: str, train_rows, dev_rows, tokenizer, args) -> dict:
    """PEFT's LoRA or DoRA, through the loop and evaluation every other condition uses."""
    settings, lr = PEFT_CONDITIONS[name.split("@")[0]]
    if "@" in name:
        lr = float(name.split("@")[1])
    wall0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = peft_model(models.load_classifier(num_labels=2), settings)
    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    losses, train_seconds = train_loop(model, params, lr, lorakit.hooks.Hooks([]), train_rows, tokenizer, args)
    acc = accuracy(model, dev_rows, tokenizer, args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {
        "condition": name,
        "dev_accuracy": acc,
        "trainable": sum(p.numel() for p in params[0]["params"]),
        "adapter_bytes": size,
        "layout": {},
        "lr": lr,
        "loraplus_ratio": None,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall0,
        "losses": losses,
    }


def smoothed(losses: list[float], beta: float = 0.9) -> list[float]:
    out, ema = [], None
    for x in losses:
        ema = x if ema is None else beta * ema + (1 - beta) * x
        out.append(ema)
    return out


def first_step_below(losses: list[float], level: float) -> int | None:
    return next((i + 1 for i, v in enumerate(smoothed(losses)) if v <= level), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(CONDITIONS), choices=[*CONDITIONS, *PEFT_CONDITIONS])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--train-size", type=int, default=1600)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps on 320 sentences, 200 dev sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--lrs", type=float, nargs="+", help="a learning-rate sweep: each method at each of these")
    args = parser.parse_args()
    if args.lrs:
        args.methods = [f"{m}@{lr:g}" for m in args.methods for lr in args.lrs]
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.train_size = 10, 320
    if not (SST2 / "train.tsv").is_file():
        print(f"SST-2 not found at {SST2} (it lives in ../shared/datasets/sst2)", file=sys.stderr)
        return 2
    tokenizer = models.load_tokenizer(task="classify")
    train_rows = read_tsv(SST2 / "train.tsv", args.train_size, args.seed)
    dev_rows = read_tsv(SST2 / "dev.tsv", 200 if args.quick else None)
    results = []
    for name in args.methods:
        result = run(name, train_rows, dev_rows, tokenizer, args)
        results.append(result)
        print(
            f"{name}: dev accuracy {100 * result['dev_accuracy']:.2f}% ({result['train_seconds']:.0f} s training, "
            f"{result['wall_seconds']:.0f} s wall)",
            flush=True,
        )

    print(
        f"\nSST-2 dev ({len(dev_rows)}), all-MiniLM-L6-v2, {args.steps} steps x batch {args.batch_size} on {len(train_rows)} "
        f"train sentences, max length {args.max_length}, seed {args.seed}"
    )
    print(f"command: python {' '.join(sys.argv)}")
    machine = (
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__} CPU, "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    )
    print(f"machine: {machine}\n")
    print("| condition | lr | dev accuracy | trainable params | adapter on disk | train time | wall time |")
    print("|---|---|---|---|---|---|---|")
    full = next((r for r in results if r["condition"] == "full"), None)
    for r in results:
        size = "-" if r["adapter_bytes"] is None else f"{r['adapter_bytes'] / 2**20:.2f} MiB"
        delta = (
            "" if full is None or r is full else f" ({100 * (r['dev_accuracy'] - full['dev_accuracy']):+.2f} vs full)"
        )
        name = r["condition"] + (f" (ratio {r['loraplus_ratio']:g})" if r["loraplus_ratio"] else "")
        print(
            f"| {name} | {r['lr']:g} | {100 * r['dev_accuracy']:.2f}%{delta} | {r['trainable']:,} | {size} "
            f"| {r['train_seconds']:.0f} s | {r['wall_seconds']:.0f} s |"
        )
    by_name = {r["condition"]: r for r in results}
    if "lora" in by_name and "lora-plus" in by_name:
        final = smoothed(by_name["lora"]["losses"])[-1]
        print("\nsteps until the EMA (beta 0.9) of the training loss first falls to a level:")
        print("| loss level | LoRA | LoRA+ |\n|---|---|---|")
        steps_to = {}
        for level in (0.5, 0.4, 0.3, round(final, 4)):
            lo, lp = (first_step_below(by_name[k]["losses"], level) for k in ("lora", "lora-plus"))
            steps_to[str(level)] = {"lora": lo, "lora-plus": lp}
            label = f"{level} (LoRA's final)" if level == round(final, 4) else str(level)
            print(f"| {label} | {lo or 'not reached'} | {lp or 'not reached'} |")
    else:
        steps_to = None
    path = args.json or RESULTS / f"quality-sst2-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "machine": machine,
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": results,
                "loraplus_steps_to_loss": steps_to,
            },
            indent=1,
        )
    )
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
