"""LoftQ initialisation over an NF4 base: the math, every LoRA-pair method, save/load, loading, PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lorakit
from bnb_reference import reference_dequantize_4bit
from conftest import perturb_trainable, tiny_llama
from lorakit.quant import Linear4bit, load_quantized_causal_lm, quantize, quantized_layers
from lorakit.quant.loftq import residual_factors

TARGETS = ["0", "2"]


def two_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 64))


def naive_truncated_svd(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation, by the textbook formula sum_i<r σ_i u_i v_i^T (float64)."""
    U, S, Vh = torch.linalg.svd(matrix.double())
    return sum(S[i] * torch.outer(U[:, i], Vh[i]) for i in range(r))


def test_residual_factors_are_the_truncated_svd_of_the_rounding_error():
    weight = torch.randn(80, 96, generator=torch.Generator().manual_seed(0))
    layer = Linear4bit(weight)
    dequantized = layer.dense_weight(torch.float32)
    L, R = residual_factors(weight, dequantized, 8)
    assert L.shape == (80, 8) and R.shape == (8, 96)
    residual = (weight - dequantized).double()
    # (fp32 SVD vs the fp64 textbook sum: entries of size ~0.1 agree to a few 1e-5)
    torch.testing.assert_close((L @ R).double(), naive_truncated_svd(residual, 8), atol=1e-4, rtol=1e-4)
    # Eckart-Young: what is left is exactly the tail of the spectrum, and less than the rounding error
    S = torch.linalg.svdvals(residual)
    left = (residual - (L @ R).double()).norm()
    torch.testing.assert_close(left, S[8:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-6)
    assert left < residual.norm()
    # balanced split, the first k columns are the best rank-k fit as well
    torch.testing.assert_close(L.norm(dim=0), R.norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((L[:, :3] @ R[:3]).double(), naive_truncated_svd(residual, 3), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "lora-fa", "dora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_layer_starts_at_quantized_plus_truncated_residual(method, rslora):
    model = two_layer()
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1))
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    quantize(model, targets=TARGETS, loftq_rank=12)  # kept rank above r: the top r are used
    config = lorakit.methods.METHODS[method](r=6, alpha=24.0, rslora=rslora, targets=TARGETS, init="loftq")
    lorakit.adapt(model, config)
    for name in TARGETS:
        layer = model.get_submodule(name)
        base = layer.base_layer.dense_weight(torch.float32)
        expected = base.double() + naive_truncated_svd(dense[name] - base, 6)
        torch.testing.assert_close(layer.delta_weight().double() + base.double(), expected, atol=1e-4, rtol=1e-4)
        assert layer.base_layer.residual_factors is None  # consumed by the adapter
    # the forward pass agrees with the dense weights it stands for
    h = torch.relu(x @ (expected_weight(model, "0")).T + model[0].base_layer.bias)
    torch.testing.assert_close(
        model(x), h @ expected_weight(model, "2").T + model[2].base_layer.bias, atol=1e-4, rtol=1e-4
    )


def expected_weight(model: nn.Module, name: str) -> torch.Tensor:
    layer = model.get_submodule(name)
    return layer.base_layer.dense_weight(torch.float32) + layer.delta_weight()


def test_loftq_start_is_closer_to_the_full_precision_model_than_qlora():
    model = tiny_llama(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        qlora = lorakit.adapt(quantize(copy.deepcopy(model)), lorakit.LoRA(r=8))
        loftq = lorakit.adapt(quantize(copy.deepcopy(model), loftq_rank=8), lorakit.LoRA(r=8, init="loftq"))
        assert (loftq(ids).logits - reference).norm() < (qlora(ids).logits - reference).norm()


def test_loftq_trains_and_saves_a_plain_adapter(tmp_path):
    model = lorakit.adapt(quantize(tiny_llama(), loftq_rank=4), lorakit.LoRA(r=4, alpha=8, init="loftq"))
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lorakit.adapter_parameters(model))
    perturb_trainable(model)
    expected = model(ids).logits
    lorakit.save(model, tmp_path)
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["init_lora_weights"] is True  # PEFT must not rerun LoftQ on load
    # loading needs no factors: the base is NF4(W) again, the file holds A and B
    restored = lorakit.load(tiny_llama(), tmp_path)
    assert lorakit.inject.adapter_config(restored).init == "loftq"
    assert torch.equal(restored(ids).logits, expected)


def test_streamed_loader_keeps_the_same_factors(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=3).save_pretrained(tmp_path)
    streamed = load_quantized_causal_lm(str(tmp_path), loftq_rank=4)
    reference = quantize(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), loftq_rank=4)
    assert "loftq_rank" not in lorakit.inject.lorakit_state(streamed).quantization  # not part of the base
    ref_layers = dict(quantized_layers(reference))
    for name, layer in quantized_layers(streamed):
        for ours, theirs in zip(layer.residual_factors, ref_layers[name].residual_factors):
            assert torch.equal(ours, theirs), name


def test_clear_errors():
    with pytest.raises(ValueError, match="loftq_rank=r"):  # dense base: no rounding error to start from
        lorakit.adapt(two_layer(), lorakit.LoRA(r=4, targets=TARGETS, init="loftq"))
    with pytest.raises(ValueError, match="loftq_rank=r"):  # quantized without keeping the factors
        lorakit.adapt(quantize(two_layer(), targets=TARGETS), lorakit.LoRA(r=4, targets=TARGETS, init="loftq"))
    with pytest.raises(ValueError, match="loftq_rank >= r"):
        lorakit.adapt(
            quantize(two_layer(), targets=TARGETS, loftq_rank=2), lorakit.LoRA(r=4, targets=TARGETS, init="loftq")
        )
    with pytest.raises(ValueError, match="not one of default, loftq"):
        lorakit.LoRA(init="pissa")
    with pytest.raises(ValueError, match="Delta-LoRA supports only init='default'"):
        lorakit.methods.METHODS["delta-lora"](init="loftq")


def test_same_pair_as_peft_loftq_with_alpha_equal_r():
    """PEFT's LoftQ (replace_lora_weights_loftq) sets B, A = U_r Σ_r^½, Σ_r^½ V_r^T of W - bnb's NF4
    dequantization, ignoring the scale: with lora_alpha == r that is lorakit's pair exactly."""
    bnb = pytest.importorskip("bitsandbytes")
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    model = two_layer(seed=4)
    weight = model[0].weight.detach().clone()
    q, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    residual = weight - reference_dequantize_4bit(q, state)  # not the native kernel: tests/bnb_reference.py
    peft = loftq_utils._low_rank_decomposition(residual, reduced_rank=8)
    quantize(model, targets=["0"], double_quant=False, loftq_rank=8)
    lorakit.adapt(model, lorakit.LoRA(r=8, alpha=8.0, targets=["0"], init="loftq"))
    adapter = model[0].adapter
    # singular vectors are defined up to sign: compare the sign-invariant products per component
    for i in range(8):
        ours = torch.outer(adapter.lora_B[:, i], adapter.lora_A[i])
        theirs = torch.outer(peft["L"][:, i], peft["R"][i])
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
