"""Named adapters on a model: finding targets, wrapping, activating, merging, removing. Written once
for every method.

A model carries any number of named adapters (`adapt(model, config, name)`), each possibly of
another method and over other modules. Every adapted module becomes an `AdaptedLayer`: the frozen
base layer plus a container of that module's adapters by name. The base output is computed once;
each active adapter then adds its change to the running output::

    y = base(x);   for name in active: y = adapters[name](x, y, base_out=base(x), base_layer)

so several active adapters add up (PEFT's multiple active adapters), and a batch can route each
sample to its own adapter (`model(..., adapter_names=[...])`, or `per_sample_adapters`).

What lorakit knows about a model at model level (the named configs, the active set, the 4-bit
quantization of the base) lives in one `LorakitState`, `lorakit_state(model)`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import base_layers
from .methods.base import AdapterConfig

OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "cls", "qa_outputs")
DEFAULT_NAME = "default"
BASE_NAME = "__base__"  # in per-sample adapter names: this sample runs the base model alone
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


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

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    quantization: dict[str, Any] | None = None
    layout_version: int = 0


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
            raise AttributeError(f"this layer holds adapters {list(adapters)} (active {list(self.active)}): "
                                 "use layer.adapters[name]")
        return adapters[names[0]]

    def _refresh(self) -> None:
        self.running = tuple(n for n in self.active if n in self.adapters and n not in self.merged)

    def check_exact(self, active: Sequence[str], merged: Sequence[str]) -> None:
        """Refuse a state the layer cannot compute exactly: an adapter whose change depends on W0
        (DoRA) running unmerged while other adapters are merged into the base weight."""
        running = [n for n in active if n in self.adapters and n not in merged]
        scaling = [n for n in running if not getattr(self.adapters[n], "additive", False)]
        if scaling and merged:
            raise ValueError(f"adapter {scaling[0]!r} (DoRA) would run unmerged over a base weight that holds the merged "
                             f"adapters {list(merged)}: its change depends on the base weight itself; merge it too, "
                             "or unmerge the others first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        if self.sample_groups is None and len(self.running) == 1:
            # One adapter over the whole batch: it may compute the base and its change as one
            # autograd node (LoRA's `fused_forward`); None means it has no such path for this base.
            fused = getattr(self.adapters[self.running[0]], "fused_forward", None)
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

    def _mixed_batch(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Each sample (row of dim 0) through its own adapter; rows of other adapters untouched."""
        samples = sum(len(rows) for rows in self.sample_groups.values())
        if x.shape[0] != samples:
            raise ValueError(f"per-sample adapters: this layer's input has {x.shape[0]} rows in dim 0 for {samples} samples "
                             "(the model reshapes activations before it); run such adapters one at a time")
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
            raise ValueError("cannot merge into a 4-bit base: writing W + delta back would round it to 4 bits, and "
                             "unmerging would not restore the base; lorakit.merge_and_unload(model) gives the exact "
                             "merged model in full precision")
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
            raise ValueError(f"cannot merge adapters {scaling} into one weight: each rescales the whole weight "
                             "(DoRA); merge one of them, or run them unmerged")
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


# --- target selection -------------------------------------------------------------------------


def layer_index(name: str) -> int | None:
    """The layer index of a module name: its first all-digit component (`h.3.attn` -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s), never adapted by "all-linear"."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out_emb or name.split(".")[-1] in OUTPUT_HEAD_NAMES:
            heads.add(name)
    # a head may be a small block (e.g. BERT's classifier is a Linear, RoBERTa's a dense+out_proj)
    return {n for n, _ in model.named_modules() if any(n == h or n.startswith(h + ".") for h in heads)}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules under their original names: an adapted layer stands for its base."""
    out = {}
    for name, module in model.named_modules():
        if not name or ".base_layer" in f".{name}" or ".adapters" in f".{name}":
            continue
        out[name] = module
    return out


