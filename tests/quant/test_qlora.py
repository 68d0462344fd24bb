"""QLoRA: lorakit methods over an NF4-quantized base (Linear4bit, quantize, merge, save/load, loading)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import lorakit
from bnb_reference import native_kernel_is_exact, reference_kernels
from conftest import graph_node_names, perturb_trainable, tiny_gpt2, tiny_llama
from lorakit.quant import Linear4bit, load_quantized_causal_lm, quantize, quantized_layers, requantize


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every Linear4bit replaced by a dense nn.Linear of its dequantized weight."""
    dense = copy.deepcopy(model)
    for name, layer in quantized_layers(dense):
        parent_name, _, child = name.rpartition(".")
        parent = dense.get_submodule(parent_name) if parent_name else dense
        setattr(parent, child, layer.merged_module(layer.dense_weight(torch.float32)))
    return dense


def copy_adapters(source: nn.Module, target: nn.Module) -> None:
    target_params = dict(lorakit.adapter_parameters(target))
    with torch.no_grad():
        for name, p in lorakit.adapter_parameters(source):
            target_params[name].copy_(p)


def test_quantize_replaces_linear_layers_but_not_the_head():
    model = quantize(tiny_llama())
    names = [n for n, _ in quantized_layers(model)]
    assert len(names) == 2 * 7 and all("layers." in n for n in names)
    assert type(model.lm_head) is nn.Linear
    assert lorakit.inject.lorakit_state(model).quantization == {
        "method": "nf4",
        "targets": "all-linear",
        "blocksize": 64,
        "double_quant": True,
        "compute_dtype": None,
    }
    # idempotent: a second call finds the 4-bit layers and leaves them alone
    before = model.model.layers[0].mlp.up_proj.weight_packed
    quantize(model)
    assert model.model.layers[0].mlp.up_proj.weight_packed is before


def test_quantized_forward_equals_dense_dequantized(input_ids):
    model = quantize(tiny_llama())
    torch.testing.assert_close(model(input_ids).logits, dequantized_copy(model)(input_ids).logits, rtol=0, atol=1e-5)


def test_gpt2_conv1d_is_quantized(input_ids):
    model = tiny_gpt2()
    reference = model(input_ids).logits
    quantize(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit)
    out = model(input_ids).logits
    torch.testing.assert_close(out, dequantized_copy(model)(input_ids).logits, rtol=0, atol=1e-5)
    assert (out - reference).abs().max() < 0.5  # 4-bit rounding moves logits only a little


def test_lora_on_quantized_llama_equals_lora_on_dequantized_weights(input_ids):
    model = quantize(tiny_llama())
    dense = dequantized_copy(model)
    lorakit.adapt(model, lorakit.LoRA(r=4, alpha=8))
    lorakit.adapt(dense, lorakit.LoRA(r=4, alpha=8))
    perturb_trainable(model)
    copy_adapters(model, dense)
    out, ref = model(input_ids).logits, dense(input_ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    grads = {n: p.grad for n, p in lorakit.adapter_parameters(model)}
    for name, p in lorakit.adapter_parameters(dense):
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_gradients_reach_adapters_only(input_ids):
    model = lorakit.adapt(quantize(tiny_llama()), lorakit.LoRA(r=4, alpha=8))
    perturb_trainable(model)
    model(input_ids).logits.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in lorakit.adapter_parameters(model)}
    assert all("lora_" in n for n in with_grad) and len(with_grad) == 2 * 2 * 7
    for _, layer in quantized_layers(model):
        assert all(not b.requires_grad for b in layer.buffers())


