"""Named adapters on a model: adding, activating, merging, removing. Written once for every method.

A model carries any number of named adapters (`adapt(model, config, name)`), each possibly of
another method and over other modules; `adapt` swaps each module it selects (`lorakit.targets`) for
an `AdaptedLayer` (`lorakit.adapted_layer`), which holds that module's adapters by name. Several
active adapters add up (PEFT's multiple active adapters), and a batch can route each sample to its
own adapter (`model(..., adapter_names=[...])`, or `per_sample_adapters`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import base_layers
from .adapted_layer import (
    BASE_NAME,
    AdaptedLayer,
    LorakitState,
    active_adapters,
    adapted_layers,
    adapter_config,
    adapter_names,
    lorakit_state,
    reconfigure,
    require_state,
)
from .kernels.grouped_lora import link_siblings
from .methods.base import AdapterConfig
from .targets import select_targets, set_submodule

# The queries on adapters live below the methods (`adapted_layer`: a method's training hooks use them);
# they are part of this module's API too.
__all__ = [
    "BASE_NAME",
    "DEFAULT_NAME",
    "AdaptedLayer",
    "LorakitState",
    "active_adapters",
    "adapt",
    "adapted_layers",
    "adapter_config",
    "adapter_names",
    "adapter_parameters",
    "base_of",
    "check_name",
    "disabled",
    "lorakit_state",
    "merge",
    "merge_and_unload",
    "per_sample_adapters",
    "reconfigure",
    "remove",
    "select_targets",
    "set_active",
    "set_submodule",
    "unmerge",
]

DEFAULT_NAME = "default"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


# --- adding, activating, removing ----------------------------------------------------------------


def base_of(module: nn.Module) -> nn.Module:
    """The frozen base layer of an adapted module (the module itself when it is not adapted)."""
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == BASE_NAME:
        raise ValueError(
            f"adapter name {name!r} must be a word (letters, digits, _ or -, not starting with a digit), "
            f"not {BASE_NAME!r}"
        )
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
        raise ValueError(
            f"the model already has an adapter named {name!r} (adapters: {list(state.configs)}); "
            "pick another name, or lorakit.remove(model, name) first"
        )
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
    _link_siblings(model)
    _install_mixed_batch_hook(model)
    set_active(model, [name])
    return model


def set_active(model: nn.Module, names: str | Iterable[str]) -> nn.Module:
    """Run the adapters `names` (one name or several; several add up), in that order."""
    state = require_state(model)
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


def remove(model: nn.Module, name: str) -> nn.Module:
    """Delete the adapter `name` (unmerging it first); a module left without adapters becomes its
    plain base layer again, and a model without adapters drops its lorakit state (but for the
    quantization settings of a base that is still 4-bit)."""
    state = require_state(model)
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
    _link_siblings(model)
    state.active = tuple(n for n in state.active if n != name)
    _push_active(model, state)
    _drop_state_if_empty(model)
    return model


def _link_siblings(model: nn.Module) -> None:
    """Regroup the adapted layers that read one input (q/k/v, gate/up) after layers came or went."""
    link_siblings(model, lambda module: isinstance(module, AdaptedLayer))


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


# --- merging, disabling -------------------------------------------------------------------------


def _names(model: nn.Module, names: str | Iterable[str] | None) -> list[str]:
    state = require_state(model)
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
            raise ValueError(
                f"cannot merge into {module_name}: its weight is tied to {tied[0]} (tied embeddings), so "
                "merging would change that module too; keep this adapter unmerged, or untie the weights "
                "first (e.g. model.config.tie_word_embeddings = False and a copy of the weight)"
            )


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
                weight, _ = layer.merged_weight(
                    [n for n in names if n in layer.adapters], layer._unmerged_base_weight()
                )
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
    state = require_state(model)
    if isinstance(names, str):
        raise ValueError(f"adapter_names takes one name per sample (a list), got the string {names!r}")
    names = _name_list(names, "adapter_names")
    unknown = sorted({n for n in names if n != BASE_NAME and n not in state.configs})
    if unknown:
        raise ValueError(
            f"adapter_names: no adapter named {unknown}; adapters: {list(state.configs)} "
            f"(or {BASE_NAME!r} for the base model)"
        )
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
    The hooks are found again by a mark on their function (a deep copy of the model keeps them)."""
    if any(getattr(fn, "lorakit_mixed_batch", False) for fn in model._forward_pre_hooks.values()):
        return
    router = MixedBatchRouter()
    model.register_forward_pre_hook(router.pre_hook, with_kwargs=True)
    model.register_forward_hook(router.post_hook, with_kwargs=True, always_call=True)


class MixedBatchRouter:
    """The pair of hooks behind `adapter_names=`: the pre-hook enters `per_sample_adapters` for the
    call, the post-hook leaves it (always, even when the forward raises). A plain object with bound
    methods, so that a model carrying it can still be pickled (`torch.save(model)`, deepcopy)."""

    def __init__(self) -> None:
        self.contexts: list[Any] = []  # one per call in flight (None: a call without adapter_names)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        names = kwargs.pop("adapter_names", None)
        if names is None:
            self.contexts.append(None)
            return args, kwargs
        if isinstance(names, str):
            raise ValueError(f"adapter_names takes one name per sample (a list), got the string {names!r}")
        batch = _batch_size(args, kwargs)
        if batch is not None and len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch}")
        context = per_sample_adapters(module, names)
        context.__enter__()
        self.contexts.append(context)
        return args, kwargs

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        context = self.contexts.pop() if self.contexts else None
        if context is not None:
            context.__exit__(None, None, None)

    pre_hook.lorakit_mixed_batch = post_hook.lorakit_mixed_batch = True  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        return {"contexts": []}  # calls in flight belong to this process's forward only


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
