"""The adapted layer and the model's adapter state: what the methods and the machinery both read.

Every adapted module becomes an `AdaptedLayer`: the frozen base layer plus a container of that
module's adapters by name. The base output is computed once; each active adapter then adds its
change to the running output::

    y = base(x);   for name in active: y = adapters[name](x, y, base_out=base(x), base_layer)

What lorakit knows about a model at model level (the named configs, the active set, the 4-bit
quantization of the base) lives in one `LorakitState`, `lorakit_state(model)`.

This module sits below the methods: a method's training hooks find their layers (`adapted_layers`),
their config (`adapter_config`) and change their layout (`reconfigure`) here, never through
`lorakit.inject`, which adds, activates, merges and removes adapters. It imports nothing of lorakit
but `base_layers`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import base_layers

BASE_NAME = "__base__"  # in per-sample adapter names: this sample runs the base model alone
MERGED_TRAINING = (
    "adapter(s) {names} are merged into the base weights: training gives their parameters no gradient; "
    "lorakit.unmerge(model) before training (merge again for inference)"
)


@dataclass
class LorakitState:
    """Everything lorakit knows about a model, in one place (`model.lorakit_state`).

    Attributes:
        configs: the named adapters' configs, in the order they were added. A config's layout
            fields (e.g. `rank_pattern`) also hold what training decided (`reconfigure`), so
            saving the config saves the layout.
        active: names of the adapters that run (their changes add up), in order.
        quantization: the settings the base was quantized with (`lorakit.quantize`), or None.
        layout_version: bumped whenever an adapter's tensors are rebuilt (`reconfigure`), so a
            training loop knows to rebuild its optimizer.
    """

    configs: dict[str, Any] = field(default_factory=dict)  # name -> its method's AdapterConfig
    active: tuple[str, ...] = ()
    quantization: dict[str, Any] | None = None
    layout_version: int = 0


def merged_trainable(model: nn.Module) -> list[str]:
    """Names of the adapters merged into the base weights somewhere while their parameters are trainable."""
    found: list[str] = []
    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            for name in module.merged:
                if name not in found and any(p.requires_grad for p in module.adapters[name].parameters()):
                    found.append(name)
    return found


def lorakit_state(model: nn.Module, create: bool = False) -> LorakitState | None:
    """The model's `LorakitState` (created empty when `create`), or None when it has none."""
    state = model.__dict__.get("lorakit_state")
    if state is None and create:
        state = model.__dict__["lorakit_state"] = LorakitState()
    return state


