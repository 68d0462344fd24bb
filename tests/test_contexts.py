"""Every method in the contexts users run models in: `no_grad`, `inference_mode` (transformers'
pipelines), eval and train mode, bf16 autocast, `torch.compile`; and the fused layer path equal to
the unfused one for every method that has both.

Parametrized over the method registry (plus QLoRA: LoRA over an NF4 base), on a tiny Llama.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_llama
from lorakit.quant import quantize
from test_contract import METHOD_NAMES, make_config

CASES = METHOD_NAMES + ["qlora"]


def adapted(case: str) -> torch.nn.Module:
    """A tiny Llama with the method's adapter, every trainable value non-zero."""
    model = tiny_llama()
    if case == "qlora":
        quantize(model, method="nf4")
    lorakit.adapt(model, make_config("lora" if case == "qlora" else case, "llama"))
    perturb_trainable(model)
    return model


@pytest.mark.parametrize("case", CASES)
def test_forward_is_the_same_in_every_grad_context_and_mode(case, input_ids):
    model = adapted(case).eval()
    expected = model(input_ids).logits.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-6, rtol=1e-6)
    with torch.inference_mode():
        first = model(input_ids).logits
        again = model(input_ids).logits  # a second call reuses nothing from the first
    torch.testing.assert_close(first.clone(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again.clone(), expected, atol=1e-6, rtol=1e-6)
    model.train()  # no dropout here: train mode computes the same
    torch.testing.assert_close(model(input_ids).logits.detach(), expected, atol=1e-6, rtol=1e-6)
    model.eval()
    with torch.no_grad():
        greedy = model.generate(input_ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode():  # what a transformers pipeline does
        assert torch.equal(model.generate(input_ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0), greedy)


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_forward_and_backward(case, input_ids):
    """Under bf16 autocast: the fp32 result up to bf16 rounding, fp32 gradients for the adapter, and
    the same in inference mode."""
    model = adapted(case).eval()
    expected = model(input_ids).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=input_ids)
    torch.testing.assert_close(out.logits.float(), expected, atol=0.15, rtol=0.05)
    out.loss.backward()
    trainable = [p for _, p in lorakit.adapter_parameters(model)]
    assert trainable and all(
        p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all() for p in trainable
    )
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(input_ids).logits.float(), out.logits.detach().float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", CASES)
def test_compiled_forward_in_inference_mode_equals_eager(case, input_ids):
    """`torch.compile` under `inference_mode` (the contract suite compiles training; each grad mode is
    a compilation of its own, so `no_grad`, between the two, is left out to keep this fast).
    `aot_eager` traces as inductor would, without compiling C++."""
    model = adapted(case).eval()
    with torch.no_grad():
        expected = model(input_ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(input_ids).logits.clone(), expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.integration
@pytest.mark.parametrize("case", ["lora", "vera"])
def test_inductor_compiled_layer_in_inference_mode_equals_eager(case):
    """The real CPU backend (inductor, C++) under inference mode, on one adapted layer (a whole model
    costs minutes of C++ compiles here): LoRA's and VeRA's fused nodes. Training compiles of whole
    models are in the contract suite (aot_eager) and tests/methods/test_lora_fa.py (inductor)."""
    layer = next(layer for _, layer in lorakit.inject.adapted_layers(adapted(case)))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x).clone(), expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


FUSED = sorted(
    m
    for m in METHOD_NAMES
    if any(
        hasattr(layer.adapter, "fused_forward")
        for _, layer in lorakit.inject.adapted_layers(lorakit.adapt(tiny_llama(), make_config(m, "llama")))
    )
)


def test_the_fused_methods_are_known():
    assert {"lora", "lora-fa", "vera"} <= set(FUSED)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("method", FUSED)
def test_fused_path_equals_unfused(method, autocast):
    """Per adapted layer: the one-node fused output, the input's and the adapter's gradients equal
    the base-then-adapter path's, in train and eval mode, in fp32 and under bf16 autocast."""
    model = adapted(method)
    generator = torch.Generator().manual_seed(3)
    for mode in (True, False):
        model.train(mode)
        for name, layer in lorakit.inject.adapted_layers(model):
            adapter, base = layer.adapter, layer.base_layer
            x = torch.randn(2, 5, layer.in_features, generator=generator)
            grad_out = torch.randn(2, 5, layer.out_features, generator=generator)
            results = []
            for fused in (True, False):
                xi = x.clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    if fused:
                        y = adapter.fused_forward(xi, base)
                        assert y is not None, f"{method} {name}: no fused path over a plain Linear"
                    else:
                        base_out = base(xi)
                        y = adapter(xi, base_out, base_out, base)
                y.backward(grad_out.to(y.dtype))
                params = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
                adapter.zero_grad(set_to_none=True)
                results.append((y.detach().float(), xi.grad.float(), params))
            (y_f, gx_f, gp_f), (y_u, gx_u, gp_u) = results
            tol = dict(atol=3e-2, rtol=3e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y_f, y_u, **tol, msg=lambda m: f"{method} {name} output: {m}")
            torch.testing.assert_close(gx_f, gx_u, **tol, msg=lambda m: f"{method} {name} input grad: {m}")
            assert gp_f.keys() == gp_u.keys() and gp_f
            for key in gp_u:
                torch.testing.assert_close(gp_f[key], gp_u[key], **tol, msg=lambda m: f"{method} {name} {key}: {m}")
