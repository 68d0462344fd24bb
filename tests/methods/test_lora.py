"""LoRA against its math, against Hugging Face PEFT, and the shared machinery around it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lorakit
from conftest import each_layer_alone, graph_node_names, perturb_trainable, step_results, tiny_gpt2, tiny_llama
from lorakit.methods.lora import LoRAAdapter


def naive_lora(x, w0, bias, a, b, scale):
    """Reference: y = x (W0 + s B A)^T + bias."""
    y = x @ (w0 + scale * b @ a).T
    return y + bias if bias is not None else y


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_match_naive_reference(rslora):
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    model = nn.Sequential(base)
    lorakit.adapt(model, lorakit.LoRA(r=4, alpha=8, targets=["0"], rslora=rslora))
    adapter = model[0].adapter
    perturb_trainable(model)
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert adapter.scale == pytest.approx(scale)

    x = torch.randn(3, 5, 20, requires_grad=True)
    y = model(x)
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = adapter.lora_A.detach().clone().requires_grad_(True)
    b_ref = adapter.lora_B.detach().clone().requires_grad_(True)
    y_ref = naive_lora(x_ref, base.weight, base.bias, a_ref, b_ref, scale)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(adapter.lora_A.grad, a_ref.grad)
    torch.testing.assert_close(adapter.lora_B.grad, b_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert base.weight.grad is None and not base.weight.requires_grad


def test_init_kaiming_a_zero_b_model_unchanged(input_ids):
    model = tiny_llama()
    before = model(input_ids).logits
    lorakit.adapt(model, lorakit.LoRA(r=8, alpha=16))
    for _, layer in lorakit.inject.adapted_layers(model):
        a = layer.adapter.lora_A
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt 5) on (r, in)
        assert a.abs().max() <= bound and a.std() > bound / 3
        assert torch.count_nonzero(layer.adapter.lora_B) == 0
    torch.testing.assert_close(model(input_ids).logits, before)


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    lorakit.adapt(model, lorakit.LoRA(r=2, dropout=0.5, targets=["0"]))
    x = torch.randn(64, 16)
    base_out = model[0].base_layer(x)
    # B = 0: dropout on the adapter path cannot change the output, even in train mode.
    model.train()
    torch.testing.assert_close(model(x), base_out)
    perturb_trainable(model)
    assert not torch.allclose(model(x), model(x))  # stochastic in train mode
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_dtype_policy_fp32_master_weights_compute_in_activation_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8).to(torch.bfloat16))
    lorakit.adapt(model, lorakit.LoRA(r=2, targets=["0"]))
    adapter = model[0].adapter
    assert adapter.lora_A.dtype == torch.float32
    perturb_trainable(model)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert adapter.lora_B.grad.dtype == torch.float32
    ref = naive_lora(
        x.float(),
        model[0].base_layer.weight.float(),
        model[0].base_layer.bias.float(),
        adapter.lora_A.detach(),
        adapter.lora_B.detach(),
        adapter.scale,
    )
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
    lorakit_bf16 = nn.Sequential(nn.Linear(16, 8).to(torch.bfloat16))
    lorakit.adapt(lorakit_bf16, lorakit.LoRA(r=2, targets=["0"], dtype="bfloat16"))
    assert lorakit_bf16[0].adapter.lora_A.dtype == torch.bfloat16


# --- target selection ---------------------------------------------------------------------------


def names(model):
    return [n for n, _ in lorakit.inject.adapted_layers(model)]


def test_all_linear_skips_output_head():
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(targets="all-linear"))
    chosen = names(model)
    assert len(chosen) == 2 * 7 and "lm_head" not in chosen


def test_suffix_regex_and_layer_selection():
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(targets=["q_proj", "v_proj"]))
    assert sorted(names(model)) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(targets=r".*mlp\.(gate|up)_proj", layers=[1]))
    assert sorted(names(model)) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(targets=["model.layers.0.self_attn.o_proj"]))
    assert names(model) == ["model.layers.0.self_attn.o_proj"]
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(targets="all-linear", exclude=["down_proj"]))
    assert len(names(model)) == 12 and not any("down_proj" in n for n in names(model))


def test_gpt2_conv1d_is_adapted_and_merges():
    model = tiny_gpt2()
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["c_attn", "c_proj", "c_fc"]))
    assert len(names(model)) == 2 * 4
    perturb_trainable(model)
    ids = torch.randint(0, 128, (2, 8))
    adapted = model(ids).logits
    plain = lorakit.merge_and_unload(model)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_unknown_target_lists_candidates():
    with pytest.raises(ValueError) as err:
        lorakit.adapt(tiny_llama(), lorakit.LoRA(targets=["query"]))
    msg = str(err.value)
    assert "query" in msg and "q_proj" in msg and "gate_proj" in msg


def test_non_linear_target_is_an_error_listing_candidates():
    with pytest.raises(ValueError) as err:
        lorakit.adapt(tiny_llama(), lorakit.LoRA(targets=["input_layernorm"]))
    assert "LlamaRMSNorm" in str(err.value) and "q_proj" in str(err.value)


def test_layer_selection_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matched no adaptable module"):
        lorakit.adapt(tiny_llama(), lorakit.LoRA(targets=["q_proj"], layers=[7]))


def test_summary_counts():
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    text = lorakit.summary(model, per_module=True)
    # q: 4*(32+32), v: 4*(32+16) per layer, 2 layers
    expected = 2 * (4 * 64 + 4 * 48)
    assert f"{expected:,}" in text and "lora" in text
    assert "model.layers.1.self_attn.v_proj" in text


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip_identical_logits(tmp_path, input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    perturb_trainable(model)
    expected = model(input_ids).logits
    lorakit.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    loaded = lorakit.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=0, atol=0)


def test_load_onto_wrong_base_names_module_and_shapes(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj"]))
    lorakit.save(model, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    with pytest.raises(ValueError) as err:
        lorakit.load(wider, tmp_path)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(4, 32)" in msg and "(4, 48)" in msg
    with pytest.raises(ValueError, match="q_proj"):
        lorakit.load(tiny_gpt2(), tmp_path)  # no such module


def test_load_is_strict_about_extra_and_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj"]))
    lorakit.save(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    extra = dict(state, **{"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)})
    save_file(extra, str(weights))
    with pytest.raises(ValueError, match="match no adapted module.*up_proj"):
        lorakit.load(tiny_llama(), tmp_path)
    missing = {k: v for k, v in state.items() if "layers.1" not in k}
    save_file(missing, str(weights))
    with pytest.raises(
        ValueError, match=r"model.layers.1.self_attn.q_proj: missing \['lora_A.weight', 'lora_B.weight'\]"
    ):
        lorakit.load(tiny_llama(), tmp_path)


def test_load_refuses_pickles(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    )
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        lorakit.load(tiny_llama(), tmp_path)


def test_train_modules_are_trained_and_saved(tmp_path, input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj"], train_modules=["lm_head"]))
    assert model.lm_head.weight.requires_grad
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    perturb_trainable(model)
    expected = model(input_ids).logits
    lorakit.save(model, tmp_path)
    loaded = lorakit.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids).logits, expected)


# --- the fused layer (base + pair as one autograd node) -------------------------------------------


def unfused(monkeypatch):
    """Make every LoRA-pair adapter take the unfused path (base, then `forward`)."""
    from lorakit.methods.lora_fa import LoRAFAAdapter

    monkeypatch.setattr(LoRAAdapter, "fused_forward", lambda self, x, base_layer: None)
    monkeypatch.setattr(LoRAFAAdapter, "fused_forward", lambda self, x, base_layer: None)


def fused_nodes(model, input_ids):
    """Names of the FusedLoRALinear nodes in the graph of one forward."""
    return [name for name in graph_node_names(model(input_ids).logits) if "FusedLoRALinear" in name]


@pytest.mark.parametrize("method", ["lora", "lora-fa", "delta-lora", "lora-drop"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_fused_layer_equals_unfused_path(method, make_model, input_ids, monkeypatch):
    """The fused node computes what the base and the adapter compute apart: outputs and every
    gradient (adapter parameters and the input) to float tolerance, Linear and GPT-2 Conv1D bases."""
    each_layer_alone(monkeypatch)
    model = lorakit.adapt(make_model(), lorakit.methods.METHODS[method](r=4, targets="all-linear"))
    perturb_trainable(model)
    assert len(fused_nodes(model, input_ids)) == len(list(lorakit.inject.adapted_layers(model)))
    fused = step_results(model, input_ids)
    unfused(monkeypatch)
    assert fused_nodes(model, input_ids) == []
    reference = step_results(model, input_ids)
    for got, want in zip(fused[:2], reference[:2]):
        torch.testing.assert_close(got, want)
    assert fused[2].keys() == reference[2].keys()
    for name, grad in reference[2].items():
        torch.testing.assert_close(fused[2][name], grad, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(fused[3], reference[3])


def test_fused_layer_under_bf16_autocast_equals_unfused_path(input_ids, monkeypatch):
    """Under CPU bf16 autocast the fused node computes in bf16 as the unfused ops do; gradients of
    the fp32 master weights come back fp32, equal up to bf16 rounding."""
    each_layer_alone(monkeypatch)
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets="all-linear"))
    perturb_trainable(model)
    fused = step_results(model, input_ids, autocast=True)
    unfused(monkeypatch)
    reference = step_results(model, input_ids, autocast=True)
    torch.testing.assert_close(fused[0], reference[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(fused[1], reference[1], atol=5e-2, rtol=2e-2)
    for name, grad in reference[2].items():
        assert fused[2][name].dtype == torch.float32
        scale = grad.abs().max()
        torch.testing.assert_close(
            fused[2][name] / scale, grad / scale, atol=3e-2, rtol=0, msg=lambda m: f"{name}: {m}"
        )


def test_fused_layer_with_dropout_draws_the_same_mask(input_ids, monkeypatch):
    """Training with dropout: the fused path applies the adapter's dropout outside its node, so
    the same seed gives the same mask, outputs and gradients as the unfused path."""
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, dropout=0.3, targets="all-linear")).train()
    perturb_trainable(model)
    torch.manual_seed(5)
    fused = step_results(model, input_ids)
    assert len(fused_nodes(model, input_ids)) == len(list(lorakit.inject.adapted_layers(model)))
    unfused(monkeypatch)
    torch.manual_seed(5)
    reference = step_results(model, input_ids)
    torch.testing.assert_close(fused[1], reference[1])
    for name, grad in reference[2].items():
        torch.testing.assert_close(fused[2][name], grad, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(fused[3], reference[3])


def test_fused_layer_matches_naive_reference_and_saves_x_and_z_only():
    """One layer against `naive_lora` (bias, 3-D input); autograd keeps x and z = x A^T, nothing of
    the (tokens x out) outputs."""
    torch.manual_seed(0)
    tokens, d_in, d_out, r = 30, 20, 12, 4
    model = lorakit.adapt(nn.Sequential(nn.Linear(d_in, d_out)), lorakit.LoRA(r=r, alpha=8, targets=["0"]))
    perturb_trainable(model)
    adapter, base = model[0].adapter, model[0].base_layer
    x = torch.randn(3, tokens // 3, d_in, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert "FusedLoRALinear" in y.grad_fn.next_functions[0][0].name()
    params = {p.data_ptr() for p in model.parameters()}
    activations = sorted(t.numel() for t in saved if t.data_ptr() not in params)
    assert activations == [tokens * r, tokens * d_in]
    refs = [t.detach().clone().requires_grad_(True) for t in (x, adapter.lora_A, adapter.lora_B)]
    y_ref = naive_lora(refs[0], base.weight, base.bias, refs[1], refs[2], adapter.scale)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for got, ref in zip((x, adapter.lora_A, adapter.lora_B), refs):
        torch.testing.assert_close(got.grad, ref.grad)


def test_fused_layer_falls_back_where_it_does_not_apply(input_ids):
    """Several active adapters, a mixed batch, a trainable or hooked base, a 4-bit base computing in
    another dtype: the base runs on its own and each adapter adds its change (no fused node)."""
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj"]))
    lorakit.adapt(model, lorakit.LoRA(r=2, targets=["q_proj"]), "second")
    lorakit.set_active(model, ["default", "second"])
    assert fused_nodes(model, input_ids) == []
    lorakit.set_active(model, "second")  # the one that trains (adapt froze "default")
    assert len(fused_nodes(model, input_ids)) == 2
    with lorakit.inject.per_sample_adapters(model, ["default", "second"]):
        assert fused_nodes(model, input_ids) == []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.base_layer.register_forward_hook(lambda *args: None)
    assert len(fused_nodes(model, input_ids)) == 1
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert len(fused_nodes(model, input_ids)) == 1
    layer.base_layer.weight.requires_grad_(False)
    # a 4-bit base fuses where it computes in the activations' dtype (tests/quant/test_qlora.py), not otherwise
    quantized = lorakit.quantize(tiny_llama(), targets=["q_proj"], compute_dtype=torch.bfloat16)
    assert fused_nodes(lorakit.adapt(quantized, lorakit.LoRA(r=4, targets=["q_proj"])), input_ids) == []
