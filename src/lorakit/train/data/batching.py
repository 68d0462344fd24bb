"""Batching: the held-out split, the seeded endless stream of micro-batches (the same batches after
a resume), evenly spread samples, and padding a batch into tensors.
"""

from __future__ import annotations

import random

import torch

from .encoding import Example
from .records import IGNORE_INDEX, Record


def split_held_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded random split into (train, held-out); both non-empty when there are 2+ records."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, token_type_ids (sentence pairs), and labels
    (token ids, class indices or float targets)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if examples[0].token_type_ids is not None:
        token_type_ids = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            token_type_ids[row, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
        batch["token_type_ids"] = token_type_ids
    if examples[0].labels is not None:
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    elif isinstance(examples[0].label, float):
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run sees exactly the batches the uninterrupted run would have."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def evenly_spaced(examples: list, fraction: float) -> list:
    """About `fraction` of `examples` (at least one), taken at even intervals over the whole list, so
    the sample spans the data as it comes (all parts of a sorted or grouped file)."""
    count = max(1, min(len(examples), round(len(examples) * fraction)))
    return [examples[(i * len(examples)) // count] for i in range(count)]


def micro_batch(examples: list[Example], index: int, batch_size: int, seed: int) -> list[Example]:
    """The `index`-th micro-batch of the endless seeded stream (epochs follow each other;
    the last partial batch of an epoch is dropped so every batch has `batch_size` examples)."""
    per_epoch = max(1, len(examples) // batch_size)
    epoch, position = divmod(index, per_epoch)
    order = epoch_order(len(examples), seed, epoch)
    take = order[position * batch_size : (position + 1) * batch_size]
    if len(take) < batch_size:  # fewer examples than one batch: use them all
        take = order
    return [examples[i] for i in take]