def test_backward_keeps_no_dense_weight():
    layer = Linear4bit(torch.randn(96, 128))
    x = torch.randn(5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (96, 128) not in saved and (128, 96) not in saved
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 96) @ layer.dense_weight())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_over_4bit_is_one_fused_node_keeping_no_dense_weight(input_ids, monkeypatch, dropout):
    """LoRA over a 4-bit base (GPT-2: biases, Conv1D) runs as one fused node per layer that dequantizes
    the weight for each product and keeps none, and equals the unfused path (base, then adapter)."""
    from lorakit.methods.lora import LoRAAdapter

    model = lorakit.adapt(quantize(tiny_gpt2()), lorakit.LoRA(r=4, alpha=8, dropout=dropout)).train()
    perturb_trainable(model)
    dense_shapes = {
        s
        for _, layer in quantized_layers(model)
        for s in ((layer.out_features, layer.in_features), (layer.in_features, layer.out_features))
    }

    own = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def step():
        saved = []

        def pack(t):
            if t.data_ptr() not in own:
                saved.append(tuple(t.shape))
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids, labels=input_ids).loss
        nodes = graph_node_names(loss)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lorakit.adapter_parameters(model)}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, saved, nodes

    loss, grads, saved, nodes = step()
    assert sum("FusedLoRALinear" in n for n in nodes) == len(quantized_layers(model))
    assert not dense_shapes & set(saved)
    monkeypatch.setattr(LoRAAdapter, "fused_forward", lambda self, x, base_layer: None)
    ref_loss, ref_grads, _, ref_nodes = step()
    assert not any("FusedLoRALinear" in n for n in ref_nodes)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bf16_compute_dtype_on_cpu():
    layer = Linear4bit(torch.randn(32, 64), bias=torch.randn(32), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16
    expected = (x.bfloat16() @ layer.dense_weight().T + layer.bias.bfloat16()).float()
    torch.testing.assert_close(y, expected)


def test_merge_and_unload_gives_dense_model_matching_adapted(input_ids):
    model = lorakit.adapt(quantize(tiny_llama()), lorakit.LoRA(r=4, alpha=8))
    perturb_trainable(model)
    adapted = model(input_ids).logits
    merged = lorakit.merge_and_unload(model)
    assert not quantized_layers(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("proj"))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(merged(input_ids).logits, adapted, rtol=0, atol=1e-4)


def test_requantize_is_explicit_and_reports_error(input_ids):
    model = lorakit.adapt(quantize(tiny_llama()), lorakit.LoRA(r=4, alpha=8))
    perturb_trainable(model)
    merged = lorakit.merge_and_unload(model)
    report = requantize(merged)
    assert len(quantized_layers(merged)) == 14
    assert 0 < report["relative_error"] < 0.15 and report["max_abs_error"] > 0
    assert set(report["layers"]) == {n for n, _ in quantized_layers(merged)}


def test_set_dense_weight_requantizes():
    layer = Linear4bit(torch.randn(16, 64))
    w = torch.randn(16, 64)
    layer.set_dense_weight(w)
    assert torch.equal(layer.dense_weight(), Linear4bit(w).dense_weight())


def test_quantize_after_adapt_is_refused():
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2))
    with pytest.raises(ValueError, match="before lorakit.adapt"):
        quantize(model)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize(tiny_llama(), method="int3")


def test_save_load_round_trip_requantizes_fresh_base(tmp_path, input_ids):
    model = lorakit.adapt(
        quantize(tiny_llama(), compute_dtype="float32", exclude=["down_proj"]), lorakit.LoRA(r=4, alpha=8)
    )
    perturb_trainable(model)
    expected = model(input_ids).logits
    lorakit.save(model, tmp_path)
    restored = lorakit.load(tiny_llama(), tmp_path)
    assert lorakit.inject.lorakit_state(restored).quantization == lorakit.inject.lorakit_state(model).quantization
    assert len(quantized_layers(restored)) == 2 * 6
    assert torch.equal(restored(input_ids).logits, expected)


