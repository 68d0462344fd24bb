"""DoRA against its dense math, against Hugging Face PEFT (`LoraConfig(use_dora=True)`), and its files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import perturb_trainable, tiny_gpt2, tiny_llama
from lorakit.kernels.dropout import DropoutDraw, draw_seed
from lorakit.methods.dora import NORM_EPS, factored_row_norm


def naive_dora(x, w0, bias, a, b, m, scale):
    """Reference: y = x W'^T + bias, W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_row (norm detached)."""
    direction = w0 + scale * b @ a
    norm = torch.linalg.norm(direction, dim=1).detach()
    y = x @ (m[:, None] * direction / norm[:, None]).T
    return y + bias if bias is not None else y


def adapted_linear(in_f=20, out_f=12, bias=True, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    return lorakit.adapt(model, lorakit.DoRA(targets=["0"], **kwargs))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_match_naive_reference(bias, rslora):
    model = adapted_linear(bias=bias, r=4, alpha=8, rslora=rslora)
    base, adapter = model[0].base_layer, model[0].adapter
    perturb_trainable(model)
    x = torch.randn(3, 5, 20, requires_grad=True)
    y = model(x)
    x_ref = x.detach().clone().requires_grad_(True)
    a, b, m = (
        t.detach().clone().requires_grad_(True) for t in (adapter.lora.lora_A, adapter.lora.lora_B, adapter.magnitude)
    )
    y_ref = naive_dora(x_ref, base.weight, base.bias, a, b, m, adapter.scale)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(adapter.lora.lora_A.grad, a.grad)
    torch.testing.assert_close(adapter.lora.lora_B.grad, b.grad)
    torch.testing.assert_close(adapter.magnitude.grad, m.grad)
    assert base.weight.grad is None


def test_factored_norm_equals_dense_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    a = torch.randn(8, 64, generator=g, dtype=torch.float64)
    b = torch.randn(48, 8, generator=g, dtype=torch.float64)
    for scale in (0.5, 2.0):
        dense = torch.linalg.norm(w + scale * b @ a, dim=1)
        factored = factored_row_norm(w, w.pow(2).sum(1), a, b, scale)
        assert factored.dtype == torch.float32
        torch.testing.assert_close(factored, dense.float())
    # a Conv1D-style transposed view works as well
    torch.testing.assert_close(factored_row_norm(w.T.contiguous().T, w.pow(2).sum(1), a, b, 2.0), dense.float())


def test_magnitude_is_row_norm_and_output_equals_base_at_init(input_ids):
    model = tiny_llama()
    before = model(input_ids).logits
    lorakit.adapt(model, lorakit.DoRA(r=4, alpha=8, targets="all-linear"))
    for _, layer in lorakit.inject.adapted_layers(model):
        w = layer.base_layer.weight
        torch.testing.assert_close(layer.adapter.magnitude, torch.linalg.norm(w, dim=1))
        assert layer.adapter.magnitude.shape == (w.shape[0],)  # one value per OUTPUT row
        assert torch.count_nonzero(layer.adapter.lora.lora_B) == 0
    assert torch.equal(model(input_ids).logits, before)


def test_gpt2_conv1d_norm_is_over_the_input_axis(input_ids):
    model = tiny_gpt2()
    before = model(input_ids).logits
    lorakit.adapt(model, lorakit.DoRA(r=4, targets=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    w = layer.base_layer.weight  # Conv1D stores (in, out)
    torch.testing.assert_close(layer.adapter.magnitude, torch.linalg.norm(w, dim=0))
    assert layer.adapter.magnitude.shape == (96,)
    assert torch.equal(model(input_ids).logits, before)


def test_dropout_runs_the_base_matmul_once_on_the_clean_input():
    model = adapted_linear(in_f=16, out_f=16, r=4, dropout=0.5)
    perturb_trainable(model)
    base, adapter = model[0].base_layer, model[0].adapter
    model.train()
    x = torch.randn(32, 16)
    torch.manual_seed(3)
    y = model(x)
    torch.manual_seed(3)
    dropped = DropoutDraw(0.5, draw_seed()).apply(x)  # the mask the adapter draws after the same seed
    mag_norm = adapter.magnitude / adapter.weight_norm(base)
    lora = adapter.scale * dropped @ adapter.lora.lora_A.T @ adapter.lora.lora_B.T
    plain = x @ base.weight.T
    # y = base + (m/n - 1) base + (m/n) s drop(x) A^T B^T + bias, base = x W0^T (not of drop(x))
    torch.testing.assert_close(y, plain + (mag_norm - 1) * plain + mag_norm * lora + base.bias)
    calls = []
    base.register_forward_hook(lambda *_: calls.append(1))
    model(x)
    assert len(calls) == 1
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_zero_rows_give_zero_output_not_nan():
    model = adapted_linear(in_f=8, out_f=6, r=2)
    base, adapter = model[0].base_layer, model[0].adapter
    with torch.no_grad():
        base.weight[2].zero_()
        base.bias.zero_()
    adapter.refresh_base_norm(base)
    with torch.no_grad():
        adapter.magnitude.copy_(torch.linalg.norm(base.weight, dim=1))
    assert adapter.weight_norm(base)[2] == pytest.approx(NORM_EPS)
    x = torch.randn(4, 8)
    y = model(x)
    assert torch.isfinite(y).all() and torch.count_nonzero(y[:, 2]) == 0
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in adapter.parameters())
    merged = adapter.merge(base.weight)
    assert torch.isfinite(merged).all() and torch.count_nonzero(merged[2]) == 0
    torch.testing.assert_close(adapter.unmerge(merged), base.weight)


def test_merged_weight_is_the_dora_formula():
    model = adapted_linear(r=4, alpha=8)
    perturb_trainable(model)
    base, adapter = model[0].base_layer, model[0].adapter
    w0 = base.weight.detach().clone()
    direction = w0 + adapter.scale * adapter.lora.lora_B @ adapter.lora.lora_A
    expected = adapter.magnitude[:, None] * direction / torch.linalg.norm(direction, dim=1)[:, None]
    lorakit.merge(model)
    torch.testing.assert_close(base.weight, expected)
    lorakit.unmerge(model)
    torch.testing.assert_close(base.weight, w0)
    with pytest.raises(RuntimeError, match="not merged"):
        adapted_linear(r=4)[0].adapter.unmerge(w0)


def test_compute_in_activation_dtype_with_fp32_master_weights():
    torch.manual_seed(0)
    model = lorakit.adapt(nn.Sequential(nn.Linear(32, 32)).to(torch.bfloat16), lorakit.DoRA(r=4, targets=["0"]))
    perturb_trainable(model)
    base, adapter = model[0].base_layer, model[0].adapter
    assert adapter.magnitude.dtype == torch.float32 and adapter.lora.lora_A.dtype == torch.float32
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    ref = naive_dora(
        x.float(),
        base.weight.float(),
        base.bias.float(),
        adapter.lora.lora_A,
        adapter.lora.lora_B,
        adapter.magnitude,
        adapter.scale,
    )
    torch.testing.assert_close(y.float(), ref.detach(), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert adapter.magnitude.grad.dtype == torch.float32


def test_summary_counts():
    model = lorakit.adapt(tiny_llama(), lorakit.DoRA(r=4, targets=["q_proj", "v_proj"]))
    # per layer: q r(32+32) + 32, v r(32+16) + 16; 2 layers
    expected = 2 * (4 * 64 + 32 + 4 * 48 + 16)
    assert f"{expected:,}" in lorakit.summary(model)


def test_meta_device_base():
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(4)])
    lorakit.adapt(model, lorakit.DoRA(r=64))
    assert sum(p.numel() for _, p in lorakit.adapter_parameters(model)) == 4 * (64 * 8192 + 4096)


# --- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.DoRA(r=4, alpha=8, targets=["q_proj", "up_proj"]))
    perturb_trainable(model)
    lorakit.save(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in saved
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["use_dora"] is True
    loaded = lorakit.load(tiny_llama(), tmp_path)
    assert type(lorakit.inject.adapter_config(loaded)) is lorakit.DoRA
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_peft_config_picks_dora_or_lora():
    from lorakit.methods.base import config_from_peft

    body = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert type(config_from_peft({**body, "use_dora": True})) is lorakit.DoRA
    assert type(config_from_peft(body)) is lorakit.LoRA
