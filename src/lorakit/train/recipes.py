"""Each method's learning rate when the user gives none: LoRA's, times what the method needs.

Methods do not share one good learning rate. LoRA-FA trains only B (A frozen, B starting at zero)
and needs a larger step to start; AdaLoRA starts its update at P, Q ~ N(0, 0.02) and E = 0; VeRA
trains only two scaling vectors (b starting at zero). Measured on SST-2 with all-MiniLM-L6-v2,
50 steps x batch 32 on 1,600 sentences (`python benchmarks/quality_sst2.py --methods lora-fa vera
--lrs 1e-3 3e-3 1e-2 3e-2`, `benchmarks/results/quality-sst2-lr-sweep.json`; LoRA at 1e-3, the same seed: 78.33 %):

| method | dev accuracy by learning rate | recipe (x LoRA's) |
|---|---|---|
| LoRA-FA | 1e-3: 51.15 (majority class), 3e-3: 77.87, 1e-2: 77.87, 3e-2: 50.92 | 3x |
| AdaLoRA | 1e-3: 73.51 (8,000 sentences), 1e-2: 78.02 (three seeds) | 10x |
| VeRA | 1e-3: 50.92, 3e-3: 50.92, 1e-2: 60.09, 3e-2: 75.34 | 30x |
| LoRA+ (ratio 16) | 1e-3: diverged (B at 1.6e-2), 2.5e-4: 77.75 | 1/4x (B: 4x) |

The others (LoRA, DoRA, Delta-LoRA, LoRA-drop) train the same pair as LoRA and take its rate. LoRA's
own default, 2e-3, is what the built-in job (reverse-words, SmolLM2) was tuned with; the ratios were
measured at LoRA 1e-3 on SST-2 and are applied to it (one task, one budget: `--lr` always wins, and
`lorakit compare` runs each method with its recipe). VeRA was not swept above 3e-2.
"""

from __future__ import annotations

LORA_LR = 2e-3

# method -> (multiple of LoRA's learning rate, where it comes from)
LR_MULTIPLIER: dict[str, tuple[float, str]] = {
    "lora-fa": (3.0, "SST-2 sweep: 51.15 % at LoRA's rate, 77.87 % at 3x and 10x (LoRA 78.33 %)"),
    "adalora": (10.0, "SST-2: 73.51 % at LoRA's rate, 78.02 % at 10x"),
    "lora-plus": (0.25, "SST-2: ratio 16 diverged at LoRA's rate 1e-3 (B at 1.6e-2); 77.75 % at 2.5e-4 (LoRA 78.33 %)"),
    "vera": (30.0, "SST-2 sweep: 50.92 % at LoRA's rate and 3x, 60.09 % at 10x, 75.34 % at 30x (LoRA 78.33 %)"),
}


def learning_rate(method: str) -> float:
    """The learning rate `lorakit train` uses for `method` when --lr is not given."""
    return LORA_LR * LR_MULTIPLIER.get(method, (1.0, ""))[0]


def describe(method: str) -> str:
    """`2e-3 (LoRA's)` or `6e-3 (3x LoRA's: SST-2 sweep ...)`, for --print-config and reports."""
    multiplier, source = LR_MULTIPLIER.get(method, (1.0, ""))
    return (
        f"{learning_rate(method):g} (LoRA's)"
        if multiplier == 1.0
        else f"{learning_rate(method):g} ({multiplier:g}x LoRA's: {source})"
    )
