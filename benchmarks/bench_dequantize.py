"""NF4 dequantization on CPU: the ways lorakit can do it, against bitsandbytes' C++ kernel.

    python benchmarks/bench_dequantize.py                 # SmolLM2-135M's 210 decoder linears (106 M weights)
    python benchmarks/bench_dequantize.py --layers 4 --rounds 31

Random weights in SmolLM2-135M's decoder shapes (q/o 576x576, k/v 192x576, gate/up 1536x576,
down 576x1536), NF4 with 64-blocks, per-block fp32 absmax (the double-quantized statistics decode
in a separate, 1/64-sized step that every option shares). Every option is checked bit for bit
against `lorakit.quant.nf4.dequantize_nf4_torch` (lorakit's PyTorch path, itself bit-identical to
bitsandbytes' reference) before it is timed. Options, each dequantizing every layer once per round,
rounds interleaved in alternating order:

- `native (lorakit C kernel)`: `lorakit.quant.nf4.dequantize_nf4` as lorakit calls it, which runs
  the native kernel (`src/lorakit/kernels/_nf4_native.c` through ctypes, the best vector path of the
  CPU, chunks on `--threads` threads for large layers) when it was built at install time;
- `eager (pairs table)`: lorakit's PyTorch path (`dequantize_nf4_torch`, used where the native kernel
  is not): one `index_select` of 8-byte words from a 256-entry byte -> (code of high nibble, code of
  low nibble) table, then the block scale in place;
- `compiled (pairs table)`: the same formula through `torch.compile` (inductor's C++ backend,
  one pass: gather, scale, round to the output dtype);
- `compiled (select tree)`: no gather at all: each nibble's code chosen by four levels of
  `where` on its bits (16 constants), vectorisable;
- `bitsandbytes`: `bitsandbytes.functional.dequantize_4bit` (its native CPU kernel).

Reported: the minimum over rounds (the machine's own speed when nothing else ran) and the median,
ms for all layers, and each option's ratio to bitsandbytes. torch.compile writes its kernels to a
temporary directory (see tests/conftest.py on TORCHINDUCTOR_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lorakit-inductor-"))

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lorakit.kernels import nf4_native as native  # noqa: E402
from lorakit.quant import nf4  # noqa: E402

SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """`values * absmax` per block in fp32, rounded once to `dtype` (as bitsandbytes)."""
    return (values.view(-1, blocksize) * absmax.view(-1, 1)).to(dtype)


def pairs_formula(
    packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    values = pairs[packed.to(torch.int32)].view(torch.float32)
    return scale_blocks(values, absmax, blocksize, dtype)


def select_tree_formula(
    packed: torch.Tensor, absmax: torch.Tensor, codes: tuple[float, ...], blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    def decode(nibble: torch.Tensor) -> torch.Tensor:
        nodes: list[torch.Tensor | float] = list(codes)
        bit = 1
        while len(nodes) > 1:  # lowest bit first: 16 -> 8 -> 4 -> 2 -> 1
            taken = (nibble & bit) != 0
            nodes = [torch.where(taken, nodes[2 * i + 1], nodes[2 * i]) for i in range(len(nodes) // 2)]
            bit <<= 1
        return nodes[0]

    byte = packed.to(torch.int32)
    values = torch.stack([decode(byte >> 4), decode(byte & 15)], dim=-1)
    return scale_blocks(values, absmax, blocksize, dtype)


def options(blocksize: int) -> dict[str, Callable]:
    pairs = nf4.code_table("nf4_pairs")
    codes = tuple(float(c) for c in nf4.code_table("nf4"))
    compiled_pairs = torch.compile(pairs_formula, dynamic=True)
    compiled_tree = torch.compile(select_tree_formula, dynamic=True)
    found = {}
    if native.enabled():
        found["native (lorakit C kernel)"] = lambda q, dtype: nf4.dequantize_nf4(
            q.packed, q.absmax, q.shape, blocksize, dtype
        )
    else:
        print(f"no native option: {native.load_error() or 'LORAKIT_NATIVE=0'}", file=sys.stderr)
    found |= {
        "eager (pairs table)": lambda q, dtype: nf4.dequantize_nf4_torch(q.packed, q.absmax, q.shape, blocksize, dtype),
        "compiled (pairs table)": lambda q, dtype: compiled_pairs(q.packed, q.absmax, pairs, blocksize, dtype),
        "compiled (select tree)": lambda q, dtype: compiled_tree(q.packed, q.absmax, codes, blocksize, dtype),
    }
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return found

    def bnb(q, dtype):
        q.bnb_state.dtype = dtype
        return bnb_functional.dequantize_4bit(q.bnb_packed, q.bnb_state)

    found["bitsandbytes"] = bnb
    return found


def make_layers(count: int, blocksize: int) -> list[nf4.NF4Tensor]:
    generator = torch.Generator().manual_seed(0)
    layers = []
    for shape in (SMOLLM2_LAYER * count)[: 7 * count]:
        weight = torch.randn(shape, generator=generator) * 0.02
        q = nf4.quantize_nf4(weight, blocksize, double_quant=False)
        try:
            import bitsandbytes.functional as bnb_functional

            q.bnb_packed, q.bnb_state = bnb_functional.quantize_4bit(
                weight, blocksize=blocksize, quant_type="nf4", compress_statistics=False
            )
        except ImportError:
            pass
        layers.append(q)
    return layers


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers of SmolLM2's shapes (30: the whole model)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    blocksize = nf4.DEFAULT_BLOCKSIZE
    layers = make_layers(args.layers, blocksize)
    weights = sum(q.packed.numel() * 2 for q in layers)
    found = options(blocksize)
    load_before = common.load_average()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in found.items():  # bit-exact first (and compiles the compiled options)
            for q in layers[:7]:
                got = fn(q, dtype).reshape(q.shape)
                if not torch.equal(got, nf4.dequantize_nf4_torch(q.packed, q.absmax, q.shape, blocksize, dtype)):
                    raise SystemExit(f"{name} ({dtype}) is not bit-identical to lorakit's PyTorch dequantization")
        times: dict[str, list[float]] = {name: [] for name in found}
        for i in range(args.rounds):
            for name, fn in list(found.items()) if i % 2 == 0 else list(found.items())[::-1]:
                start = time.perf_counter()
                for q in layers:
                    fn(q, dtype)
                times[name].append(time.perf_counter() - start)
        reference = times.get("bitsandbytes")
        for name, values in times.items():
            row = {
                "option": name,
                "dtype": str(dtype).removeprefix("torch."),
                "min_ms": min(values) * 1e3,
                "median_ms": statistics.median(values) * 1e3,
            }
            if reference:
                row["min_x_bitsandbytes"] = min(values) / min(reference)
                row["median_x_bitsandbytes"] = statistics.median(values) / statistics.median(reference)
            rows.append(row)
    header = ["option", "dtype", "min ms", "median ms", "min x bnb", "median x bnb"]
    body = [
        [
            r["option"],
            r["dtype"],
            f"{r['min_ms']:.2f}",
            f"{r['median_ms']:.2f}",
            f"{r.get('min_x_bitsandbytes', float('nan')):.2f}",
            f"{r.get('median_x_bitsandbytes', float('nan')):.2f}",
        ]
        for r in rows
    ]
    isa = native.isa() if native.enabled() else None
    text = (
        f"NF4 dequantization, {weights / 1e6:.1f} M weights ({args.layers} x SmolLM2-135M decoder layers), "
        f"{args.rounds} interleaved rounds, torch threads {args.threads}, native kernel path {isa}; load average "
        f"{load_before} / {common.load_average()}\n\n" + common.markdown_table(header, body)
    )
    print(text)
    result = {
        "benchmark": "bench_dequantize",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "machine": common.machine_info(torch.device("cpu")),
        "weights": weights,
        "native_isa": isa,
        "results": rows,
        "markdown": text,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
