"""QLoRA benchmark on CPU: lorakit's NF4 against fp32 and against bitsandbytes (+ PEFT).

    python benchmarks/bench_qlora.py                # about 5 minutes on 2 cores
    python benchmarks/bench_qlora.py --json out.json

Model: the built-in SmolLM2-135M-Instruct (GGUF, dequantized to fp32 by transformers). Measures

1. weight memory and bits per parameter, fp32 vs lorakit NF4 (+ double quant), from the tensors;
2. quantization error of lorakit vs bitsandbytes on the first 4 decoder layers (28 matrices),
   and whether the two are bit-identical;
3. dequantization speed on CPU, lorakit (vectorized PyTorch) vs bitsandbytes, all linear layers;
4. one training step (LoRA r=16 on all linear layers, AdamW, batch x seq tokens): ms/step and
   memory, for LoRA over fp32, LoRA over lorakit NF4, and PEFT LoRA over bitsandbytes NF4
   (`BitsAndBytesConfig(load_in_4bit=True)`);
5. peak resident memory (RSS) of a fresh process while loading: plain fp32 load vs
   `lorakit.quant.load_quantized_causal_lm`, from the GGUF file and from safetensors.

Each training condition and each load runs in its own process (so their peaks do not mix);
models come from a safetensors copy of the GGUF model written once to a temporary directory.
Step memory uses `common.peak_step_bytes` (PyTorch's CPU allocator, via the profiler) plus the
resident weights and optimizer state; bitsandbytes' absmax statistics live outside module buffers
and are not in its "resident" column (about 3% of its 4-bit weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/ is not a package)
import lorakit  # noqa: E402
from lorakit.models import load_causal_lm, load_tokenizer  # noqa: E402
from lorakit.param_summary import parameter_counts  # noqa: E402
from lorakit.quant import bits_per_parameter, nf4, weight_bytes  # noqa: E402

MiB = 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def anon_rss_mib() -> float:
    """Resident anonymous memory (RssAnon): RSS without the pages of memory-mapped files."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Samples RssAnon every 2 ms in a thread: the kernel records peak RSS (VmHWM) only with
    file-backed pages included, and safetensors / GGUF loaders map whole files."""

    def __init__(self) -> None:
        import threading

        self.peak = anon_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anon_rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anon_rss_mib())


# --- workers (each in its own process) ---------------------------------------------------------


def worker_load(kind: str, directory: str) -> dict[str, Any]:
    """Peak RSS of loading one way; `gguf-fp32` also writes the safetensors copy to `directory`."""
    before = current_rss_mib()
    sampler = AnonPeak()
    start = time.perf_counter()
    if kind == "gguf-fp32":
        model = load_causal_lm()  # lorakit's tensor-by-tensor GGUF reader
    elif kind == "gguf-fp32-transformers":
        from transformers import AutoModelForCausalLM

        from lorakit.models import resolve_model_path

        gguf_dir, gguf_name = resolve_model_path(None)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    elif kind == "gguf-nf4":
        model = lorakit.quant.load_quantized_causal_lm()
    elif kind == "safetensors-fp32":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    elif kind == "safetensors-nf4":
        model = lorakit.quant.load_quantized_causal_lm(directory)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    result = {
        "load": kind,
        "seconds": seconds,
        "peak_anon_mib": sampler.stop(),
        "rss_before_mib": before,
        "peak_rss_mib": peak_rss_mib(),
        "weight_mib": weight_bytes(model) / MiB,
        "bits_per_parameter": bits_per_parameter(model),
        "linear_bits_per_parameter": bits_per_parameter(model.model.layers),
        "parameters": parameter_counts(model)[1],  # a 4-bit layer counts its out x in weights
    }
    if kind == "gguf-fp32":
        save_as_safetensors(model, directory)
    return result


def save_as_safetensors(model, directory: str) -> None:
    """A plain Hugging Face directory of the model (transformers refuses to save GGUF-loaded models)."""
    from safetensors.torch import save_file

    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    load_tokenizer().save_pretrained(directory)


def worker_train(kind: str, directory: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """ms/step and memory of LoRA training over one base."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if kind == "lorakit-fp32":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        model = lorakit.adapt(model, lorakit.LoRA(r=16, alpha=16))
    elif kind == "lorakit-nf4":
        model = lorakit.quant.load_quantized_causal_lm(directory)
        model = lorakit.adapt(model, lorakit.LoRA(r=16, alpha=16))
    elif kind == "peft-bnb-nf4":
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=config, device_map="cpu", dtype=torch.float32
        )
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    else:
        raise ValueError(kind)
    load_peak = peak_rss_mib()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step()]  # warm-up (also creates the optimizer state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    peak_step = common.peak_step_bytes(step, torch.device("cpu"))
    resident = common.resident_bytes(model, optimizer)
    return {
        "train": kind,
        "ms_per_step": 1000 * common.median(times),
        "resident_mib": resident / MiB,
        "peak_step_mib": peak_step / MiB,
        "peak_mib": (resident + peak_step) / MiB,
        "process_peak_rss_mib": peak_rss_mib(),
        "load_peak_rss_mib": load_peak,
        "trainable": sum(p.numel() for p in params),
        "losses": losses,
    }