def select_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules `config` adapts; raises a helpful error when nothing fits."""
    modules = module_names(model)
    adaptable = [n for n, m in modules.items() if isinstance(m, AdaptedLayer) or base_layers.is_adaptable(m)]
    if not adaptable:
        kinds = sorted({type(m).__name__ for n, m in modules.items() if n and not list(m.children())})
        raise ValueError(f"{type(model).__name__} has no layer lorakit can adapt: every method wraps linear layers "
                         f"(nn.Linear, GPT-2's Conv1D, 4-bit Linear4bit), and this model's layers are {', '.join(kinds[:8]) or 'none'}")
    targets = config.targets
    if targets == "all-linear":
        heads = output_head_names(model)
        chosen = [n for n in adaptable if n not in heads]
    elif isinstance(targets, str):
        # A regex may also hit containers (e.g. ".*attn"); keep the layers it names.
        regex = re.compile(targets)
        chosen = [n for n in adaptable if regex.fullmatch(n)]
    else:
        targets = list(targets)
        chosen = [n for n in modules if any(_matches(n, t) for t in targets)]
        unmatched = [t for t in targets if not any(_matches(n, t) for n in modules)]
        if unmatched:
            raise ValueError(
                f"target module(s) {unmatched} not found in the model; adaptable modules: "
                f"{_candidate_summary(adaptable)}"
            )
        not_linear = {n: type(modules[n]).__name__ for n in chosen if n not in adaptable}
        if not_linear:
            raise ValueError(
                f"target(s) {dict(list(not_linear.items())[:5])} are not linear layers lorakit can adapt; "
                f"adaptable modules: {_candidate_summary(adaptable)}"
            )
    if config.exclude:
        chosen = [n for n in chosen if not any(_matches(n, e) for e in config.exclude)]
    if config.layers is not None:
        layers = [config.layers] if isinstance(config.layers, int) else list(config.layers)
        chosen = [n for n in chosen if layer_index(n) in layers]
    if not chosen:
        raise ValueError(
            f"targets={config.targets!r} (layers={config.layers}) matched no adaptable module; "
            f"adaptable modules: {_candidate_summary(adaptable)}"
        )
    return chosen


def _candidate_summary(names: list[str], limit: int = 12) -> str:
    """Distinct name suffixes first (what users type), then a few full names."""
    suffixes = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"suffixes [{', '.join(suffixes)}]; names [{shown}]"


# --- adding, activating, removing ----------------------------------------------------------------


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def base_of(module: nn.Module) -> nn.Module:
    """The frozen base layer of an adapted module (the module itself when it is not adapted)."""
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == BASE_NAME:
        raise ValueError(f"adapter name {name!r} must be a word (letters, digits, _ or -, not starting with a digit), "
                         f"not {BASE_NAME!r}")
    return name


def adapt(model: nn.Module, config: AdapterConfig, name: str = DEFAULT_NAME) -> nn.Module:
    """Add the named adapter `config` describes to the modules it selects, in place.

    The new adapter becomes the one active adapter and the only thing that trains: every other
    parameter (base and other adapters) is frozen, `train_modules` excepted. Use `set_active` to run
    several adapters together. Returns the same model object for chaining.
    """
    check_name(name)
    state = lorakit_state(model, create=True)
    if name in state.configs:
        raise ValueError(f"the model already has an adapter named {name!r} (adapters: {list(state.configs)}); "
                         "pick another name, or lorakit.remove(model, name) first")
    names = select_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = config.make_adapters({n: base_of(model.get_submodule(n)) for n in names})
    for module_name in names:
        module = model.get_submodule(module_name)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module).train(model.training)  # new modules start in the model's mode
            set_submodule(model, module_name, module)
        module.adapters[name] = adapters[module_name].train(model.training)
    for module_name in config.train_modules:
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"train_modules: no module named {module_name!r} in the model") from None
        for p in module.parameters():
            p.requires_grad_(True)
    state.configs[name] = config
    _install_mixed_batch_hook(model)
    set_active(model, [name])
    return model


def set_active(model: nn.Module, names: str | Iterable[str]) -> nn.Module:
    """Run the adapters `names` (one name or several; several add up), in that order."""
    state = _state(model)
    names = _name_list(names, "set_active")
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"no adapter named {unknown} on this model; adapters: {list(state.configs)}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat in {names}")
    for _, layer in adapted_layers(model):
        layer.check_exact(names, layer.merged)
    state.active = tuple(names)
    _push_active(model, state)
    return model


def _push_active(model: nn.Module, state: LorakitState) -> None:
    for _, layer in adapted_layers(model):
        layer.active = state.active
        layer._refresh()


def _name_list(names: Any, what: str) -> list[str]:
    """One name or an iterable of names, as a list; anything else is a clear error."""
    if isinstance(names, str):
        return [names]
    try:
        names = list(names)
    except TypeError:
        raise ValueError(f"{what}: expected an adapter name or a list of names, got {names!r}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"{what}: adapter names must be strings, got {bad[:3]}")
    return names


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters that run, in order."""
    return _state(model).active


