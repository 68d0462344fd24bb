"""What an adapter changed inside the model, module by module (`lorakit inspect`).

For every adapted module, from the weight the model computes with (W = W0 + the adapters' change,
merged exactly as `merge` would) against the original base weight W0:

- relative change ||ΔW||_F / ||W0||_F;
- the singular values of ΔW, its effective rank exp(H(σ / Σσ)) (Roy & Vetterli, 2007) and the
  number of singular values holding 90 % of its energy: how low-rank the update really is;
- magnitude and direction change per output row, as the DoRA paper measures them (Liu et al.,
  2024, Sec. 2.2): ΔM = mean_i | ||W_i|| - ||W0_i|| |, ΔD = mean_i (1 - cos(W_i, W0_i));
- whether the module changed at all (an inert adapter: B still zero, or a collapsed update).

The comparison needs W0 as the base had it before the adapter was loaded (Delta-LoRA moves the base
weights themselves; a QLoRA base is the dequantized 4-bit weight it was trained against), so
`snapshot_base_weights` is called before `lorakit.load`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import base_layers, inject

INERT = 1e-7  # relative change below this: the module did not learn


@dataclass
class ModuleChange:
    """The change of one adapted module."""

    module: str
    layer: int | None  # the block index in the module's name, when there is one
    kind: str  # the module's own name: q_proj, down_proj, ...
    shape: tuple[int, int]  # (out, in)
    relative_change: float  # ||ΔW|| / ||W0||
    delta_norm: float
    effective_rank: float
    rank_90: int  # singular values holding 90 % of ||ΔW||^2
    adapter_rank: int | None  # the adapter's own rank (AdaLoRA: what the allocator kept)
    magnitude_change: float  # DoRA's ΔM
    direction_change: float  # DoRA's ΔD
    top_singular_values: list[float]
    base_change: float = 0.0  # ||W_base - W0|| / ||W0||: the base weights themselves moved (Delta-LoRA)
    extras: dict[str, float] = dataclasses.field(default_factory=dict)  # the adapter's own numbers (`describe`)
    shared_group: int | None = None  # modules with the same number share one adapter's tensors (LoRA-drop)
    importance: float | None = None  # LoRA-drop's stage-1 importance I_i (sums to 1 over the modules)
    plan: str | None = None  # LoRA-drop's plan for the module: "own" (kept) or the shared pair's group

    @property
    def inert(self) -> bool:
        return self.relative_change < INERT


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if base_layers.is_adaptable(m)}


@torch.no_grad()
def snapshot_base_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The dense (out, in) weights of the modules `names`, as they are now (before an adapter loads)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the model has no module {missing[0]!r} (the adapter was trained on another base?)")
    return {name: base_layers.dense_weight(modules[name]).detach().float().cpu().clone() for name in names}


NOISE = 1e-6  # singular values below this share of the largest are float32 rounding, not learning


def significant(singular_values: torch.Tensor) -> torch.Tensor:
    if singular_values.numel() == 0 or singular_values.max() <= 0:
        return singular_values[:0]
    return singular_values[singular_values > NOISE * singular_values.max()]


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (1 for a rank-one update, r for r equal ones)."""
    kept = significant(singular_values)
    if kept.numel() == 0:
        return 0.0
    p = kept / kept.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(singular_values: torch.Tensor, share: float = 0.9) -> int:
    """How many singular values hold `share` of the squared norm."""
    energy = singular_values.pow(2)
    if energy.sum() <= 0:
        return 0
    return int((energy.cumsum(0) / energy.sum() < share).sum()) + 1


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    """(block index, the name inside the block): `model.layers.3.self_attn.q_proj` -> (3, `self_attn.q_proj`)."""
    found = list(re.finditer(r"(?:^|\.)(\d+)\.", name))
    if not found:
        return None, name
    return int(found[-1].group(1)), name[found[-1].end() :]


def short_labels(kinds: list[str]) -> dict[str, str]:
    """The fewest trailing name parts that still tell the kinds apart (`q_proj`; BERT's
    `attention.output.dense` next to `output.dense`)."""
    labels = {}
    for kind in kinds:
        parts = kind.split(".")
        for k in range(1, len(parts) + 1):
            label = ".".join(parts[-k:])
            if all(".".join(other.split(".")[-k:]) != label for other in kinds if other != kind):
                break
        labels[kind] = label
    return labels


