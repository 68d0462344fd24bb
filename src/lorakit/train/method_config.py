"""The adapter config a run trains, from its flags: `--method` and the common settings, checked
before anything slow happens.

`--method qlora` and `--method lora-plus` are aliases (LoRA over an NF4 base; LoRA with LoRA+'s
learning rates). Every registered method works here without changes: its config is built from the
registry by dataclass fields.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from ..errors import LorakitError, did_you_mean
from ..methods import METHODS
from .config import TrainConfig, unknown_method, validate
from .loading import SEQUENCE_TASKS

CLASSIFIER_HEADS = ("classifier", "score")


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The config with aliases expanded, every value and the method's settings checked: before
    anything slow (a model load) happens, so a typo costs no waiting."""
    named = cfg.method  # the recipe is the named method's (LoRA+ is LoRA with its own rate)
    cfg = expand_aliases(cfg)
    validate(cfg)
    if cfg.lr is None:
        from .recipes import learning_rate

        cfg = dataclasses.replace(cfg, lr=learning_rate(named))
    method_config(cfg, nn.Module())  # the method exists and takes these settings (targets need the model)
    return cfg


def expand_aliases(cfg: TrainConfig) -> TrainConfig:
    """`--method qlora` is LoRA over an NF4 base (QLoRA's defaults where not given); `--method
    lora-plus` is LoRA with B's learning rate 16x A's (LoRA+'s ratio, unless --loraplus-ratio)."""
    if cfg.method == "lora-plus":
        return dataclasses.replace(cfg, method="lora", loraplus_ratio=cfg.loraplus_ratio or 16.0)
    if cfg.method != "qlora":
        return cfg
    return dataclasses.replace(
        cfg,
        method="lora",
        quantize=cfg.quantize or "nf4",
        r=cfg.r if cfg.r is not None else 64,
        alpha=cfg.alpha if cfg.alpha is not None else 16.0,
        dropout=cfg.dropout if cfg.dropout is not None else 0.05,
    )


def method_config(cfg: TrainConfig, model: nn.Module):
    """The adapter config for `cfg.method`, built from the registry by dataclass fields, so a
    newly registered method works without changes here. Common flags (r, alpha, dropout,
    targets, train_modules) are passed only to methods that have such fields."""
    if cfg.method not in METHODS:
        raise unknown_method(cfg.method, METHODS)
    cls = METHODS[cfg.method]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    targets: Any = cfg.targets
    if isinstance(targets, str) and targets != "all-linear" and ("," in targets or re.fullmatch(r"[\w.]+", targets)):
        # names ("q_proj", "q_proj,v_proj") match a full module name or a name suffix;
        # anything else is a regular expression matched against full names
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    train_modules = cfg.train_modules
    if train_modules is None:
        train_modules = [h for h in CLASSIFIER_HEADS if hasattr(model, h)][:1] if cfg.task in SEQUENCE_TASKS else []
    kwargs: dict[str, Any] = {"targets": targets, "train_modules": list(train_modules)}
    for flag in ("r", "alpha", "dropout", "init"):
        value = getattr(cfg, flag)
        if value is None:
            continue
        name = cls.flag_fields.get(flag, flag)
        if name not in fields:
            raise LorakitError(
                f"method {cfg.method!r} has no {flag!r} setting; its settings: {', '.join(fields)}"
                f"{did_you_mean(flag, fields)}"
            )
        kwargs[name] = value
    for name, value in cfg.method_args.items():
        if name not in fields:
            raise LorakitError(
                f"method {cfg.method!r} has no setting {name!r}; its settings: {', '.join(fields)}"
                f"{did_you_mean(name, fields)}"
            )
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise LorakitError(f"method {cfg.method}: {err}") from None
