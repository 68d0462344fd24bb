"""What `lorakit explain` finds for one input, as plain records (`Explanation.as_dict()` is the
--json record); `core.explain` computes them, `summary` and `page` present them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..analysis import INERT
from . import attribution as attribution_mod

TASKS = ("causal-lm", "classify", "regress")


@dataclass
class OutputStep:
    """One scored output: a completion token (causal LM), the chosen class, or the score."""

    position: int | None  # causal LM: the input position whose output predicts this token; None for a sequence
    token: str  # the token, the class name, or "score"
    token_id: int  # the token id or class index (-1 for a score)
    base_value: float  # log p (or the score) under the base model
    adapted_value: float  # ... and under the adapted model
    base_top: list[tuple[str, float]]  # the base's most likely tokens or classes, with probabilities
    adapted_top: list[tuple[str, float]]
    attribution: list[float]  # per module (the order of `Explanation.modules`): adds up to `effect`
    completeness_error: float  # |sum(attribution) - effect|

    @property
    def effect(self) -> float:
        return self.adapted_value - self.base_value


@dataclass
class Component:
    """One rank component of a module's update and how strongly each token drives it."""

    label: str  # σ1, σ2, ... (singular components), "triplet 3" (AdaLoRA), "moved base: σ1" ...
    part: str  # the part of the change it belongs to
    strength: float  # ||up_i|| (its singular value)
    drive: list[float]  # per token: ||up_i|| |down_i · x| / ||W0 x||


@dataclass
class ModuleActivity:
    """What one adapted module did on this input."""

    module: str
    layer: int | None
    kind: str
    size: list[float]  # per token: ||ΔW x|| / ||W0 x||
    parts: dict[str, list[float]]  # per part, per token: ||part|| / ||W0 x||
    components: list[Component]
    attribution: float  # summed over the outputs
    per_token: bool = True  # False for a module that reads one vector for the whole input (a pooler): one value

    def size_at(self, position: int) -> float:
        """||ΔW x|| / ||W0 x|| at an input position (nan for a module without per-token values)."""
        return self.size[position] if self.per_token else math.nan

    @property
    def mean_size(self) -> float:
        finite = [s for s in self.size if math.isfinite(s)]
        return sum(finite) / max(len(finite), 1)


@dataclass
class DepthCheck:
    """An exact check by depth: each output's change with the update kept only in a band of layers,
    and with it removed from them (the rest of the model's update kept); no integration involved."""

    layers: list[int]
    only: list[float]  # per output: its change (adapted - base) with the update in these layers only
    without: list[float]  # per output: its change with the update everywhere but in these layers

    @property
    def name(self) -> str:
        return f"{self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])


def depth_bands(layers: list[int], bands: int = 3) -> list[list[int]]:
    """The layers in `bands` contiguous groups as equal as possible (first, middle, last); none for
    fewer layers than bands."""
    layers = sorted(set(layers))
    if len(layers) < bands:
        return []
    size, extra = divmod(len(layers), bands)
    groups, start = [], 0
    for band in range(bands):
        groups.append(layers[start : start + size + (band < extra)])
        start += len(groups[-1])
    return groups


@dataclass
class Explanation:
    """Everything `lorakit explain` computes for one input (`as_dict()` is the --json record)."""

    task: str
    prompt: str
    tokens: list[str]  # the input tokens (causal LM: prompt + completion), as text
    token_ids: list[int]
    prompt_length: int  # how many of `tokens` are the prompt
    measure: str  # what the outputs' values are: "log p(token)", "log p(class)" or "score"
    completion_source: str | None  # "generated" (by the adapted model) or "given"; None for sequence tasks
    base_completion: str | None  # what the base model generates instead (greedy), when generating
    outputs: list[OutputStep]
    modules: list[ModuleActivity]
    ig_steps: int
    within_tolerance: bool
    methods: list[str] = field(default_factory=list)
    depth: list[DepthCheck] = field(default_factory=list)

    @property
    def total_effect(self) -> float:
        return sum(o.effect for o in self.outputs)

    @property
    def completeness_error(self) -> float:
        return abs(sum(m.attribution for m in self.modules) - self.total_effect)

    @property
    def tolerance(self) -> float:
        return attribution_mod.tolerance(self.total_effect)

    @property
    def inert(self) -> bool:
        """No adapted module changes its output on this input (B = 0, or a collapsed update)."""
        return all(not (s >= INERT) for m in self.modules for s in m.size if not math.isnan(s))

    @property
    def completion(self) -> str:
        return "".join(self.tokens[self.prompt_length :])

    def as_dict(self) -> dict[str, Any]:
        """Every number, as plain data (infinite sizes, where the base path is zero, stay inf here)."""
        return {
            "task": self.task,
            "prompt": self.prompt,
            "methods": self.methods,
            "measure": self.measure,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "prompt_length": self.prompt_length,
            "completion": self.completion if self.task == "causal-lm" else None,
            "completion_source": self.completion_source,
            "base_completion": self.base_completion,
            "inert": self.inert,
            "total_effect": self.total_effect,
            "attribution": {
                "method": "integrated gradients over a scale on each module's update, 0 -> 1 (Gauss-Legendre)",
                "steps": self.ig_steps,
                "completeness_error": self.completeness_error,
                "tolerance": self.tolerance,
                "within_tolerance": self.within_tolerance,
                "per_output_tolerance": f"max({attribution_mod.ABSOLUTE_TOLERANCE}, "
                f"{attribution_mod.RELATIVE_TOLERANCE} x |effect|)",
            },
            "outputs": [
                {
                    "position": o.position,
                    "token": o.token,
                    "token_id": o.token_id,
                    "base": o.base_value,
                    "adapted": o.adapted_value,
                    "effect": o.effect,
                    "base_top": [list(t) for t in o.base_top],
                    "adapted_top": [list(t) for t in o.adapted_top],
                    "attribution": o.attribution,
                    "completeness_error": o.completeness_error,
                }
                for o in self.outputs
            ],
            "modules": [
                {
                    "module": m.module,
                    "layer": m.layer,
                    "kind": m.kind,
                    "attribution": m.attribution,
                    "per_token": m.per_token,
                    "size": m.size,
                    "parts": m.parts,
                    "components": [
                        {"label": c.label, "part": c.part, "strength": c.strength, "drive": c.drive}
                        for c in m.components
                    ],
                }
                for m in self.modules
            ],
            "depth_check": [{"layers": d.layers, "only": d.only, "without": d.without} for d in self.depth],
        }
