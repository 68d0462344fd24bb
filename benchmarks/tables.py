"""The benchmark tables of the README and the documentation, made from benchmarks/results/*.json.

    python benchmarks/tables.py            # rewrite every generated block in README.md and docs/
    python benchmarks/tables.py --check    # exit 1, naming each block that differs from the results
    python benchmarks/tables.py step-all   # print one table

A page holds a generated block as

    <!-- generated: NAME -->
    ...the table, written by this script...
    <!-- end generated -->

so that no number of a table is typed by hand: the text between the markers is always what the
function of that name makes of the result files. The documentation build fills the blocks again and
fails when a page's copy differs (docs/hooks/lorakit_docs.py), and tests/test_docs.py checks it too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

from lorakit.compare import LIMIT_PAIRED

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)
METHOD_NAMES = {
    "lora": "LoRA",
    "lora-fa": "LoRA-FA",
    "vera": "VeRA",
    "dora": "DoRA",
    "delta-lora": "Delta-LoRA",
    "adalora": "AdaLoRA",
    "lora-drop": "LoRA-drop",
    "lora-plus": "LoRA+",
    "qlora": "QLoRA",
}


def benchmark_module(name: str):
    """Another script of benchmarks/ as a module (benchmarks/ is not a package, nor always on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


# --- formatting -------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f} %"


def points(x: float) -> str:
    """A difference of two accuracies, in percentage points."""
    return f"{100 * x:+.2f}"


def rate(x: float) -> str:
    """A learning rate as people write it: 1e-3, 2.5e-4."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def command(name: str) -> str:
    """The command a result file records, as one would type it (`python benchmarks/...`)."""
    text = load(name)["command"]
    return text if text.startswith("python") else "python " + text


def source(name: str, cmd: bool = True) -> str:
    """Where a table comes from: the command that wrote the file, and the file."""
    where = f"`benchmarks/results/{name}`"
    return f"`{command(name)}` ({where})" if cmd else where


# --- one training step (bench_step.py) -----------------------------------------------------------


def step_rows(name: str) -> dict[str, dict]:
    """condition -> result, of a bench_step.py file."""
    return {r["condition"]: r for r in load(name)["results"]}


def round_ratios(condition: dict, reference: dict) -> list[float]:
    """Each round's time of one condition over another's in the same round (paired: a round's
    conditions ran back to back)."""
    return [t / r for t, r in zip(condition["ms_per_step_all"], reference["ms_per_step_all"])]


def median_of_rounds(condition: dict, reference: dict) -> float:
    return statistics.median(round_ratios(condition, reference))


def peft_twin(rows: dict[str, dict], method: str) -> dict | None:
    return rows.get(f"peft {method}") or rows.get(f"peft {method} (bitsandbytes)")


def step_all() -> str:
    """Every method against PEFT's same method, one run."""
    rows = step_rows("step-cpu-all-methods.json")
    limit = rows["limit (frozen base)"]
    out = []
    for method in ("lora", "lora-fa", "dora", "vera", "delta-lora", "adalora", "lora-drop", "qlora"):
        ours = rows[f"lorakit {method}"]
        peft = peft_twin(rows, method)
        out.append(
            [
                METHOD_NAMES[method] + (" (stage 2)" if method == "lora-drop" else ""),
                f"{ours['ms_per_step_median']:,.0f}",
                f"{peft['ms_per_step_median']:,.0f}" if peft else "– (PEFT has none)",
                f"**{median_of_rounds(ours, peft):.3f}**" if peft else "–",
                f"{median_of_rounds(ours, limit):.3f}",
                mib(ours["peak_bytes"]),
                mib(peft["peak_bytes"]) if peft else "–",
                f"**{ours['peak_vs_peft_same_method']:.3f}**" if peft else "–",
                mib(ours["saved_bytes"]),
            ]
        )
    header = [
        "method",
        "lorakit ms/step",
        "PEFT ms/step",
        "time x PEFT (median of rounds)",
        "time x limit (median of rounds)",
        "lorakit peak MiB",
        "PEFT peak MiB",
        "peak x PEFT",
        "saved for backward MiB",
    ]
    return table(header, out) + f"\n\n{source('step-cpu-all-methods.json')}"


def step_qlora_native() -> str:
    rows = step_rows("step-cpu-qlora-native.json")
    q, lora = rows["lorakit qlora"], rows["lorakit lora"]
    peft = rows["peft qlora (bitsandbytes)"]
    return (
        table(
            ["condition", "time x limit", "time x PEFT + bitsandbytes", "peak MiB"],
            [
                [
                    "lorakit QLoRA (NF4 + LoRA r=16)",
                    f"{q['vs_limit']:.3f}",
                    f"**{q['vs_peft_same_method']:.3f}**",
                    mib(q["peak_bytes"]),
                ],
                ["PEFT + bitsandbytes QLoRA", f"{peft['vs_limit']:.3f}", "1.000", mib(peft["peak_bytes"])],
                ["lorakit LoRA, fp32 base", f"{lora['vs_limit']:.3f}", "–", mib(lora["peak_bytes"])],
            ],
        )
        + f"\n\n{source('step-cpu-qlora-native.json')}"
    )


def chunked_loss() -> str:
    rows = step_rows("step-cpu-chunked-loss.json")
    out = []
    for label, key in (
        ("limit (frozen base)", "limit (frozen base)"),
        ("lorakit LoRA", "lorakit lora"),
        ("lorakit DoRA", "lorakit dora"),
        ("lorakit VeRA", "lorakit vera"),
    ):
        full, chunked = rows[key], rows[key + " +chunked loss"]
        peft = (full.get("peak_vs_peft_same_method"), chunked.get("peak_vs_peft_same_method"))
        out.append(
            [
                label,
                f"{mib(full['peak_step_bytes'])} -> **{mib(chunked['peak_step_bytes'])}**",
                f"{mib(full['peak_bytes'])} -> {mib(chunked['peak_bytes'])}",
                "–" if peft[0] is None else f"{peft[0]:.3f} -> **{peft[1]:.3f}**",
                f"{full['vs_limit']:.3f} -> {chunked['vs_limit'] * chunked_limit_ratio(rows):.3f}",
            ]
        )
    header = [
        "condition",
        "step peak MiB, model's loss -> chunked",
        "peak MiB",
        "peak x PEFT (model's loss)",
        "time x limit (the model's loss limit)",
    ]
    return table(header, out) + f"\n\n{source('step-cpu-chunked-loss.json')}"


def chunked_limit_ratio(rows: dict[str, dict]) -> float:
    """The chunked limit's step time as a multiple of the plain limit's (both medians of one run)."""
    return (
        rows["limit (frozen base) +chunked loss"]["ms_per_step_median"]
        / rows["limit (frozen base)"]["ms_per_step_median"]
    )


def compile_step() -> str:
    rows = step_rows("step-cpu-compile.json")
    out = []
    for label, key in (
        ("limit (frozen base)", "limit (frozen base)"),
        ("lorakit LoRA", "lorakit lora"),
        ("PEFT LoRA", "peft lora"),
    ):
        eager, compiled = rows[key], rows[key + " +compile"]
        vs_peft = (
            "–"
            if key.startswith(("limit", "peft"))
            else f"{eager['vs_peft_same_method']:.3f} / {compiled['vs_peft_same_method']:.3f}"
        )
        out.append(
            [
                label,
                f"{eager['vs_limit']:.3f} / {compiled['vs_limit']:.3f}",
                vs_peft,
                f"{mib(eager['peak_bytes'])} / {mib(compiled['peak_bytes'])}",
            ]
        )
    ratio = (
        rows["limit (frozen base) +compile"]["ms_per_step_median"] / rows["limit (frozen base)"]["ms_per_step_median"]
    )
    header = [
        "condition",
        "time x its limit, eager / compiled",
        "time x PEFT, eager / compiled",
        "peak MiB, eager / compiled",
    ]
    return (
        table(header, out)
        + f"\n\nThe compiled limit took {ratio:.3f}x the eager limit's time. "
        + source("step-cpu-compile.json")
    )


def before_after(name: str, methods: tuple[str, ...], then: str, now: str) -> str:
    """A bench_step.py run with `--before COMMIT`: the same step through two versions of lorakit's code,
    interleaved in one process (`then`: the code at COMMIT, `now`: the code it was compared with)."""
    rows = step_rows(name)
    other = next(c.split()[0].split("@")[1] for c in rows if "@" in c)
    out = []
    for method in methods:
        b, a = rows[f"lorakit@{other} {method}"], rows[f"lorakit {method}"]
        vs_peft = (
            "–"
            if math.isnan(a.get("vs_peft_same_method", math.nan))
            else f"{b['vs_peft_same_method']:.3f} -> {a['vs_peft_same_method']:.3f}"
        )
        out.append(
            [
                METHOD_NAMES[method],
                f"{b['vs_limit']:.3f} -> {a['vs_limit']:.3f}",
                vs_peft,
                f"{mib(b['peak_bytes'])} -> {mib(a['peak_bytes'])}",
            ]
        )
    header = [f"method: {then} -> {now}", "time x limit", "time x PEFT's", "peak MiB"]
    return table(header, out) + f"\n\n{source(name)}"


def named_adapters() -> str:
    return before_after(
        "step-cpu-smollm2-20261130T111159Z.json",
        ("lora", "lora-fa", "dora", "vera", "delta-lora"),
        "one adapter per layer",
        "named adapters",
    )


def fused_vera() -> str:
    return before_after("step-cpu-fused-vera.json", ("vera",), "separate autograd ops", "one fused node")


def vera_merged_forward() -> str:
    return before_after(
        "step-cpu-vera-merged-forward.json", ("vera", "lora"), "forward through z B'ᵀ", "through W + B'A"
    )


def lora_breakdown() -> str:
    """LoRA's step above the limit, piece by piece (lora_breakdown.py)."""
    name = "lora-breakdown-cpu.json"
    rows = load(name)["results"]
    out = [
        [
            r["condition"],
            f"{r['ms_median']:,.0f}",
            f"{r['x_limit_median_of_rounds']:.3f}",
            "–" if r["adds_x_limit"] is None else f"{r['adds_x_limit']:+.3f}",
            " ".join(f"{x:.3f}" for x in r["rounds_x_limit"]),
        ]
        for r in rows
    ]
    header = [
        "condition",
        "ms/step (median)",
        "x limit (median of rounds)",
        "the piece adds (x limit)",
        "every round x limit",
    ]
    return table(header, out) + f"\n\n{source(name)}"


def lora_fused_adamw() -> str:
    """LoRA's step before and after the fused AdamW and dL/dB as (z^T g)^T, beside PEFT, every round."""
    return lora_before_now("step-cpu-lora-fused-adamw.json")


def lora_siblings() -> str:
    """LoRA's step before and after q/k/v and gate/up ran as one node each, beside PEFT, every round."""
    return lora_before_now("step-cpu-lora-siblings.json")


def lora_rounds() -> str:
    """lorakit's LoRA step and PEFT's, every round of one long paired run."""
    return lora_before_now("step-cpu-lora-rounds.json")


# one command run back to back, four steps of every condition a round (`--steps-per-round 4`)
LORA_ROUNDS4_FILES = [f"step-cpu-lora-rounds4-{i}.json" for i in (1, 2, 3)]


def paired_lora_run(name: str) -> dict:
    """A `bench_step.py --methods lora` run: lorakit's and PEFT's medians of per-round ratios to the
    limit, lorakit's per-round ratios to PEFT, and the limit's per-round times."""
    rows = step_rows(name)
    limit, ours, peft = (rows[c] for c in ("limit (frozen base)", "lorakit lora", "peft lora"))
    return {
        "vs_limit": median_of_rounds(ours, limit),
        "peft_vs_limit": median_of_rounds(peft, limit),
        "per_peft": round_ratios(ours, peft),
        "limit_ms": limit["ms_per_step_all"],
    }


def command_without_out(name: str) -> str:
    """The command a result file records, less its `--out` (for runs of one command into several files)."""
    return command(name).split(" --out ")[0]


def lora_rounds4() -> str:
    """Runs of one paired command in a row: each run's medians of per-round ratios, its rounds
    ahead of PEFT, its worst round, and how much the limit itself moved."""
    out = []
    for number, name in enumerate(LORA_ROUNDS4_FILES, start=1):
        run = paired_lora_run(name)
        per_peft = run["per_peft"]
        out.append(
            [
                f"{number} (`{name}`)",
                f"{min(run['limit_ms']) / 1e3:.1f}-{max(run['limit_ms']) / 1e3:.1f} s",
                f"{run['vs_limit']:.3f}",
                f"{run['peft_vs_limit']:.3f}",
                f"{statistics.median(per_peft):.3f}",
                f"{sum(r < 1 for r in per_peft)} of {len(per_peft)}",
                f"{max(per_peft):.3f}",
            ]
        )
    header = [
        "run",
        "the limit's step, per round",
        "lorakit x limit",
        "PEFT x limit",
        "lorakit x PEFT",
        "rounds lorakit is ahead",
        "lorakit's worst round x PEFT",
    ]
    cmd = command_without_out(LORA_ROUNDS4_FILES[0])
    return table(header, out) + f"\n\n`{cmd}`, run {len(out)} times in a row; every step of every round is in each file"


def lora_before_now(name: str) -> str:
    """A `bench_step.py --methods lora --before REV` run: lorakit's LoRA before and now, and PEFT's,
    each round's ratio to the limit and to PEFT."""
    rows = step_rows(name)
    before = next((c for c in rows if c.startswith("lorakit@")), None)
    limit, peft = rows["limit (frozen base)"], rows["peft lora"]
    out = []
    if before:
        conditions = [("lorakit LoRA, before", before), ("lorakit LoRA, now", "lorakit lora")]
    else:
        conditions = [("lorakit LoRA", "lorakit lora")]
    for label, condition in (*conditions, ("PEFT LoRA", "peft lora")):
        per_limit = round_ratios(rows[condition], limit)
        per_peft = round_ratios(rows[condition], peft)
        out.append(
            [
                label,
                f"{statistics.median(per_limit):.3f}",
                "–" if condition == "peft lora" else f"{statistics.median(per_peft):.3f}",
                " ".join(f"{x:.3f}" for x in per_limit),
                "–" if condition == "peft lora" else " ".join(f"{x:.3f}" for x in per_peft),
            ]
        )
    header = [
        "condition",
        "x limit (median of rounds)",
        "x PEFT (median of rounds)",
        "every round x limit",
        "every round x PEFT",
    ]
    return table(header, out) + f"\n\n{source(name)}"


# the bench_step.py runs of the current layers (fused LoRA and VeRA nodes, VeRA's forward through W + B'A)
CURRENT_STEP_FILES = [
    "step-cpu-all-methods.json",
    "step-cpu-qlora-native.json",
    "step-cpu-compile.json",
    "step-cpu-vera-merged-forward.json",
]


def flop_floor() -> str:
    """The least multiply-adds a method's gradient needs, against the step times measured (flop_floor.py)."""
    floor = benchmark_module("flop_floor")

    def ratio(model: str, batch: int, seq: int, extra) -> float:
        m = floor.MODELS[model]
        limit = floor.limit_per_token(m, seq)
        return (limit + extra(m, batch * seq)) / limit

    out = []
    for label, method, extra in (
        ("LoRA r = 16", "lora", lambda m, t: floor.lora_per_token(m, 16, t)),
        ("VeRA r = 256", "vera", lambda m, t: floor.vera_per_token(m, 256, t)),
    ):
        measured = [
            step_rows(f)[f"lorakit {method}"]["vs_limit"]
            for f in CURRENT_STEP_FILES
            if f"lorakit {method}" in step_rows(f)
        ]
        out.append(
            [
                label,
                f"{ratio('smollm2', 4, 256, extra):.3f}",
                f"{min(measured):.3f}-{max(measured):.3f}",
                f"{ratio('llama-1b', 4, 2048, extra):.3f}",
            ]
        )
    header = [
        "step (all seven projections)",
        "SmolLM2-135M, batch 4 x 256: floor x limit",
        "measured time x limit",
        "Llama-3.2-1B shape, batch 4 x 2048: floor",
    ]
    return (
        table(header, out) + "\n\n`python benchmarks/flop_floor.py` (and `--model llama-1b --seq 2048`); measured: "
        "the `bench_step.py` runs of the current layers (" + ", ".join(f"`{f}`" for f in CURRENT_STEP_FILES) + ")"
    )


# --- quality (quality_sst2.py, quality_alpaca.py) --------------------------------------------------


def sst2(name: str) -> dict[str, dict]:
    return {r["condition"]: r for r in load(name)["results"]}


def sst2_vs_peft() -> str:
    """lorakit's LoRA and DoRA against PEFT's on the same model, data, budget and seed."""
    files = [f"sst2-vs-peft-seed{s}.json" for s in (0, 1, 2)]
    runs = [sst2(f) for f in files]
    out = []
    for ours, theirs in (("lora", "peft-lora"), ("dora", "peft-dora")):
        a = [r[ours]["dev_accuracy"] for r in runs]
        b = [r[theirs]["dev_accuracy"] for r in runs]
        out.append(
            [
                METHOD_NAMES[ours],
                *(f"{pct(x)} / {pct(y)}" for x, y in zip(a, b)),
                f"**{pct(statistics.mean(a))} / {pct(statistics.mean(b))}**",
                points(statistics.mean(a) - statistics.mean(b)),
                f"{runs[0][ours]['trainable']:,} / {runs[0][theirs]['trainable']:,}",
            ]
        )
    header = [
        "method (r=8)",
        "seed 0: lorakit / PEFT",
        "seed 1",
        "seed 2",
        "mean",
        "lorakit - PEFT (points)",
        "trainable params",
    ]
    cmd = command(files[0]).replace("--seed 0", "--seed S").replace("sst2-vs-peft-seed0", "sst2-vs-peft-seedS")
    return table(header, out) + f"\n\n`{cmd}`, S = 0, 1, 2 (`benchmarks/results/sst2-vs-peft-seed*.json`)"


def sst2_quality() -> str:
    """Every method at the small budget, seed 0, each at the learning rate that suits it."""
    full = sst2("quality-sst2-20261123T131726Z.json")
    plus = sst2("quality-sst2-20261123T132139Z.json")["lora-plus"]
    sweep = sst2("quality-sst2-lr-sweep.json")
    lora = full["lora"]
    rows = [
        ("full fine-tuning", full["full"], ""),
        ("LoRA r=8", lora, ""),
        ("DoRA r=8", full["dora"], ""),
        ("Delta-LoRA r=8", full["delta-lora"], " (holds the moved W)"),
        ("LoRA+ ratio 16", plus, ""),
        ("LoRA-FA r=8", sweep["lora-fa@0.003"], ""),
        ("VeRA r=256", sweep["vera@0.03"], ""),
    ]
    out = []
    for label, r, note in rows:
        lr = rate(r["lr"]) + (f" (B: {rate(r['lr'] * r['loraplus_ratio'])})" if r.get("loraplus_ratio") else "")
        delta = "" if r is full["full"] else f" ({points(r['dev_accuracy'] - full['full']['dev_accuracy'])} vs full)"
        size = "–" if r["adapter_bytes"] is None else f"{r['adapter_bytes'] / 2**20:.2f} MiB{note}"
        out.append([label, lr, pct(r["dev_accuracy"]) + delta, f"{r['trainable']:,}", size])
    return (
        table(["condition", "lr", "dev accuracy", "trainable params", "adapter on disk"], out)
        + f"\n\n{source('quality-sst2-20261123T131726Z.json')}; LoRA+: {source('quality-sst2-20261123T132139Z.json')}; "
        f"LoRA-FA and VeRA: {source('quality-sst2-lr-sweep.json')}"
    )


def lr_sweep() -> str:
    sweep = sst2("quality-sst2-lr-sweep.json")
    rates = (1e-3, 3e-3, 1e-2, 3e-2)
    out = []
    for method in ("lora-fa", "vera"):
        accs = [sweep[f"{method}@{lr:g}"]["dev_accuracy"] for lr in rates]
        best = max(accs)
        out.append([METHOD_NAMES[method], *(f"**{pct(a)}**" if a == best else pct(a) for a in accs)])
    return (
        table(["method", "1e-3 (LoRA's)", "3e-3", "1e-2", "3e-2"], out)
        + f"\n\n{source('quality-sst2-lr-sweep.json')}; LoRA at 1e-3, the same seed: "
        f"{pct(sst2('quality-sst2-20261123T131726Z.json')['lora']['dev_accuracy'])}"
    )


def seeds_table(
    files: list[str], columns: list[tuple[str, str]], lora_file: list[str] | None = None
) -> list[list[str]]:
    """Per seed, the dev accuracy of each (label, condition), LoRA's first; a mean row at the end."""
    values = []
    for i, name in enumerate(files):
        runs = sst2(name)
        if lora_file:
            runs = {**sst2(lora_file[i]), **runs}
        values.append([runs[cond]["dev_accuracy"] for _, cond in columns])
    rows = [[str(seed), *(pct(v) for v in vals)] for seed, vals in enumerate(values)]
    means = [statistics.mean(col) for col in zip(*values)]
    return rows + [["mean", *(pct(m) for m in means)]], values


def sst2_qlora_seeds() -> str:
    plain, _ = seeds_table([f"sst2-qlora-seed{s}.json" for s in range(3)], [("LoRA", "lora"), ("QLoRA", "qlora")])
    loftq, _ = seeds_table([f"sst2-qlora-loftq-seed{s}.json" for s in range(3)], [("LoftQ", "qlora-loftq")])
    out = []
    for a, b in zip(plain, loftq):
        lora, q, lq = (float(x.split()[0]) for x in (a[1], a[2], b[1]))
        out.append([a[0], a[1], a[2], f"{q - lora:+.2f}", b[1], f"{lq - lora:+.2f}"])
    header = ["seed", "LoRA r=8", "QLoRA r=8", "QLoRA - LoRA", "QLoRA + LoftQ init", "LoftQ - LoRA"]
    return (
        table(header, out) + "\n\n`python benchmarks/quality_sst2.py --methods lora qlora --seed S` and "
        "`--methods qlora-loftq --seed S`, S = 0, 1, 2 (`benchmarks/results/sst2-qlora-seed*.json`, "
        "`sst2-qlora-loftq-seed*.json`)"
    )


def sst2_adalora_lora_drop_seeds() -> str:
    files = [f"sst2-adalora-lora-drop-seed{s}.json" for s in range(3)]
    high = [f"sst2-adalora-lr1e-2-seed{s}.json" for s in range(3)]
    out, values = [], []
    for seed in range(3):
        runs = {**sst2(files[seed]), **sst2(high[seed])}
        drop = runs["lora-drop"]
        kept = len(drop["layout"]["kept"])
        accs = [runs[c]["dev_accuracy"] for c in ("lora", "adalora", "adalora-lr1e-2", "lora-drop")]
        share = drop["layout"]["adapter_params_vs_lora_r8"]
        values.append([*accs, accs[3] - accs[0], share])
        out.append(
            [
                str(seed),
                *(pct(a) for a in accs),
                points(accs[3] - accs[0]),
                f"{pct(share, 1)} ({kept} modules keep their own pair)",
            ]
        )
    means = [statistics.mean(col) for col in zip(*values)]
    out.append(["mean", *(pct(m) for m in means[:4]), points(means[4]), pct(means[5], 1)])
    header = [
        "seed",
        "LoRA r=8",
        "AdaLoRA, lr 1e-3",
        "AdaLoRA, lr 1e-2",
        "LoRA-drop",
        "LoRA-drop - LoRA",
        "LoRA-drop's adapter parameters / LoRA's",
    ]
    return (
        table(header, out) + "\n\n`python benchmarks/quality_sst2.py --methods lora adalora lora-drop --seed S` "
        "and `--methods adalora-lr1e-2 --seed S`, S = 0, 1, 2 (`benchmarks/results/sst2-adalora-lora-drop-seed*.json`, "
        "`sst2-adalora-lr1e-2-seed*.json`)"
    )


def sst2_8000_adalora_lora_drop() -> str:
    runs = sst2("sst2-adalora-lora-drop-8000.json")
    out = []
    for label, cond in (
        ("LoRA r=8, lr 1e-3", "lora"),
        ("LoRA-drop, lr 1e-3", "lora-drop"),
        ("AdaLoRA 12 -> 8, lr 1e-3", "adalora"),
    ):
        r = runs[cond]
        share = r["layout"].get("adapter_params_vs_lora_r8", 1.0)
        note = {
            "lora-drop": f"{len(r['layout'].get('kept', []))} of 36 modules keep their own pair",
            "adalora": "final ranks {}..{} across modules".format(
                *(f(r["layout"]["final_ranks"].values()) for f in (min, max))
            )
            if cond == "adalora"
            else "",
            "lora": "",
        }[cond]
        out.append([label, pct(r["dev_accuracy"]), pct(share, 1), note])
    return (
        table(["condition", "dev accuracy", "adapter parameters / LoRA r=8's", "notes"], out)
        + f"\n\n{source('sst2-adalora-lora-drop-8000.json')}"
    )


def sst2_8000_seeds() -> str:
    files = ["sst2-methods-8000.json", "sst2-methods-8000-seed1.json", "sst2-methods-8000-seed2.json"]
    runs = [sst2(f) for f in files]
    runs[0] = {**sst2("sst2-adalora-lora-drop-8000.json"), **runs[0]}  # seed 0's LoRA ran with AdaLoRA, LoRA-drop
    out = []
    lora = [r["lora"]["dev_accuracy"] for r in runs]
    for method in ("lora", "lora-fa", "vera", "dora", "delta-lora", "lora-plus"):
        accs = [r[method]["dev_accuracy"] for r in runs]
        diffs = [a - b for a, b in zip(accs, lora)]
        out.append(
            [
                METHOD_NAMES[method] + {"vera": " r=256", "lora-plus": " (ratio 16)"}.get(method, " r=8"),
                rate(runs[0][method]["lr"]),
                *(pct(a) for a in accs),
                pct(statistics.mean(accs)),
                "–" if method == "lora" else " / ".join(points(d) for d in diffs),
                "–" if method == "lora" else points(statistics.mean(diffs)),
            ]
        )
    header = ["condition", "lr", "seed 0", "seed 1", "seed 2", "mean", "vs LoRA, per seed", "mean vs LoRA"]
    return (
        table(header, out) + "\n\n`python benchmarks/quality_sst2.py --methods lora lora-fa vera dora delta-lora "
        "lora-plus --train-size 8000 --steps 250 --threads 1 --seed S` (`benchmarks/results/sst2-methods-8000*.json`; "
        "seed 0's LoRA row: `sst2-adalora-lora-drop-8000.json`)"
    )


def steps_to_loss(losses: list[float], level: float, window: int = 20) -> int | None:
    """The first step whose trailing `window`-step mean training loss is at or below `level`."""
    for step in range(window, len(losses) + 1):
        if statistics.mean(losses[step - window : step]) <= level:
            return step
    return None


def loraplus_convergence() -> str:
    files = [
        ("sst2-adalora-lora-drop-8000.json", "sst2-methods-8000.json"),
        ("sst2-methods-8000-seed1.json", "sst2-methods-8000-seed1.json"),
        ("sst2-methods-8000-seed2.json", "sst2-methods-8000-seed2.json"),
    ]
    levels = (0.5, 0.45, 0.4)
    out = []
    for seed, (lora_file, plus_file) in enumerate(files):
        lora, plus = sst2(lora_file)["lora"]["losses"], sst2(plus_file)["lora-plus"]["losses"]
        cells = [" / ".join(str(steps_to_loss(x, level) or "–") for level in levels) for x in (lora, plus)]
        out.append([str(seed), *cells])
    return (
        table(["seed", "LoRA: steps to 0.5 / 0.45 / 0.4", "LoRA+ (ratio 16)"], out)
        + "\n\nThe training loss as its mean over the last 20 steps; the 8,000-sentence runs above."
    )


def alpaca_rows(name: str) -> list[dict]:
    return load(name)["results"]


def alpaca_200() -> str:
    rows = []
    for label, name, cond in (
        ("LoRA (fp32 base)", "quality-alpaca-20261123T132339Z.json", "lora"),
        ("QLoRA (NF4 + double quantization base)", "quality-alpaca-20261123T132339Z.json", "qlora"),
        ("LoRA, training seed 1", "quality-alpaca-seed1-20261123T1653Z.json", "lora"),
        ("QLoRA, training seed 1", "quality-alpaca-seed1-20261123T1653Z.json", "qlora"),
    ):
        r = next(x for x in alpaca_rows(name) if x["condition"] == cond)
        rows.append(
            [
                label,
                f"{r['before']['eval_loss']:.4f}",
                f"{r['after']['eval_loss']:.4f}",
                f"{r['before']['perplexity']:.2f} -> {r['after']['perplexity']:.2f}",
            ]
        )
    return (
        table(["condition", "held-out loss before", "after", "perplexity before -> after"], rows)
        + f"\n\n{source('quality-alpaca-20261123T132339Z.json')}; seed 1: {source('quality-alpaca-seed1-20261123T1653Z.json')}"
    )


def alpaca_400() -> str:
    runs = alpaca_rows("quality-alpaca-400-20261123T1913Z.json") + alpaca_rows(
        "quality-alpaca-400-loftq-20261123T1852Z.json"
    )
    after = {(r["condition"], r["seed"]): r["after"]["eval_loss"] for r in runs}
    before = {r["condition"]: r["before"]["eval_loss"] for r in runs}
    out = []
    for label, cond in (
        ("LoRA (fp32 base)", "lora"),
        ("QLoRA", "qlora"),
        ("QLoRA + LoftQ init (rank 16)", "qlora-loftq"),
    ):
        gap = "–" if cond == "lora" else f"{statistics.mean(after[cond, s] - after['lora', s] for s in (0, 1)):+.3f}"
        out.append([label, f"{before[cond]:.4f}", f"{after[cond, 0]:.4f}", f"{after[cond, 1]:.4f}", gap])
    return (
        table(["condition", "held-out loss before", "after, seed 0", "after, seed 1", "mean gap to LoRA"], out)
        + f"\n\n{source('quality-alpaca-400-20261123T1913Z.json')}; LoftQ: {source('quality-alpaca-400-loftq-20261123T1852Z.json')}"
    )


def run_memory() -> str:
    """Peak memory of a whole run: the model's own loss, the chunked loss, and gradient checkpointing."""
    own = alpaca_rows("quality-alpaca-20261123T130951Z.json")[0]
    chunked = alpaca_rows("quality-alpaca-chunked-loss.json")[0]
    ckpt = alpaca_rows("quality-alpaca-chunked-loss-checkpointing.json")[0]
    out = []
    for label, r in (
        ("the model's own loss (full logits)", own),
        ("chunked loss (the default)", chunked),
        ("chunked loss + `--gradient-checkpointing`", ckpt),
    ):
        out.append(
            [
                label,
                f"{r['peak_memory_mb']:,.0f} MiB",
                f"{r['peak_memory_mb'] / own['peak_memory_mb']:.2f}",
                f"{r['after']['eval_loss']:.8f}",
                f"{r['train_seconds']:.0f} s",
            ]
        )
    return (
        table(["run", "peak memory (RSS)", "x the model's loss", "held-out loss after", "training time"], out)
        + f"\n\nChunked: {source('quality-alpaca-chunked-loss.json')}; with checkpointing: "
        f"{source('quality-alpaca-chunked-loss-checkpointing.json')}; the model's own loss: "
        f"{source('quality-alpaca-20261123T130951Z.json')}, from before the chunked loss existed "
        "(`--no-chunked-loss` runs it that way now)"
    )


# --- NF4 / QLoRA (bench_qlora.py, bench_dequantize.py) ---------------------------------------------


def qlora_format() -> str:
    d = load("qlora-cpu-20261123T1915Z.json")
    loads, train = d["loads"], d["training"]
    nf4, fp32, peft = train["lorakit-nf4"], train["lorakit-fp32"], train["peft-bnb-nf4"]
    err = d["error_vs_bnb"]
    rows = [
        [
            "NF4 codes and statistics vs bitsandbytes' `quantize_4bit`",
            f"bit-identical on {err['matrices']} matrices" if err["bit_identical"] else "differ",
            "–",
        ],
        [
            "relative weight error of NF4 on SmolLM2",
            f"{err['relative_error_lorakit']:.4f}",
            f"{err['relative_error_bitsandbytes']:.4f}",
        ],
        [
            "bits per parameter, decoder linears (norms included)",
            f"{loads['gguf-nf4']['linear_bits_per_parameter']:.3f}",
            "–",
        ],
        [
            "SmolLM2 weights, fp32 -> NF4",
            f"{loads['gguf-fp32']['weight_mib']:.1f} -> {loads['gguf-nf4']['weight_mib']:.1f} MiB",
            "–",
        ],
        [
            "training step (LoRA r=16, batch 2 x 64): peak memory",
            f"{nf4['peak_mib']:.0f} MiB (fp32 base: {fp32['peak_mib']:.0f} MiB)",
            f"PEFT + bitsandbytes: {peft['peak_mib']:.0f} MiB",
        ],
        [
            "loading SmolLM2 from GGUF: time, peak anonymous memory",
            f"fp32: {loads['gguf-fp32']['seconds']:.1f} s, {loads['gguf-fp32']['peak_anon_mib']:.0f} MiB; "
            f"streamed into NF4: {loads['gguf-nf4']['seconds']:.1f} s, {loads['gguf-nf4']['peak_anon_mib']:.0f} MiB",
            f"transformers' GGUF loader, fp32: {loads['gguf-fp32-transformers']['seconds']:.1f} s, "
            f"{loads['gguf-fp32-transformers']['peak_anon_mib']:.0f} MiB",
        ],
    ]
    return table(["", "lorakit", "reference"], rows) + f"\n\n{source('qlora-cpu-20261123T1915Z.json')}"


def dequantize() -> str:
    d = load("dequantize-cpu-1thread.json")
    labels = {
        "native (lorakit C kernel)": "**lorakit's native kernel** (the default)",
        "eager (pairs table)": "eager PyTorch, 256-entry byte -> pair table (the fallback)",
        "compiled (pairs table)": "`torch.compile` of the same formula",
        "compiled (select tree)": "`torch.compile`, codes chosen by a 4-level `where` tree",
        "bitsandbytes": f"bitsandbytes {d['machine']['bitsandbytes']} `dequantize_4bit` (C++)",
    }
    by = {(r["option"], r["dtype"]): r for r in d["results"]}
    out = []
    for option, label in labels.items():
        cells = [
            f"{by[option, dt]['min_ms']:.1f} ({by[option, dt]['min_x_bitsandbytes']:.2f}x)"
            for dt in ("float32", "bfloat16")
        ]
        out.append([label, *cells])
    return (
        table(["option", "fp32: min ms (x bitsandbytes)", "bf16: min ms (x bitsandbytes)"], out)
        + f"\n\n{d['weights'] / 1e6:.1f} M weights, one thread, native path `{d['native_isa']}`; {source('dequantize-cpu-1thread.json')}"
    )


# --- several processes, llama.cpp -------------------------------------------------------------------


def ddp() -> str:
    d = load("ddp-cpu.json")
    out = [
        [n, f"{r['tokens_per_s']:.0f}", f"{r['ratio']:.2f}x", f"{r['peak_memory_mb']:,.0f} MiB"]
        for n, r in d["results"].items()
    ]
    a = d["args"]
    return (
        table(["processes", f"tokens/s (median of {a['rounds']})", "x 1 process", "peak memory, main process"], out)
        + f"\n\nSmolLM2-135M, the built-in task, global batch {a['batch_size']}, {a['steps']} steps: "
        "`python benchmarks/bench_ddp.py` (`benchmarks/results/ddp-cpu.json`)"
    )


def llama_cpp() -> str:
    d = load("gguf-llama-cpp.json")
    em, ad, base, dora = d["exact_match"], d["adapted_logits"], d["base_logits"], d["dora_merged"]
    rows = [
        [
            f"held-out exact match, greedy (all {em['examples']} word lists)",
            pct(em["lorakit"], 0),
            f"{pct(em['llama_cpp'], 0)} (the same answers: {pct(em['same_answer'], 0)})",
        ],
        [
            f"logits vs lorakit's: mean / max abs difference (logit std {ad['logit_std']:.1f})",
            "–",
            f"{ad['mean_abs_logit_diff']:.2f} / {ad['max_abs_logit_diff']:.2f} (base alone: "
            f"{base['mean_abs_logit_diff']:.2f} / {base['max_abs_logit_diff']:.2f})",
        ],
        [
            "top-1 token agreement with lorakit",
            "–",
            f"{pct(ad['top1_agreement'], 0)} (base alone: {pct(base['top1_agreement'], 0)})",
        ],
        [
            "adapter's effect (adapted - base logits), correlation with lorakit's",
            "–",
            f"{ad['adapter_effect_correlation']:.4f}",
        ],
        [
            "merged DoRA model (`--merged`, f16): greedy answers equal to lorakit's",
            "–",
            f"{dora['same_greedy_answers']} of {dora['prompts']} prompts",
        ],
    ]
    return (
        table(["", "lorakit", f"llama.cpp, `{d['base']}` + `--lora adapter.gguf`"], rows)
        + "\n\n`python benchmarks/llama_cpp_check.py` (`benchmarks/results/gguf-llama-cpp.json`)"
    )


# --- each method against its paper (reproduce.py) ---------------------------------------------------

# method -> (what its paper reports, that claim as a difference to LoRA); the papers' numbers as
# collected for lorakit's implementers (definitions and reference results of the nine methods)
PAPERS = {
    "lora": ("RoBERTa-base SST-2 95.1 with 0.3 M trainable (full fine-tuning 94.8)", "reference"),
    "lora-fa": ("accuracy close to LoRA (GLUE, MMLU); up to 1.4x less total memory", "about 0 points; less memory"),
    "vera": ("RoBERTa-base SST-2 94.6 with 0.043 M trainable", "-0.5 points on SST-2 with ~7x fewer parameters"),
    "dora": ("LLaMA-7B commonsense average 78.4 vs LoRA 74.7", "+3.7 points"),
    "delta-lora": ("above LoRA on E2E and GLUE", "at or above LoRA"),
    "lora-plus": ("1-2 % better, up to ~2x faster convergence, same step cost", "+1-2 points; fewer steps"),
    "qlora": ("NF4 + double quant matches 16-bit LoRA (MMLU 53.1 vs 53.0)", "about 0"),
    "adalora": ("DeBERTaV3-base GLUE average 89.46 vs LoRA r=8 88.50", "+1.0 point at the same budget"),
    "lora-drop": ("about 50 % of LoRA's parameters, comparable accuracy", "about 0 points at ~half the parameters"),
}


def done(part: dict | None) -> dict[str, dict]:
    return {r["method"]: r for r in (part or {}).get("methods", []) if r["status"] == "done"}


def ratio_cell(record: dict | None) -> str:
    """A step / limit ratio; marked † unless the run timed the limit beside its own steps."""
    if not record or not record.get("step_vs_limit"):
        return "-"
    return f"{record['step_vs_limit']:.2f}x" + ("" if record.get("limit_timed") == LIMIT_PAIRED else "†")


def metric_cell(record: dict | None, lora: dict | None, scale: float, digits: int, unit: str = "") -> str:
    if record is None:
        return "-"
    text = f"{scale * record['metric_after']:.{digits}f}{unit}"
    if lora is not None and record is not lora:
        text += f" ({scale * (record['metric_after'] - lora['metric_after']):+.{digits}f})"
    return text


def reproduction_table(sst2_part: dict | None, alpaca_part: dict | None, methods: list[str] | None = None) -> str:
    """Cost and quality of each method on SST-2 and Alpaca, beside its paper's claim (reproduce.py's table)."""
    s, a = done(sst2_part), done(alpaca_part)
    methods = methods or list(dict.fromkeys([*s, *a]))
    out = []
    for m in methods:
        r, q = s.get(m), a.get(m)
        cost = r or q
        out.append(
            [
                METHOD_NAMES.get(m, m),
                f"{cost['trainable_params']:,} ({cost['trainable_percent']:.2f} %)",
                f"{cost['adapter_mib']:.2f} MiB",
                f"{cost['peak_memory_mib']:,.0f} MiB",
                " / ".join(ratio_cell(x) for x in (r, q)),
                metric_cell(r, s.get("lora"), 100, 2, " %"),
                metric_cell(q, a.get("lora"), 1, 3),
                PAPERS.get(m, ("-", "-"))[1],
            ]
        )
    header = [
        "method",
        "trainable (SST-2)",
        "adapter (SST-2)",
        "peak memory (SST-2)",
        "step / limit (SST-2 / Alpaca)",
        "SST-2 accuracy (vs LoRA)",
        "Alpaca held-out loss (vs LoRA)",
        "paper vs LoRA",
    ]
    text = table(header, out)
    if any(x.get("step_vs_limit") and x.get("limit_timed") != LIMIT_PAIRED for x in [*s.values(), *a.values()]):
        text += (
            "\n\n† the limit timed once, after all methods: on a busy machine such a ratio follows the load at "
            "the time the method ran, not the method"
        )
    return text


def reproduce() -> str:
    d = load("reproduce-cpu.json")
    return reproduction_table(d.get("sst2"), d.get("alpaca")) + "\n\n" + reproduce_source()


def reproduce_source() -> str:
    return (
        "`OMP_NUM_THREADS=1 python benchmarks/reproduce.py --part sst2 --out-dir runs/reproduce-paired`, "
        "`python benchmarks/reproduce.py --part alpaca --out-dir runs/reproduce`, collected by `python "
        "benchmarks/reproduce.py --collect-only ...` (`benchmarks/results/reproduce-cpu.json`)"
    )


def reproduce_notes() -> str:
    """What each paper reports and what was measured here, one paragraph a method."""
    notes = load("reproduce-notes.json")
    return "\n\n".join(f"**{METHOD_NAMES[m]}.** The paper: {PAPERS[m][0]}. Here: {text}" for m, text in notes.items())


def reproduce_method(method: str) -> str:
    """One method's part of the reproduction table beside LoRA's, one row a measure, with its note and
    the paper's claim (for the method's own page)."""
    d = load("reproduce-cpu.json")
    s, a = done(d.get("sst2")), done(d.get("alpaca"))
    columns = ["lora"] if method == "lora" else ["lora", method]
    rows = [
        ["trainable parameters (SST-2)", lambda m: f"{s[m]['trainable_params']:,} ({s[m]['trainable_percent']:.2f} %)"],
        ["adapter on disk (SST-2)", lambda m: f"{s[m]['adapter_mib']:.2f} MiB"],
        [
            "peak memory (SST-2 / Alpaca)",
            lambda m: f"{s[m]['peak_memory_mib']:,.0f} / {a[m]['peak_memory_mib']:,.0f} MiB",
        ],
        ["step time x limit (SST-2 / Alpaca)", lambda m: f"{ratio_cell(s[m])} / {ratio_cell(a[m])}"],
        ["SST-2 dev accuracy (vs LoRA)", lambda m: metric_cell(s[m], s["lora"], 100, 2, " %")],
        ["Alpaca held-out loss (vs LoRA)", lambda m: metric_cell(a[m], a["lora"], 1, 3)],
        ["the paper, vs LoRA", lambda m: PAPERS[m][1]],
    ]
    text = table(
        ["", *(METHOD_NAMES[m] for m in columns)], [[label, *(cell(m) for m in columns)] for label, cell in rows]
    )
    if any(r.get("step_vs_limit") and r.get("limit_timed") != LIMIT_PAIRED for m in columns for r in (s[m], a[m])):
        text += "\n\n† the limit timed once, after all methods: such a ratio follows the machine's load, not the method"
    return (
        text
        + f"\n\nThe paper: {PAPERS[method][0]}. Here: {load('reproduce-notes.json')[method]}\n\n"
        + reproduce_source()
        + "; every method: [Each method against its paper](../benchmarks/reproduction.md)"
    )


# --- the README's headline -------------------------------------------------------------------------


def lora_rounds_cell(names: list[str]) -> str:
    """LoRA's medians of per-round ratios over paired runs (their range), and its rounds ahead of PEFT."""
    runs = [paired_lora_run(name) for name in names]
    vs_peft = [statistics.median(run["per_peft"]) for run in runs]
    vs_limit = [run["vs_limit"] for run in runs]
    ahead = sum(r < 1 for run in runs for r in run["per_peft"])
    rounds = sum(len(run["per_peft"]) for run in runs)
    return (
        f"LoRA {min(vs_peft):.2f}-{max(vs_peft):.2f}x PEFT · {min(vs_limit):.2f}-{max(vs_limit):.2f}x the limit "
        f"(medians of each run's rounds, {len(names)} runs); ahead of PEFT in {ahead} of {rounds} rounds"
    )


def headline() -> str:
    step = step_rows("step-cpu-all-methods.json")
    chunked = step_rows("step-cpu-chunked-loss.json")
    time_cells = " · ".join(
        f"{METHOD_NAMES[m]} {median_of_rounds(step['lorakit ' + m], peft_twin(step, m)):.2f}x"
        for m in ("lora", "dora", "vera", "adalora", "qlora")
    )
    peak_cells = " · ".join(
        f"{METHOD_NAMES[m]} {step['lorakit ' + m]['peak_vs_peft_same_method']:.2f}x"
        for m in ("lora", "dora", "vera", "adalora", "qlora")
    )
    chunked_cell = f"{chunked['lorakit lora +chunked loss']['peak_vs_peft_same_method']:.2f}x"
    runs = [sst2(f"sst2-vs-peft-seed{s}.json") for s in range(3)]
    quality = " · ".join(
        f"{METHOD_NAMES[m]} {pct(statistics.mean(r[m]['dev_accuracy'] for r in runs))} vs "
        f"{pct(statistics.mean(r['peft-' + m]['dev_accuracy'] for r in runs))}"
        for m in ("lora", "dora")
    )
    dq = {(r["option"], r["dtype"]): r for r in load("dequantize-cpu-1thread.json")["results"]}
    seeds = command("sst2-vs-peft-seed0.json").replace("seed 0", "seed S").replace("seed0", "seedS")
    rows = [
        [
            "training step time, x PEFT's same method (lower is better), every method in one run",
            time_cells,
            "SmolLM2-135M, batch 4 x 256, CPU",
            f"`{command('step-cpu-all-methods.json')}`",
        ],
        ["peak memory of the step, x PEFT's", peak_cells, "the same", "the same"],
        [
            "the same, with lorakit's chunked loss",
            f"LoRA {chunked_cell}",
            "the same",
            f"`{command('step-cpu-chunked-loss.json')}`",
        ],
        [
            "LoRA's step in long paired runs: x PEFT's, x the limit (the frozen base's step)",
            lora_rounds_cell(LORA_ROUNDS4_FILES),
            "SmolLM2-135M, batch 4 x 256, CPU",
            f"`{command_without_out(LORA_ROUNDS4_FILES[0])}`",
        ],
        [
            "SST-2 dev accuracy, lorakit vs PEFT (mean of 3 seeds, S = 0, 1, 2)",
            quality,
            "MiniLM-L6, 50 steps x 32",
            f"`{seeds}`",
        ],
        [
            "NF4 dequantization, x bitsandbytes' CPU kernel",
            f"{dq['native (lorakit C kernel)', 'float32']['min_x_bitsandbytes']:.2f}x "
            f"(fp32) · {dq['native (lorakit C kernel)', 'bfloat16']['min_x_bitsandbytes']:.2f}x (bf16)",
            "106 M weights, 1 thread",
            f"`{command('dequantize-cpu-1thread.json')}`",
        ],
    ]
    return table(["measured", "lorakit", "on", "command"], rows)


# --- blocks in pages -------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], str]] = {
    "headline": headline,
    "step-all": step_all,
    "step-qlora-native": step_qlora_native,
    "chunked-loss": chunked_loss,
    "run-memory": run_memory,
    "compile": compile_step,
    "named-adapters": named_adapters,
    "fused-vera": fused_vera,
    "vera-merged-forward": vera_merged_forward,
    "lora-breakdown": lora_breakdown,
    "lora-fused-adamw": lora_fused_adamw,
    "lora-siblings": lora_siblings,
    "lora-rounds": lora_rounds,
    "lora-rounds4": lora_rounds4,
    "sst2-vs-peft": sst2_vs_peft,
    "sst2-quality": sst2_quality,
    "lr-sweep": lr_sweep,
    "sst2-qlora-seeds": sst2_qlora_seeds,
    "sst2-adalora-lora-drop-seeds": sst2_adalora_lora_drop_seeds,
    "sst2-8000-adalora-lora-drop": sst2_8000_adalora_lora_drop,
    "sst2-8000-seeds": sst2_8000_seeds,
    "loraplus-convergence": loraplus_convergence,
    "alpaca-200": alpaca_200,
    "alpaca-400": alpaca_400,
    "flop-floor": flop_floor,
    "qlora-format": qlora_format,
    "dequantize": dequantize,
    "ddp": ddp,
    "llama-cpp": llama_cpp,
    "reproduce": reproduce,
    "reproduce-notes": reproduce_notes,
}


