"""GGUF export (llama.cpp's format), on tiny models: the file's layout, names, row order and folded
scales, read back with the gguf package; the merged model against a tiny GGUF base written here the
way llama.cpp's converter writes Llama. The checks in llama.cpp itself are in test_llama_cpp.py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_llama
from lorakit import gguf_export
from lorakit.errors import LorakitError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def converter_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: Llama's q/k rows regrouped for its rotary embedding (the
    reference this test holds the export to, written from the converter's description)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_permute(name: str, weight: np.ndarray, model) -> np.ndarray:
    if ".attn_q." in name:
        return converter_permute(weight, model.config.num_attention_heads)
    if ".attn_k." in name:
        return converter_permute(weight, model.config.num_key_value_heads)
    return weight


def unpermute(name: str, weight: np.ndarray, model) -> np.ndarray:
    """Inverse of gguf_permute, by brute force on row indices (independent of the code under test)."""
    index = gguf_permute(name, np.arange(weight.shape[0])[:, None], model)[:, 0]
    out = np.empty_like(weight)
    out[index] = weight
    return out


def write_tiny_gguf_base(model, path: Path) -> None:
    """A GGUF file of `model` as llama.cpp's converter lays Llama out (names, q/k rows, f32)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(model.config.num_hidden_layers)
    writer.add_string("general.name", "tiny test llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(model.config.vocab_size)])
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        stem = names.get_name(hf_name.removesuffix(".weight"))
        name = f"{stem}.weight"
        writer.add_tensor(name, np.ascontiguousarray(gguf_permute(name, value.float().numpy(), model)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    tensors = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))
        for t in reader.tensors
    }
    return fields, tensors


def adapted(method: str, **kwargs):
    model = tiny_llama()
    cls = lorakit.methods.METHODS[method]
    config = {"targets": TARGETS, **kwargs}
    if method == "adalora":
        config.update(init_r=4, target_r=2, total_step=10)
    elif "r" in {f for f in cls.__dataclass_fields__}:
        config.setdefault("r", 16 if method == "vera" else 4)
    lorakit.adapt(model, cls(**config))
    perturb_trainable(model)
    return model


def hf_layout(model, tmp_path: Path):
    return gguf_export.gguf_layout(model, tmp_path, None)  # a Hugging Face directory base (config.json's type)