def run_worker(args: list[str], timeout: int = 400) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[-400:]}
    return json.loads(lines[-1])


# --- in-process measurements -------------------------------------------------------------------


def quantization_error_vs_bnb(directory: str) -> dict[str, Any]:
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    weights = [
        m.weight.detach()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers." in n and int(n.split(".")[2]) < 4
    ]
    identical = True
    err = {"lorakit": 0.0, "bitsandbytes": 0.0}
    ref = 0.0
    for w in weights:
        ours = nf4.quantize_nf4(w, 64, True)
        packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
        theirs = F.dequantize_4bit(packed, state)
        mine = ours.dequantize()
        identical &= (
            torch.equal(ours.packed, packed.view(-1))
            and torch.equal(ours.absmax, state.absmax)
            and torch.equal(mine, theirs)
        )
        err["lorakit"] += (mine - w).pow(2).sum().item()
        err["bitsandbytes"] += (theirs - w).pow(2).sum().item()
        ref += w.pow(2).sum().item()
    return {
        "matrices": len(weights),
        "bit_identical": identical,
        "relative_error_lorakit": (err["lorakit"] / ref) ** 0.5,
        "relative_error_bitsandbytes": (err["bitsandbytes"] / ref) ** 0.5,
    }


def dequantization_speed(directory: str, repeats: int = 3) -> dict[str, Any]:
    """Seconds to dequantize every decoder linear weight once (fp32 and bf16 outputs)."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    weights = [m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    weights = weights[: len(weights) // 3]  # 10 of 30 layers keeps the quantization time short
    ours = [nf4.quantize_nf4(w) for w in weights]
    theirs = [F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True) for w in weights]
    result: dict[str, Any] = {"matrices": len(weights), "parameters": sum(w.numel() for w in weights)}
    for dtype in (torch.float32, torch.bfloat16):
        states = [_with_dtype(s, dtype) for _, s in theirs]
        passes = {
            "lorakit": lambda: [q.dequantize(dtype) for q in ours],  # noqa: B023 (timed in this iteration)
            "bitsandbytes": lambda: [F.dequantize_4bit(p, s) for (p, _), s in zip(theirs, states)],  # noqa: B023
        }
        for name, one_pass in passes.items():
            one_pass()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                one_pass()
            result[f"{name}_{str(dtype).removeprefix('torch.')}_ms"] = 1000 * (time.perf_counter() - start) / repeats
    return result


def _with_dtype(state, dtype):
    """A copy of a bitsandbytes QuantState that dequantizes to `dtype`."""
    import copy

    state = copy.copy(state)
    state.dtype = dtype
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", help="also write all results to this file")
    args = parser.parse_args()
    if args.worker:
        kind, directory, *rest = args.worker
        if kind.startswith(("gguf-", "safetensors-")):
            print(json.dumps(worker_load(kind, directory)))
        else:
            print(json.dumps(worker_train(kind, directory, *map(int, rest))))
        return

    started = time.perf_counter()
    results: dict[str, Any] = {"machine": common.machine_info(torch.device("cpu")), "command": " ".join(sys.argv)}
    results["load_average_start"] = common.load_average()
    with tempfile.TemporaryDirectory() as directory:
        loads = {
            kind: run_worker([kind, directory])
            for kind in ("gguf-fp32", "gguf-fp32-transformers", "gguf-nf4", "safetensors-fp32", "safetensors-nf4")
        }
        results["loads"] = loads
        if "error" in loads["gguf-fp32"]:
            raise SystemExit(f"could not load SmolLM2: {loads['gguf-fp32']['error']}")
        results["error_vs_bnb"] = quantization_error_vs_bnb(directory)
        results["dequantization"] = dequantization_speed(directory)
        shape = [str(args.batch), str(args.seq), str(args.steps)]
        results["training"] = {
            kind: run_worker([kind, directory, *shape]) for kind in ("lorakit-fp32", "lorakit-nf4", "peft-bnb-nf4")
        }
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = common.load_average()
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any], args) -> str:
    loads, err, deq, train = r["loads"], r["error_vs_bnb"], r["dequantization"], r["training"]
    fp32, q = loads["gguf-fp32"], loads["gguf-nf4"]
    m = r["machine"]
    out = [
        f"## QLoRA on CPU: SmolLM2-135M ({m.get('cpu')}, {m.get('torch_threads')} threads, torch {m.get('torch')}, "
        f"bitsandbytes {m.get('bitsandbytes')}, peft {m.get('peft')})",
        "",
        "### Weights",
        common.markdown_table(
            ["model", "weight MiB", "bits/param (all)", "bits/param (decoder linears)"],
            [
                [
                    "fp32",
                    f"{fp32['weight_mib']:.1f}",
                    f"{fp32['bits_per_parameter']:.2f}",
                    f"{fp32['linear_bits_per_parameter']:.2f}",
                ],
                [
                    "lorakit NF4 + double quant (head, embeddings fp32, tied)",
                    f"{q.get('weight_mib', float('nan')):.1f}",
                    f"{q.get('bits_per_parameter', float('nan')):.2f}",
                    f"{q.get('linear_bits_per_parameter', float('nan')):.3f}",
                ],
            ],
        ),
        "",
        f"### NF4 vs bitsandbytes ({err['matrices']} matrices of layers 0-3)",
        f"bit-identical packed codes, statistics and dequantized values: **{err['bit_identical']}**; relative "
        f"error ||W - Q(W)|| / ||W||: lorakit {err['relative_error_lorakit']:.5f}, bitsandbytes {err['relative_error_bitsandbytes']:.5f}",
        "",
        f"### Dequantization on CPU ({deq['matrices']} matrices, {deq['parameters'] / 1e6:.1f} M weights, ms per pass)",
        common.markdown_table(
            ["output dtype", "lorakit (PyTorch)", "bitsandbytes (C++ CPU kernel)"],
            [
                [d, f"{deq[f'lorakit_{d}_ms']:.1f}", f"{deq[f'bitsandbytes_{d}_ms']:.1f}"]
                for d in ("float32", "bfloat16")
            ],
        ),
        "",
        f"### Training step: LoRA r=16 on all linear layers, AdamW, batch {args.batch} x {args.seq} tokens, median of {args.steps}",
    ]
    rows = []
    for kind, t in train.items():
        if "error" in t:
            rows.append([kind, "failed: " + t["error"].replace("|", "/")[:160], "", "", "", ""])
        else:
            rows.append(
                [
                    kind,
                    f"{t['ms_per_step']:.0f}",
                    f"{t['resident_mib']:.0f}",
                    f"{t['peak_step_mib']:.0f}",
                    f"{t['peak_mib']:.0f}",
                    f"{t['process_peak_rss_mib']:.0f}",
                ]
            )
    out.append(
        common.markdown_table(
            ["condition", "ms/step", "resident MiB", "step peak MiB", "peak MiB", "process peak RSS MiB"], rows
        )
    )
    out += ["", "### Loading: peak RSS of a fresh process"]
    load_rows = []
    for kind, result in loads.items():
        if "error" in result:
            load_rows.append([kind, "failed: " + result["error"][:120], "", "", ""])
        else:
            load_rows.append(
                [
                    kind,
                    f"{result['seconds']:.1f}",
                    f"{result['peak_rss_mib']:.0f}",
                    f"{result['peak_anon_mib']:.0f}",
                    f"{result['weight_mib']:.0f}",
                ]
            )
    out.append(
        common.markdown_table(
            ["load", "seconds", "peak RSS MiB (incl. mapped file pages)", "peak anonymous MiB", "weights MiB"],
            load_rows,
        )
    )
    out += [
        "",
        "gguf-nf4 / safetensors-nf4 stream: weights are quantized one tensor at a time as they are read "
        "(GGUF tensors are read a chunk of rows at a time by lorakit's header reader and converted by transformers' GGUF processors); the dense model never exists.",
        f"Machine load average (1/5/15 min) at start {r['load_average_start']}, at end {r['load_average_end']}: "
        "other work on the same 2 cores makes single timings noisy.",
        f"Total benchmark time {r['seconds']:.0f} s. Command: `python benchmarks/bench_qlora.py {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
