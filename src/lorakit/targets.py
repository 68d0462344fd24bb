"""Which modules of a model an adapter (or the 4-bit quantizer) takes: target selection.

`TargetSelection` holds what a user writes (`targets`, `layers`, `exclude`; every adapter config is
one, and `lorakit.quantize` builds one from its arguments); `select_targets` turns it into module
names, with a helpful error listing the candidates when nothing fits. Names are the model's own: a
layer lorakit already adapted stands under its original name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from . import base_layers
from .adapted_layer import AdaptedLayer
from .errors import check_field_types

OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "cls", "qa_outputs")


@dataclass
class TargetSelection:
    """Which modules to take.

    Attributes:
        targets: what to adapt. `"all-linear"` (every linear layer except the output head), a
            regular expression (a string, matched in full against module names, as PEFT does),
            or a list of module names, each matching a full name or a name suffix
            (`"q_proj"` matches `model.layers.0.self_attn.q_proj`).
        layers: keep only modules in these layer indices (the first integer in the module name,
            e.g. `model.layers.3.mlp.up_proj` is in layer 3). `None` keeps all.
        exclude: module names or name suffixes never to adapt.
    """

    targets: str | list[str] = "all-linear"
    layers: list[int] | None = None
    exclude: list[str] | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.targets, str) and self.targets != "all-linear":
            try:
                re.compile(self.targets)
            except re.error as err:
                raise ValueError(f"targets {self.targets!r} is not a valid regular expression ({err})") from None
        elif not isinstance(self.targets, str) and (
            not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets)
        ):
            raise ValueError(
                f"targets must be 'all-linear', a regular expression or a list of module names, got {self.targets!r}"
            )


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


def name_matches(name: str, pattern: str) -> bool:
    """Whether module `name` is `pattern` or ends with `.pattern` (a name suffix)."""
    return name == pattern or name.endswith("." + pattern)


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules under their original names: an adapted layer stands for its base."""
    out = {}
    for name, module in model.named_modules():
        if not name or ".base_layer" in f".{name}" or ".adapters" in f".{name}":
            continue
        out[name] = module
    return out


def select_targets(model: nn.Module, config: TargetSelection) -> list[str]:
    """Names of the modules `config` selects; raises a helpful error when nothing fits."""
    modules = module_names(model)
    adaptable = [n for n, m in modules.items() if isinstance(m, AdaptedLayer) or base_layers.is_adaptable(m)]
    if not adaptable:
        kinds = sorted({type(m).__name__ for n, m in modules.items() if n and not list(m.children())})
        raise ValueError(
            f"{type(model).__name__} has no layer lorakit can adapt: every method wraps linear layers "
            f"(nn.Linear, GPT-2's Conv1D, 4-bit Linear4bit), and this model's layers are {', '.join(kinds[:8]) or 'none'}"
        )
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
        chosen = [n for n in modules if any(name_matches(n, t) for t in targets)]
        unmatched = [t for t in targets if not any(name_matches(n, t) for n in modules)]
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
        chosen = [n for n in chosen if not any(name_matches(n, e) for e in config.exclude)]
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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
