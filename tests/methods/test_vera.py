"""VeRA against its math, against Hugging Face PEFT (same seed -> same projections), and its files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import perturb_trainable, step_results, tiny_gpt2, tiny_llama
from lorakit.kernels import fused_vera as vera_module
from lorakit.methods.vera import VeRAAdapter, VeRAProjections, shared_projections, vera_projections


def naive_vera(x, w0, bias, a, b_mat, d, b):
    """Reference: y = x (W0 + diag(b) B diag(d) A)^T + bias, from the dense weight."""
    y = x @ (w0 + torch.diag(b) @ b_mat @ torch.diag(d) @ a).T
    return y + bias if bias is not None else y


def two_layer_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 12), nn.Linear(12, 24, bias=False))


def test_forward_and_grads_match_naive_reference():
    model = lorakit.adapt(two_layer_model(), lorakit.VeRA(r=6, targets=["0", "1"]))
    perturb_trainable(model)
    first, second = model[0].adapter, model[1].adapter
    proj = shared_projections(model, "default")
    assert first.projections is second.projections is proj
    assert tuple(proj.vera_A.shape) == (6, 20) and tuple(proj.vera_B.shape) == (24, 6)

    x = torch.randn(3, 5, 20, requires_grad=True)
    y = model(x)
    refs = [
        {k: t.detach().clone().requires_grad_(True) for k, t in a.peft_state_dict().items()} for a in (first, second)
    ]
    x_ref = x.detach().clone().requires_grad_(True)
    h = naive_vera(
        x_ref,
        model[0].base_layer.weight,
        model[0].base_layer.bias,
        proj.vera_A[:, :20],
        proj.vera_B[:12],
        refs[0]["vera_lambda_d"],
        refs[0]["vera_lambda_b"],
    )
    y_ref = naive_vera(
        h,
        model[1].base_layer.weight,
        None,
        proj.vera_A[:, :12],
        proj.vera_B[:24],
        refs[1]["vera_lambda_d"],
        refs[1]["vera_lambda_b"],
    )
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for adapter, ref in zip((first, second), refs):
        torch.testing.assert_close(adapter.vera_lambda_d.grad, ref["vera_lambda_d"].grad)
        torch.testing.assert_close(adapter.vera_lambda_b.grad, ref["vera_lambda_b"].grad)
    assert proj.vera_A.grad is None and not proj.vera_A.requires_grad


def test_init_and_trainable_parameters(input_ids):
    model = tiny_llama()
    before = model(input_ids).logits
    lorakit.adapt(model, lorakit.VeRA(r=16, d_initial=0.25, targets=["q_proj", "v_proj"]))
    for _, layer in lorakit.inject.adapted_layers(model):
        assert torch.all(layer.adapter.vera_lambda_d == 0.25)
        assert torch.count_nonzero(layer.adapter.vera_lambda_b) == 0
    torch.testing.assert_close(model(input_ids).logits, before)
    names = {n.rsplit(".", 1)[-1] for n, _ in lorakit.adapter_parameters(model)}
    assert names == {"vera_lambda_b", "vera_lambda_d"}
    # the projections are buffers, shared, and kept out of the model's state dict
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())
    assert sum(isinstance(m, VeRAProjections) for m in model.modules()) == 1


def test_projections_are_peft_kaiming_uniform_from_the_seed():
    a, b = vera_projections(8, 40, 24, seed=3)
    a2, b2 = vera_projections(8, 40, 24, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, vera_projections(8, 40, 24, seed=4)[0])
    assert a.abs().max() <= math.sqrt(6 / 40) and b.abs().max() <= math.sqrt(6 / 8)
    assert a.std() > math.sqrt(6 / 40) / 3


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    model = lorakit.adapt(nn.Sequential(nn.Linear(16, 16)), lorakit.VeRA(r=4, dropout=0.5, targets=["0"]))
    x = torch.randn(64, 16)
    base_out = model[0].base_layer(x)
    model.train()
    torch.testing.assert_close(model(x), base_out)  # b = 0: nothing to drop yet
    perturb_trainable(model)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_compute_in_activation_dtype_with_fp32_master_weights():
    torch.manual_seed(0)
    model = lorakit.adapt(nn.Sequential(nn.Linear(32, 32)).to(torch.bfloat16), lorakit.VeRA(r=8, targets=["0"]))
    perturb_trainable(model)
    adapter = model[0].adapter
    assert adapter.vera_lambda_b.dtype == torch.float32 and adapter.projections.vera_A.dtype == torch.float32
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    ref = naive_vera(
        x.float(),
        model[0].base_layer.weight.float(),
        model[0].base_layer.bias.float(),
        adapter.projections.vera_A,
        adapter.projections.vera_B,
        adapter.vera_lambda_d,
        adapter.vera_lambda_b,
    )
    torch.testing.assert_close(y.float(), ref.detach(), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert adapter.vera_lambda_d.grad.dtype == torch.float32


def test_summary_counts_the_seed_document_example():
    """in = out = 4096, r = 64, 80 layers: LoRA ~42M trainable, VeRA ~333K (a meta-device base)."""

    def base():
        with torch.device("meta"):
            return nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(80)])

    lora = lorakit.adapt(base(), lorakit.LoRA(r=64))
    vera = lorakit.adapt(base(), lorakit.VeRA(r=64))
    lora_count = sum(p.numel() for _, p in lorakit.adapter_parameters(lora))
    vera_count = sum(p.numel() for _, p in lorakit.adapter_parameters(vera))
    assert lora_count == 80 * 64 * (4096 + 4096) == 41_943_040
    assert vera_count == 80 * (4096 + 64) == 332_800
    assert round(lora_count / vera_count) == 126
    assert "41,943,040" in lorakit.summary(lora) and "332,800" in lorakit.summary(vera)
    assert "332,800" in lorakit.summary(vera, per_module=True).splitlines()[1]
    assert shared_projections(vera, "default").vera_A.shape == (64, 4096)


def test_layers_larger_than_the_projections_are_refused():
    proj = VeRAProjections(*vera_projections(4, 8, 8, seed=0))
    with pytest.raises(ValueError, match="too small"):
        VeRAAdapter(proj, 16, 8)


# --- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("save_projection", [False, True])
def test_save_load_round_trip(save_projection, tmp_path, input_ids):
    config = lorakit.VeRA(r=16, projection_prng_key=7, save_projection=save_projection, targets=["q_proj", "up_proj"])
    model = lorakit.adapt(tiny_llama(), config)
    perturb_trainable(model)
    lorakit.save(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in saved) == save_projection
    assert all(
        k.endswith(("vera_lambda_b", "vera_lambda_d"))
        for k in saved
        if k not in ("base_model.vera_A", "base_model.vera_B")
    )
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "VERA" and peft_config["projection_prng_key"] == 7
    loaded = lorakit.load(tiny_llama(), tmp_path)
    assert type(lorakit.inject.adapter_config(loaded)) is lorakit.VeRA
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)


def test_saved_projections_are_what_loads(tmp_path, input_ids):
    """With save_projection, the file's matrices win over the seed (portability across platforms)."""
    model = lorakit.adapt(tiny_llama(), lorakit.VeRA(r=8, save_projection=True, targets=["q_proj"]))
    perturb_trainable(model)
    with torch.no_grad():
        shared_projections(model, "default").vera_A.mul_(2)  # no longer what the seed gives
    lorakit.save(model, tmp_path)
    loaded = lorakit.load(tiny_llama(), tmp_path)
    assert torch.equal(shared_projections(loaded, "default").vera_A, shared_projections(model, "default").vera_A)
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


