"""The adapted modules of a model, instrumented to tell the adapters' change apart from the base.

Inside `instrumented(model)` every adapted layer runs its frozen base only, and a forward hook adds
the update back, scaled:

    y_m = W0 x + b + α_m · Δ_m(x),     Δ_m(x) = Σ parts (the adapters' `change_parts`, plus the moved base)

With α = 1 this is the adapted model, with α = 0 the base model as it was before the adapter was
loaded (Delta-LoRA moves the base weights themselves: their movement `(W_now - W0) x` is one more part
of the update, from a snapshot of W0). While `record` is on, the hook also keeps, per token, the size
of the update and of each part relative to the base path, ||Δ_m(x)|| / ||W0 x||, and how strongly
each rank component is driven. Everything is read through the generic adapter functions of
`lorakit.methods.base`, so every method is covered without naming its internals.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import inject
from ..methods.base import RankComponents, change_parts, rank_components

MOVED_BASE = "moved base"  # the part of the update that is the base weights' own movement (Delta-LoRA)


@dataclass
class Site:
    """One adapted module: its layer, the base's movement `W_now - W0` where the base weights moved,
    and the rank components of its update's low-rank parts."""

    name: str
    layer: inject.AdaptedLayer
    moved: torch.Tensor | None
    components: list[RankComponents]


@dataclass
class Record:
    """What one module did, per token (first batch row), while recording."""

    size: torch.Tensor  # (tokens,) ||Δ x|| / ||W0 x||; one value for a module that reads one vector (a pooler)
    parts: dict[str, torch.Tensor]  # part -> (tokens,) ||part x|| / ||W0 x||
    drive: list[torch.Tensor] = field(
        default_factory=list
    )  # per RankComponents: (k, tokens), ||up_i|| |down_i · x| / ||W0 x||


@torch.no_grad()
def dense_components(part: str, matrix: torch.Tensor, limit: int) -> RankComponents:
    """The `limit` strongest singular components of a dense `(out, in)` matrix."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    keep = s > 1e-6 * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    u, s, vh = u[:, keep][:, :limit], s[keep][:limit], vh[keep][:limit]
    largest = vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh.gather(1, largest)).view(-1)
    return RankComponents(
        part,
        (u * sign * s).to(matrix.dtype),
        (vh * sign[:, None]).to(matrix.dtype),
        [f"σ{i + 1}" for i in range(len(s))],
    )


def _truncated(components: RankComponents, limit: int, prefix: str) -> RankComponents:
    return RankComponents(
        components.part,
        components.up[:, :limit],
        components.down[:limit],
        [prefix + label for label in components.labels[:limit]],
    )


def sites(model: nn.Module, original: dict[str, torch.Tensor] | None, components: int) -> list[Site]:
    """Every adapted module with a running adapter, in the model's order. `original`: the base weights
    before the adapter was loaded (`analysis.snapshot_base_weights`), where the adapter moves them."""
    found = []
    cache: dict[object, RankComponents | None] = {}
    for name, layer in inject.adapted_layers(model):
        running = list(layer.running)
        if not running:
            continue
        moved = None
        if original is not None and name in original:
            with torch.no_grad():
                now = layer._unmerged_base_weight().detach()
                difference = now.float() - original[name].to(now.device).float()
            if difference.abs().max() > 0:
                moved = difference.to(now.dtype)
        pieces = []
        for adapter_name in running:
            adapter = layer.adapters[adapter_name]
            key = id(adapter) if getattr(adapter, "additive", False) else (id(adapter), id(layer))  # shared pairs once
            if key not in cache:
                cache[key] = rank_components(adapter, layer.base_layer)
            if cache[key] is not None:
                pieces.append(_truncated(cache[key], components, f"{adapter_name}: " if len(running) > 1 else ""))
        if moved is not None:
            pieces.append(dense_components(MOVED_BASE, moved, components))
        found.append(Site(name, layer, moved, pieces))
    return found


class Tracer:
    """The forward hook of every site: `scale` (None: 1; a `(modules,)` or `(batch, modules)` tensor)
    scales each module's update; `record` keeps per-token sizes and component drives."""

    def __init__(self, found: list[Site]) -> None:
        self.sites = found
        self.scale: torch.Tensor | None = None
        self.record = False
        self.records: dict[str, Record] = {}

    def hook(self, index: int, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        site = self.sites[index]
        x = inputs[0]
        parts: dict[str, torch.Tensor] = {}
        running = layer.running
        for adapter_name in running:
            for part, value in change_parts(layer.adapters[adapter_name], x, output, layer.base_layer).items():
                parts[part if len(running) == 1 else f"{adapter_name}: {part}"] = value
        base_out = output
        if site.moved is not None:
            parts[MOVED_BASE] = x @ site.moved.to(x.dtype).T
            base_out = output - parts[MOVED_BASE]
        change = sum(parts.values())
        if self.record:
            self._record(site, x, base_out, parts, change)
        if self.scale is None:
            return base_out + change
        alpha = self.scale[..., index]
        if alpha.dim() == 1:  # one scale per batch row
            alpha = alpha.view(-1, *([1] * (change.dim() - 1)))
        return base_out + alpha.to(change.dtype) * change

    @torch.no_grad()
    def _record(
        self, site: Site, x: torch.Tensor, base_out: torch.Tensor, parts: dict[str, torch.Tensor], change: torch.Tensor
    ) -> None:
        def rows(t: torch.Tensor) -> torch.Tensor:  # the first batch row, one row per token (a pooler reads one)
            return t[0].reshape(-1, t.shape[-1]).double()

        bias = getattr(site.layer.base_layer, "bias", None)
        base_path = base_out if bias is None else base_out - bias.to(base_out.dtype)
        base_norm = rows(base_path).norm(dim=-1)  # (tokens,)

        def relative(norm: torch.Tensor) -> torch.Tensor:
            return torch.where(base_norm > 0, norm / base_norm.clamp_min(1e-300), torch.where(norm > 0, math.inf, 0.0))

        record = Record(
            relative(rows(change).norm(dim=-1)),
            {part: relative(rows(value).norm(dim=-1)) for part, value in parts.items()},
        )
        for piece in site.components:
            coefficient = (rows(x) @ piece.down.double().T).abs() * piece.strengths.double()  # (tokens, k)
            record.drive.append(relative(coefficient.mT))
        self.records[site.name] = record


@contextmanager
def instrumented(
    model: nn.Module, original: dict[str, torch.Tensor] | None = None, components: int = 8
) -> Iterator[Tracer]:
    """Run `model` with every adapted module's update under a `Tracer`'s control (see the module
    docstring); merged adapters are unmerged inside the block and everything is restored after it."""
    layers = [layer for _, layer in inject.adapted_layers(model)]
    before = [(layer.merged, layer.enabled) for layer in layers]
    handles = []
    try:
        for layer in layers:
            layer.unmerge()
        tracer = Tracer(sites(model, original, components))
        for index, site in enumerate(tracer.sites):
            site.layer.enabled = False  # the layer computes its base only; the hook adds the update
            handles.append(
                site.layer.register_forward_hook(
                    lambda layer, inputs, output, index=index: tracer.hook(index, layer, inputs, output)
                )
            )
        yield tracer
    finally:
        for handle in handles:
            handle.remove()
        for layer, (merged, enabled) in zip(layers, before):
            layer.enabled = enabled
            if merged:
                layer.merge(merged)
