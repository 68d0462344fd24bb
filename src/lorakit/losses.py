"""A causal-LM loss that never holds the full (tokens x vocabulary) logits.

The output head and the cross-entropy are computed a chunk of tokens at a time, in one custom
autograd function. While a chunk's logits exist, forward also turns them into the gradient,

    d loss / d logits = (softmax(logits) - onehot(target)) / n_items,

and from it the gradient of the hidden states (and of a trainable head); backward scales what
forward kept by the incoming gradient. Peak memory holds one chunk of logits instead of all of them
(and of their fp32 copy, their softmax and their gradient), and no logit is computed twice. The loss and the gradients are those of transformers' own
`ForCausalLMLoss` (shift by one, `ignore_index=-100`, sum over tokens divided by `num_items_in_batch`
or by the number of label tokens) to float tolerance: tested against it.

    loss = lorakit.losses.causal_lm_loss(model, input_ids, attention_mask, labels)   # a user's own loop
    model = lorakit.losses.ChunkedLossModel(model)                             # model(**batch).loss, chunked
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_LOGIT_BYTES = 32 * 2**20  # one chunk's fp32 logits: rows = this / (vocabulary x 4 bytes)
DEFAULT_CHUNK_TOKENS = None  # chosen from the vocabulary size (`chunk_rows`)
MIN_CHUNKED_LOGIT_BYTES = 2 * CHUNK_LOGIT_BYTES  # `ChunkedLossModel`: smaller full logits take the model's own loss


def chunk_rows(vocab: int, chunk: int | None = None) -> int:
    """Tokens per chunk: as given, or as many as fit CHUNK_LOGIT_BYTES of fp32 logits (at least 16)."""
    return max(1, int(chunk)) if chunk else max(16, CHUNK_LOGIT_BYTES // (4 * vocab))


# Architectures whose causal-LM head is exactly `lm_head(hidden_states)` on the backbone's last hidden
# state (no logit soft-capping or scaling) and whose loss is transformers' ForCausalLMLoss.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "olmo", "olmo2", "starcoder2")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T + bias, targets) * scale, by chunks.

    The loss is a scalar at the end of the graph, so the gradients with respect to `hidden` (and a
    trainable head) are computed in forward, chunk by chunk, while each chunk's logits exist; backward
    only multiplies them by the incoming gradient. The head's matmul runs twice per step (logits, and
    the gradient), as in the model's own loss, and no chunk is computed again."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk):  # noqa: D102 -- see the class
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            logits = F.linear(h, weight, bias)
            compute_dtype = logits.dtype
            logits = logits.float()
            target = targets[start : start + chunk]
            valid = target != IGNORE_INDEX
            column = target.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, column.unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = (softmax - onehot(target)) * scale, zero where no target; in place
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            grad_logits[torch.arange(target.shape[0], device=target.device), column] -= 1.0
            grad_logits.mul_((valid.float() * scale).unsqueeze(1))
            grad_logits = grad_logits.to(compute_dtype)
            if need_hidden:
                grad_hidden[start : start + chunk] = (grad_logits @ weight.to(compute_dtype)).to(hidden.dtype)
            if need_weight:
                grad_weight += (grad_logits.t() @ h.to(compute_dtype)).float()
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        factor = grad_output.float()
        return (
            (grad_hidden * factor.to(grad_hidden.dtype)) if grad_hidden is not None else None,
            (grad_weight * factor).to(weight_dtype) if grad_weight is not None else None,
            (grad_bias * factor).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    num_items: torch.Tensor | float | None = None,
    chunk: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets` (IGNORE_INDEX: no loss), summed
    and divided by `num_items` (default: the number of targets that count), without materialising
    more than `chunk` rows of logits (default: `chunk_rows`). `hidden` (N, H), `weight` (V, H), `targets` (N,)."""
    if num_items is None:
        num_items = (targets != IGNORE_INDEX).sum()
    scale = 1.0 / torch.as_tensor(num_items, dtype=torch.float32, device=hidden.device).clamp(min=1)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, scale, chunk_rows(weight.shape[0], chunk))


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1: labels moved left by one, the last position ignored (as
    transformers' ForCausalLMLoss pads and shifts), flattened."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head when the model's logits are exactly `head(last hidden state)`, else None
    (soft-capped or scaled logits, an adapted or quantized head, an unknown architecture)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if (
        type(head) is not nn.Linear
        or getattr(config, "final_logit_softcapping", None)
        or getattr(config, "logit_scale", None)
    ):
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return head if isinstance(backbone, nn.Module) else None


@dataclass
class LossOutput:
    """What `ChunkedLossModel` returns: the loss only (there are no full logits to return)."""

    loss: torch.Tensor


class ChunkedLossModel(nn.Module):
    """A causal LM whose forward with `labels` returns the loss computed by chunks (`model(**batch).loss`
    as before, without the logits). Wraps a model for which `plain_head` is not None."""

    def __init__(
        self, model: nn.Module, chunk: int | None = DEFAULT_CHUNK_TOKENS, min_logit_bytes: int | None = None
    ) -> None:
        super().__init__()
        head = plain_head(model)
        if head is None:
            raise ValueError(
                f"{type(model).__name__}: the chunked loss needs a plain linear output head on a known "
                f"architecture ({', '.join(PLAIN_HEAD_MODEL_TYPES)})"
            )
        self.model, self.chunk, self.vocab = model, chunk, head.out_features
        self.min_logit_bytes = MIN_CHUNKED_LOGIT_BYTES if min_logit_bytes is None else min_logit_bytes

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | float | None = None,
        **kwargs,
    ) -> LossOutput:
        if input_ids.numel() * self.vocab * 4 <= self.min_logit_bytes:
            # full logits this small cost less memory than the chunk loop costs time (the built-in job:
            # 320 tokens x 49k = 63 MB): the model's own loss, the same value
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra, **kwargs)
        return LossOutput(
            causal_lm_loss(self.model, input_ids, attention_mask, labels, num_items_in_batch, self.chunk, **kwargs)
        )


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | float | None = None,
    chunk: int | None = DEFAULT_CHUNK_TOKENS,
    **kwargs,
) -> torch.Tensor:
    """transformers' causal-LM loss of `model` on a batch, computed without the full logits."""
    head = plain_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no plain output head: use model(**batch).loss")
    backbone = getattr(model, model.base_model_prefix)
    kwargs.setdefault("use_cache", False)  # training keeps no key/value cache (the model's own loss path may)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    return linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, shifted_targets(labels), num_items_in_batch, chunk
    )