class AdaptedLayer(nn.Module):
    """A frozen base layer plus its named adapters.

    `base_layer` keeps its name (so the base weights keep their state-dict keys, under
    `<module>.base_layer.`, as in PEFT); `adapters` holds this module's adapters by name (an
    adapter may be shared with other layers). `running` is the order in which the active,
    unmerged adapters add their changes to the base output.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.enabled = True
        self.running: tuple[str, ...] = ()
        # name -> row indices of the batch, while a mixed batch runs (`per_sample_adapters`)
        self.sample_groups: dict[str, list[int]] | None = None
        # the adapted layers of the same parent that may read the same input, computed together
        # when they do (`lorakit.kernels.grouped_lora.SharedInput`); set by `lorakit.inject`
        self.siblings: Any = None

    @property
    def in_features(self) -> int:
        return base_layers.in_out_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return base_layers.in_out_features(self.base_layer)[1]

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `layer.weight.dtype/device` (transformers does) keeps working.
        return self.base_layer.weight

    def __getattr__(self, name: str) -> Any:
        # `layer.adapter`: the layer's adapter when that is unambiguous (its only one, else its only
        # active one). Answered here, not by a property: a property's AttributeError would reach
        # nn.Module.__getattr__, which replaces the message with its own; `hasattr` must see False.
        if name != "adapter":
            return super().__getattr__(name)
        adapters = super().__getattr__("adapters")
        names = list(adapters) if len(adapters) == 1 else list(self.active)
        if len(names) != 1:
            raise AttributeError(
                f"this layer holds adapters {list(adapters)} (active {list(self.active)}): use layer.adapters[name]"
            )
        return adapters[names[0]]

    def _refresh(self) -> None:
        self.running = tuple(n for n in self.active if n in self.adapters and n not in self.merged)

    def check_exact(self, active: Sequence[str], merged: Sequence[str]) -> None:
        """Refuse a state the layer cannot compute exactly: an adapter whose change depends on W0
        (DoRA) running unmerged while other adapters are merged into the base weight."""
        running = [n for n in active if n in self.adapters and n not in merged]
        scaling = [n for n in running if not getattr(self.adapters[n], "additive", False)]
        if scaling and merged:
            raise ValueError(
                f"adapter {scaling[0]!r} (DoRA) would run unmerged over a base weight that holds the merged "
                f"adapters {list(merged)}: its change depends on the base weight itself; merge it too, "
                "or unmerge the others first"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self.merged and self.training and torch.is_grad_enabled():
            self._warn_if_merged_trains()
        adapter = self.lone_adapter()
        if adapter is not None:
            # One adapter over the whole batch: its layer may run with its siblings that read the
            # same x as one node, or alone as one node (LoRA's `fused_forward`); None means no
            # such path for this base.
            siblings = self.__dict__.get("siblings")
            y = siblings.output(self, x) if siblings is not None else None
            if y is not None:
                return y
            fused = getattr(adapter, "fused_forward", None)
            y = fused(x, self.base_layer) if fused is not None else None
            if y is not None:
                return y
        base_out = self.base_layer(x)
        if self.sample_groups is not None:
            return self._mixed_batch(x, base_out)
        y = base_out
        for name in self.running:
            y = self.adapters[name](x, y, base_out, self.base_layer)
        return y

    def lone_adapter(self) -> nn.Module | None:
        """The one adapter that runs, over the whole batch, or None (none, several, per-sample ones, or disabled)."""
        if not self.enabled or self.sample_groups is not None or len(self.running) != 1:
            return None
        return self.adapters[self.running[0]]

    def _warn_if_merged_trains(self) -> None:
        """A merged adapter is part of the base weight: a loss gets no gradient for its parameters (the
        backward fails with "element 0 of tensors does not require grad" when nothing else trains)."""
        merged = [n for n in self.merged if any(p.requires_grad for p in self.adapters[n].parameters())]
        if merged:
            warnings.warn(MERGED_TRAINING.format(names=merged), stacklevel=2)

    def _mixed_batch(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Each sample (row of dim 0) through its own adapter; rows of other adapters untouched."""
        samples = sum(len(rows) for rows in self.sample_groups.values())
        if x.shape[0] != samples:
            raise ValueError(
                f"per-sample adapters: this layer's input has {x.shape[0]} rows in dim 0 for {samples} samples "
                "(the model reshapes activations before it); run such adapters one at a time"
            )
        y = base_out
        for name, rows in self.sample_groups.items():
            if name == BASE_NAME or name not in self.adapters:
                continue
            index = torch.tensor(rows, device=x.device)
            part_base = base_out.index_select(0, index)
            part = self.adapters[name](x.index_select(0, index), part_base, part_base, self.base_layer)
            y = y.index_copy(0, index, part)
        return y

    # --- merging ------------------------------------------------------------------------------
    def _unmerged_base_weight(self) -> torch.Tensor:
        """The base weight W0 with every merged adapter taken out again."""
        weight = base_layers.dense_weight(self.base_layer)
        additive = [n for n in self.merged if getattr(self.adapters[n], "additive", False)]
        other = [n for n in self.merged if n not in additive]
        for name in additive:  # their change does not depend on W0
            weight = self.adapters[name].unmerge(weight)
        for name in other:  # at most one: checked by merge
            weight = self.adapters[name].unmerge(weight)
        return weight

    def merge_plan(self, names: Sequence[str] | None = None) -> list[str]:
        """The adapters merged after `merge(names)`; raises, changing nothing, when that state
        cannot be computed exactly."""
        names = [n for n in (self.active if names is None else names) if n in self.adapters]
        together = list(self.merged) + [n for n in names if n not in self.merged]
        if together != list(self.merged) and isinstance(self.base_layer, base_layers.DenseWeightProvider):
            raise ValueError(
                "cannot merge into a 4-bit base: writing W + delta back would round it to 4 bits, and "
                "unmerging would not restore the base; lorakit.merge_and_unload(model) gives the exact "
                "merged model in full precision"
            )
        self._scaling(together)
        self.check_exact(self.active, together)
        return together

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Write the adapters `names` (default: the active ones) into the base weight.

        The merged weight is `W0 + sum_i delta_i(W0)`, exactly what the unmerged adapters compute
        together. An adapter whose change depends on W0 (DoRA) is merged first, against W0 itself;
        two such adapters cannot share one merged weight exactly and are refused.
        """
        together = self.merge_plan(names)
        if together == list(self.merged):
            return
        weight, order = self.merged_weight(together, self._unmerged_base_weight())
        base_layers.set_dense_weight(self.base_layer, weight)
        self.merged = order
        self._refresh()

    def _scaling(self, names: Sequence[str]) -> list[str]:
        """The adapters among `names` whose change depends on W0 (DoRA); more than one cannot merge."""
        scaling = [n for n in names if not getattr(self.adapters[n], "additive", False)]
        if len(scaling) > 1:
            raise ValueError(
                f"cannot merge adapters {scaling} into one weight: each rescales the whole weight "
                "(DoRA); merge one of them, or run them unmerged"
            )
        return scaling

    def merged_weight(self, names: Sequence[str], base: torch.Tensor) -> tuple[torch.Tensor, tuple[str, ...]]:
        """`(W0 + sum of the adapters' changes, the merge order)` for the unmerged base weight `base`:
        the adapter whose change depends on W0 (DoRA) first, against W0, then the additive ones."""
        scaling = self._scaling(names)
        order = tuple(scaling + [n for n in names if n not in scaling])
        weight = base
        for name in order:
            weight = self.adapters[name].merge(weight)
        return weight, order

    @torch.no_grad()
    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Take the adapters `names` (default: all merged ones) out of the base weight again."""
        leave = [n for n in self.merged if n in (self.merged if names is None else names)]
        if not leave:
            return
        keep = [n for n in self.merged if n not in leave]
        self.check_exact(self.active, keep)
        base = self._unmerged_base_weight()
        base_layers.set_dense_weight(self.base_layer, base)
        self.merged = ()
        if keep:
            self.merge(keep)
        self._refresh()

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """The dense `(out, in)` change the adapter `name` (default: the layer's only/active one)
        makes to the base weight W0."""
        adapter = self.adapter if name is None else self.adapters[name]
        return adapter.delta_weight(self._unmerged_base_weight())


