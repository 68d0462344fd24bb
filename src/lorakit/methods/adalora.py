r"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al. 2023,
arXiv 2303.10512).

::

        x ──────────────► W0 (frozen, out x in) ─────────────────────────────┐
        │                                                                   (+) ──► y
        └─► dropout ─► Q (r x in) ─► ⊙ E (r) ─► P (out x r) ─► * alpha/r_0 ──┘

    W = W0 + P diag(E) Q · alpha / r_0

An SVD-shaped update: P (`lora_B`, out x r_0) and Q (`lora_A`, r_0 x in) start normal(0, 0.02), the
"singular values" E (`lora_E`, r_0) start at zero, so the model is unchanged at step 0. The scale is
fixed at `alpha / (r_0 + 1e-5)` whatever rank a module ends with (PEFT's `ranknum`), so pruning a
triplet (P_i, E_i, Q_i) removes exactly its contribution.

Training adds, through the training hooks (never inside forward: PEFT adds it in
`AdaLoraModel.forward` only when the output has a loss, and the usual call, `peft_model(**batch)`,
goes through `PeftModel.forward`, which calls the wrapped model directly and drops it without a
word; seen with PEFT 0.21, tests/test_peft.py):

- `extra_loss`: the orthogonality regulariser
  `gamma · mean over the 2·modules matrices of ||Q Q^T - I||_F and ||P^T P - I||_F`
  (non-squared Frobenius norms, PEFT's and the official code's average);
- `after_optimizer_step`, while gradients exist: the rank allocator.
  `I = |w · ∂L/∂w|` per entry, `Ī ← β1 Ī + (1-β1) I`, `Ū ← β2 Ū + (1-β2) |I - Ī|`, `s = Ī · Ū`;
  triplet score `S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)`; the budget (kept triplets over
  all modules) is `b_0 = r_0 · modules` until `t_init`, then falls cubically,
  `b_T + (b_0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3`, to `b_T = target_r · modules`
  at `T - t_final`; every `ΔT` steps the triplets whose score is at or below the `(b_0 - b)`-th
  smallest get `E_i = 0` (global across modules; pruned triplets keep training and may come back).
  At `T - t_final` the allocation is final: masks are frozen (re-applied every step) and become the
  adapter's layout, `rank_pattern = {module: [kept?] * r_0}` (`lorakit.inject.reconfigure`), which `save`
  writes as PEFT's `rank_pattern` with only the kept triplets in the file.

Where lorakit differs from PEFT: the total step count comes from the run (`lorakit train`, or
`lorakit.training_hooks(model, total_steps=N)` in a loop of your own) instead of a `total_step` the
user must remember, with `update_and_allocate` called for you; budgets at the edges (nothing or
everything pruned, one module) are handled instead of raising `kthvalue(): k out of range`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapted_layer import adapted_layers, adapter_config, reconfigure
from ..base_layers import in_out_features, weight_dtype_device
from ..kernels.dropout import AdapterDropout
from .base import AdapterConfig, AdditiveAdapter, RankComponents, common_fields_from_peft, register
from .lora import check_rank, low_rank_update

SCALE_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5)