class UnknownTable(LookupError):
    """A block names a table no function makes."""


def generate(name: str) -> str:
    """The markdown of one block; `reproduce:METHOD` is one method's part of the reproduction table."""
    if name.startswith("reproduce:") and name.split(":", 1)[1] in PAPERS:
        return reproduce_method(name.split(":", 1)[1])
    if name not in GENERATORS:
        raise UnknownTable(
            f"no generated table named {name!r} (known: {', '.join(GENERATORS)}, "
            f"reproduce:METHOD for {', '.join(PAPERS)})"
        )
    return GENERATORS[name]()


def fill(text: str) -> str:
    """`text` with every generated block made again from the result files."""
    return BLOCK.sub(lambda m: m.group(1) + generate(m.group("name")) + "\n" + m.group(4), text)


def stale_blocks(text: str) -> list[str]:
    """The names of the blocks of `text` whose content differs from what the results give."""
    blocks = list(BLOCK.finditer(text))
    if len(blocks) != len(re.findall(r"<!-- generated: [\w:.-]+ -->\n", text)):
        raise UnknownTable("a '<!-- generated: NAME -->' line without its '<!-- end generated -->' line")
    return [m.group("name") for m in blocks if m.group("body") != generate(m.group("name")) + "\n"]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", nargs="?", help="print this one table")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = parser.parse_args()
    try:
        if args.table:
            print(generate(args.table))
            return 0
        return rewrite(args.check)
    except (UnknownTable, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def write_atomically(path: Path, text: str) -> None:
    """A temporary file beside `path`, synced, then renamed over it: never half a page."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def rewrite(check: bool) -> int:
    """Rewrite (or, with `check`, only list) every out-of-date block of the README and docs/."""
    stale = []
    for page in pages():
        text = page.read_text()
        try:
            names = stale_blocks(text)
        except UnknownTable as err:
            raise UnknownTable(f"{page.relative_to(ROOT)}: {err}") from None
        if names and not check:
            write_atomically(page, fill(text))
        stale += [f"{page.relative_to(ROOT)}: {name}" for name in names]
    for entry in stale:
        print(("out of date: " if check else "rewrote: ") + entry)
    return 1 if stale and check else 0


if __name__ == "__main__":
    sys.exit(main())