def adapter_names(model: nn.Module) -> list[str]:
    """Names of all the model's adapters, in the order they were added."""
    state = lorakit_state(model)
    return list(state.configs) if state is not None else []


def remove(model: nn.Module, name: str) -> nn.Module:
    """Delete the adapter `name` (unmerging it first); a module left without adapters becomes its
    plain base layer again, and a model without adapters drops its lorakit state (but for the
    quantization settings of a base that is still 4-bit)."""
    state = _state(model)
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r} on this model; adapters: {list(state.configs)}")
    for module_name, layer in list(adapted_layers(model)):
        if name not in layer.adapters:
            continue
        layer.unmerge([name])
        del layer.adapters[name]
        if not len(layer.adapters):
            layer.unmerge()
            set_submodule(model, module_name, layer.base_layer)
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)
    _push_active(model, state)
    _drop_state_if_empty(model)
    return model


def _drop_state_if_empty(model: nn.Module) -> None:
    state = lorakit_state(model)
    if state is None or state.configs:
        return
    if state.quantization is not None and any(isinstance(m, base_layers.DenseWeightProvider) for m in model.modules()):
        state.active = ()
        return
    del model.__dict__["lorakit_state"]
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if getattr(fn, "lorakit_mixed_batch", False)]:
            del hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)


def _state(model: nn.Module) -> LorakitState:
    state = lorakit_state(model)
    if state is None or not state.configs:
        raise ValueError("model has no lorakit adapter: call lorakit.adapt(model, config) or lorakit.load(...) first")
    return state


def adapted_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdaptedLayer]]:
    """(module name, layer) for every adapted module (holding adapter `name`, when given)."""
    for module_name, module in model.named_modules():
        if isinstance(module, AdaptedLayer) and (name is None or name in module.adapters):
            yield module_name, module


def adapter_config(model: nn.Module, name: str | None = None) -> AdapterConfig:
    """The config of adapter `name`; without a name, of the model's only adapter or only active one."""
    state = _state(model)
    if name is None:
        candidates = list(state.configs) if len(state.configs) == 1 else list(state.active)
        if len(candidates) != 1:
            raise ValueError(f"the model has adapters {list(state.configs)} (active {list(state.active)}): "
                             "name the one you mean")
        name = candidates[0]
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r} on this model; adapters: {list(state.configs)}")
    return state.configs[name]


def reconfigure(model: nn.Module, name: str, **changes: Any) -> list[str]:
    """Change layout fields of adapter `name` (e.g. `rank_pattern`) and rebuild the adapters of the
    modules whose own config changed; returns their names. This is the declared channel for what
    training decides: the changed config is what `save` writes, `load` rebuilds and `--resume`
    restores. The rebuilt adapters start as new (the caller copies over what it keeps)."""
    state = _state(model)
    config = adapter_config(model, name)
    bad = sorted(set(changes) - set(config.layout_fields))
    if bad:
        raise ValueError(f"{type(config).__name__}: {bad} are not layout fields; layout fields: {list(config.layout_fields)}")
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


# --- merging, disabling -------------------------------------------------------------------------


def _names(model: nn.Module, names: str | Iterable[str] | None) -> list[str]:
    state = _state(model)
    names = list(state.active) if names is None else _name_list(names, "adapter names")
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"no adapter named {unknown} on this model; adapters: {list(state.configs)}")
    return names


def merge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Merge adapters `names` (default: the active ones) into the base weights: inference then
    costs exactly the base model."""
    names = _names(model, names)
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:  # check every layer before changing any
        layer.merge_plan(names)
    _refuse_tied_merge(model, names)
    for layer in layers:
        layer.merge(names)
    return model


def _refuse_tied_merge(model: nn.Module, names: Sequence[str]) -> None:
    """Merging into a weight that another module shares (a tied output head) would change both."""
    owners: dict[int, list[str]] = {}
    for param_name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(param_name)
    for module_name, layer in adapted_layers(model):
        if not any(n in layer.adapters for n in names):
            continue
        weight = getattr(layer.base_layer, "weight", None)
        tied = [n for n in owners.get(id(weight), []) if not n.startswith(f"{module_name}.")]
        if tied:
            raise ValueError(f"cannot merge into {module_name}: its weight is tied to {tied[0]} (tied embeddings), so "
                             "merging would change that module too; keep this adapter unmerged, or untie the weights "
                             "first (e.g. model.config.tie_word_embeddings = False and a copy of the weight)")


def unmerge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Undo `merge` for `names` (default: every merged adapter), restoring the base weights (exact
    up to float rounding)."""
    names = None if names is None else _names(model, names)
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:  # check every layer before changing any
        layer.check_exact(layer.active, [n for n in layer.merged if names is not None and n not in names])
    for layer in layers:
        layer.unmerge(names)
    return model