def test_streaming_loader_equals_quantize_after_load(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    tiny_llama(seed=3).save_pretrained(tmp_path)
    streamed = load_quantized_causal_lm(str(tmp_path))
    reference = quantize(AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    assert lorakit.inject.lorakit_state(streamed).quantization == lorakit.inject.lorakit_state(reference).quantization
    ref_state = reference.state_dict()
    for key, value in streamed.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight or not streamed.config.tie_word_embeddings
    assert torch.equal(streamed(input_ids).logits, reference(input_ids).logits)


@pytest.mark.integration
def test_smollm2_streamed_from_gguf():
    # Exact equality with quantize-after-load is tested on a safetensors model above (the GGUF path
    # differs only in where tensors come from); here: the real GGUF loads, is 4-bit, and still knows.
    from lorakit.models import load_tokenizer

    model = load_quantized_causal_lm()
    assert len(quantized_layers(model)) == 30 * 7 and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 4.1 < lorakit.quant.bits_per_parameter(model.model.layers) < 4.2
    tokenizer = load_tokenizer()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].topk(3).indices
    assert "Paris" in tokenizer.decode(top)


@pytest.mark.parametrize("method", sorted(lorakit.methods.METHODS))
def test_every_method_trains_on_a_quantized_base(method, input_ids):
    """Each registered method over NF4 equals the same method over the dequantized dense weights."""
    try:
        config = lorakit.methods.METHODS[method]()
    except TypeError as err:  # a method whose config has required arguments
        pytest.skip(f"{method} needs arguments: {err}")
    model = quantize(tiny_llama())
    if getattr(config, "moves_base_weights", False):
        with pytest.raises(ValueError, match="4-bit"):
            lorakit.adapt(model, config)
        return
    dense = dequantized_copy(model)
    torch.manual_seed(0)
    lorakit.adapt(model, config)
    torch.manual_seed(0)
    lorakit.adapt(dense, lorakit.methods.METHODS[method]())
    perturb_trainable(model)
    dense_state = dense.state_dict()
    with torch.no_grad():  # same adapter tensors (and shared buffers) in both
        for key, value in model.state_dict().items():
            if key in dense_state and dense_state[key].shape == value.shape:
                dense_state[key].copy_(value)
    out = model(input_ids).logits
    torch.testing.assert_close(out, dense(input_ids).logits, rtol=0, atol=1e-4)
    out.square().mean().backward()
    trainable = {n for n, _ in lorakit.adapter_parameters(model)}
    assert trainable and {n for n, p in model.named_parameters() if p.grad is not None} <= trainable


# --- against PEFT + bitsandbytes (the reference QLoRA stack; runs on CPU with bitsandbytes >= 0.45) ---


def peft_bnb_model(directory, double_quant: bool = True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=config, device_map="cpu", dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("kernel", ["reference", "native"])
def test_qlora_matches_peft_over_bitsandbytes(tmp_path, input_ids, double_quant, kernel):
    """The same LoRA weights over lorakit's NF4 and over bitsandbytes' NF4 give the same logits and
    gradients (the 4-bit weights are bit-identical; only matmul rounding differs), and PEFT loads the
    QLoRA adapter lorakit saves onto its own bitsandbytes base.

    kernel="reference": the tiny model's 32-wide layers, with bitsandbytes dequantizing through its reference
    implementation (its native AVX-512 kernel is wrong on rows shorter than a block: tests/bnb_reference.py);
    kernel="native": a 64-wide model, every row a whole number of blocks, through bitsandbytes' native kernel."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    hidden_size = 32 if kernel == "reference" else 64
    with contextlib.ExitStack() as stack:
        if kernel == "reference":
            stack.enter_context(reference_kernels())
        else:
            assert all(native_kernel_is_exact((1, width), 64) for width in (hidden_size, 2 * hidden_size))
        compare_with_peft_over_bitsandbytes(tmp_path, input_ids, double_quant, hidden_size, peft)


def compare_with_peft_over_bitsandbytes(tmp_path, input_ids, double_quant, hidden_size, peft):
    tiny_llama(seed=2, hidden_size=hidden_size).save_pretrained(tmp_path / "base")
    ours = lorakit.adapt(
        quantize(tiny_llama(seed=2, hidden_size=hidden_size), double_quant=double_quant), lorakit.LoRA(r=4, alpha=8)
    )
    perturb_trainable(ours)
    theirs = peft.get_peft_model(
        peft_bnb_model(tmp_path / "base", double_quant), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    bnb_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    import bitsandbytes.functional as F

    torch.testing.assert_close(
        F.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state),
        ours.model.layers[0].self_attn.q_proj.base_layer.dense_weight(torch.float32),
        rtol=0,
        atol=0,
    )
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" in k}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                module, _, kind = name.removeprefix("base_model.model.").rpartition(".lora_")
                p.copy_(mine[f"{module}.adapters.default.lora_{kind.split('.')[0]}"])
    assert state  # PEFT adapted the same linears
    theirs.train(), ours.train()
    out_ours, out_theirs = ours(input_ids, labels=input_ids), theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=1e-4)
    out_ours.loss.backward(), out_theirs.loss.backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in mine.items():
        module, _, kind = name.rpartition(".adapters.default.")
        torch.testing.assert_close(p.grad, grads[f"{module}.{kind}.default.weight"], atol=1e-5, rtol=1e-4)
    # PEFT loads lorakit's QLoRA adapter over bitsandbytes and computes the same thing
    lorakit.save(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(peft_bnb_model(tmp_path / "base", double_quant), str(tmp_path / "adapter"))
    # in training mode: in eval mode on a CPU with AVX512-BF16, bitsandbytes repacks the weight and multiplies
    # in bf16 (its inference kernel), which no fp32 reference matches to 1e-5 (dropout is 0 either way)
    loaded.train(), ours.eval()
    torch.testing.assert_close(loaded(input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-4)


def test_summary_counts_quantized_weights_as_parameters():
    dense = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4))
    quantized = lorakit.adapt(quantize(tiny_llama()), lorakit.LoRA(r=4))
    assert lorakit.summary(quantized) == lorakit.summary(dense)  # the same share trains, packed or not


def test_load_onto_an_already_quantized_base(tmp_path, input_ids):
    model = lorakit.adapt(quantize(tiny_llama(), exclude=["down_proj"]), lorakit.LoRA(r=4))
    perturb_trainable(model)
    lorakit.save(model, tmp_path)
    restored = lorakit.load(quantize(tiny_llama(), exclude=["down_proj"]), tmp_path)  # e.g. streamed by the loader
    assert torch.equal(restored(input_ids).logits, model(input_ids).logits)
    with pytest.raises(ValueError, match=r"quantized differently.*blocksize: model 128 vs adapter 64.*exclude"):
        lorakit.load(quantize(tiny_llama(), blocksize=128), tmp_path)


def test_modules_a_model_keeps_in_full_precision_stay_dense():
    """T5 casts the input of `wo` to `wo.weight.dtype` (transformers' `_keep_in_fp32_modules`): a 4-bit
    `wo` would feed it uint8. quantize and requantize leave such modules dense, as transformers does."""
    from architectures import batch, build, outputs

    model = build("t5")
    dense = outputs(model, batch("t5"))
    quantize(model)
    names = {n for n, _ in quantized_layers(model)}
    assert names and not any(n.endswith(".wo") for n in names)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(".wo"))
    assert (outputs(model, batch("t5")) - dense).norm() < 0.5 * dense.norm()
    assert set(requantize(build("t5"))["layers"]) == names
