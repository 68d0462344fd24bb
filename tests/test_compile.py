"""A LoRA-adapted model must compile whole: no graph breaks, forward and backward, same numbers.

`torch.compile` is worth about 1.3x on a LoRA step (docs/PERFORMANCE.md) only if the adapter
layers leave the model one graph. The `aot_eager` backend traces forward and backward through
dynamo and AOTAutograd exactly as inductor would, without paying for C++ code generation, so a
graph break or an untraceable backward shows up here in seconds.
"""

from __future__ import annotations

import pytest
import torch

import lorakit

transformers = pytest.importorskip("transformers")


def tiny_adapted_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    lorakit.adapt(model, lorakit.LoRA(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():  # B starts at zero; make the adapter path change the output
        for _, p in lorakit.adapter_parameters(model):
            p.normal_(std=0.1)
    return model


def loss_and_grads(model, compiled, input_ids):
    loss = compiled(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in lorakit.adapter_parameters(model)}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_lora_model_has_no_graph_breaks():
    model = tiny_adapted_llama()
    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=input_ids, labels=input_ids, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_lora_forward_and_backward_equal_eager():
    model = tiny_adapted_llama()
    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = loss_and_grads(model, model, input_ids)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_loss, compiled_grads = loss_and_grads(model, compiled, input_ids)

    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == 2 * 7 * 2
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], grad, msg=lambda m: f"{name}: {m}")
