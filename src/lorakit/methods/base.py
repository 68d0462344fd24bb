"""What every method provides: a config dataclass and an adapter module.

A method is one file in `lorakit/methods/` holding

- a config dataclass derived from `AdapterConfig` (which modules to adapt, plus the method's own
  hyper-parameters), registered with `@register`, and
- an adapter `nn.Module` built by `config.make_adapter(module_name, base_layer)` that follows the
  `Adapter` protocol: its `forward(x, result, base_out, base_layer)` holds the method's whole
  formula (adding its change to the layer's running output), and it knows how to merge itself into
  a dense weight and how its tensors are named in PEFT's file format.

`AdapterConfig` declares every optional capability with a default (shared adapters, per-module
settings, training hooks, extra saved state), so the machinery never probes with `getattr`.

The shared machinery (`inject.py`, `io.py`, the trainer) only talks to these two interfaces, so a
new method never touches it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..targets import TargetSelection


@runtime_checkable
class Adapter(Protocol):
    """The interface of a method's adapter module (one per adapted layer, or shared by several)."""

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        """`result` plus this adapter's change to the layer's output for input `x`.

        `base_out` is the frozen base layer's own output `base_layer(x)`, computed once per layer;
        `result` is the running output (`base_out` itself when this adapter runs alone, else with
        other active adapters' changes already added). Adding into `result` in place is not allowed
        (autograd may need it); `torch.addmm`-style out-of-place fusion is the fast path.
        """

    # Optional: `fused_forward(x, base_layer) -> Tensor | None`, the whole layer's output
    # `base_layer(x) + change` as one autograd node, used when this adapter runs alone over the
    # whole batch; None where it has no such path for this base (the machinery then calls the
    # base, then `forward`). LoRA's pair (`methods/lora.py`) and VeRA have one.
    # Optional: `shared_input_pair() -> (A, B, scale) | None`, a plain LoRA pair that may run in one
    # node with its siblings reading the same input (`kernels/grouped_lora.py`; LoRA, LoRA-FA).
    #
    # Optional, for `lorakit explain` (generic defaults below: `change_parts`, `rank_components`):
    # `change_parts(x, base_out, base_layer) -> {part: change}`, the change split into named parts
    # that add up to it (DoRA: magnitude and direction), and `rank_components(base_layer) ->
    # RankComponents | None`, the method's own components of a low-rank part (AdaLoRA's triplets).

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
    """Mixin for methods whose merge is `W' = W0 + delta` with a delta that does not depend on W0
    (all but DoRA). Several such adapters merge into one weight in any order."""

    additive = True

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(weight).to(weight.dtype)

    def unmerge(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(weight).to(weight.dtype)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(down (r, in), up (out, r))` with `up @ down == delta_weight` (every scale folded in), the
        form a plain LoRA file holds (GGUF export); None when the change is not such a pair."""
        return None


# --- what an adapter does to one input (`lorakit explain`), generically --------------------------


@dataclass
class RankComponents:
    """A low-rank part of an adapter's change as a sum of rank-one components,
    `part(x) = sum_i up[:, i] (down[i] · x)`, each `down[i]` of unit norm, so `||up[:, i]||` is the
    component's strength (its singular value where the components come from an SVD), strongest first."""

    part: str  # the change part they make up: a key of `change_parts`
    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in)
    labels: list[str]

    @property
    def strengths(self) -> torch.Tensor:
        return self.up.norm(dim=0)


NOISE_SHARE = 1e-6  # components below this share of the strongest are float rounding, not learning


@torch.no_grad()
def svd_components(part: str, up: torch.Tensor, down: torch.Tensor) -> RankComponents:
    """`up (out, k) @ down (k, in)` as its singular components, strongest first, without forming the
    dense product (QR of both factors, SVD of the small core). Each input direction's largest entry is
    made positive, so the components are unique wherever the singular values differ."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    left, right = q_up @ u, vh @ q_down.T  # (out, j), (j, in)
    keep = s > NOISE_SHARE * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    left, s, right = left[:, keep], s[keep], right[keep]
    largest = right.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(right.gather(1, largest)).view(-1)
    left, right = left * sign, right * sign[:, None]
    return RankComponents(part, (left * s).to(up.dtype), right.to(down.dtype), [f"σ{i + 1}" for i in range(len(s))])


def change_parts(
    adapter: nn.Module, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
) -> dict[str, torch.Tensor]:
    """The adapter's change to its layer's output for input `x`, as named parts that add up to it.

    The adapter's own `change_parts` where it has one (DoRA: magnitude and direction), else the
    whole change as one part, "update", from the adapter's `forward` (its whole formula): an
    additive adapter adds its change to a zero running output (no rounding against the base
    output), any other gives `forward(x, base_out, ...) - base_out`.
    """
    own = getattr(adapter, "change_parts", None)
    if callable(own):
        return own(x, base_out, base_layer)
    if getattr(adapter, "additive", False):
        return {"update": adapter(x, torch.zeros_like(base_out), base_out, base_layer)}
    return {"update": adapter(x, base_out, base_out, base_layer) - base_out}


def rank_components(adapter: nn.Module, base_layer: nn.Module) -> RankComponents | None:
    """The rank-one components of the adapter's low-rank part: the adapter's own `rank_components`
    where it has one (AdaLoRA's triplets, DoRA's direction), else the singular components of its
    `low_rank_factors` (LoRA's r directions ordered and made unique by the SVD of s·B·A; VeRA's
    diag(b) B diag(d) A); None for an adapter whose change has no low-rank form."""
    own = getattr(adapter, "rank_components", None)
    if callable(own):
        return own(base_layer)
    factors = adapter.low_rank_factors() if getattr(adapter, "additive", False) else None
    if factors is None:
        return None
    down, up = factors
    return svd_components("update", up, down)


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
class AdapterConfig(TargetSelection):
    """Which modules to adapt (`targets`, `layers`, `exclude`: see `lorakit.targets.TargetSelection`)
    and the fields every method shares.

    Attributes:
        train_modules: modules trained in full and saved with the adapter (PEFT's
            `modules_to_save`), e.g. a classification head.
        dtype: dtype of the adapter parameters (`"float32"` master weights by default); the
            adapter always computes in the activation dtype.
    """

    train_modules: list[str] = field(default_factory=list)
    dtype: str = "float32"

    method: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    # Fields that training may change (`lorakit.inject.reconfigure`): saved with the adapter, restored by
    # `load` and `--resume` before any tensor is loaded.
    layout_fields: ClassVar[tuple[str, ...]] = ()
    # True for methods that write the base weights during training (Delta-LoRA): saved adapters
    # then carry those weights, and benchmarks give such a method its own copy of the base.
    moves_base_weights: ClassVar[bool] = False
    # The common training flags (r, alpha, dropout, init) under the method's own field names, where
    # they differ (AdaLoRA's rank is its starting rank, `init_r`).
    flag_fields: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()  # the field types and the targets
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype={self.dtype!r} is not one of float32, bfloat16, float16, float64")

    # --- what a method provides --------------------------------------------------------------
    def make_adapter(self, name: str, base_layer: nn.Module) -> nn.Module:
        """The adapter for the module `name` (its full name in the model), over `base_layer`."""
        raise TypeError(f"{type(self).__name__} must define make_adapter(name, base_layer)")

    def make_adapters(self, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Adapters for several modules at once (module name -> base layer). Override to share
        tensors between modules (VeRA's projections, LoRA-drop's shared pairs)."""
        return {name: self.make_adapter(name, base_layer) for name, base_layer in layers.items()}

    def initialise(self, adapter: nn.Module, base_layer: nn.Module) -> nn.Module:
        """Apply a non-default start to an adapter just built for `base_layer` (e.g. LoftQ)."""
        return adapter

    def module_settings(self, name: str) -> dict[str, Any]:
        """The settings that differ by module (e.g. its rank), for the module `name`. Adapters of a
        module whose settings change under `lorakit.inject.reconfigure` are rebuilt."""
        return {}

    def training_hooks(self, model: nn.Module, name: str, total_steps: int | None = None) -> list[Any]:
        """Hooks that act during training on the adapter `name` (lorakit.hooks); none by default.
        `total_steps`: the run's optimizer steps, when the caller knows them (schedules need it)."""
        return []

    def extra_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter `name` saved beside the per-module ones (full file keys)."""
        return {}

    def load_extra_state(self, model: nn.Module, name: str, remaining: dict[str, torch.Tensor]) -> None:
        """Load what `extra_state` saved, popping its keys from `remaining`."""

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
    def from_peft(cls, peft_config: dict[str, Any]) -> AdapterConfig:
        """Build the config from a PEFT adapter_config.json body."""
        raise ValueError(f"{cls.__name__} has no PEFT counterpart")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


def common_fields_from_peft(peft_config: dict[str, Any]) -> dict[str, Any]:
    """The `AdapterConfig` fields of any PEFT adapter_config.json body (targets, layers,
    train_modules); refuses what lorakit does not implement (trained biases)."""
    if peft_config.get("bias", "none") != "none":
        raise ValueError(f"PEFT adapters with bias={peft_config['bias']!r} are not supported")
    targets = peft_config.get("target_modules") or []
    return {
        "targets": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
        "layers": peft_config.get("layers_to_transform"),
        "train_modules": list(peft_config.get("modules_to_save") or []),
    }


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
    if not isinstance(peft_type, str) or not peft_type:
        raise ValueError(f"the PEFT config names no peft_type (got {peft_type!r})")
    for cls in METHODS.values():
        if cls.peft_type == peft_type and cls.matches_peft(peft_config):
            return cls.from_peft(peft_config)
    raise ValueError(f"lorakit cannot load PEFT adapters of type {peft_type!r}")
