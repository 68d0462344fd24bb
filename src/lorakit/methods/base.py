"""What every method provides: a config dataclass and an adapter module.

A method is one file in `lorakit/methods/` holding

- a config dataclass derived from `AdapterConfig` (which modules to adapt, plus the method's own
  hyper-parameters), registered with `@register`, and
- an adapter `nn.Module` built by `config.make_adapter(base_layer)` that follows the `Adapter`
  protocol: its `forward(x, base_layer)` holds the method's whole formula, and it knows how to
  merge itself into a dense weight and how its tensors are named in PEFT's file format.

The shared machinery (`inject.py`, `io.py`, the trainer) only talks to these two interfaces, so a
new method never touches it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Adapter(Protocol):
    """The interface of a method's adapter module (one per adapted layer, or shared by several)."""

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The adapted layer's output for input `x` (the base layer is passed, frozen)."""

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """The dense change `W' - W0` the adapter makes to the `(out, in)` base weight."""

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight `W'` for base weight `W0` (both `(out, in)`)."""

    def unmerge(self, weight: torch.Tensor) -> torch.Tensor:
        """Invert `merge`: return `W0` given the merged weight `W'`."""

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by PEFT's names relative to the module (e.g. `lora_A.weight`)."""

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors named as in `peft_state_dict`; must raise on missing or extra keys."""


class AdditiveAdapter:
    """Mixin for methods whose merge is `W' = W0 + delta` (all but DoRA)."""

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(weight).to(weight.dtype)

    def unmerge(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(weight).to(weight.dtype)


def load_exact(module: nn.Module, names: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the tensors `names` (PEFT key -> parameter), refusing any mismatch."""
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise KeyError(f"{type(module).__name__}: missing tensors {missing}, unexpected tensors {unexpected}")
    with torch.no_grad():
        for key, target in names.items():
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{type(module).__name__}.{key}: saved shape {tuple(value.shape)} "
                    f"!= model shape {tuple(target.shape)}"
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))


@dataclass
class AdapterConfig:
    """Which modules to adapt; the fields every method shares.

    Attributes:
        targets: what to adapt. `"all-linear"` (every linear layer except the output head), a
            regular expression (a string, matched in full against module names, as PEFT does),
            or a list of module names, each matching a full name or a name suffix
            (`"q_proj"` matches `model.layers.0.self_attn.q_proj`).
        layers: keep only modules in these layer indices (the first integer in the module name,
            e.g. `model.layers.3.mlp.up_proj` is in layer 3). `None` keeps all.
        exclude: module names or name suffixes never to adapt.
        train_modules: modules trained in full and saved with the adapter (PEFT's
            `modules_to_save`), e.g. a classification head.
        dtype: dtype of the adapter parameters (`"float32"` master weights by default); the
            adapter always computes in the activation dtype.
    """

    targets: str | list[str] = "all-linear"
    layers: list[int] | None = None
    exclude: list[str] | None = None
    train_modules: list[str] = field(default_factory=list)
    dtype: str = "float32"

    method: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None

    # Each method defines `make_adapter(self, base_layer) -> nn.Module`, building the adapter for
    # one base layer, and may define `make_adapters(self, model, names) -> dict[name, adapter]`
    # when adapters are shared across layers (VeRA's projections, LoRA-drop's shared pairs).

    @property
    def param_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    # --- PEFT config interchange -------------------------------------------------------------
    def to_peft(self, target_names: list[str]) -> dict[str, Any]:
        """The adapter_config.json body PEFT reads. `target_names`: the adapted module names."""
        return {
            "peft_type": self.peft_type,
            "target_modules": sorted(target_names),
            "modules_to_save": list(self.train_modules) or None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "bias": "none",
            "inference_mode": True,
            "task_type": None,
        }

    @classmethod
    def matches_peft(cls, peft_config: dict[str, Any]) -> bool:
        """Whether this method reads a PEFT config (beyond matching `peft_type`)."""
        return True

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> "AdapterConfig":
        """Build the config from a PEFT adapter_config.json body."""
        raise ValueError(f"{cls.__name__} has no PEFT counterpart")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


METHODS: dict[str, type[AdapterConfig]] = {}


def register(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a method known by its `method` name (CLI, saved configs)."""
    if not cls.method:
        raise ValueError(f"{cls.__name__} has no `method` name")
    METHODS[cls.method] = cls
    return cls


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config written by `AdapterConfig.to_dict`."""
    data = dict(data)
    method = data.pop("method")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def config_from_peft(peft_config: dict[str, Any]) -> AdapterConfig:
    """Pick the registered method that reads this PEFT config and build it."""
    peft_type = peft_config.get("peft_type")
    for cls in METHODS.values():
        if cls.peft_type == peft_type and cls.matches_peft(peft_config):
            return cls.from_peft(peft_config)
    raise ValueError(f"lorakit cannot load PEFT adapters of type {peft_type!r}")
