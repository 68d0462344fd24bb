"""LoRA-FA: LoRA's math with A frozen, the activation saving measured, PEFT reads the file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import lorakit
from conftest import perturb_trainable, tiny_gpt2, tiny_llama
from lorakit.kernels.dropout import DropoutDraw, draw_seed
from lorakit.methods.lora_fa import LoRAFAAdapter


def one_layer(config: lorakit.methods.AdapterConfig, in_features: int = 20, out_features: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    lorakit.adapt(model, config)
    return model


def naive(x, w0, bias, a, b, scale, keep=None, p=0.0):
    """Reference: y = x W0^T + bias + s · dropout(x) A^T B^T (dropout given by its mask)."""
    xd = x if keep is None else x * keep / (1 - p)
    return x @ w0.T + bias + scale * xd @ a.T @ b.T


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_match_naive_reference(rslora):
    model = one_layer(lorakit.LoRAFA(r=4, alpha=8, targets=["0"], rslora=rslora))
    layer = model[0]
    adapter = layer.adapter
    perturb_trainable(model)
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert adapter.scale == pytest.approx(scale)
    x = torch.randn(3, 5, 20, requires_grad=True)
    y = model(x)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = adapter.lora_B.detach().clone().requires_grad_(True)
    y_ref = naive(x_ref, layer.base_layer.weight, layer.base_layer.bias, adapter.lora_A, b_ref, scale)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(adapter.lora_B.grad, b_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_a_is_frozen_kaiming_b_zero_and_only_b_trains(input_ids):
    model = tiny_llama()
    before = model(input_ids).logits
    lorakit.adapt(model, lorakit.LoRAFA(r=8, alpha=16, targets=["q_proj", "up_proj"]))
    torch.testing.assert_close(model(input_ids).logits, before)
    trainable = dict(lorakit.adapter_parameters(model))
    assert trainable and all(name.endswith("lora_B") for name in trainable)
    for _, layer in lorakit.inject.adapted_layers(model):
        a = layer.adapter.lora_A
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt 5) on (r, in)
        assert a.abs().max() <= bound and a.std() > bound / 3
        assert not a.requires_grad and "lora_A" in dict(layer.adapter.named_buffers())
        assert torch.count_nonzero(layer.adapter.lora_B) == 0
    # r * out per layer: q_proj (32 out) and up_proj (64 out) in each of 2 layers
    assert sum(p.numel() for p in trainable.values()) == 8 * (32 + 64) * 2
    model.requires_grad_(True)  # cannot unfreeze a buffer by accident
    assert all(not layer.adapter.lora_A.requires_grad for _, layer in lorakit.inject.adapted_layers(model))


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in `model(x)`, not counting the model's own tensors."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in own:
            total += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_tokens_times_r_not_tokens_times_in(dtype):
    tokens, d_in, d_out, r = 256, 512, 384, 8
    x = torch.randn(4, tokens // 4, d_in, dtype=dtype, requires_grad=True)
    size = torch.finfo(dtype).bits // 8

    base = one_layer(lorakit.LoRA(r=r, targets=["0"]), d_in, d_out).to(dtype)
    with lorakit.disabled(base):
        assert saved_activation_bytes(base, x) == 0  # the frozen base linear does not keep x

    lora = one_layer(lorakit.LoRA(r=r, targets=["0"]), d_in, d_out)
    lora[0].base_layer.to(dtype)
    lora_bytes = saved_activation_bytes(lora, x)
    assert lora_bytes >= tokens * d_in * size  # LoRA keeps x for A's gradient

    fa = one_layer(lorakit.LoRAFA(r=r, targets=["0"]), d_in, d_out)
    fa[0].base_layer.to(dtype)  # fp32 master A, B; activations in `dtype`
    assert saved_activation_bytes(fa, x) == tokens * r * size  # z only
    assert fa(x).dtype == dtype


def test_dropout_keeps_only_z_and_grads_match_reference():
    tokens, d_in, d_out, r, p = 64, 20, 12, 4, 0.3
    model = one_layer(lorakit.LoRAFA(r=r, alpha=8, dropout=p, targets=["0"]), d_in, d_out).train()
    perturb_trainable(model)
    layer, adapter = model[0], model[0].adapter
    x = torch.randn(tokens, d_in)
    # saved: z (tokens x r, fp32) alone; the mask is drawn again from its seed in backward
    assert saved_activation_bytes(model, x.requires_grad_(True)) == tokens * r * 4

    torch.manual_seed(123)
    y = model(x)
    torch.manual_seed(123)
    keep = DropoutDraw(p, draw_seed()).mask(x.shape)  # the same draw
    assert 0 < keep.sum() < keep.numel()
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = adapter.lora_B.detach().clone().requires_grad_(True)
    y_ref = naive(x_ref, layer.base_layer.weight, layer.base_layer.bias, adapter.lora_A, b_ref, 2.0, keep, p)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    x.grad = None
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(adapter.lora_B.grad, b_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    model.eval()  # no dropout in eval mode
    torch.testing.assert_close(model(x), model(x))


def test_projected_gradient_option():
    """LoRA-FA v2: B's gradient becomes g_B (A A^T + δI)^+ / s^2."""
    model = one_layer(lorakit.LoRAFA(r=4, alpha=8, targets=["0"], projected_grad=True, projection_damping=1e-6))
    perturb_trainable(model)
    adapter = model[0].adapter
    x = torch.randn(16, 20, requires_grad=True)
    plain = one_layer(lorakit.LoRAFA(r=4, alpha=8, targets=["0"]))
    plain.load_state_dict(model.state_dict())
    g = torch.randn(16, 12)
    model(x).backward(g)
    plain(x.detach().requires_grad_(True)).backward(g)
    a = adapter.lora_A.double()
    inverse = torch.linalg.pinv(a @ a.T + 1e-6 * torch.eye(4, dtype=torch.float64))
    expected = plain[0].adapter.lora_B.grad.double() @ inverse / adapter.scale**2
    torch.testing.assert_close(adapter.lora_B.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_compiles_without_graph_breaks_forward_and_backward():
    for dropout in (0.0, 0.1):
        model = one_layer(lorakit.LoRAFA(r=4, targets=["0"], dropout=dropout)).train()
        perturb_trainable(model)
        compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
        x = torch.randn(2, 6, 20, requires_grad=True)
        compiled(x).square().sum().backward()
        assert model[0].adapter.lora_B.grad is not None and x.grad is not None
        if dropout == 0.0:
            grad_b = model[0].adapter.lora_B.grad.clone()
            model[0].adapter.lora_B.grad = None
            model(x).square().sum().backward()
            torch.testing.assert_close(model[0].adapter.lora_B.grad, grad_b)


def test_merge_is_exact(input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRAFA(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    perturb_trainable(model)
    expected = model(input_ids).logits
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    w0 = layer.base_layer.weight.detach().clone()
    a, b = layer.adapter.lora_A, layer.adapter.lora_B.detach()
    lorakit.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, w0 + 2.0 * b @ a, rtol=0, atol=1e-7)
    torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "make_model,targets", [(tiny_llama, ["q_proj", "v_proj", "up_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])]
)
def test_save_load_round_trip_keeps_method_and_frozen_a(tmp_path, input_ids, make_model, targets):
    model = lorakit.adapt(make_model(), lorakit.LoRAFA(r=4, alpha=8, targets=targets, dropout=0.1))
    perturb_trainable(model)
    model.eval()
    lorakit.save(model, tmp_path)
    assert json.loads((tmp_path / "lorakit.json").read_text())["config"]["method"] == "lora-fa"
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4
    loaded = lorakit.load(make_model(), tmp_path, trainable=True).eval()  # new adapter modules start in train mode
    config = lorakit.inject.adapter_config(loaded)
    assert isinstance(config, lorakit.LoRAFA) and config.dropout == 0.1
    assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    trainable = dict(lorakit.adapter_parameters(loaded))
    assert trainable and all(name.endswith("lora_B") for name in trainable)
    # Without lorakit.json the file is an ordinary PEFT LoRA and loads as plain LoRA.
    (tmp_path / "lorakit.json").unlink()
    as_lora = lorakit.load(make_model(), tmp_path).eval()
    assert type(lorakit.inject.adapter_config(as_lora)) is lorakit.LoRA
    torch.testing.assert_close(as_lora(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=1e-6)


def test_rejects_bad_rank_and_dropout():
    with pytest.raises(ValueError, match="rank"):
        LoRAFAAdapter(8, 8, 0, 1.0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAFAAdapter(8, 8, 2, 1.0, dropout=1.0)
