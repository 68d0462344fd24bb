"""The least work a method's training step can add to the limit, counted in multiply-adds.

    python benchmarks/flop_floor.py                       # SmolLM2-135M, batch 4 x 256 (bench_step.py's CPU run)
    python benchmarks/flop_floor.py --model llama-1b --seq 2048

The limit (bench_step.py's reference) is the frozen base's forward + backward through the
activations only: every linear layer's forward and its input gradient, attention's two products
and their gradients, the output head's forward and input gradient. A method adds what its gradient
needs whatever the implementation, per adapted projection (in -> out, T tokens in the batch):

- LoRA, rank r: dL/dB = s g^T (x A^T) and dL/dA = s (g B)^T x need x A^T, g B and the two
  products: 2 r (in + out) per token. The update's own forward term is at least
  min(r out, r out in / T) per token (z B^T, or forming W + s B A once per step), and its share of
  dL/dx at least min(r in, r out in / T) ((g B) A with g B already there, or W + s B A again).
- VeRA, rank r (A, B frozen, shared): x A^T once per distinct input (q/k/v and gate/up read one
  each) at r in per token; d's gradient needs one (T x out x r) product. Then either the forward
  forms W + B'A (b's gradient from g^T z, which gives d's too; dL/dx through W + B'A again:
  two dense sums), or it computes z B'^T (r out, kept for b's gradient) and d's product is
  (g b) B, which also gives dL/dx's share through A (r in, or one dense sum).

Printed: each count per token and as a ratio to the limit. A time ratio measured by bench_step.py
lands below its FLOP floor when the limit also spends time outside matmuls (softmax, norms, the
loss): the floor is for the matmuls alone. Any target below a method's floor is out of reach for
that model and batch, whatever the kernels.
"""

from __future__ import annotations

import argparse
import json

MODELS = {
    # hidden, intermediate, layers, heads' total q width, k/v width, vocabulary (tied or not: the head's matmul)
    "smollm2": dict(hidden=576, intermediate=1536, layers=30, kv=192, vocab=49152),
    "llama-1b": dict(hidden=2048, intermediate=8192, layers=16, kv=512, vocab=128256),
}


def projections(m: dict) -> list[tuple[str, int, int, str]]:
    """(name, in, out, which input it reads) of one decoder layer's seven projections."""
    h, i, kv = m["hidden"], m["intermediate"], m["kv"]
    return [
        ("q_proj", h, h, "attn_in"),
        ("k_proj", h, kv, "attn_in"),
        ("v_proj", h, kv, "attn_in"),
        ("o_proj", h, h, "attn_out"),
        ("gate_proj", h, i, "mlp_in"),
        ("up_proj", h, i, "mlp_in"),
        ("down_proj", i, h, "mlp_mid"),
    ]


def limit_per_token(m: dict, seq: int) -> float:
    h = m["hidden"]
    linears = sum(fan_in * fan_out for _, fan_in, fan_out, _ in projections(m))
    attention = 2 * seq * h  # q k^T and p v, full (unskipped) causal matrices, per token
    per_layer = 2 * linears + 3 * attention  # forward + input gradient; attention's backward is two products each
    return m["layers"] * per_layer + 2 * h * m["vocab"]


def lora_per_token(m: dict, r: int, tokens: int) -> float:
    extra = 0.0
    for _, fan_in, fan_out, _ in projections(m):
        merge = r * fan_out * fan_in / tokens
        extra += 2 * r * (fan_in + fan_out) + min(r * fan_out, merge) + min(r * fan_in, merge)
    return m["layers"] * extra


def vera_per_token(m: dict, r: int, tokens: int) -> float:
    extra, inputs = 0.0, {}
    for _, fan_in, fan_out, source in projections(m):
        inputs[source] = fan_in
        merge = r * fan_out * fan_in / tokens
        extra += r * fan_out + min(2 * merge, r * fan_out + min(r * fan_in, merge))
    extra += sum(r * fan_in for fan_in in inputs.values())
    return m["layers"] * extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--vera-r", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    for name in ("batch", "seq", "r", "vera_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    m, tokens = MODELS[args.model], args.batch * args.seq
    limit = limit_per_token(m, args.seq)
    rows = {
        "limit": limit,
        f"LoRA r={args.r} (floor)": limit + lora_per_token(m, args.r, tokens),
        f"VeRA r={args.vera_r} (floor)": limit + vera_per_token(m, args.vera_r, tokens),
    }
    if args.json:
        print(
            json.dumps({name: {"mult_adds_per_token": v, "x_limit": v / limit} for name, v in rows.items()}, indent=1)
        )
        return
    print(f"{args.model}, batch {args.batch} x {args.seq}, all seven projections: multiply-adds per token")
    print("| step | M multiply-adds / token | x limit |\n|---|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value / 1e6:.1f} | {value / limit:.3f} |")


if __name__ == "__main__":
    main()