def test_row_order_is_the_converters_permutation():
    model = tiny_llama()  # 4 heads, 2 kv heads: q and k permute differently
    layout = hf_layout(model, Path("."))
    for module, tensor in (
        ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
        ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight"),
        ("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight"),
        ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"),
    ):
        assert layout.tensor_name(module) == tensor
        weight = model.get_submodule(module).weight.detach().numpy()
        np.testing.assert_array_equal(
            weight[layout.row_order(tensor, weight.shape[0])], gguf_permute(tensor, weight, model)
        )
    assert not np.array_equal(layout.row_order("blk.0.attn_q.weight", 32), np.arange(32))


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("lora", {}),
        ("lora", {"rslora": True, "alpha": 3}),
        ("lora", {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 32}}),
        ("lora-fa", {}),
        ("vera", {}),
        ("adalora", {}),
        ("lora-drop", {}),
    ],
)
def test_adapter_file_holds_exactly_the_change(method, kwargs, tmp_path):
    model = adapted(method, **kwargs)
    if method == "adalora":  # prune some triplets: only the kept ones are written
        for _, layer in lorakit.inject.adapted_layers(model):
            layer.adapter.apply_mask(torch.tensor([True, False, True, False]))
    summary = gguf_export.export_adapter(model, hf_layout(model, tmp_path), tmp_path / "a.gguf")
    fields, tensors = read_gguf(tmp_path / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    layers = dict(lorakit.inject.adapted_layers(model))
    assert summary.modules == len(layers) and len(tensors) == 2 * len(layers)
    for module, layer in layers.items():
        name = hf_layout(model, tmp_path).tensor_name(module)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.shape == (b.shape[1], layer.in_features) and b.shape[0] == layer.out_features  # llama.cpp's checks
        if method == "adalora":
            assert a.shape[0] == 2
        change = (alpha / b.shape[1]) * unpermute(name, b, model) @ a  # what llama.cpp adds
        np.testing.assert_allclose(change, layer.delta_weight().detach().numpy(), atol=1e-6, rtol=1e-5)


def test_plain_lora_keeps_b_as_trained(tmp_path):
    model = adapted("lora", alpha=8)
    gguf_export.export_adapter(model, hf_layout(model, tmp_path), tmp_path / "a.gguf")
    fields, tensors = read_gguf(tmp_path / "a.gguf")
    assert fields["adapter.lora.alpha"] == 8
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"], layer.adapter.lora_B.detach().numpy(), rtol=1e-6)


def test_f16_adapter(tmp_path):
    model = adapted("lora")
    summary = gguf_export.export_adapter(model, hf_layout(model, tmp_path), tmp_path / "a.gguf", outtype="f16")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    assert summary.outtype == "f16"


@pytest.mark.parametrize(
    "method,kwargs,words",
    [
        ("dora", {}, "depends on the base weight"),
        ("delta-lora", {"start_step": 0}, "changes the base weights"),
        ("lora", {"train_modules": ["lm_head"]}, "trains whole modules"),
    ],
)
def test_what_an_adapter_file_cannot_hold_is_refused_with_the_alternative(method, kwargs, words, tmp_path):
    model = adapted(method, **kwargs)
    with pytest.raises(LorakitError, match="--merged") as err:
        gguf_export.export_adapter(model, hf_layout(model, tmp_path), tmp_path / "a.gguf")
    assert words in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_other_base_and_tied_head_are_refused(tmp_path):
    model = adapted("lora")
    other = tiny_llama(hidden_size=64)
    write_tiny_gguf_base(other, tmp_path / "other.gguf")
    with pytest.raises(LorakitError, match="different base model"):
        gguf_export.export_adapter(model, gguf_export.gguf_layout(model, tmp_path, "other.gguf"), tmp_path / "a.gguf")
    head = tiny_llama()
    head.config.tie_word_embeddings = True
    write_tiny_gguf_base(head, tmp_path / "tied.gguf")
    lorakit.adapt(head, lorakit.LoRA(targets=["lm_head"], r=2))
    with pytest.raises(LorakitError, match="tied to the token embeddings.*--merged"):
        gguf_export.export_adapter(head, gguf_export.gguf_layout(head, tmp_path, "tied.gguf"), tmp_path / "a.gguf")


def test_unsupported_architecture_is_refused(tmp_path):
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    with pytest.raises(LorakitError, match="gpt2"):
        gguf_export.gguf_layout(model, tmp_path, None)


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_merged_model_is_the_merged_weights_in_the_bases_layout(outtype, tmp_path):
    base = tiny_llama()
    write_tiny_gguf_base(base, tmp_path / "base.gguf")
    model = adapted("dora")
    expected = {k: v.clone() for k, v in lorakit.merge_and_unload(model).state_dict().items()}
    layout = gguf_export.gguf_layout(model, tmp_path, "base.gguf")
    summary = gguf_export.export_merged(model, layout, tmp_path / "m.gguf", outtype)
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    base_fields, base_tensors = read_gguf(tmp_path / "base.gguf")
    assert (
        fields["general.name"] == "tiny test llama"
        and fields["tokenizer.ggml.tokens"] == base_fields["tokenizer.ggml.tokens"]
    )
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert set(tensors) == set(base_tensors) and summary.tensors == len(tensors)
    assert summary.modules == len(tensors) and not any("copied from the base" in n for n in summary.notes)
    tolerance = {"f32": 1e-7, "f16": 2e-3, "q8_0": 2e-2}[outtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    changed = 0
    for hf_name, value in expected.items():
        if hf_name == "lm_head.weight" and "output.weight" not in tensors:
            continue
        name = f"{names.get_name(hf_name.removesuffix('.weight'))}.weight"
        got = unpermute(name, tensors[name], model) if tensors[name].ndim == 2 else tensors[name]
        np.testing.assert_allclose(got, value.numpy(), atol=tolerance * float(value.abs().max()), rtol=0)
        changed += not np.allclose(base_tensors[name], gguf_permute(name, value.numpy(), model))
    assert changed == len(TARGETS) * 2  # the adapted weights differ from the base, the others do not


def test_merged_needs_a_gguf_base(tmp_path):
    model = lorakit.merge_and_unload(adapted("lora"))
    with pytest.raises(LorakitError, match="convert_hf_to_gguf"):
        gguf_export.export_merged(model, hf_layout(model, tmp_path), tmp_path / "m.gguf")


def test_library_call_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    base = tiny_llama()
    write_tiny_gguf_base(base, tmp_path / "base.gguf")
    model = adapted("lora")
    summary = lorakit.export_gguf(model, tmp_path / "a.gguf", base=tmp_path / "base.gguf")
    assert summary.kind == "adapter" and (tmp_path / "a.gguf").is_file()
    before = (tmp_path / "a.gguf").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(LorakitError, match="the disk is full: .*a.gguf was not written; the earlier a.gguf is kept"):
        lorakit.export_gguf(model, tmp_path / "a.gguf", base=tmp_path / "base.gguf", outtype="f16")
    assert (tmp_path / "a.gguf").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "base.gguf"]  # no temporary left behind
    monkeypatch.undo()
    merged = lorakit.export_gguf(model, tmp_path / "m.gguf", base=tmp_path / "base.gguf", merged=True, outtype="q8_0")
    assert merged.kind == "merged" and not any(isinstance(m, lorakit.inject.AdaptedLayer) for m in model.modules())


def test_qlora_merges_into_the_4bit_weights_it_was_trained_against(tmp_path):
    base = tiny_llama(hidden_size=64)
    write_tiny_gguf_base(base, tmp_path / "base.gguf")
    model = lorakit.quantize(tiny_llama(hidden_size=64))
    lorakit.adapt(model, lorakit.LoRA(targets=["q_proj", "down_proj"], r=4))
    perturb_trainable(model)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    expected_q = (lorakit.base_layers.dense_weight(q.base_layer) + q.delta_weight()).detach().numpy()  # NF4(W0) + ΔW
    k = lorakit.inject.base_of(model.get_submodule("model.layers.0.self_attn.k_proj"))
    expected_k = lorakit.base_layers.dense_weight(k).detach().numpy()  # not adapted: NF4(W0), not W0
    assert not np.allclose(expected_k, base.get_submodule("model.layers.0.self_attn.k_proj").weight.detach().numpy())
    lorakit.export_gguf(model, tmp_path / "m.gguf", base=tmp_path / "base.gguf", merged=True, outtype="f32")
    _, tensors = read_gguf(tmp_path / "m.gguf")
    np.testing.assert_allclose(
        unpermute("blk.0.attn_q.weight", tensors["blk.0.attn_q.weight"], model), expected_q, atol=1e-6
    )
    np.testing.assert_allclose(
        unpermute("blk.0.attn_k.weight", tensors["blk.0.attn_k.weight"], model), expected_k, atol=1e-6
    )