def low_rank_singular_values(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The singular values of `up @ down` (up (out, r), down (r, in)) from the r x r core, exact:
    with up = Q1 R1 and downᵀ = Q2 R2, up @ down = Q1 (R1 R2ᵀ) Q2ᵀ, and Q1, Q2 have orthonormal
    columns, so σ(up @ down) = σ(R1 R2ᵀ). Two thin QRs and an r x r SVD instead of an out x in SVD."""
    r1 = torch.linalg.qr(up.double(), mode="r").R
    r2 = torch.linalg.qr(down.double().T, mode="r").R
    return torch.linalg.svdvals(r1 @ r2.T)


@torch.no_grad()
def module_change(
    name: str,
    original: torch.Tensor,
    current: torch.Tensor,
    adapter_rank: int | None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ModuleChange:
    """The change from `original` to `current` (both dense (out, in)). `factors`: `(down, up)` with
    `up @ down == current - original` (a low-rank change on an unmoved base): its singular values then
    come from the factors (`low_rank_singular_values`) instead of an SVD of the whole matrix."""
    original, current = original.double(), current.double()
    delta = current - original
    base_norm = float(original.norm())
    delta_norm = float(delta.norm())
    if delta_norm == 0:
        singular = torch.zeros(min(delta.shape), dtype=delta.dtype)
    elif factors is not None:
        singular = low_rank_singular_values(*factors)
    else:
        singular = torch.linalg.svdvals(delta)
    row_before, row_after = original.norm(dim=1), current.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(current, original, dim=1)
    layer, kind = _layer_and_kind(name)
    return ModuleChange(
        module=name,
        layer=layer,
        kind=kind,
        shape=(int(original.shape[0]), int(original.shape[1])),
        relative_change=delta_norm / base_norm if base_norm > 0 else math.inf if delta_norm > 0 else 0.0,
        delta_norm=delta_norm,
        effective_rank=effective_rank(singular),
        rank_90=energy_rank(singular),
        adapter_rank=adapter_rank,
        magnitude_change=float((row_after - row_before).abs().mean()),
        direction_change=float((1 - cosine).mean()),
        top_singular_values=[float(s) for s in singular[:8]],
    )


def _adapter_rank(adapter: nn.Module) -> int | None:
    rank = getattr(adapter, "r", None)
    if isinstance(rank, torch.Tensor):
        rank = int(rank)
    return rank if isinstance(rank, int) else None


def _change_factors(layer: nn.Module, using: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(down, up)` of the adapters' summed change where each is a plain low-rank pair of lower rank
    than the weight's (their factors side by side), else None."""
    pairs = []
    for name in using:
        adapter = layer.adapters[name]
        pair = adapter.low_rank_factors() if getattr(adapter, "additive", False) else None
        if pair is None:
            return None
        pairs.append(tuple(t.detach().double().cpu() for t in pair))
    down, up = torch.cat([d for d, _ in pairs]), torch.cat([u for _, u in pairs], dim=1)
    return (down, up) if down.shape[0] < min(up.shape[0], down.shape[1]) else None


@torch.no_grad()
def changes(
    model: nn.Module, original: dict[str, torch.Tensor], names: list[str] | None = None, progress: bool = False
) -> list[ModuleChange]:
    """The change of every adapted module (adapters `names`, default: the active ones) against
    `original` (from `snapshot_base_weights`); `progress`: a bar on stderr (a terminal only)."""
    from tqdm.auto import tqdm

    found = []
    groups: dict[int, int] = {}
    layers = list(inject.adapted_layers(model))
    for module_name, layer in tqdm(
        layers, desc="inspect", unit="module", leave=False, dynamic_ncols=True, disable=None if progress else True
    ):
        using = [n for n in (names or inject.lorakit_state(model).active) if n in layer.adapters]
        if not using or module_name not in original:
            continue
        base_now = layer._unmerged_base_weight()
        current, _ = layer.merged_weight(using, base_now)
        ranks = [_adapter_rank(layer.adapters[n]) for n in using]
        w0 = original[module_name].double()
        moved = base_now.detach().double().cpu() - w0
        factors = (
            _change_factors(layer, using) if not moved.any() else None
        )  # a moved base (Delta-LoRA) is not low-rank
        change = module_change(
            module_name, original[module_name], current.float().cpu(), ranks[0] if len(ranks) == 1 else None, factors
        )
        change.base_change = float(moved.norm() / w0.norm()) if w0.norm() > 0 else 0.0
        for name in using:
            adapter = layer.adapters[name]
            if callable(getattr(adapter, "describe", None)):
                change.extras.update(adapter.describe())
        first = next((p for n in using for p in layer.adapters[n].parameters()), None)
        if first is not None:
            change.shared_group = groups.setdefault(first.data_ptr(), len(groups))
        change.importance, change.plan = _lora_drop_plan(model, using, module_name)
        found.append(change)
    return found


def _lora_drop_plan(model: nn.Module, using: list[str], module: str) -> tuple[float | None, str | None]:
    """(importance, "own" or the shared group) of `module` from a LoRA-drop adapter's plan (its
    config's layout, saved with it), or (None, None) for other methods."""
    configs = inject.lorakit_state(model).configs
    for name in using:
        plan = getattr(configs.get(name), "plan", None)
        if isinstance(plan, dict) and "scores" in plan:
            plan_of = "own" if module in plan.get("kept", []) else plan.get("groups", {}).get(module)
            return plan["scores"].get(module), plan_of
    return None, None


def correlation(xs: list[float], ys: list[float]) -> float:
    from .train.metrics import pearson

    return pearson(xs, ys)


def report(found: list[ModuleChange]) -> dict[str, Any]:
    """Everything `lorakit inspect` shows, as plain data (also its --json)."""
    moved = [c for c in found if not c.inert]
    return {
        "modules": [{**asdict(c), "inert": c.inert} for c in found],
        "inert_modules": [c.module for c in found if c.inert],
        "mean_relative_change": sum(c.relative_change for c in found) / max(len(found), 1),
        "magnitude_direction_correlation": correlation(
            [c.magnitude_change for c in moved], [c.direction_change for c in moved]
        )
        if len(moved) > 1
        else None,
    }


def heatmap_text(found: list[ModuleChange], value=lambda c: c.relative_change * 1e3, mark=lambda c: "") -> str:
    """A number per module as a grid: one row per layer, one column per module kind; by default
    ||ΔW|| / ||W0|| in 1e-3. `mark(change)` is a short suffix after a cell (e.g. LoRA-drop's kept)."""
    in_blocks = [c for c in found if c.layer is not None]
    kinds = list(dict.fromkeys(c.kind for c in in_blocks))
    labels = short_labels(kinds)
    layers = sorted({c.layer for c in in_blocks})
    cell = {(c.layer, c.kind): f"{value(c):.2f}{mark(c)}" for c in in_blocks}
    widths = {k: max(7, len(labels[k]), *(len(cell.get((layer, k), "")) for layer in layers)) for k in kinds}
    lines = ["layer  " + " ".join(f"{labels[k]:>{widths[k]}}" for k in kinds)] if kinds else []
    for layer in layers:
        lines.append(f"{layer:>5}  " + " ".join(f"{cell.get((layer, k), ''):>{widths[k]}}" for k in kinds))
    lines += [f"{c.module}: {value(c):.2f}{mark(c)}" for c in found if c.layer is None]
    return "\n".join(lines)


def lora_drop_text(found: list[ModuleChange]) -> list[str]:
    """LoRA-drop's importance scores and sharing plan, as summary lines (none for other methods)."""
    planned = [c for c in found if c.importance is not None]
    if not planned:
        return []
    kept = [c for c in planned if c.plan == "own"]
    shared: dict[str, int] = {}
    for c in planned:
        if c.plan != "own":
            shared[str(c.plan)] = shared.get(str(c.plan), 0) + 1
    lines = [
        f"LoRA-drop's plan: {len(kept)} of {len(planned)} modules keep their own pair (their importance adds up to "
        f"{sum(c.importance for c in kept):.3f}); the other {len(planned) - len(kept)} share {len(shared)} "
        f"pair{'s' if len(shared) != 1 else ''}, one per kind: "
        + ", ".join(f"{group} x{count}" for group, count in shared.items()),
        "LoRA-drop's importance (stage 1: share of Σ||ΔW x||², in %; * keeps its own pair):",
        heatmap_text(planned, value=lambda c: 100 * c.importance, mark=lambda c: "*" if c.plan == "own" else " "),
    ]
    return lines


def summary_text(found: list[ModuleChange]) -> str:
    """The terminal summary: the heatmap, the low-rank view, DoRA's magnitude/direction view, warnings."""
    if not found:
        return "no adapted module found"
    data = report(found)
    lines = [f"relative change ||ΔW|| / ||W0|| (x 1e-3) of {len(found)} adapted modules:", heatmap_text(found), ""]
    ranked = sorted(found, key=lambda c: -c.relative_change)
    lines.append("largest changes: " + ", ".join(f"{c.module} {c.relative_change:.2e}" for c in ranked[:5]))
    moved = [c for c in found if not c.inert]
    if moved:
        mean_erank = sum(c.effective_rank for c in moved) / len(moved)
        mean_r90 = sum(c.rank_90 for c in moved) / len(moved)
        ranks = [c.adapter_rank for c in moved if c.adapter_rank]
        of = (
            f" (adapter rank {min(ranks)}-{max(ranks)})"
            if ranks and min(ranks) != max(ranks)
            else (f" (adapter rank {ranks[0]})" if ranks else "")
        )
        lines.append(
            f"effective rank of ΔW: mean {mean_erank:.2f}; 90 % of its energy in {mean_r90:.1f} singular values{of}"
        )
        corr = data["magnitude_direction_correlation"]
        lines.append(
            "magnitude vs direction change per module (DoRA's view): mean ΔM "
            f"{sum(c.magnitude_change for c in moved) / len(moved):.3e}, mean ΔD "
            f"{sum(c.direction_change for c in moved) / len(moved):.3e}"
            + (f", correlation {corr:+.2f} (LoRA tends positive, DoRA negative)" if corr is not None else "")
        )
    moved_base = [c for c in found if c.base_change > INERT]
    if moved_base:
        lines.append(
            f"the base weights themselves moved in {len(moved_base)} modules (Delta-LoRA): mean ||W_base - W0|| / ||W0|| "
            f"{sum(c.base_change for c in moved_base) / len(moved_base):.2e} of a total change of "
            f"{sum(c.relative_change for c in moved_base) / len(moved_base):.2e}"
        )
    groups = {c.shared_group for c in found if c.shared_group is not None}
    if len(groups) < len([c for c in found if c.shared_group is not None]):
        lines.append(
            f"{len(found)} modules share {len(groups)} adapters (LoRA-drop's plan: modules with one number share it)"
        )
    lines += lora_drop_text(found)
    keys = list(dict.fromkeys(k for c in found for k in c.extras))
    if keys:
        lines.append(
            "the method's own numbers (mean over modules): "
            + ", ".join(f"{k} {sum(c.extras.get(k, 0.0) for c in found) / len(found):.4g}" for k in keys)
        )
    if data["inert_modules"]:
        share = len(data["inert_modules"]) / len(found)
        lines.append(
            f"warning: {len(data['inert_modules'])} of {len(found)} modules did not change (ΔW ≈ 0): "
            + (
                "the adapter learned nothing; check the learning rate, steps and that B is trained"
                if share == 1
                else ", ".join(data["inert_modules"][:6]) + (" ..." if len(data["inert_modules"]) > 6 else "")
            )
        )
    return "\n".join(lines)


def write_html(found: list[ModuleChange], path, title: str) -> None:
    """The inspect report: the relative-change heatmap, singular-value spectra, DoRA's magnitude vs
    direction scatter, and the per-module table, in one offline HTML file."""
    from . import html_report

    plt = html_report.pyplot("the inspect HTML report")
    images = []
    in_blocks = [c for c in found if c.layer is not None]
    if in_blocks:
        kinds = list(dict.fromkeys(c.kind for c in in_blocks))
        labels = short_labels(kinds)
        layers = sorted({c.layer for c in in_blocks})
        grid = [[math.nan] * len(kinds) for _ in layers]
        for c in in_blocks:
            grid[layers.index(c.layer)][kinds.index(c.kind)] = c.relative_change
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds), 1.0 + 0.35 * len(layers)))
        shown = ax.imshow(grid, aspect="auto", cmap="viridis")
        _kind_ticks(ax, [labels[k] for k in kinds])
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set(xlabel="module", ylabel="layer", title="||ΔW|| / ||W0|| per module")
        fig.colorbar(shown, ax=ax, label="relative change")
        images.append(("Relative change of every adapted module (layers x module kinds)", html_report.png(fig)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in found:
        if not c.inert and c.top_singular_values:
            values = [v / c.top_singular_values[0] for v in c.top_singular_values]
            ax.plot(range(1, len(values) + 1), values, alpha=0.4)
    ax.set(
        xlabel="singular value index",
        ylabel="σ_i / σ_1",
        title="Singular values of ΔW (one line per module)",
        yscale="log",
    )
    images.append(("How low-rank each update is: its leading singular values", html_report.png(fig)))
    moved = [c for c in found if not c.inert]
    if moved:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([c.direction_change for c in moved], [c.magnitude_change for c in moved], s=18)
        ax.set(
            xlabel="direction change ΔD (mean 1 - cos per output row)",
            ylabel="magnitude change ΔM (mean |Δ row norm|)",
            title="Magnitude against direction change (DoRA's view)",
        )
        images.append(("Magnitude against direction change, one point per module", html_report.png(fig)))
    planned = [c for c in in_blocks if c.importance is not None]
    if planned:
        images.append(
            ("LoRA-drop's importance of every module and its plan (own pair or shared)", lora_drop_figure(plt, planned))
        )
    head = [
        "module",
        "relative change",
        "effective rank",
        "rank 90 %",
        "adapter rank",
        "ΔM",
        "ΔD",
        "base moved",
        "inert",
    ]
    rows = [
        [
            c.module,
            f"{c.relative_change:.3e}",
            f"{c.effective_rank:.2f}",
            c.rank_90,
            c.adapter_rank or "-",
            f"{c.magnitude_change:.3e}",
            f"{c.direction_change:.3e}",
            f"{c.base_change:.2e}",
            "yes" if c.inert else "",
        ]
        for c in found
    ]
    if any(c.importance is not None for c in found):  # LoRA-drop: its importance and plan per module
        head += ["LoRA-drop importance", "LoRA-drop plan"]
        for row, c in zip(rows, found):
            row += [f"{100 * c.importance:.2f} %" if c.importance is not None else "-", c.plan or "-"]
    intro = summary_text(found).splitlines()[-1] if found else "no adapted module"
    # the summary's prose lines lead the page (the grids are drawn as figures)
    path.write_text(
        html_report.page(
            title,
            "; ".join(
                line
                for line in summary_text(found).splitlines()
                if line.startswith(("effective", "magnitude", "warning", "the base", "the method", "LoRA-drop's plan"))
            )
            or intro,
            html_report.table(head, rows),
            images,
        )
    )


def _kind_ticks(ax, labels: list[str]) -> None:
    """The module kinds under a heatmap's columns (one column is 1.1 inch): level where each fits its
    column, else upright, so that long names (BERT's attention.output.dense) never overprint."""
    upright = max((len(label) for label in labels), default=0) > 10
    ax.set_xticks(range(len(labels)), labels, rotation=90 if upright else 0, ha="center")


def lora_drop_figure(plt, planned: list[ModuleChange]) -> str:
    """LoRA-drop's importance as a layers x module kinds heatmap, each cell labelled with its plan."""
    from . import html_report

    kinds = list(dict.fromkeys(c.kind for c in planned))
    labels = short_labels(kinds)
    layers = sorted({c.layer for c in planned})
    grid = [[math.nan] * len(kinds) for _ in layers]
    top = max(100 * c.importance for c in planned)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds), 1.0 + 0.35 * len(layers)))
    for c in planned:
        row, column = layers.index(c.layer), kinds.index(c.kind)
        grid[row][column] = 100 * c.importance
        ax.text(
            column,
            row,
            "own" if c.plan == "own" else "shared",
            ha="center",
            va="center",
            fontsize=7,
            color="black" if grid[row][column] > 0.6 * top else "white",
        )  # readable on magma's light end
    shown = ax.imshow(grid, aspect="auto", cmap="magma")
    _kind_ticks(ax, [labels[k] for k in kinds])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set(xlabel="module", ylabel="layer", title="LoRA-drop: importance (% of Σ||ΔW x||²) and plan")
    fig.colorbar(shown, ax=ax, label="importance (%)")
    return html_report.png(fig)