class AdaLoRAAdapter(AdditiveAdapter, nn.Module):
    """One module's SVD-form update: `lora_A` = Q (r_0, in), `lora_E` = E (r_0, 1), `lora_B` = P (out, r_0),
    and `kept` (r_0,): which triplets the allocator currently keeps."""

    loraplus_fast = ("lora_B",)  # LoRA+ (lorakit.param_groups): P is the output side
    no_weight_decay = ("lora_E",)  # E is a vector of singular values (stored r x 1, as PEFT's): never decayed
    training_buffers = ("kept",)  # buffers that training changes (the allocator's mask)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init_r: int,
        alpha: float,
        dropout: float = 0.0,
        kept: list[bool] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        check_rank(init_r, "AdaLoRA init_r")
        self.init_r = init_r
        self.scale = (alpha if alpha > 0 else float(init_r)) / (init_r + SCALE_EPS)
        self.lora_A = nn.Parameter(torch.empty(init_r, in_features, dtype=dtype, device=device).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, init_r, dtype=dtype, device=device).normal_(0.0, 0.02))
        mask = torch.ones(init_r, dtype=torch.bool) if kept is None else torch.tensor(kept, dtype=torch.bool)
        if mask.shape != (init_r,):
            raise ValueError(f"AdaLoRA rank pattern has {mask.numel()} entries for init_r={init_r}")
        # `kept`: the allocator's live mask (training state: in the model's state dict, so checkpoints
        # keep it); `layout`: the final allocation the adapter file is written with (from the config's
        # rank_pattern; all rows until training decides).
        self.register_buffer("kept", mask.clone().to(device))
        self.register_buffer("layout", mask.to(device), persistent=False)
        self.dropout = AdapterDropout(dropout)  # keeps no dropped-out copy or mask for backward

    @property
    def r(self) -> int:
        """The live rank: triplets the allocator keeps."""
        return int(self.kept.sum())

    def describe(self) -> dict[str, float]:
        """What `lorakit inspect` shows: the rank the allocator left this module, of its start."""
        return {"adalora rank kept": float(self.r), "adalora initial rank": float(self.kept.numel())}

    def forward(
        self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        down = (self.lora_A * self.lora_E).to(x.dtype)  # diag(E) Q, (r_0, in)
        z = self.dropout.down_projection(x, down)  # dropout(x) (diag(E) Q)^T, (..., r_0)
        return low_rank_update(result, z, self.lora_B.to(x.dtype), self.scale)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        dtype = base_weight.dtype
        return self.scale * (self.lora_B.to(dtype) @ (self.lora_A * self.lora_E).to(dtype))

    @torch.no_grad()
    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(diag(E) Q, s P)` over the kept triplets only (the pruned ones add nothing)."""
        index = self.kept.nonzero().view(-1)
        return (self.lora_A * self.lora_E)[index], self.scale * self.lora_B[:, index]

    @torch.no_grad()
    def rank_components(self, base_layer: nn.Module) -> RankComponents:
        """The kept triplets themselves (for `lorakit explain`), strongest first: triplet i is
        `s E_i P_i Q_i^T`, labelled with its index among the init_r (as `rank_pattern` counts them)."""
        index = self.kept.nonzero().view(-1)
        norms = self.lora_A[index].norm(dim=1).clamp_min(1e-30)
        up = self.scale * self.lora_B[:, index] * (self.lora_E[index, 0] * norms)[None, :]
        order = up.norm(dim=0).argsort(descending=True)
        down = self.lora_A[index] / norms[:, None]
        return RankComponents("update", up[:, order], down[order], [f"triplet {int(index[i])}" for i in order])

    @torch.no_grad()
    def apply_mask(self, kept: torch.Tensor) -> None:
        """Keep the triplets `kept` (bool, r_0); zero the others' E."""
        self.kept.copy_(kept.to(self.kept.device))
        self.lora_E.masked_fill_(~self.kept[:, None], 0.0)

    # PEFT's AdaLoRA file: ParameterDict entries (no ".weight"), only the kept triplets once a rank
    # pattern exists.
    @torch.no_grad()
    def set_layout(self, kept: torch.Tensor) -> None:
        """Fix the final allocation: the live mask and what the adapter file holds."""
        self.apply_mask(kept)
        self.layout.copy_(self.kept)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        index = self.layout.nonzero().view(-1)
        if len(index) == self.init_r:
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        return {"lora_A": self.lora_A[index], "lora_B": self.lora_B[:, index], "lora_E": self.lora_E[index]}

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.peft_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"AdaLoRAAdapter: missing tensors {missing}, unexpected tensors {unexpected}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"AdaLoRAAdapter.{key}: saved shape {tuple(value.shape)} != model shape "
                    f"{tuple(expected[key].shape)} ({int(self.layout.sum())} of {self.init_r} triplets kept)"
                )
        index = self.layout.nonzero().view(-1)
        self.lora_A.zero_()
        self.lora_B.zero_()
        self.lora_E.zero_()
        self.lora_A[index] = state["lora_A"].to(self.lora_A)
        self.lora_B[:, index] = state["lora_B"].to(self.lora_B)
        self.lora_E[index] = state["lora_E"].to(self.lora_E)

    def extra_repr(self) -> str:
        return f"rank={self.r} of init_r={self.init_r}, scale={self.scale:g}"


# --- the budget and the allocator ----------------------------------------------------------------


def budget_at(
    step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int, delta_t: int
) -> tuple[int, bool]:
    """(kept triplets, whether to mask at this step): `init_budget` up to `tinit`, the cubic fall to
    `target_budget` at `total_step - tfinal`, then `target_budget` (PEFT's `budget_schedule`)."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    span = total_step - tfinal - tinit
    remaining = 1 - (step - tinit) / span
    return int((init_budget - target_budget) * remaining**3 + target_budget), step % delta_t == 0


def prune_to_budget(scores: dict[str, torch.Tensor], init_budget: int, budget: int) -> dict[str, torch.Tensor]:
    """Which triplets to keep (bool per module) so that about `budget` survive: the
    `init_budget - budget` lowest scores go, and every triplet scoring at or below that threshold with
    them (ties, as PEFT). No triplet is pruned when the budget covers all; all go when it is <= 0."""
    cut = init_budget - budget
    if cut <= 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    everything = torch.cat([s.view(-1) for s in scores.values()])
    if cut >= everything.numel():
        return {name: torch.zeros_like(s, dtype=torch.bool) for name, s in scores.items()}
    threshold = torch.kthvalue(everything, cut).values
    return {name: s > threshold for name, s in scores.items()}


class AdaLoRAHook:
    """The orthogonality regulariser (`extra_loss`) and the rank allocator (`after_optimizer_step`) of
    one AdaLoRA adapter."""

    def __init__(self, name: str, config: AdaLoRA, total_steps: int | None) -> None:
        self.name, self.config = name, config
        self.total_step = config.total_step or total_steps
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def adapters(self, model: nn.Module) -> dict[str, AdaLoRAAdapter]:
        return {m: layer.adapters[self.name] for m, layer in adapted_layers(model, self.name)}

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        weight = self.config.orth_reg_weight
        if weight == 0:
            return None
        terms = []
        for adapter in self.adapters(model).values():
            for gram in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return weight * torch.stack(terms).mean() if terms else None

    # --- the allocator ---------------------------------------------------------------------------
    def budgets(self, model: nn.Module) -> tuple[int, int]:
        adapters = self.adapters(model)
        return sum(a.init_r for a in adapters.values()), self.config.target_r * len(adapters)

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for module, adapter in self.adapters(model).items():
            for kind in ("lora_A", "lora_B", "lora_E"):
                p = getattr(adapter, kind)
                if p.grad is None:
                    continue
                key = f"{module}.{kind}"
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                self.ipt[key] = (p * p.grad).abs()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
                self.exp_avg_unc[key] = (
                    beta2 * self.exp_avg_unc[key] + (1 - beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()
                )

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)` per module (r_0,), from the smoothed importance."""
        scores = {}
        for module, adapter in self.adapters(model).items():
            # a tensor that never had a gradient (no step before the final one) scores zero
            s = {
                kind: self.exp_avg_ipt[key] * self.exp_avg_unc[key]
                if (key := f"{module}.{kind}") in self.exp_avg_ipt
                else torch.zeros_like(getattr(adapter, kind))
                for kind in ("lora_A", "lora_B", "lora_E")
            }
            scores[module] = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return scores

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, torch.Tensor]:
        init_budget, _ = self.budgets(model)
        kept = prune_to_budget(self.triplet_scores(model), init_budget, budget)
        for module, adapter in self.adapters(model).items():
            adapter.apply_mask(kept[module])
        return kept

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """PEFT's `update_and_allocate(step)`, `step` = optimizer steps taken (1 after the first)."""
        if self.total_step is None:
            raise ValueError(
                "AdaLoRA needs the run's total step count: lorakit.training_hooks(model, total_steps=N) "
                "(lorakit train passes it), or AdaLoRA(total_step=N)"
            )
        final = self.total_step - self.config.tfinal
        init_budget, target_budget = self.budgets(model)
        budget, mask = budget_at(
            step,
            init_budget,
            target_budget,
            self.config.tinit,
            self.config.tfinal,
            self.total_step,
            self.config.delta_t,
        )
        if step < final:
            self.update_importance(model)
            if mask:
                self.mask_to_budget(model, budget)
        elif step == final:
            if not self.exp_avg_ipt:  # the final allocation is the run's first step (total_step = tfinal + 1)
                self.update_importance(model)
            kept = self.mask_to_budget(model, budget)
            # the allocation is final: it becomes the adapter's layout (saved, reloaded, resumed)
            for module, adapter in self.adapters(model).items():
                adapter.set_layout(kept[module])
            reconfigure(model, self.name, rank_pattern={m: k.tolist() for m, k in kept.items()})
            self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        else:
            for adapter in self.adapters(model).values():
                adapter.apply_mask(adapter.kept)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ipt": dict(self.ipt),
            "exp_avg_ipt": dict(self.exp_avg_ipt),
            "exp_avg_unc": dict(self.exp_avg_unc),
            "total_step": self.total_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = (
            dict(state["ipt"]),
            dict(state["exp_avg_ipt"]),
            dict(state["exp_avg_unc"]),
        )
        self.total_step = state["total_step"]


@register
@dataclass
class AdaLoRA(AdapterConfig):
    """AdaLoRA (Zhang et al. 2023): `W = W0 + P diag(E) Q · alpha / init_r`, with the rank budget moved
    during training to the triplets that matter (see the module docstring). Defaults are PEFT's.

    Attributes:
        init_r: each module's starting rank r_0.
        target_r: the average final rank; the final budget is `target_r · modules`.
        alpha: scale numerator (`alpha / init_r`, fixed); 0 means `init_r`.
        dropout: dropout on the adapter's input.
        tinit: steps of full budget before pruning starts.
        tfinal: steps at the end with the allocation frozen.
        delta_t: steps between allocations (PEFT's `deltaT`; the paper used 100 on MNLI).
        beta1: EMA factor of the importance.
        beta2: EMA factor of its uncertainty.
        orth_reg_weight: gamma of the orthogonality regulariser (PEFT 0.5; the paper 0.1).
        total_step: the run's length T; None takes it from the run (`lorakit train`, or
            `lorakit.training_hooks(model, total_steps=N)`).
        rank_pattern: the final allocation, `{module: [kept?] * init_r}`, written by training at
            `T - tfinal` (PEFT's field of the same name); empty while training has not decided.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)

    method = "adalora"
    peft_type = "ADALORA"
    layout_fields: ClassVar[tuple[str, ...]] = ("rank_pattern", "total_step")
    flag_fields: ClassVar[dict[str, str]] = {"r": "init_r"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.init_r, "init_r")
        if (
            isinstance(self.target_r, bool)
            or not isinstance(self.target_r, int)
            or not 0 < self.target_r <= self.init_r
        ):
            raise ValueError(f"target_r must be an integer in 1..init_r={self.init_r}, got {self.target_r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("tinit", "tfinal"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise ValueError(f"delta_t must be an integer >= 1, got {self.delta_t!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.total_step is not None and (
            not isinstance(self.total_step, int) or self.total_step <= self.tinit + self.tfinal
        ):
            raise ValueError(
                f"total_step={self.total_step!r} must be an integer above tinit + tfinal = {self.tinit + self.tfinal}"
            )
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be a mapping {{module: [kept?] * init_r}}, got {self.rank_pattern!r}")
        for module, kept in self.rank_pattern.items():
            if (
                not isinstance(kept, (list, tuple))
                or len(kept) != self.init_r
                or not all(isinstance(k, bool) for k in kept)
            ):
                raise ValueError(f"rank_pattern[{module!r}] must be {self.init_r} booleans, got {kept!r}")

    def make_adapter(self, name: str, base_layer: nn.Module) -> AdaLoRAAdapter:
        in_f, out_f = in_out_features(base_layer)
        _, device = weight_dtype_device(base_layer)
        return AdaLoRAAdapter(
            in_f, out_f, self.init_r, self.alpha, self.dropout, self.rank_pattern.get(name), self.param_dtype, device
        )

    def training_hooks(self, model: nn.Module, name: str, total_steps: int | None = None) -> list[AdaLoRAHook]:
        if self.total_step is None and total_steps is not None:
            # the run's length is part of what the adapter records (PEFT's total_step)
            reconfigure(model, name, total_step=total_steps)
        return [AdaLoRAHook(name, adapter_config(model, name), total_steps)]

    # --- PEFT config interchange -----------------------------------------------------------------
    def to_peft(self, target_names: list[str]) -> dict[str, Any]:
        return {
            **super().to_peft(target_names),
            "init_r": self.init_r,
            "target_r": self.target_r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.delta_t,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            # PEFT's config refuses a missing total_step even to load for inference
            "total_step": self.total_step or self.tinit + self.tfinal + 1,
            "rank_pattern": {f"{m}.lora_E": list(k) for m, k in self.rank_pattern.items()} or None,
            "init_lora_weights": True,
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
        }

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> AdaLoRA:
        patterns = peft_config.get("rank_pattern") or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"rank_pattern must be a mapping {{module: [kept?] * init_r}}, got {patterns!r}"[:200])
        # module names, as lorakit's; every value as written (the config's checks refuse `[1, 0]` or `r: "8"`)
        pattern = {key.removesuffix(".lora_E"): kept for key, kept in patterns.items()}
        return cls(
            **common_fields_from_peft(peft_config),
            init_r=peft_config.get("init_r", 12),
            target_r=peft_config.get("target_r", 8),
            alpha=peft_config.get("lora_alpha", 8),
            dropout=peft_config.get("lora_dropout", 0.0),
            tinit=peft_config.get("tinit", 0),
            tfinal=peft_config.get("tfinal", 0),
            delta_t=peft_config.get("deltaT", 1),
            beta1=peft_config.get("beta1", 0.85),
            beta2=peft_config.get("beta2", 0.85),
            orth_reg_weight=peft_config.get("orth_reg_weight", 0.5),
            total_step=peft_config.get("total_step"),
            rank_pattern=pattern,
        )


def live_ranks(model: nn.Module, name: str) -> dict[str, int]:
    """Each module's current rank under the AdaLoRA adapter `name`."""
    return {m: layer.adapters[name].r for m, layer in adapted_layers(model, name)}
