"""Time and memory of one training step: lorakit's methods vs PEFT's vs the frozen-base limit.

One step is forward (causal-LM loss), backward, AdamW step, zero_grad, plus the method's training
hooks where it has any (Delta-LoRA's base update). Each library's AdamW is the one its users get:
lorakit's as `lorakit train` builds it (`lorakit.optim.adamw`), PEFT's as transformers' Trainer
does by default (torch's fused AdamW). Conditions:

- `limit`: the frozen base model with backward through the activations only: every parameter is
  frozen and the input embeddings require grad, so backward runs through every layer (checked: the
  embeddings' gradient must come back non-zero) but computes no weight gradient. No LoRA-family
  step can beat it (see /work/shared/docs/PERFORMANCE.md).
- `lorakit <method>` for every method in `lorakit.methods.METHODS` (and QLoRA when `lorakit.quantize`
  exists), and `peft <method>` where PEFT has the same method with the same rank, alpha and
  targets (LoRA, DoRA = `use_dora=True`, VeRA, LoRA-FA = LoRA + PEFT's LoRA-FA optimizer;
  QLoRA = PEFT LoRA over bitsandbytes NF4 + double quant, when bitsandbytes is installed).

All conditions share one base model's weights (methods that change the base, such as Delta-LoRA,
get their own copy), see the same batch, and run in one process, interleaved: every round runs
each condition once, in alternating order, and the tables report medians over the rounds.

    python benchmarks/bench_step.py                       # CPU: SmolLM2-135M fp32, batch 4 x 256, r=16
    python benchmarks/bench_step.py --quick               # CPU: batch 2 x 128, 2 timed rounds
    python benchmarks/bench_step.py --device cuda         # Llama-3.2-1B shape, bf16, batch 4 x 2048
    python benchmarks/bench_step.py --methods lora dora --compile
    python benchmarks/bench_step.py --profile lora        # where lorakit's and PEFT's LoRA step spend time
    python benchmarks/bench_step.py --methods lora dora --before HEAD~1   # before/after a change, one run
    python benchmarks/bench_step.py --methods lora --dropout 0.05   # also lorakit's and PEFT's LoRA with dropout 0.05
    python benchmarks/bench_step.py --methods lora --steps 15 --steps-per-round 2   # a round: each condition's faster of two steps

With `--dropout P` each method that has an input dropout (and PEFT's counterpart) also runs with dropout
P, its model in training mode so the dropout is drawn (the base models here have no dropout of their own).
Under the tables, the time of every round, and lorakit's time over PEFT's round by round.

On a CPU shared with other busy processes, add `--threads 1` (see the note printed under the table).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/ is not a package)
import lorakit  # noqa: E402
import lorakit.losses  # noqa: E402
import lorakit.train.allocator  # noqa: E402

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# lorakit method name -> PEFT's counterpart; methods not listed here have none in PEFT.
PEFT_COUNTERPARTS = ("lora", "dora", "vera", "lora-fa", "adalora")
# AdaLoRA's run length for its budget schedule: long, so every timed step is in the cubic phase and
# runs the allocator (both libraries, deltaT = 1), as PEFT's AdaLoRA "with allocator" in PERFORMANCE.md
ADALORA_TOTAL_STEPS = 10_000


# --- models ------------------------------------------------------------------------------------


def llama_config(kind: str):
    from transformers import LlamaConfig

    if kind == "llama-1b":  # Llama-3.2-1B's shape
        return LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        )
    return LlamaConfig(  # tiny: for a fast smoke run
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    )


def build_model(kind: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base model, frozen, in eval mode (no dropout, so every condition computes the same)."""
    if kind == "smollm2":
        from lorakit.models import load_causal_lm

        model = load_causal_lm(dtype=dtype).to(device)
    else:
        from transformers import AutoModelForCausalLM

        if kind == "llama-1b" and device.type != "cuda":
            raise SystemExit("--model llama-1b needs --device cuda (random 1B weights are too slow on CPU)")
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(llama_config(kind), dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares the parameter and buffer tensors (no extra memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


# --- conditions --------------------------------------------------------------------------------


@dataclass
class Condition:
    """One thing to time: a model, its optimizer, its training hooks, how to feed it."""

    name: str
    library: str  # "base", "lorakit" or "peft"
    method: str  # "limit" or a lorakit method name
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    hooks: Any = None
    feed: str = "ids"  # "ids" or "embeddings" (the limit)
    compiled: bool = False
    chunked_loss: bool = False  # lorakit.losses.causal_lm_loss instead of the model's own loss (full logits)
    times: list[float] = field(default_factory=list)  # one a round: its fastest step
    round_steps: list[list[float]] = field(default_factory=list)  # every step of every round
    memory: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    steps_done: int = 0
    malloc: str | None = None  # with --malloc both: glibc's thresholds set before each of its steps

    def step(self, batch: torch.Tensor, check: bool = False) -> float:
        """One training step; returns the loss. `check` verifies that gradients reached their targets."""
        if self.feed == "embeddings":
            embeddings = self.model.get_input_embeddings()(batch).detach().requires_grad_(True)
            if self.chunked_loss:
                loss = lorakit.losses.causal_lm_loss(self.model, None, None, batch, inputs_embeds=embeddings)
            else:
                loss = self.model(inputs_embeds=embeddings, labels=batch).loss
        elif self.chunked_loss:
            loss = lorakit.losses.causal_lm_loss(self.model, batch, None, batch)
        else:
            loss = self.model(input_ids=batch, labels=batch).loss
        if self.hooks:
            loss = loss + self.hooks.extra_loss(self.model)
        loss.backward()
        if check:
            self.check_gradients(embeddings if self.feed == "embeddings" else None)
        if self.optimizer is not None:
            self.optimizer.step()
        self.steps_done += 1
        if self.hooks:
            self.hooks.after_optimizer_step(self.model, self.steps_done)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def check_gradients(self, embeddings: torch.Tensor | None) -> None:
        if embeddings is not None:
            grad = embeddings.grad
            if grad is None or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
                raise RuntimeError(f"{self.name}: backward did not reach the input embeddings")
            return
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        missing = [n for n, p in trainable if p.grad is None]
        if not trainable or missing:
            raise RuntimeError(
                f"{self.name}: trainable parameters without gradient: {missing[:5]} ({len(trainable)} trainable)"
            )


def adamw(params, lr: float) -> torch.optim.Optimizer:
    """AdamW as a PEFT user gets it from transformers' Trainer (its default `adamw_torch_fused`):
    torch's fused kernel where torch has one for the device and dtype."""
    trainable = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(trainable, lr=lr, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(trainable, lr=lr)


def lorakit_adamw(lib: Any, params, lr: float) -> torch.optim.Optimizer:
    """AdamW as `lorakit train` (of `lib`'s revision) builds it: `lorakit.optim.adamw` where the
    revision has it, torch's default AdamW before it did."""
    build = getattr(importlib.import_module(f"{lib.__name__}.optim"), "adamw", None)
    trainable = [p for p in params if p.requires_grad]
    return build(trainable, lr=lr) if build is not None else torch.optim.AdamW(trainable, lr=lr)


def lorakit_at(revision: str) -> Any:
    """lorakit as it was at git `revision`, imported beside the current one as `lorakit_<rev>`
    (its source extracted with `git archive`; nothing in the working tree changes)."""
    import subprocess
    import tarfile
    import tempfile

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix=f"lorakit-{commit}-"))
    archive = subprocess.run(
        ["git", "archive", commit, "src/lorakit"], cwd=root, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    package = target / "src" / "lorakit"
    name = f"lorakit_{commit}"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.revision = commit
    return module


def registered_methods(lib: Any) -> dict[str, type]:
    """The method registry of `lib` (lorakit, or an earlier revision of it loaded by `lorakit_at`)."""
    return importlib.import_module(f"{lib.__name__}.methods").METHODS


def lorakit_config(
    method: str, args: argparse.Namespace, lib: Any = lorakit, dropout: float = 0.0
) -> lorakit.methods.AdapterConfig:
    """The method's config with the shared rank / alpha / targets (and `dropout`) where it has such fields."""
    cls = registered_methods(lib)[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    wanted: dict[str, Any] = {"targets": list(args.targets), "dropout": dropout}
    wanted["r"] = args.vera_r if method == "vera" else args.r
    wanted["alpha"] = float(args.alpha)
    return cls(**{k: v for k, v in wanted.items() if k in fields})


def has_dropout(method: str) -> bool:
    """Whether lorakit's `method` takes an input dropout (Delta-LoRA refuses one)."""
    if method not in lorakit.methods.METHODS or "dropout" not in {
        f.name for f in dataclasses.fields(lorakit.methods.METHODS[method])
    }:
        return False
    try:
        lorakit.methods.METHODS[method](dropout=0.05)
    except (ValueError, TypeError):
        return False
    return True


def with_dropout(condition: Condition | None, dropout: float) -> Condition | None:
    """The condition renamed for its dropout and its model in training mode (so that the dropout draws)."""
    if condition is None or not dropout or condition.error:
        return condition
    condition.model.train()
    label = f" dropout {dropout:g}"
    return dataclasses.replace(condition, name=condition.name + label, method=condition.method + label)


def lorakit_condition(
    base: nn.Module,
    method: str,
    args: argparse.Namespace,
    quantized: bool = False,
    lib: Any = lorakit,
    dropout: float = 0.0,
) -> Condition:
    config = lorakit_config(method, args, lib, dropout)
    # Methods that write the base weights (Delta-LoRA) get their own copy.
    own_weights = quantized or getattr(config, "moves_base_weights", False)
    model = copy.deepcopy(base) if own_weights else sharing_copy(base)
    if quantized:
        model = lib.quantize(model, targets=list(args.targets))
    model = lib.adapt(model, config)
    optimizer = lorakit_adamw(lib, (p for _, p in lib.adapter_parameters(model)), args.lr)
    hooks = lib.training_hooks(model, total_steps=ADALORA_TOTAL_STEPS) if lib is lorakit else lib.training_hooks(model)
    version = f"@{lib.revision}" if lib is not lorakit else ""
    name = f"lorakit{version} {'qlora' if quantized else method}"
    return with_dropout(
        Condition(name, "lorakit", "qlora" if quantized else method, model, optimizer, hooks or None), dropout
    )


def peft_condition(base: nn.Module, method: str, args: argparse.Namespace, dropout: float = 0.0) -> Condition | None:
    """PEFT's version of `method` (with input dropout `dropout`), or None where PEFT has none."""
    return with_dropout(plain_peft_condition(base, method, args, dropout), dropout)


def plain_peft_condition(base: nn.Module, method: str, args: argparse.Namespace, dropout: float) -> Condition | None:
    import peft

    targets = list(args.targets)
    model = sharing_copy(base)
    if method in ("lora", "dora", "lora-fa"):
        config = peft.LoraConfig(
            r=args.r, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=targets, use_dora=method == "dora"
        )
    elif method == "vera":
        config = peft.VeraConfig(r=args.vera_r, target_modules=targets, vera_dropout=dropout)
    elif method == "adalora":
        config = peft.AdaLoraConfig(
            init_r=12,
            target_r=8,
            lora_alpha=args.alpha,
            lora_dropout=dropout,
            target_modules=targets,
            total_step=ADALORA_TOTAL_STEPS,
        )
        # AdaLoraModel.forward adds the regulariser (PeftModel.forward would skip it); the allocator
        # runs after each optimizer step, as PEFT's docs ask
        model = peft.get_peft_model(model, config).base_model
        return Condition("peft adalora", "peft", method, model, adamw(model.parameters(), args.lr), PeftAllocator())
    else:
        return None
    model = peft.get_peft_model(model, config)
    if method == "lora-fa":
        from peft.optimizers import create_lorafa_optimizer

        optimizer = create_lorafa_optimizer(model, r=args.r, lora_alpha=args.alpha, lr=args.lr)
    else:
        optimizer = adamw(model.parameters(), args.lr)
    return Condition(f"peft {method}", "peft", method, model, optimizer)


class PeftAllocator:
    """PEFT AdaLoRA's `update_and_allocate`, called where lorakit's hooks are."""

    def extra_loss(self, model: nn.Module) -> float:
        return 0.0  # already in the model's loss (AdaLoraModel.forward)

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        model.update_and_allocate(step)


def peft_qlora_condition(base: nn.Module, args: argparse.Namespace) -> Condition:
    """PEFT LoRA over a bitsandbytes NF4 (+ double quant) copy of the base: the reference QLoRA."""
    import peft

    model = common.bnb_quantize(copy.deepcopy(base), list(args.targets), compute_dtype=getattr(torch, args.dtype))
    config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(args.targets))
    model = peft.get_peft_model(model, config)
    return Condition("peft qlora (bitsandbytes)", "peft", "qlora", model, adamw(model.parameters(), args.lr))


def limit_condition(base: nn.Module) -> Condition:
    return Condition("limit (frozen base)", "base", "limit", base, None, feed="embeddings")


def build_conditions(base: nn.Module, args: argparse.Namespace) -> list[Condition]:
    conditions = [limit_condition(base)]
    methods = args.methods or sorted(lorakit.methods.METHODS, key=lambda m: (m != "lora", m))
    if args.methods is None and callable(getattr(lorakit, "quantize", None)):
        methods = methods + ["qlora"]
    for method in methods:
        builders: list[Callable[[], Condition | None]] = []
        if method == "qlora":
            builders.append(lambda: lorakit_condition(base, "lora", args, quantized=True))
            if not args.no_peft and importlib.util.find_spec("bitsandbytes") is not None:
                builders.append(lambda: peft_qlora_condition(base, args))
        else:
            if method not in lorakit.methods.METHODS:
                raise SystemExit(f"unknown method {method!r}; registered: {', '.join(sorted(lorakit.methods.METHODS))}")
            builders.append(lambda m=method: lorakit_condition(base, m, args))
            if args.before_lib is not None and method in registered_methods(args.before_lib):
                builders.append(lambda m=method: lorakit_condition(base, m, args, lib=args.before_lib))
            if method in PEFT_COUNTERPARTS and not args.no_peft:
                builders.append(lambda m=method: peft_condition(base, m, args))
            if args.dropout and has_dropout(method):
                builders.append(lambda m=method: lorakit_condition(base, m, args, dropout=args.dropout))
                if method in PEFT_COUNTERPARTS and not args.no_peft:
                    builders.append(lambda m=method: peft_condition(base, m, args, dropout=args.dropout))
        for build in builders:
            try:
                condition = build()
            except Exception as exc:  # noqa: BLE001 - report the failure, keep benchmarking the rest
                print(f"  could not build a condition for {method}: {type(exc).__name__}: {exc}", flush=True)
                condition = Condition(
                    f"? {method}", "?", method, nn.Identity(), None, error=f"{type(exc).__name__}: {exc}"
                )
            if condition is not None:
                conditions.append(condition)
    if args.chunked_loss:
        conditions += [
            dataclasses.replace(c, name=c.name + " +chunked loss", chunked_loss=True, times=[], memory={})
            for c in conditions
            if c.error is None and c.library in ("base", "lorakit")
        ]
    if args.compile:
        conditions += [compiled_variant(c, args.compile_backend) for c in conditions if c.error is None]
    return conditions


def compiled_variant(condition: Condition, backend: str = "inductor") -> Condition:
    """The same model, parameters and optimizer under `torch.compile` (nothing is copied)."""
    model = torch.compile(condition.model, backend=backend)
    return dataclasses.replace(
        condition, name=condition.name + " +compile", model=model, compiled=True, times=[], memory={}
    )


# --- running -----------------------------------------------------------------------------------


# What a step's time is read from: wall time, or (`--clock process`) the CPU time this process used,
# which leaves out the time other processes held the cores (on a CPU run with one torch thread,
# the two agree on an idle machine).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock = CLOCKS["wall"]


def run_step(condition: Condition, batch: torch.Tensor, device: torch.device, check: bool = False) -> float | None:
    """Time one step; a failing condition is marked and skipped from then on."""
    if condition.error:
        return None
    try:
        common.synchronize(device)
        start = clock()
        condition.step(batch, check=check)
        common.synchronize(device)
        return clock() - start
    except Exception as exc:  # noqa: BLE001
        condition.error = f"{type(exc).__name__}: {exc}"
        print(f"  {condition.name} failed: {condition.error}", flush=True)
        return None


def measure_memory(condition: Condition, batch: torch.Tensor, device: torch.device) -> None:
    if condition.error:
        return
    try:
        gc.collect()
        saved = {"bytes": 0}

        def step() -> None:
            nonlocal saved
            if condition.compiled:  # saved-tensor hooks do not apply inside compiled graphs
                condition.step(batch)
            else:
                with common.saved_tensor_bytes(condition.model) as saved:
                    condition.step(batch)

        peak = common.peak_step_bytes(step, device)
        resident = common.resident_bytes(condition.model, condition.optimizer)
        condition.memory = {"peak_step_bytes": peak, "resident_bytes": resident, "peak_bytes": peak + resident}
        if not condition.compiled:
            condition.memory["saved_bytes"] = saved["bytes"]
    except Exception as exc:  # noqa: BLE001
        condition.error = f"memory: {type(exc).__name__}: {exc}"
        print(f"  {condition.name} failed: {condition.error}", flush=True)


def run(conditions: list[Condition], batch: torch.Tensor, device: torch.device, args: argparse.Namespace) -> None:
    print(f"warmup ({args.warmup} round(s); compiles the +compile variants) and gradient checks", flush=True)
    for i in range(args.warmup):
        for c in conditions:
            t = run_step(c, batch, device, check=i == 0)
            if t is not None:
                print(f"  {c.name:32s} {t * 1e3:9.1f} ms (warmup)", flush=True)
    if not args.no_memory:
        print("memory (one untimed step each)", flush=True)
        for c in conditions:
            measure_memory(c, batch, device)
    per_round = args.steps_per_round
    print(f"timed rounds ({args.steps} x {per_round} step(s) per condition), alternating order", flush=True)
    for i in range(args.steps):
        steps: dict[str, list[float]] = {c.name: [] for c in conditions}
        for j in range(per_round):  # A B C, then C B A: the conditions' mean position is the same
            order = conditions if (i + j) % 2 == 0 else conditions[::-1]
            for c in order:
                if c.malloc:
                    set_malloc(c.malloc)
                t = run_step(c, batch, device)
                if t is not None:
                    steps[c.name].append(t)
        for c in conditions:
            if steps[c.name]:
                c.times.append(min(steps[c.name]))
                c.round_steps.append(steps[c.name])
        done = [c for c in conditions if c.times]
        print(f"  round {i + 1}: " + ", ".join(f"{c.name} {c.times[-1] * 1e3:.0f}" for c in done), flush=True)


# glibc's adaptive mmap threshold rises to the largest block freed so far, at most 32 MiB (and the
# trim threshold to twice that): a fixed 32 MiB stands in for it once a step has run, so the two
# settings can take turns within one process.
GLIBC_ADAPTIVE_MAX = 32 << 20


def set_malloc(setting: str) -> None:
    """--malloc both: before a condition's step, glibc's thresholds as `lorakit train` sets them
    ("lorakit") or at the adaptive threshold's ceiling ("default")."""
    import ctypes

    from lorakit.train import allocator

    libc = ctypes.CDLL(None)
    mmap, trim = (
        (allocator.MMAP_THRESHOLD_BYTES, allocator.TRIM_THRESHOLD_BYTES)
        if setting == "lorakit"
        else (GLIBC_ADAPTIVE_MAX, 2 * GLIBC_ADAPTIVE_MAX)
    )
    if not (libc.mallopt(allocator.M_MMAP_THRESHOLD, mmap) and libc.mallopt(allocator.M_TRIM_THRESHOLD, trim)):
        raise SystemExit("--malloc both: mallopt refused")


def with_malloc_twins(conditions: list[Condition]) -> list[Condition]:
    """Each condition twice, under each malloc setting, sharing its model and optimizer."""
    return [
        dataclasses.replace(c, name=f"{c.name} [malloc {setting}]", malloc=setting, times=[], memory={})
        for c in conditions
        for setting in ("lorakit", "default")
    ]


def profile_method(
    conditions: list[Condition], method: str, batch: torch.Tensor, device: torch.device, rows: int
) -> str:
    """torch.profiler tables (self time by op) for the lorakit, PEFT and limit steps of `method`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for c in conditions:
        if c.error or c.compiled or c.method not in (method, "limit"):
            continue
        with profile(activities=activities, record_shapes=True) as prof:
            c.step(batch)
            common.synchronize(device)
        out.append(f"### {c.name}: one step, by self time\n")
        out.append(prof.key_averages().table(sort_by=sort, row_limit=rows))
        out.append(f"\n### {c.name}: by self time and input shapes\n")
        out.append(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows))
    return "\n".join(out)


# --- reporting ---------------------------------------------------------------------------------


def summarize(conditions: list[Condition]) -> list[dict[str, Any]]:
    by_key = {(c.library, c.method, c.compiled, c.chunked_loss): c for c in conditions}
    rows = []
    for c in conditions:
        ms = common.median(c.times) * 1e3
        limit = by_key.get(("base", "limit", c.compiled, c.chunked_loss))  # the limit with the same loss
        peft = by_key.get(("peft", c.method, c.compiled, False))  # PEFT has only the model's own loss
        limit_ms = common.median(limit.times) * 1e3 if limit and limit.times else math.nan
        peft_ms = common.median(peft.times) * 1e3 if peft and peft.times and c.library == "lorakit" else math.nan
        row = {
            "condition": c.name,
            "library": c.library,
            "method": c.method,
            "compiled": c.compiled,
            "ms_per_step_median": ms,
            "ms_per_step_all": [t * 1e3 for t in c.times],
            "ms_every_step_by_round": [[t * 1e3 for t in steps] for steps in c.round_steps],
            "vs_limit": ms / limit_ms,
            "vs_peft_same_method": ms / peft_ms,
            # the rounds' own ratios: a round's conditions ran back to back, so these cancel the
            # machine's drift between rounds that a ratio of two medians keeps
            "vs_limit_median_of_rounds": median_of_ratios(c.times, limit.times if limit else []),
            "vs_peft_median_of_rounds": median_of_ratios(
                c.times, peft.times if peft and c.library == "lorakit" else []
            ),
            **c.memory,
            "error": c.error,
        }
        if limit and limit.memory.get("peak_bytes") and c.memory.get("peak_bytes"):
            row["peak_vs_limit"] = c.memory["peak_bytes"] / limit.memory["peak_bytes"]
        if c.library == "lorakit" and peft and peft.memory.get("peak_bytes") and c.memory.get("peak_bytes"):
            row["peak_vs_peft_same_method"] = c.memory["peak_bytes"] / peft.memory["peak_bytes"]
        rows.append(row)
    return rows


def median_of_ratios(times: list[float], reference: list[float]) -> float:
    """The median over rounds of `times[i] / reference[i]` (NaN without a reference)."""
    ratios = [t / r for t, r in zip(times, reference)]
    return common.median(ratios) if ratios else math.nan


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """Every timed round's ms per condition, and lorakit over PEFT (same method) round by round: the
    conditions of a round ran back to back, so a round's ratio is paired (the load is shared)."""
    rounds = max((len(r["ms_per_step_all"]) for r in rows), default=0)
    if not rounds:
        return ""
    by_key = {(r["library"], r["method"], r["compiled"]): r for r in rows}
    body = [[r["condition"]] + [fmt(t, ".0f") for t in r["ms_per_step_all"]] for r in rows if not r["error"]]
    for r in rows:
        peft = by_key.get(("peft", r["method"], r["compiled"]))
        if r["library"] != "lorakit" or peft is None or r["error"] or peft["error"] or "+chunked" in r["condition"]:
            continue
        ratios = [a / b for a, b in zip(r["ms_per_step_all"], peft["ms_per_step_all"], strict=False)]
        body.append([f"{r['condition']} / {peft['condition']}"] + [fmt(x, ".3f") for x in ratios])
    return common.markdown_table(["ms per step"] + [f"round {i + 1}" for i in range(rounds)], body)


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    header = [
        "condition",
        "ms/step (median)",
        "x limit (median of rounds)",
        "x PEFT same method (median of rounds)",
        "peak MiB",
        "step peak MiB",
        "saved-for-backward MiB",
        "peak x limit",
        "peak x PEFT",
    ]
    body = []
    for r in rows:
        if r["error"]:
            body.append([r["condition"], "failed: " + r["error"][:80]] + [""] * (len(header) - 2))
            continue
        mib = lambda key: fmt(r[key] / common.MiB if key in r else None, ".0f")  # noqa: E731, B023 (used in this iteration)
        body.append(
            [
                r["condition"],
                fmt(r["ms_per_step_median"], ".1f"),
                fmt(r["vs_limit_median_of_rounds"], ".3f"),
                fmt(r["vs_peft_median_of_rounds"], ".3f"),
                mib("peak_bytes"),
                mib("peak_step_bytes"),
                mib("saved_bytes"),
                fmt(r.get("peak_vs_limit"), ".3f"),
                fmt(r.get("peak_vs_peft_same_method"), ".3f"),
            ]
        )
    return common.markdown_table(header, body)


MEMORY_NOTE = (
    "peak MiB = resident (the condition's parameters, buffers, optimizer state; shared base weights "
    "included) + step peak. step peak = peak of tensor bytes allocated during one step above the "
    "step's start ({how}). saved-for-backward = distinct storages autograd saved, parameters excluded "
    "(eager only)."
)


def report(
    args: argparse.Namespace,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    device: torch.device,
    batch_shape: tuple[int, int],
    extra: dict[str, Any],
) -> str:
    how = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "PyTorch CPU allocator events from torch.profiler(profile_memory=True); oneDNN/MKL scratch not seen"
    )
    lines = [
        f"## lorakit step benchmark: {args.model}, {args.dtype}, batch {batch_shape[0]} x {batch_shape[1]}, "
        f"r={args.r} (VeRA r={args.vera_r}), alpha={args.alpha}, targets {','.join(args.targets)}",
        "",
        "command: `" + " ".join(["python"] + sys.argv) + "`",
        "",
        f"machine: {info['cpu']} ({info['cpu_count']} cores visible, torch threads {info['torch_threads']})"
        + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f"; torch {info['torch']}, transformers {info.get('transformers')}, peft {info.get('peft')}; "
        f"device {info['device']}",
        f"load average before / after: {extra['load_before']} / {extra['load_after']}",
        f"clock: {args.clock}; steps: {args.warmup} warmup + 1 memory + {args.steps} timed rounds per condition "
        f"({args.steps_per_round} step(s) each, a round's time its fastest), interleaved in "
        "alternating order; medians reported (ratios: the median of the rounds' ratios). One step = forward + loss + backward + AdamW step (+ method "
        "hooks) + zero_grad. The limit has no optimizer (no trainable parameter) and backpropagates to the "
        "input embeddings.",
        "",
        table(rows),
        "",
        MEMORY_NOTE.format(how=how),
        "",
        "Every round (ms), and lorakit / PEFT round by round:",
        "",
        rounds_table(rows),
    ]
    if device.type == "cpu":
        lines.append(
            "CPU note: this machine's cores may be shared with other processes (see the load average); "
            "differences below a few percent are within noise. With other processes busy, use --threads 1: "
            "2-thread OpenMP steps stall at every barrier when a core is taken (steps 5-10x slower, erratic)."
        )
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=["smollm2", "llama-1b", "tiny"], help="default: smollm2 on CPU, llama-1b on CUDA")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument("--batch", type=int, help="default 4 (2 with --quick)")
    p.add_argument("--seq", type=int, help="default 256 on CPU (128 with --quick), 2048 on CUDA")
    p.add_argument("--r", type=int, default=16)
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="also run each method that has an input dropout (lorakit's and PEFT's) with this dropout",
    )
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--vera-r", type=int, default=256, help="VeRA's rank (its shared projections)")
    p.add_argument("--targets", nargs="+", default=SEVEN_PROJECTIONS)
    p.add_argument("--methods", nargs="+", help="lorakit method names (and 'qlora'); default: all registered")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's conditions")
    p.add_argument("--steps", type=int, help="timed rounds (default 3, 2 with --quick)")
    p.add_argument(
        "--steps-per-round",
        type=int,
        default=1,
        help="steps of every condition in a round, in mirrored order (A B C C B A); the round's time is "
        "a condition's fastest step, so one stalled step does not decide a round (every step is kept)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants (vs the compiled limit)")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend for --compile (aot_eager: the same code paths without C++/Triton builds)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory step")
    p.add_argument(
        "--chunked-loss",
        action="store_true",
        help="also time lorakit's conditions (and the limit) with lorakit.losses.causal_lm_loss (no full logits)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (CPU runs with --threads 1 on a machine other "
        "processes keep busy: their time on the cores is left out)",
    )
    p.add_argument("--quick", action="store_true", help="smaller batch and fewer rounds")
    p.add_argument(
        "--profile", metavar="METHOD", help="after timing, profile one step of lorakit's, PEFT's and the limit"
    )
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/step-<device>-<model>-<time>.json)")
    p.add_argument(
        "--malloc",
        choices=["default", "lorakit", "both"],
        default="default",
        help="glibc's malloc as it comes, or as `lorakit train` sets it on the CPU (a 1 MiB mmap threshold, "
        "lorakit.train.allocator), or both: every condition twice a round, the thresholds set before each "
        "(the default stood in for by 32 MiB, the adaptive threshold's ceiling; glibc only)",
    )
    p.add_argument(
        "--before",
        metavar="REV",
        help="also time lorakit as it was at git revision REV (same run, interleaved): before/after a change",
    )
    args = p.parse_args(argv)
    if args.steps_per_round < 1 or (args.steps is not None and args.steps < 1):
        p.error("--steps and --steps-per-round must be at least 1")
    args.before_lib = lorakit_at(args.before) if args.before else None
    gpu = args.device == "cuda"
    args.model = args.model or ("llama-1b" if gpu else "smollm2")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (2048 if gpu else 128 if args.quick else 256)
    args.steps = args.steps or (2 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # compiled kernels go to a fresh directory: a shared on-disk cache keyed without the CPU's
        # vector ISA was seen to hand back kernels built for another (tests/conftest.py)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorakit-inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "lorakit" and not lorakit.train.allocator.return_freed_memory_to_system(args.device):
        print("--malloc lorakit: not set (not glibc, not the CPU, or set by the environment)", flush=True)
    global clock
    if args.clock == "process" and args.device == "cuda":
        raise SystemExit("--clock process measures CPU time: use it for CPU runs")
    clock = CLOCKS[args.clock]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    load_before = common.load_average()

    base = build_model(args.model, device, dtype)
    vocab = base.get_input_embeddings().num_embeddings
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    conditions = build_conditions(base, args)
    if args.malloc == "both":
        conditions = with_malloc_twins(conditions)
    print("conditions: " + ", ".join(c.name for c in conditions), flush=True)

    run(conditions, batch, device, args)
    info = common.machine_info(device)
    rows = summarize(conditions)
    extra = {"load_before": load_before, "load_after": common.load_average()}
    text = report(args, info, rows, device, (args.batch, args.seq), extra)
    print("\n" + text, flush=True)

    result = {
        "benchmark": "bench_step",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "before_lib"},
        "machine": info,
        **extra,
        "results": rows,
        "markdown": text,
    }
    if args.profile:
        profile = profile_method(conditions, args.profile, batch, device, args.profile_rows)
        print("\n" + profile, flush=True)
        result["profile"] = profile
    out = args.out or RESULTS_DIR / (f"step-{args.device}-{args.model}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nsaved {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