# --- the fused layer ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("merged", [False, True], ids=["update-term", "merged-forward"])
def test_fused_layer_equals_unfused_path(make_model, autocast, merged, input_ids, monkeypatch):
    """One node per layer (x A^T shared by the layers reading the same x, dL/dx through W + B'A,
    the forward through W + B'A too where that is cheaper) computes what the base and `forward`
    compute apart: logits and every gradient, fp32 to float tolerance, bf16 autocast to bf16
    rounding."""
    model = lorakit.adapt(make_model(), lorakit.VeRA(r=16, targets="all-linear"))
    perturb_trainable(model)
    projections = shared_projections(model, "default")
    calls, merges = [], []
    original = VeRAProjections.down_projection
    monkeypatch.setattr(VeRAProjections, "down_projection", lambda self, *a: calls.append(1) or original(self, *a))
    decide = vera_module.merge_in_forward
    monkeypatch.setattr(
        vera_module,
        "merge_in_forward",
        lambda tokens, in_features, dtype: merges.append(decide(10**9, 1, dtype) and merged) or merges[-1],
    )
    fused = step_results(model, input_ids, autocast)[1:]
    assert calls  # the fused path ran
    assert any(merges) == (merged and not autocast)  # merged forward in fp32 only
    monkeypatch.setattr(VeRAAdapter, "fused_forward", lambda self, x, base_layer: None)
    reference = step_results(model, input_ids, autocast)[1:]
    tol = {"atol": 5e-2, "rtol": 2e-2} if autocast else {}
    torch.testing.assert_close(fused[0], reference[0], **tol)
    for name, grad in reference[1].items():
        scale = grad.abs().max()
        torch.testing.assert_close(
            fused[1][name] / scale, grad / scale, **(tol or {"atol": 1e-5, "rtol": 1e-4}), msg=lambda m: f"{name}: {m}"
        )
    scale = reference[2].abs().max()
    torch.testing.assert_close(fused[2] / scale, reference[2] / scale, **(tol or {"atol": 1e-5, "rtol": 1e-4}))
    assert projections.vera_A.grad is None


def test_down_projection_is_shared_by_layers_reading_the_same_input(input_ids):
    """Llama's q/k/v read one tensor and gate/up another: x A^T runs 4 times per decoder layer for
    7 adapted projections; a changed input (in place) is recomputed, not reused."""
    model = lorakit.adapt(tiny_llama(), lorakit.VeRA(r=16, targets="all-linear"))
    projections = shared_projections(model, "default")
    computed = []
    original_mm = torch.mm

    def counting_mm(a, b):
        computed.append(tuple(b.shape)) if b.shape[1] == 16 and b.data_ptr() == projections.vera_A.data_ptr() else None
        return original_mm(a, b)

    torch.mm = counting_mm
    try:
        model(input_ids)
        assert len(computed) == 2 * 4
        x = torch.randn(5, 32)
        first = projections.down_projection(x, 32, torch.float32)
        assert projections.down_projection(x, 32, torch.float32) is first
        x.mul_(2)
        again = projections.down_projection(x, 32, torch.float32)
        assert again is not first
        torch.testing.assert_close(again, 2 * first)
        import copy
        import pickle

        copy.deepcopy(model)  # the memo (a weak reference) copies and pickles away
        assert pickle.loads(pickle.dumps(projections))._last_down is None
    finally:
        torch.mm = original_mm
