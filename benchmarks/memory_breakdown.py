"""Where every MiB of a training step goes: LoRA, QLoRA and LoRA-drop on SmolLM2-135M, on the CPU.

    python benchmarks/memory_breakdown.py                     # batch 8 x 256, every condition (~15 min, 1 thread)
    python benchmarks/memory_breakdown.py --quick             # batch 2 x 64: the same code paths in a minute
    python benchmarks/memory_breakdown.py --only lora qlora   # some conditions
    python benchmarks/memory_breakdown.py --cli               # also `lorakit train`'s whole-run peak RSS
    python benchmarks/memory_breakdown.py --cli-only --only lora qlora-r8   # those runs alone

The `lorakit train` runs go twice, in turn: as `lorakit train` runs (on glibc it sets malloc's mmap
threshold to 1 MiB at start-up, `lorakit/train/allocator.py`) and with `LORAKIT_MALLOC=default`
(malloc as it comes); `--malloc lorakit` or `--malloc default` runs one of the two.

Each condition runs in a process of its own (their peaks must not mix): the packaged model
(`lorakit.models`; NF4 streamed in as `lorakit train --quantize nf4` loads it), one adapter on every
linear layer, AdamW, the chunked loss (the trainer's default), one warm-up step (so the optimizer
state exists, as from a run's second step) and one measured step on random tokens. What it reports:

- `runtime`: resident memory after `import torch, transformers, lorakit`, before any model;
- `base weights`: the frozen model's tensors (linear layers fp32 or NF4 codes + statistics; the
  embeddings, norms and rotary tables), and `dequantized (live max)`: the most bytes of dense
  weights dequantized from NF4 alive at one time during the step (on the CPU, the one buffer every
  4-bit layer dequantizes into, `Linear4bit.transient_weight`);
- `adapter`, `gradients`, `optimizer state`: the adapter's parameters, their gradients (alive from
  backward to `zero_grad`) and AdamW's two moments;
- `saved activations` by kind: every tensor autograd saved for backward
  (`torch.autograd.graph.saved_tensors_hooks`), each storage counted once, parameters left out,
  attributed to the module that was running when it was saved (module hooks on everything but
  the adapted layers' base layers, so the fused nodes still run) and, inside an adapted layer, to
  its role: the layer's input (x, shared by the layers that read it), z = x A^T, a dropped-out copy,
  a dropout mask;
- `step peak (live)`: the peak of PyTorch's CPU allocator bytes during the step above its start
  (`common.peak_step_bytes`); `rest of the step peak` is that minus the saved activations
  (backward's temporaries, gradients being formed, the loss's chunk);
- `process peak RSS`: the kernel's high-water mark of the process (what `lorakit train` reports),
  and the RSS at the end. The difference between the live bytes and RSS is the C allocator's:
  freed memory it has not returned to the system.

Writes benchmarks/results/memory-breakdown-<time>.json and prints the tables (MiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/ is not a package)

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alpaca" / "alpaca_5000.json"


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    method: str  # a lorakit method
    nf4: bool
    r: int
    alpha: float
    dropout: float


# At one rank and dropout (r = 8 as LoRA's default, without and with dropout 0.05), then at each
# method's defaults where they differ: QLoRA r = 64, alpha 16, dropout 0.05 (its paper's), and LoRA
# with the same settings, so the difference is the 4-bit base alone.
CONDITIONS = {
    c.name: c
    for c in (
        Condition("lora", "lora", False, 8, 16.0, 0.0),
        Condition("qlora-r8", "lora", True, 8, 16.0, 0.0),
        Condition("lora-drop", "lora-drop", False, 8, 16.0, 0.0),
        Condition("lora-d0.05", "lora", False, 8, 16.0, 0.05),
        Condition("qlora-r8-d0.05", "lora", True, 8, 16.0, 0.05),
        Condition("lora-drop-d0.05", "lora-drop", False, 8, 16.0, 0.05),
        Condition("qlora", "lora", True, 64, 16.0, 0.05),
        Condition("lora-r64-d0.05", "lora", False, 64, 16.0, 0.05),
    )
}


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process, MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


# --- one condition, in its own process -----------------------------------------------------------


class SavedTensorLedger:
    """Who saved what for backward: module hooks keep a stack of the running modules; the pack hook
    files each new storage under the innermost one (an adapted layer's input, z, masks by role)."""

    def __init__(self, model, adapted: dict[str, Any]) -> None:
        import torch

        self.torch = torch
        self.stack: list[str] = []
        self.inputs: dict[str, int] = {}  # adapted layer -> its input's storage
        self.adapted = adapted
        self.names = {id(m): n for n, m in model.named_modules()}
        self.skip = {id(layer.base_layer) for layer in adapted.values()}  # hooks there would turn off the fused node
        self.params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.kinds: dict[str, int] = {}
        self.seen: set[int] = set()
        self.handles = []
        for module in model.modules():
            if id(module) in self.skip:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module, inputs):
        name = self.names.get(id(module), "?")
        self.stack.append(name)
        if name in self.adapted and inputs and self.torch.is_tensor(inputs[0]):
            self.inputs[name] = inputs[0].untyped_storage().data_ptr()

    def _leave(self, module, inputs, output):
        self.stack.pop()

    def kind(self, t) -> str:
        torch = self.torch
        where = next((n for n in reversed(self.stack) if n in self.adapted), None)
        if where is not None:
            layer = self.adapted[where]
            r = getattr(layer.adapter, "r", None)
            if t.untyped_storage().data_ptr() == self.inputs.get(where):
                return "adapter input x (one per distinct input)"
            if t.dtype in (torch.bool, torch.uint8):
                return "dropout masks"
            if t.dim() >= 1 and r is not None and t.shape[-1] == r:
                return "z = x A^T (tokens x r)"
            if t.dim() >= 1 and t.shape[-1] == layer.in_features:
                return "dropped-out copies of x"
            return "adapted layers: other"
        innermost = self.stack[-1] if self.stack else ""
        leaf = innermost.rsplit(".", 1)[-1]
        if "norm" in leaf:
            return "norms (RMSNorm input, 1/rms)"
        if "self_attn" in innermost:
            return "attention (rotary q/k, v, softmax output)"
        if "mlp" in innermost:
            return "MLP (SiLU input, gate product)"
        if "embed" in leaf:
            return "embeddings"
        if innermost in ("", "model") or not self.stack:
            return "loss (chunked: gradient of the hidden states)"
        return f"other ({leaf})"

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            kind = self.kind(t)
            self.kinds[kind] = self.kinds.get(kind, 0) + t.untyped_storage().nbytes()
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class DequantizedLedger:
    """The most bytes of dense weights dequantized from NF4 alive at one time (weak references)."""

    def __init__(self) -> None:
        from lorakit.quant import linear4bit

        self.module = linear4bit
        self.original = linear4bit.Linear4bit.dense_weight
        self.live = self.peak = 0
        ledger = self

        def dense_weight(layer, dtype=None, out=None):
            w = ledger.original(layer, dtype, out)
            if out is None:  # a new tensor; one written into the shared buffer is counted with it
                ledger._track(w)
            return w

        linear4bit.Linear4bit.dense_weight = dense_weight

    def _track(self, w) -> None:
        nbytes = w.untyped_storage().nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(w, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def shared_buffer_bytes(self) -> int:
        """Bytes of the buffers 4-bit layers dequantize into on the CPU (one per thread and dtype)."""
        buffers = getattr(self.module._buffers, "by_dtype", {})
        return sum(b.untyped_storage().nbytes() for b in buffers.values())

    def close(self) -> None:
        self.module.Linear4bit.dense_weight = self.original


def storage_bytes(tensors) -> int:
    return common.unique_storage_bytes([t for t in tensors if t is not None])


def measure_condition(cond: Condition, batch: int, seq: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM  # noqa: F401  (the runtime includes the model's code)

    import lorakit
    import lorakit.losses
    import lorakit.models
    from lorakit.methods.lora_drop import apply_plan, module_importance
    from lorakit.quant import Linear4bit, load_quantized_causal_lm

    out: dict[str, Any] = {"condition": dataclasses.asdict(cond), "batch": [batch, seq]}
    out["rss_runtime"] = rss_mib()[0]
    model = load_quantized_causal_lm() if cond.nf4 else lorakit.models.load_causal_lm()
    out["rss_after_load"], out["peak_rss_after_load"] = rss_mib()

    base_tensors = list(model.parameters()) + list(model.buffers())
    linear = [
        t
        for m in model.modules()
        if isinstance(m, (Linear4bit, torch.nn.Linear)) and m is not model.get_output_embeddings()
        for t in list(m.parameters()) + list(m.buffers())
    ]
    out["base_linear_bytes"] = storage_bytes(linear)
    out["base_other_bytes"] = storage_bytes(base_tensors) - out["base_linear_bytes"]

    torch.manual_seed(0)
    config_cls = lorakit.methods.METHODS[cond.method]
    lorakit.adapt(model, config_cls(r=cond.r, alpha=cond.alpha, dropout=cond.dropout, targets="all-linear"))
    ids = torch.randint(
        0, model.get_input_embeddings().num_embeddings, (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    if cond.method == "lora-drop":
        # Stage 1 stands in: B perturbed so the importance is defined, the plan drawn from one batch
        # (the step's memory depends on the layout, shared pairs included, not on how it was chosen).
        with torch.no_grad():
            for _, p in lorakit.adapter_parameters(model):
                p.normal_(0, 0.01)
        apply_plan(model, "default", module_importance(model, "default", [{"input_ids": ids}]), 0.9)
        out["lora_drop_kept"] = len(lorakit.inject.adapter_config(model).plan["kept"])
    params = [p for _, p in lorakit.adapter_parameters(model)]
    out["adapter_bytes"] = storage_bytes(params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    forward = lorakit.losses.ChunkedLossModel(model)
    model.train()
    adapted = dict(lorakit.inject.adapted_layers(model))

    def step(ledger: SavedTensorLedger | None = None) -> None:
        if ledger is None:
            loss = forward(input_ids=ids, labels=ids).loss
        else:
            with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t):
                loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        out["gradient_bytes"] = storage_bytes(p.grad for p in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.process_time()
    step()  # warm-up: the optimizer state exists from here on
    out["warmup_step_seconds"] = time.process_time() - t0
    out["optimizer_state_bytes"] = storage_bytes(
        v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1
    )
    ledger = SavedTensorLedger(model, adapted)
    dequantized = DequantizedLedger()
    try:
        out["step_peak_live_bytes"] = common.peak_step_bytes(lambda: step(ledger), torch.device("cpu"))
    finally:
        ledger.close()
        dequantized.close()
    out["saved_by_kind"] = dict(sorted(ledger.kinds.items(), key=lambda kv: -kv[1]))
    out["saved_bytes"] = sum(ledger.kinds.values())
    out["dequantized_live_max_bytes"] = dequantized.peak + dequantized.shared_buffer_bytes()
    step()  # one more, unprofiled: the allocator's steady state
    out["rss_end"], out["peak_rss"] = rss_mib()
    return out


# --- the whole run, as the issue measured it -------------------------------------------------------


def cli_peak_rss(
    name: str, flags: list[str], batch: int, seq: int, steps: int, out_dir: Path, malloc: str = "lorakit"
) -> dict[str, Any]:
    """Peak RSS of a `lorakit train` process on the shipped Alpaca subset; `malloc` "default" runs
    it with LORAKIT_MALLOC=default (glibc's malloc as it comes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORAKIT_MALLOC", "MALLOC_MMAP_THRESHOLD_")}
    if malloc == "default":
        env["LORAKIT_MALLOC"] = "default"
    command = [
        sys.executable,
        "-m",
        "lorakit",
        "train",
        "--data",
        str(ALPACA),
        "--batch-size",
        str(batch),
        "--max-length",
        str(seq),
        "--steps",
        str(steps),
        "--max-eval-examples",
        "8",
        "--no-progress",
        "--checkpoint-every",
        "0",
        "--out-dir",
        str(out_dir),
        "--name",
        name,
        "--overwrite",
        *flags,
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    error = process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "name": name,
        "flags": flags,
        "malloc": malloc,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "exit": process.returncode,
        "wall_s": time.perf_counter() - start,
        "stderr_tail": error[-300:] if process.returncode else "",
    }


CLI_RUNS = {
    "lora": ["--method", "lora", "--r", "8", "--dropout", "0"],
    "qlora-r8": ["--method", "lora", "--r", "8", "--dropout", "0", "--quantize", "nf4"],
    "lora-d0.05": ["--method", "lora", "--r", "8", "--dropout", "0.05"],
    "qlora-r8-d0.05": ["--method", "lora", "--r", "8", "--dropout", "0.05", "--quantize", "nf4"],
    "qlora": ["--method", "qlora"],
    "lora-r64-d0.05": ["--method", "lora", "--r", "64", "--alpha", "16", "--dropout", "0.05"],
}


# --- tables ---------------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value / MiB:,.0f}"


def breakdown_table(results: list[dict[str, Any]]) -> str:
    names = [r["condition"]["name"] for r in results]
    kinds = sorted(
        {k for r in results for k in r["saved_by_kind"]},
        key=lambda k: -max(r["saved_by_kind"].get(k, 0) for r in results),
    )
    rows = [
        ["runtime (torch, transformers, lorakit)"] + [f"{r['rss_runtime']:,.0f}" for r in results],
        ["base weights: linear layers"] + [mib(r["base_linear_bytes"]) for r in results],
        ["base weights: embeddings, norms, rotary"] + [mib(r["base_other_bytes"]) for r in results],
        ["dequantized weights (live max)"] + [mib(r["dequantized_live_max_bytes"]) for r in results],
        ["adapter"] + [mib(r["adapter_bytes"]) for r in results],
        ["gradients"] + [mib(r["gradient_bytes"]) for r in results],
        ["optimizer state"] + [mib(r["optimizer_state_bytes"]) for r in results],
    ]
    rows += [[f"saved: {k}"] + [mib(r["saved_by_kind"].get(k, 0)) for r in results] for k in kinds]
    rows += [
        ["saved activations, total"] + [mib(r["saved_bytes"]) for r in results],
        ["rest of the step peak (backward temporaries, loss chunk)"]
        + [mib(r["step_peak_live_bytes"] - r["saved_bytes"]) for r in results],
        ["step peak (live tensors above the step's start)"] + [mib(r["step_peak_live_bytes"]) for r in results],
        ["model + adapter + optimizer + step peak (live)"]
        + [
            mib(
                r["base_linear_bytes"]
                + r["base_other_bytes"]
                + r["adapter_bytes"]
                + r["optimizer_state_bytes"]
                + r["step_peak_live_bytes"]
            )
            for r in results
        ],
        ["RSS after loading"] + [f"{r['rss_after_load']:,.0f}" for r in results],
        ["process peak RSS"] + [f"{r['peak_rss']:,.0f}" for r in results],
        ["RSS at the end"] + [f"{r['rss_end']:,.0f}" for r in results],
    ]
    return common.markdown_table(["MiB"] + names, rows)


def cli_table(cli: list[dict[str, Any]]) -> str:
    """One row a run: its flags and peak RSS under each malloc setting measured."""
    settings = [s for s in ("lorakit", "default") if any(c.get("malloc", "lorakit") == s for c in cli)]
    names = list(dict.fromkeys(c["name"] for c in cli))
    rows = []
    for name in names:
        runs = {c.get("malloc", "lorakit"): c for c in cli if c["name"] == name}
        row = [name, " ".join(next(iter(runs.values()))["flags"])]
        for setting in settings:
            c = runs.get(setting)
            row.append(
                ""
                if c is None
                else f"{c['peak_rss_mib']:,.0f}"
                if c["exit"] == 0
                else "failed: " + c["stderr_tail"][-80:]
            )
        rows.append(row)
    return common.markdown_table(["run", "flags"] + [f"peak RSS, malloc {s}" for s in settings], rows)


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--seq", str(args.seq)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=sorted(CONDITIONS), help="conditions to run (default: all)")
    p.add_argument("--batch", type=int, help="default 8 (2 with --quick)")
    p.add_argument("--seq", type=int, help="default 256 (64 with --quick)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cli", action="store_true", help="also the peak RSS of `lorakit train` runs (3 steps on Alpaca)")
    p.add_argument("--cli-only", action="store_true", help="the `lorakit train` runs alone, no breakdown")
    p.add_argument(
        "--malloc",
        choices=["both", "lorakit", "default"],
        default="both",
        help="the `lorakit train` runs with lorakit's malloc setting, with LORAKIT_MALLOC=default, or both in turn",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (64 if args.quick else 256)
    if args.one:
        print(json.dumps(measure_condition(CONDITIONS[args.one], args.batch, args.seq)))
        return {}
    load_before = common.load_average()
    results = []
    for name in [] if args.cli_only else args.only or list(CONDITIONS):
        print(f"  {name} ...", flush=True)
        results.append(run_one(name, args))
    text = ["command: `" + " ".join(["python"] + sys.argv) + "`"]
    if results:
        text += [
            "",
            f"## Memory of one training step, SmolLM2-135M, batch {args.batch} x {args.seq}, all linear layers, "
            "CPU fp32",
            "",
            breakdown_table(results),
        ]
    cli = []
    if args.cli or args.cli_only:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, flags in CLI_RUNS.items():
                if args.only and name not in args.only:
                    continue
                for malloc in ("lorakit", "default") if args.malloc == "both" else (args.malloc,):
                    print(f"  lorakit train {name} (malloc: {malloc}) ...", flush=True)
                    cli.append(cli_peak_rss(name, flags, args.batch, args.seq, 3, Path(tmp), malloc))
        text += [
            "",
            "`lorakit train` on the Alpaca subset, 3 steps: peak RSS of the process (MiB); malloc: lorakit's "
            "setting (1 MiB mmap threshold) or LORAKIT_MALLOC=default",
            "",
            cli_table(cli),
        ]
    text.append(f"\nload average before / after: {load_before} / {common.load_average()}")
    print("\n".join(text), flush=True)
    result = {
        "benchmark": "memory_breakdown",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "machine": common.machine_info(__import__("torch").device("cpu")),
        "results": results,
        "cli": cli,
        "markdown": "\n".join(text),
    }
    out = args.out or RESULTS / f"memory-breakdown-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
