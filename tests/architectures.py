"""Tiny random models of the architectures users fine-tune, built offline from transformers' own
config classes (hidden 16, 2 layers, a 64-token vocabulary), with a batch and a loss for each.

Shared by tests/test_architectures.py and the PEFT parity in tests/test_peft.py.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB = 64
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    **SPECIAL,
)
ENCODER = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=2,
)


@dataclass(frozen=True)
class Arch:
    """One architecture: its transformers model type, the Auto class it loads with, its settings."""

    model_type: str
    kind: str  # "causal", "seq2seq", "classify" or "image"
    settings: tuple[tuple[str, Any], ...]


def arch(model_type: str, kind: str, **settings: Any) -> Arch:
    return Arch(model_type, kind, tuple(sorted(settings.items())))


ARCHITECTURES = {
    "llama": arch("llama", "causal", **DECODER),
    "mistral": arch("mistral", "causal", **DECODER),
    "qwen2": arch("qwen2", "causal", **DECODER),
    "qwen3": arch("qwen3", "causal", head_dim=8, **DECODER),
    "gemma2": arch("gemma2", "causal", head_dim=8, query_pre_attn_scalar=8, **DECODER),
    "phi3": arch("phi3", "causal", **DECODER),
    "gpt2": arch(
        "gpt2",
        "causal",
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **SPECIAL,
    ),
    "gpt_neox": arch(
        "gpt_neox",
        "causal",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        **SPECIAL,
    ),
    "opt": arch(
        "opt",
        "causal",
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        dropout=0.0,
        **SPECIAL,
    ),
    "falcon": arch(
        "falcon", "causal", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB, **SPECIAL
    ),
    "bloom": arch("bloom", "causal", hidden_size=16, n_layer=2, n_head=2, vocab_size=VOCAB, **SPECIAL),
    "t5": arch(
        "t5",
        "seq2seq",
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        vocab_size=VOCAB,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
    "bert": arch("bert", "classify", **ENCODER),
    "roberta": arch("roberta", "classify", pad_token_id=1, **ENCODER),
    "deberta-v2": arch(
        "deberta-v2",
        "classify",
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        max_relative_positions=-1,
        position_biased_input=False,
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        pooler_hidden_size=16,
        pooler_dropout=0.0,
        **ENCODER,
    ),
    "vit": arch(
        "vit",
        "image",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        num_channels=3,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
}
AUTO = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classify": "AutoModelForSequenceClassification",
    "image": "AutoModelForImageClassification",
}


@functools.cache
def _base(name: str) -> nn.Module:
    import transformers

    spec = ARCHITECTURES[name]
    config = transformers.AutoConfig.for_model(spec.model_type, **dict(spec.settings))
    torch.manual_seed(0)
    return getattr(transformers, AUTO[spec.kind]).from_config(config).eval()


def build(name: str) -> nn.Module:
    """A fresh copy of the architecture's tiny random model (the same weights every time), in eval mode."""
    return copy.deepcopy(_base(name))


def batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs with labels for the architecture's task: 2 examples."""
    g = torch.Generator().manual_seed(seed)
    kind = ARCHITECTURES[name].kind
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1])}
    ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "causal":
        return {**inputs, "labels": ids}
    if kind == "seq2seq":
        return {**inputs, "labels": torch.randint(3, VOCAB, (2, 5), generator=g)}
    return {**inputs, "labels": torch.tensor([0, 1])}


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for `inputs` (the decoder's, teacher-forced, for seq2seq), without gradients."""
    with torch.no_grad():
        return model(**inputs).logits


def head_modules(name: str) -> list[str]:
    """What a classifier trains in full beside the adapter (`train_modules`): its new head."""
    return ["classifier"] if ARCHITECTURES[name].kind in ("classify", "image") else []
