"""benchmarks/flop_floor.py's count is a floor lorakit's steps really stand on: the multiply-adds
PyTorch's FLOP counter sees a step add to the limit are never fewer than the floor, and VeRA's fused
step sits within a few percent of it (the README's "as close to the limit as its math allows")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from conftest import perturb_trainable

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flop_floor.py"
HIDDEN, INTERMEDIATE, LAYERS, KV, VOCAB = 64, 160, 2, 32, 128
BATCH, SEQ = 4, 32  # 128 tokens: more than q/k/v/o/gate/up's 64 inputs, fewer than down's 160


def floor_module():
    spec = importlib.util.spec_from_file_location("flop_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config).train()


class MatmulCounter(TorchDispatchMode):
    """Multiply-adds of every matrix product that runs (forward and backward), in place ones included."""

    PRODUCTS = {
        torch.ops.aten.mm.default: 0,
        torch.ops.aten.addmm.default: 1,
        torch.ops.aten.addmm_.default: 1,
        torch.ops.aten.bmm.default: 0,
        torch.ops.aten.baddbmm.default: 1,
    }

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS:
            a, b = args[self.PRODUCTS[func]], args[self.PRODUCTS[func] + 1]
            self.total += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def step_multiply_adds(model, input_ids) -> int:
    """Multiply-adds of one forward + backward to the input embeddings (and the adapters, if any)."""
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    with MatmulCounter() as counter:
        model(inputs_embeds=embeds, labels=input_ids).loss.backward()
    return counter.total


@pytest.mark.parametrize(
    "method,config,tight",
    [
        ("lora", lambda: lorakit.LoRA(r=4, targets="all-linear"), None),
        ("vera", lambda: lorakit.VeRA(r=48, targets="all-linear"), 1.05),
    ],
)
def test_a_step_adds_at_least_the_floor(method, config, tight):
    floor = floor_module()
    shape = dict(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, kv=KV, vocab=VOCAB)
    tokens = BATCH * SEQ
    r = config().r
    expected = tokens * (
        floor.lora_per_token(shape, r, tokens) if method == "lora" else floor.vera_per_token(shape, r, tokens)
    )
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    base = tiny_llama()
    for p in base.parameters():
        p.requires_grad_(False)
    limit = step_multiply_adds(base, input_ids)
    model = lorakit.adapt(tiny_llama(), config())
    perturb_trainable(model)
    added = step_multiply_adds(model, input_ids) - limit
    assert added >= expected * 0.999, (added, expected)
    if tight:
        assert added <= expected * tight, (added, expected)
