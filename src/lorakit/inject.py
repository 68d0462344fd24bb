"""Finding target modules, wrapping them, merging, disabling: written once for every method."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import base_layers
from .methods.base import AdapterConfig

OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "cls", "qa_outputs")


class AdaptedLayer(nn.Module):
    """A frozen base layer plus one method's adapter.

    `base_layer` keeps its name (so the base weights keep their state-dict keys, under
    `<module>.base_layer.`, as in PEFT) and the adapter's own `forward(x, base_layer)` computes
    the output. The adapter may be shared with other layers.
    """

    def __init__(self, base_layer: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self.enabled = True

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        return self.adapter(x, self.base_layer)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the adapter into the base weight (idempotent)."""
        if not self.merged:
            weight = base_layers.dense_weight(self.base_layer)
            base_layers.set_dense_weight(self.base_layer, self.adapter.merge(weight))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (idempotent)."""
        if self.merged:
            weight = base_layers.dense_weight(self.base_layer)
            base_layers.set_dense_weight(self.base_layer, self.adapter.unmerge(weight))
            self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The dense `(out, in)` change this adapter makes to the base weight."""
        weight = base_layers.dense_weight(self.base_layer)
        if self.merged:
            weight = self.adapter.unmerge(weight)
        return self.adapter.delta_weight(weight)


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


def select_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules `config` adapts; raises a helpful error when nothing fits."""
    modules = dict(model.named_modules())
    adaptable = [n for n, m in modules.items() if n and base_layers.is_adaptable(m)]
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
        chosen = [n for n in modules if n and any(_matches(n, t) for t in targets)]
        unmatched = [t for t in targets if not any(_matches(n, t) for n in modules if n)]
        if unmatched:
            raise ValueError(
                f"target module(s) {unmatched} not found in the model; adaptable modules: "
                f"{_candidate_summary(adaptable)}"
            )
        not_linear = {n: type(modules[n]).__name__ for n in chosen if not base_layers.is_adaptable(modules[n])}
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


# --- adapting, merging, disabling --------------------------------------------------------------


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the modules `config` selects with the method's adapters, in place.

    Freezes every base parameter; afterwards only adapter parameters (and `train_modules`)
    require grad. Returns the same model object for chaining.
    """
    if getattr(model, "lorakit_config", None) is not None:
        raise ValueError("model already carries a lorakit adapter; several named adapters are not supported yet")
    names = select_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    make_many = getattr(config, "make_adapters", None)
    if callable(make_many):
        adapters = make_many(model, names)
    else:
        adapters = {n: config.make_adapter(model.get_submodule(n)) for n in names}
    for name in names:
        layer = AdaptedLayer(model.get_submodule(name), adapters[name])
        set_submodule(model, name, layer.train(model.training))  # new modules start in train mode
    for name in config.train_modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"train_modules: no module named {name!r} in the model") from None
        for p in module.parameters():
            p.requires_grad_(True)
    model.lorakit_config = config
    return model


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(name, layer) for every adapted module; names are the original module names."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The config the model was adapted with; a clear error if it was not."""
    config = getattr(model, "lorakit_config", None)
    if config is None:
        raise ValueError("model has no lorakit adapter: call lorakit.adapt(model, config) or lorakit.load(...) first")
    return config


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight: inference then costs exactly the base model."""
    for _, layer in adapted_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`, restoring the base weights (exact up to float rounding)."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every adapted layer by its plain base module and drop lorakit state.

    A base that cannot hold a merged dense weight (a 4-bit one) may provide
    `merged_module(weight) -> nn.Module`, which is used instead.
    """
    for name, layer in list(adapted_layers(model)):
        base = layer.base_layer
        make_merged = getattr(base, "merged_module", None)
        if callable(make_merged):
            weight = base_layers.dense_weight(base)
            if layer.merged:
                weight = layer.adapter.unmerge(weight)
            set_submodule(model, name, make_merged(layer.adapter.merge(weight)))
        else:
            layer.merge()
            set_submodule(model, name, base)
    if hasattr(model, "lorakit_config"):
        del model.lorakit_config
    if getattr(model, "lorakit_quantization", None) is not None and not any(
        isinstance(m, base_layers.DenseWeightProvider) for m in model.modules()
    ):
        del model.lorakit_quantization  # nothing is quantized any more
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters off (and merged ones unmerged) inside the block."""
    layers = [layer for _, layer in adapted_layers(model)]
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.enabled = True
            if merged:
                layer.merge()


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Trainable parameters, each once even when an adapter is shared by several layers."""
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield name, p
