"""Helpers shared by lorakit's benchmarks: machine description, peak memory of one step, tables.

Memory is measured the same way for every condition, on one step run apart from the timed ones:

- `peak_step_bytes`: the peak of tensor bytes allocated during the step above what was allocated
  when it started (activations kept for backward, gradients, optimizer temporaries, the loss).
  On CUDA from `torch.cuda.max_memory_allocated`; on CPU from the PyTorch profiler's memory events
  (every allocation and free of PyTorch's CPU allocator, summed in order). Memory that MKL/oneDNN
  allocate outside PyTorch's allocator is not seen on CPU.
- `resident_bytes`: what the condition keeps between steps: its model's parameters and buffers
  (each storage once) and its optimizer state.
- `peak_bytes = resident_bytes + peak_step_bytes`: comparable to PERFORMANCE.md's "peak GiB".
- `saved_bytes`: the tensors autograd saved for backward (each storage once, parameters left
  out), from `torch.autograd.graph.saved_tensors_hooks`; eager runs only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

MiB = 2**20


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's statistics (absmax, nested absmax, code tables) in its
    `quant_state`, outside the module's parameters and buffers; lorakit keeps them as buffers."""
    tensors = []
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return tensors


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters, buffers (4-bit statistics included) and optimizer state the condition keeps between steps."""
    tensors = list(model.parameters()) + list(model.buffers()) + quant_state_tensors(model)
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    return unique_storage_bytes(tensors)


@contextmanager
def saved_tensor_bytes(model: nn.Module):
    """Yield a dict whose `"bytes"` ends as the bytes autograd saved for backward (no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    storages: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            storages[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(storages.values())


def peak_step_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak tensor bytes allocated while `step()` runs, above the allocation when it starts."""
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted(
        (e["ts"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    )
    # A running sum of allocations (+) and frees (-) in time order; frees of tensors made before
    # the step (last step's gradients are freed by zero_grad(set_to_none) before it) count down.
    total = peak = 0
    for _, nbytes in memory:
        total += nbytes
        peak = max(peak, total)
    return peak


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bnb_quantize(
    model: nn.Module, targets: list[str], compute_dtype: torch.dtype, double_quant: bool = True
) -> nn.Module:
    """Replace the `nn.Linear`s whose name ends in one of `targets` by bitsandbytes NF4 `Linear4bit`s,
    in place, on the weights' device: what `BitsAndBytesConfig(load_in_4bit=True, nf4)` loading
    makes, for a model that already exists (random benchmark weights have no checkpoint to load)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        # bitsandbytes quantizes when a Params4bit moves to a (non-meta) device
        layer.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=layer
        ).to(module.weight.device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model