def merge_and_unload(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Merge `names` (default: the active adapters), then replace every adapted layer by its plain
    base module and drop every adapter and lorakit's state.

    A base that cannot hold a merged dense weight (a 4-bit one) may provide
    `merged_module(weight) -> nn.Module`, which is used instead.
    """
    names = _names(model, names)
    _refuse_tied_merge(model, names)
    layers = list(adapted_layers(model))
    for _, layer in layers:  # check every layer before changing any (as merge does)
        layer._scaling([n for n in names if n in layer.adapters])
    for module_name, layer in layers:
        base = layer.base_layer
        make_merged = getattr(base, "merged_module", None)
        if callable(make_merged):  # a 4-bit base: the merged weight goes into a new dense module
            with torch.no_grad():
                weight, _ = layer.merged_weight([n for n in names if n in layer.adapters], layer._unmerged_base_weight())
            set_submodule(model, module_name, make_merged(weight))
        else:
            layer.unmerge()
            layer.active = tuple(names)  # the others are dropped: only the merged ones must be exact
            layer.merge(names)
            set_submodule(model, module_name, base)
    state = lorakit_state(model)
    state.configs.clear()
    state.active = ()
    _drop_state_if_empty(model)
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter off (and merged ones unmerged) inside the block."""
    layers = [layer for _, layer in adapted_layers(model)]
    before = [(layer.merged, layer.enabled) for layer in layers]  # restored as they were: blocks nest
    for layer in layers:
        layer.unmerge()
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, (merged, enabled) in zip(layers, before):
            layer.enabled = enabled
            if merged:
                layer.merge(merged)


# --- mixed batches -----------------------------------------------------------------------------


@contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, sample i of every batch (row i of dim 0) runs through adapter `names[i]`
    alone (`"__base__"`: the base model), whatever the active set; e.g. around `model.generate`.
    Each sample's result equals running its adapter alone. Merged adapters must be unmerged first."""
    state = _state(model)
    if isinstance(names, str):
        raise ValueError(f"adapter_names takes one name per sample (a list), got the string {names!r}")
    names = _name_list(names, "adapter_names")
    unknown = sorted({n for n in names if n != BASE_NAME and n not in state.configs})
    if unknown:
        raise ValueError(f"adapter_names: no adapter named {unknown}; adapters: {list(state.configs)} "
                         f"(or {BASE_NAME!r} for the base model)")
    layers = [layer for _, layer in adapted_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("adapter_names needs unmerged adapters: lorakit.unmerge(model) first")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    previous = [layer.sample_groups for layer in layers]
    for layer in layers:
        layer.sample_groups = groups
    try:
        yield model
    finally:
        for layer, groups_before in zip(layers, previous):
            layer.sample_groups = groups_before


def _install_mixed_batch_hook(model: nn.Module) -> None:
    """Let `model(..., adapter_names=[...])` route samples (the keyword never reaches the model).
    The hooks are found again by a mark on the function (a deep copy of the model keeps them)."""
    if any(getattr(fn, "lorakit_mixed_batch", False) for fn in model._forward_pre_hooks.values()):
        return
    contexts: list[Any] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        names = kwargs.pop("adapter_names", None)
        if names is None:
            contexts.append(None)
            return args, kwargs
        if isinstance(names, str):
            raise ValueError(f"adapter_names takes one name per sample (a list), got the string {names!r}")
        batch = _batch_size(args, kwargs)
        if batch is not None and len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch}")
        context = per_sample_adapters(module, names)
        context.__enter__()
        contexts.append(context)
        return args, kwargs

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        context = contexts.pop() if contexts else None
        if context is not None:
            context.__exit__(None, None, None)

    pre_hook.lorakit_mixed_batch = post_hook.lorakit_mixed_batch = True
    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in list(args) + [kwargs.get(k) for k in ("input_ids", "inputs_embeds", "x")]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def adapter_parameters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """Trainable parameters (of adapter `name` only, when given), each once even when an adapter is
    shared by several layers."""
    seen: set[int] = set()
    if name is None:
        for param_name, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield param_name, p
        return
    for module_name, layer in adapted_layers(model, name):
        for param_name, p in layer.adapters[name].named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield f"{module_name}.adapters.{name}.{param_name}", p
