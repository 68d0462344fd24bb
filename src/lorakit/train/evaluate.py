"""Held-out metrics: loss / perplexity, classification accuracy, exact match of greedy generations."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import tasks
from .data import IGNORE_INDEX, Example, collate


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on GPU when asked for; nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def causal_lm_loss(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Mean loss per completion token over `examples`, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        labels = batch.pop("labels")
        with autocast(device, bf16):
            logits = model(**batch).logits
        # position t predicts token t + 1
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        losses = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += losses.item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def classify_accuracy(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Fraction of examples whose arg-max class is the label."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        labels = batch.pop("labels")
        with autocast(device, bf16):
            logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return {"accuracy": correct / max(len(examples), 1)}


@torch.no_grad()
def greedy_completions(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device: torch.device, bf16: bool) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), cut at end of sequence."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so that every prompt ends where generation starts
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            with autocast(device, bf16):
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(model: nn.Module, tokenizer, examples: list[Example], batch_size: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Exact-match accuracy of greedy generations against the examples' answers."""
    prompts = [e.prompt for e in examples]
    answers = [e.answer for e in examples]
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    predictions = greedy_completions(model, tokenizer, prompts, longest + 2, batch_size, device, bf16)
    hits = sum(tasks.exact_match(p, a) for p, a in zip(predictions, answers))
    return {"exact_match": hits / max(len(examples), 1)}
