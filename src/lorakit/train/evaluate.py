"""Held-out evaluation: runs the model over examples and scores it (`metrics` holds the formulas)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import metrics
from .data import IGNORE_INDEX, Example, collate, text_ids


def batches(count: int, batch_size: int, what: str, progress: bool):
    """The start of each batch, with a progress bar on stderr when `progress` (and stderr is a terminal)."""
    from tqdm.auto import tqdm

    starts = range(0, count, batch_size)
    return tqdm(starts, desc=what, unit="batch", leave=False, dynamic_ncols=True, disable=None if progress else True)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on GPU when asked for; nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def causal_lm_loss(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss per completion token over `examples`, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in batches(len(examples), batch_size, "eval loss", progress):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        labels = batch.pop("labels")
        with autocast(device, bf16):
            logits = model(**batch).logits
        # position t predicts token t + 1
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        losses = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += losses.item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def sequence_outputs(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a classifier or regressor over `examples`, on the CPU in fp32."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    for start in batches(len(examples), batch_size, "eval", progress):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        targets.append(batch.pop("labels").cpu())
        with autocast(device, bf16):
            outputs.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(outputs), torch.cat(targets)


def classify_scores(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    num_classes: int,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy, F1 (binary, or macro over classes), Matthews correlation and the cross-entropy."""
    logits, labels = sequence_outputs(model, examples, pad_id, batch_size, device, bf16, progress)
    scores = metrics.classification_metrics(logits.argmax(-1).tolist(), labels.tolist(), num_classes)
    scores["eval_loss"] = float(nn.functional.cross_entropy(logits, labels))
    return scores


def regress_scores(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    progress: bool = False,
) -> dict[str, float]:
    """Pearson and Spearman correlation of predictions and targets, and the mean squared error."""
    predictions, targets = sequence_outputs(model, examples, pad_id, batch_size, device, bf16, progress)
    scores = metrics.regression_metrics(predictions[:, 0].tolist(), targets.tolist())
    scores["eval_loss"] = scores.pop("mse")
    return scores


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches, so that every prompt ends where
    generation starts; each prompt's ids are those training used, `text_ids`), cut at end of sequence."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outputs = []
    try:
        for start in batches(len(prompts), batch_size, "generating", progress):
            encoded = [text_ids(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
            with autocast(device, bf16):
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def exact_match(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    batch_size: int,
    device: torch.device,
    bf16: bool,
    answer_pattern: str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Exact-match accuracy of greedy generations: of the whole completion, or of the answer
    `answer_pattern` extracts from it (`metrics.compile_answer_pattern`)."""
    prompts = [e.prompt for e in examples]
    answers = [e.answer for e in examples]
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    if answer_pattern is None:
        predictions = greedy_completions(model, tokenizer, prompts, longest + 2, batch_size, device, bf16, progress)
        hits = sum(metrics.whole_completion_match(p, a) for p, a in zip(predictions, answers))
    else:
        # a worked solution may run longer than the reference before reaching its answer
        predictions = greedy_completions(
            model, tokenizer, prompts, longest + max(16, longest // 4), batch_size, device, bf16, progress
        )
        pattern = metrics.compile_answer_pattern(answer_pattern)
        hits = sum(metrics.answers_match(p, a, pattern) for p, a in zip(predictions, answers))
    return {"exact_match": hits / max(len(examples), 1)}