# --- queries ------------------------------------------------------------------------------------


def require_state(model: nn.Module) -> LorakitState:
    """The model's `LorakitState`; a clear error when it has no adapter."""
    state = lorakit_state(model)
    if state is None or not state.configs:
        raise ValueError("model has no lorakit adapter: call lorakit.adapt(model, config) or lorakit.load(...) first")
    return state


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters that run, in order."""
    return require_state(model).active


def adapter_names(model: nn.Module) -> list[str]:
    """Names of all the model's adapters, in the order they were added."""
    state = lorakit_state(model)
    return list(state.configs) if state is not None else []


def adapted_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdaptedLayer]]:
    """(module name, layer) for every adapted module (holding adapter `name`, when given)."""
    for module_name, module in model.named_modules():
        if isinstance(module, AdaptedLayer) and (name is None or name in module.adapters):
            yield module_name, module


def adapter_config(model: nn.Module, name: str | None = None) -> Any:
    """The config (an `AdapterConfig`) of adapter `name`; without a name, of the model's only adapter or
    only active one."""
    state = require_state(model)
    if name is None:
        candidates = list(state.configs) if len(state.configs) == 1 else list(state.active)
        if len(candidates) != 1:
            raise ValueError(
                f"the model has adapters {list(state.configs)} (active {list(state.active)}): name the one you mean"
            )
        name = candidates[0]
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r} on this model; adapters: {list(state.configs)}")
    return state.configs[name]


def reconfigure(model: nn.Module, name: str, **changes: Any) -> list[str]:
    """Change layout fields of adapter `name` (e.g. `rank_pattern`) and rebuild the adapters of the
    modules whose own config changed; returns their names. This is the declared channel for what
    training decides: the changed config is what `save` writes, `load` rebuilds and `--resume`
    restores. The rebuilt adapters start as new (the caller copies over what it keeps)."""
    state = require_state(model)
    config = adapter_config(model, name)
    bad = sorted(set(changes) - set(config.layout_fields))
    if bad:
        raise ValueError(
            f"{type(config).__name__}: {bad} are not layout fields; layout fields: {list(config.layout_fields)}"
        )
    new_config = dataclasses.replace(config, **changes)
    layers = dict(adapted_layers(model, name))
    rebuilt = [m for m in layers if new_config.module_settings(m) != config.module_settings(m)]
    if rebuilt:
        for m in rebuilt:
            layers[m].unmerge([name])
        fresh = new_config.make_adapters({m: layers[m].base_layer for m in rebuilt})
        trainable = any(p.requires_grad for m in rebuilt for p in layers[m].adapters[name].parameters())
        for m in rebuilt:
            adapter = fresh[m].train(layers[m].training)
            for p in adapter.parameters():
                p.requires_grad_(trainable)
            layers[m].adapters[name] = adapter
        state.layout_version += 1
    state.configs[name] = new_config
    return rebuilt
