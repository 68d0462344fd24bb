"""QLoRA's headline: fitting a big model. Llama-3-8B shape, LoRA r=16 on all seven projections,
batch 1 x 2048, gradient checkpointing: step time and peak GPU memory of

- `limit`: the frozen bf16 base with checkpointing, backward through the activations only (input
  embeddings require grad, no weight gradient), the floor no LoRA step beats;
- `lorakit`: lorakit QLoRA (`lorakit.quantize`, NF4 + double quant, bf16 compute) + `lorakit.LoRA`;
- `peft-bnb`: PEFT LoRA over bitsandbytes NF4 + double quant (the reference QLoRA stack).

    python benchmarks/bench_qlora_big.py                          # CUDA: Llama-3-8B shape (needs ~20 GiB free)
    python benchmarks/bench_qlora_big.py --model llama-1b
    python benchmarks/bench_qlora_big.py --model tiny --device cpu --seq 128   # smoke run

Weights are random (std 0.02), built in bf16 on the device and quantized in place; every condition
runs in its own process, so one's memory never shows in another's peak. Peak memory is
`torch.cuda.max_memory_allocated` from after the model is built (and quantized) to the end of the
timed steps: weights, optimizer state, activations and dequantization temporaries. On CPU only the
time is meaningful (a smoke run). Figures to compare with (H100, reported for PEFT + bitsandbytes on
this shape): peak 9.8 GiB and 504 ms a step; the bf16 limit 206 ms a step at 19.0 GiB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/ is not a package)

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = ("limit", "lorakit", "peft-bnb")
GiB = 2**30

SHAPES = {  # LlamaConfig fields
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


def build(
    kind: str, args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[args.model], max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    if kind == "lorakit":
        import lorakit

        lorakit.quantize(model, targets=SEVEN_PROJECTIONS, compute_dtype=torch.bfloat16)
        lorakit.adapt(model, lorakit.LoRA(r=args.r, alpha=args.alpha, targets=SEVEN_PROJECTIONS))
    elif kind == "peft-bnb":
        import peft

        common.bnb_quantize(model, SEVEN_PROJECTIONS, compute_dtype=torch.bfloat16)
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=SEVEN_PROJECTIONS)
        )
    # the same checkpointing for every condition: each decoder layer recomputed in backward
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4) if params else None


def worker(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model, optimizer = build(kind, args, device)
    common.synchronize(device)
    weights = common.resident_bytes(model, None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> float:
        if optimizer is None:  # the limit: gradient to the input embeddings only
            embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeddings, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times = []
    for i in range(args.warmup + args.steps):
        common.synchronize(device)
        start = time.perf_counter()
        step()
        common.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {
        "kind": kind,
        "ms": [t * 1e3 for t in times],
        "median_ms": statistics.median(times) * 1e3,
        "weight_bytes": weights,
    }
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def run_worker(kind: str, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, *argv], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"kind": kind, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def report(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    by = {r["kind"]: r for r in results}
    limit, peft_bnb = by.get("limit", {}), by.get("peft-bnb", {})
    header = ["condition", "ms/step (median)", "x limit", "x PEFT+bnb", "peak GiB", "peak x PEFT+bnb", "weights GiB"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["kind"], f"failed: {r['error'][:120]}", "", "", "", "", ""])
            continue
        peak = r.get("peak_bytes")
        rows.append(
            [
                r["kind"],
                f"{r['median_ms']:.1f}",
                f"{r['median_ms'] / limit['median_ms']:.3f}" if limit.get("median_ms") else "–",
                f"{r['median_ms'] / peft_bnb['median_ms']:.3f}" if peft_bnb.get("median_ms") else "–",
                f"{peak / GiB:.2f}" if peak else "–",
                f"{peak / peft_bnb['peak_bytes']:.3f}" if peak and peft_bnb.get("peak_bytes") else "–",
                f"{r['weight_bytes'] / GiB:.2f}",
            ]
        )
    return "\n".join(
        [
            f"## QLoRA at scale: {args.model} shape, batch {args.batch} x {args.seq}, LoRA r={args.r} on the seven projections, "
            "gradient checkpointing, bf16",
            "",
            f"command: `python {' '.join(sys.argv)}`",
            f"machine: {info.get('gpu', info.get('cpu'))}; torch {info['torch']}, transformers {info.get('transformers')}, "
            f"peft {info.get('peft')}, bitsandbytes {info.get('bitsandbytes')}",
            f"{args.warmup} warmup + {args.steps} timed steps per condition, each condition in its own process",
            "",
            common.markdown_table(header, rows),
            "",
            "weights GiB: the model's parameters and buffers after quantization (bitsandbytes' absmax statistics sit "
            "outside them, about 3% of its 4-bit weights); peak GiB: torch.cuda.max_memory_allocated over the steps.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--model", choices=list(SHAPES), default="llama-8b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    argv = [a for a in sys.argv[1:]]
    results = []
    for kind in args.kinds:
        print(f"running {kind} ...", flush=True)
        results.append(run_worker(kind, argv))
        print(f"  {json.dumps({k: v for k, v in results[-1].items() if k != 'ms'})}", flush=True)
    info = common.machine_info(torch.device(args.device))
    text = report(results, args, info)
    print("\n" + text)
    out = (
        args.out or RESULTS_DIR / f"qlora-big-{args.device}-{args.model}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"command": "python " + " ".join(sys.argv), "machine": info, "results": results, "markdown": text}, indent=1
        )
    )
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
