"""Loading what a run trains: the tokenizer and the base model, any problem as one line.

Also the device and precision of a single-process run, and activation checkpointing. transformers'
GGUF loader draws a progress bar per tensor whatever its logging says; loading turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from torch import nn

from .. import models
from ..errors import LorakitError
from ..quant import load_quantized_causal_lm, quantize
from .config import TrainConfig
from .distributed import SingleProcess

SEQUENCE_TASKS = ("classify", "regress")  # a head over an encoder's (or decoder's) sequence output


def pick_device(name: str) -> torch.device:
    """The device of a single-process run (`lorakit eval`, `generate`)."""
    return SingleProcess().device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: on GPU by default, anywhere when asked for."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def load_tokenizer(spec: str | None, task: str):
    try:
        return models.load_tokenizer(spec, task)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise LorakitError(str(err).splitlines()[0]) from None
    except Exception as err:  # noqa: BLE001 -- building a tokenizer from a user's file fails in many types (a bare
        # Exception from the tokenizers library, IndexError and TypeError from transformers' GGUF conversion)
        kind = "" if type(err) is Exception else f"{type(err).__name__}: "
        raise LorakitError(
            f"cannot build the tokenizer of {spec or 'the built-in model'}: {kind}{' '.join(str(err).split())[:300]}"
        ) from None


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF loader draws its own tqdm bar per tensor, ignoring its logging switch."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(spec: str | None, task: str, num_labels: int, tokenizer, quantization: dict | None = None) -> nn.Module:
    """The base model for the task; any loading problem becomes a one-line error.

    `quantization` (the keyword arguments of `lorakit.quantize`, e.g. `{"method": "nf4"}`)
    gives a 4-bit base: a causal LM is then streamed into NF4 tensor by tensor
    (`lorakit.quant.load_quantized_causal_lm`, the same bits as quantizing after a dense load),
    so the full-precision model never sits in memory.
    """
    try:
        with _no_gguf_progress_bar():
            if quantization and task not in SEQUENCE_TASKS:
                return load_quantized_causal_lm(spec, **quantization)
            model = _load_model(spec, task, num_labels, tokenizer)
            if quantization:
                quantize(model, **quantization)
            return model
    except (FileNotFoundError, ValueError, OSError, TypeError) as err:
        raise LorakitError(str(err).splitlines()[0]) from None


def fit_max_length(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """The config with `max_length` cut to the positions the model reads (a longer example fails inside
    the model, e.g. BERT's 512 learned positions), and a note saying so where the user chose the
    length; read from the model's config alone, before the data is encoded and the weights load."""
    try:
        limit = models.max_positions(
            models.load_config(cfg.model, "classify" if cfg.task in SEQUENCE_TASKS else cfg.task)
        )
    except Exception:  # noqa: BLE001 -- an unreadable model is reported, in one line, where it loads
        return cfg, None
    if limit is None or cfg.max_length <= limit:
        return cfg, None
    chosen = (
        cfg.max_length != TrainConfig().max_length
    )  # the default needs no note: the model's limit is the default then
    note = (
        (
            f"--max-length {cfg.max_length} is above the {limit} positions {cfg.model or 'the built-in model'} reads: "
            f"examples are cut to {limit} tokens"
        )
        if chosen
        else None
    )
    return dataclasses.replace(cfg, max_length=limit), note


def num_outputs(task: str, labels: list[str]) -> int:
    """The head's width: one per class, one for a regression target."""
    return 1 if task == "regress" else max(2, len(labels))


def _load_model(spec: str | None, task: str, num_labels: int, tokenizer) -> nn.Module:
    if task in SEQUENCE_TASKS:
        model = models.load_classifier(spec, num_labels=num_labels, regression=task == "regress")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers need it
        return model
    return models.load_causal_lm(spec)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing through transformers (renamed in transformers 5)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise LorakitError(f"{type(model).__name__} does not support gradient checkpointing")
