"""Which modules matter: integrated gradients over a scale on each module's update.

Each adapted module m gets a scale α_m on its update (`probe.Tracer`): α = 0 is the base model, α = 1
the adapted one. For an output f (a token's log-probability), the attribution of module m is

    IG_m = ∫_0^1 ∂f/∂α_m (t, ..., t) dt            (Sundararajan et al. 2017, on the path α = t·1)

and the parts add up to the whole change, Σ_m IG_m = f(1) - f(0) (completeness), up to the
quadrature's error, which is measured, never assumed: the integral is taken with Gauss-Legendre
nodes, doubling them (8, 16, 32, 64) until every output's parts add up to its change within
`tolerance(change)`, and the error left is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ABSOLUTE_TOLERANCE = 1e-3  # nats (or the score's units)
RELATIVE_TOLERANCE = 0.01  # of the output's change
STEPS = (8, 16, 32, 64)  # quadrature nodes tried, in order
BATCH_TOKENS = 2048  # path points evaluated in one forward pass: up to 8, and about this many tokens


def tolerance(change: float) -> float:
    """How far an output's attributions may sum from its change: 1 % of it, or 0.001, the larger."""
    return max(ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE * abs(change))


@dataclass
class Attribution:
    """Per output and module: `values[t][m]`, with the quadrature's nodes and each output's
    completeness error |Σ_m values[t][m] - change[t]|."""

    values: torch.Tensor  # (outputs, modules)
    steps: int
    errors: torch.Tensor  # (outputs,)
    within_tolerance: bool


def gauss_legendre(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the `steps`-point Gauss-Legendre rule on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return torch.tensor((nodes + 1) / 2), torch.tensor(weights / 2)


def integrated_gradients(
    outputs: Callable[[torch.Tensor], torch.Tensor], modules: int, steps: int, batch: int = 8
) -> torch.Tensor:
    """`IG[t, m]` for `outputs(scale (batch, modules)) -> (batch, outputs)` (each batch row one point
    of the path), with `steps` Gauss-Legendre nodes, `batch` points per call."""
    nodes, weights = gauss_legendre(steps)
    total = None
    for start in range(0, steps, batch):
        t, w = nodes[start : start + batch], weights[start : start + batch]
        scale = (t[:, None].float() * torch.ones(1, modules)).requires_grad_(True)
        values = outputs(scale)  # (batch, outputs)
        if total is None:
            total = torch.zeros(values.shape[1], modules, dtype=torch.float64)
        for index in range(values.shape[1]):
            # rows are independent points of the path: the gradient of their sum is each row's own
            (grad,) = torch.autograd.grad(values[:, index].sum(), scale, retain_graph=index < values.shape[1] - 1)
            total[index] += (w[:, None] * grad.double().cpu()).sum(dim=0)
    return total


def attribute(
    outputs: Callable[[torch.Tensor], torch.Tensor],
    modules: int,
    change: torch.Tensor,
    steps: int | None = None,
    tokens: int = 1,
) -> Attribution:
    """Integrated gradients with enough nodes for completeness (see the module docstring); `steps`
    fixes the node count instead. `change[t]` = f_t(1) - f_t(0), measured by the caller; `tokens`:
    the input's length (fewer path points go in one pass for a long input)."""
    limit = torch.tensor([tolerance(float(c)) for c in change], dtype=torch.float64)
    batch = max(1, min(8, BATCH_TOKENS // max(tokens, 1)))
    for count in (steps,) if steps is not None else STEPS:
        values = integrated_gradients(outputs, modules, count, batch)
        errors = (values.sum(dim=1) - change.double().cpu()).abs()
        if bool((errors <= limit).all()):
            return Attribution(values, count, errors, True)
    return Attribution(values, count, errors, False)
