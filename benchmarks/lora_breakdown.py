"""Where LoRA's training step spends its time above the limit, piece by piece, in one interleaved run.

    python benchmarks/lora_breakdown.py                 # SmolLM2-135M fp32, batch 4 x 256, r = 16, one thread
    python benchmarks/lora_breakdown.py --rounds 9 --out benchmarks/results/lora-breakdown-cpu.json

Five conditions over one base model's weights, each fed the input embeddings with requires_grad (as
bench_step.py's limit), so every one runs backward through every layer:

1. `limit`: the frozen base, backward through the activations only (bench_step.py's reference);
2. `+ adapter layers`: lorakit's adapted model whose fused node computes the base product only
   (`y = x Wᵀ`, `dL/dx = g W`): what the layer machinery itself costs;
3. `+ LoRA forward`: the node's forward as lorakit's (`z = x Aᵀ`, `y += s·z Bᵀ`, x and z kept), its
   backward the base's only;
4. `+ LoRA backward`: lorakit's fused node as it is (`g B`, `dL/dx += (g B) A`, `dL/dA`, `dL/dB`),
   every layer alone;
5. `siblings as one node`: as lorakit runs it, q/k/v and gate/up of each block computed together
   (`lorakit.kernels.grouped_lora`: one pass over their shared input in each direction);
6. `+ optimizer`: the whole step, with the AdamW step and zero_grad as `lorakit train` runs them.

Conditions 2-4 run every layer alone (no sibling groups), so that each swaps one node for another.

Each difference between neighbours is what that piece adds, as a share of the limit. The rank-r
products are a few percent of the limit's multiply-adds (`flop_floor.py`), but each reads or writes a
whole (tokens x width) activation that is no longer in the cache when it runs; the table says what
they cost in place. Medians over the rounds, and every round's ratio to its limit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (benchmarks/ is not a package)
import common  # noqa: E402
from lorakit.kernels import fused_lora, grouped_lora  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class BaseProductOnly(torch.autograd.Function):
    """The fused node's signature, computing the frozen base's product alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, draw):
        ctx.save_for_backward(weight)
        return torch.mm(x, weight.T)

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        grad_x = torch.mm(grad_y, weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


class LoRAForwardOnly(torch.autograd.Function):
    """The fused node's forward (keeping what it keeps), with the base's backward alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, draw):
        y = torch.mm(x, weight.T)
        z = torch.mm(x, lora_A.T)
        y.addmm_(z, lora_B.T, alpha=scale)
        ctx.save_for_backward(x, z, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _, _, weight = ctx.saved_tensors
        grad_x = torch.mm(grad_y, weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


@contextlib.contextmanager
def node(replacement: type[torch.autograd.Function] | None) -> Iterator[None]:
    """lorakit's fused LoRA node replaced by `replacement` (None: as it is) for the duration, and
    every layer run alone through it (no sibling groups)."""
    real, real_output = fused_lora.FusedLoRALinear, grouped_lora.SharedInput.output
    fused_lora.FusedLoRALinear = replacement or real
    grouped_lora.SharedInput.output = lambda self, layer, x: None
    try:
        yield
    finally:
        fused_lora.FusedLoRALinear = real
        grouped_lora.SharedInput.output = real_output


def embeddings_step(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    embeddings = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeddings, labels=batch).loss
    loss.backward()
    return embeddings


def conditions(args: argparse.Namespace) -> list[tuple[str, Callable[[torch.Tensor], None]]]:
    bench_args = bench_step.parse_args(["--methods", "lora", "--no-peft", "--r", str(args.r)])
    base = bench_step.build_model("smollm2" if not args.tiny else "tiny", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    limit, lora = bench_step.build_conditions(base, bench_args)

    def partial(replacement):
        def step(batch: torch.Tensor) -> None:
            with node(replacement):
                embeddings_step(lora.model, batch)
            for p in lora.model.parameters():
                p.grad = None

        return step

    def whole(optimizer_step: bool):
        def step(batch: torch.Tensor) -> None:
            embeddings_step(lora.model, batch)
            if optimizer_step:
                lora.optimizer.step()
            lora.optimizer.zero_grad(set_to_none=True)

        return step

    def limit_step(batch: torch.Tensor) -> None:
        grad = embeddings_step(limit.model, batch).grad
        if grad is None or grad.abs().sum() == 0:
            raise RuntimeError("the limit's backward did not reach the input embeddings")

    return [
        ("limit", limit_step),
        ("+ adapter layers", partial(BaseProductOnly)),
        ("+ LoRA forward", partial(LoRAForwardOnly)),
        ("+ LoRA backward", partial(None)),
        ("siblings as one node", whole(optimizer_step=False)),
        ("+ optimizer (the whole step)", whole(optimizer_step=True)),
    ]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (a smoke run)")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/lora-breakdown-<time>.json)")
    args = p.parse_args(argv)
    if min(args.rounds, args.batch, args.seq, args.r, args.threads) < 1:
        p.error("--rounds, --batch, --seq, --r and --threads must be at least 1")
    if args.out is not None and args.out.is_dir():  # found out before the run, not after its minutes
        p.error(f"--out {args.out} is a directory; give a JSON file's path")
    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    runs = conditions(args)
    vocab = 512 if args.tiny else 49152
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _, step in runs:  # warm-up
        step(batch)
    for i in range(args.rounds):
        for name, step in runs if i % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            step(batch)
            times[name].append((time.perf_counter() - start) * 1e3)
        print(f"  round {i + 1}: " + ", ".join(f"{n} {t[-1]:.0f}" for n, t in times.items()), flush=True)
    limit = times["limit"]
    rows, previous = [], None
    for name, ts in times.items():
        ratios = [t / lt for t, lt in zip(ts, limit)]
        ratio = statistics.median(ratios)
        rows.append(
            {
                "condition": name,
                "ms_median": statistics.median(ts),
                "x_limit_median_of_rounds": ratio,
                "adds_x_limit": None if previous is None else ratio - previous,
                "rounds_x_limit": ratios,
            }
        )
        previous = ratio
    lines = [
        "| condition | ms/step (median) | x limit (median of rounds) | this piece adds (x limit) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        adds = "–" if r["adds_x_limit"] is None else f"{r['adds_x_limit']:+.3f}"
        lines.append(f"| {r['condition']} | {r['ms_median']:,.0f} | {r['x_limit_median_of_rounds']:.3f} | {adds} |")
    text = "\n".join(lines)
    print("\n" + text)
    result = {
        "benchmark": "lora_breakdown",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": common.machine_info(torch.device("cpu")),
        "load_before": load_before,
        "load_after": common.load_average(),
        "results": rows,
        "markdown": text,
    }
    out = args.out or RESULTS_DIR / f"lora-breakdown-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nsaved {out}")
    return result


if __name__ == "__main__":
    main()
