"""Saving and loading, the shared machinery: several named adapters in PEFT's layout, which adapter
becomes active, strictness, layouts decided during training, 4-bit bases."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_llama
from lorakit.quant import quantize

INPUT = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def with_three_adapters():
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    perturb_trainable(model, seed=1)
    lorakit.adapt(model, lorakit.VeRA(r=16, targets=["down_proj"]), name="vera")
    perturb_trainable(model, seed=2)
    lorakit.adapt(model, lorakit.DeltaLoRA(r=2, targets=["o_proj"]), name="delta")
    perturb_trainable(model, seed=3)
    return model


def per_adapter_logits(model):
    out = {}
    for name in lorakit.inject.adapter_names(model):
        lorakit.set_active(model, name)
        out[name] = model(INPUT).logits
    return out


def test_several_adapters_round_trip_in_peft_layout(tmp_path):
    model = with_three_adapters()
    expected = per_adapter_logits(model)
    lorakit.save(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "vera" / "adapter_config.json").is_file()
    assert not (tmp_path / "delta" / "adapter_config.json").exists()  # PEFT cannot express Delta-LoRA
    assert json.loads((tmp_path / "delta" / "lorakit.json").read_text())["adapter_name"] == "delta"
    loaded = lorakit.load(tiny_llama(), tmp_path)
    assert lorakit.inject.adapter_names(loaded) == ["default", "delta", "vera"]
    assert lorakit.inject.active_adapters(loaded) == ("default",)
    assert not any(p.requires_grad for p in loaded.parameters())
    for name, logits in per_adapter_logits(loaded).items():
        torch.testing.assert_close(logits, expected[name], msg=name)


def test_save_a_subset_and_load_one_under_a_new_name(tmp_path):
    model = with_three_adapters()
    expected = per_adapter_logits(model)["vera"]
    lorakit.save(model, tmp_path, names=["vera"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vera"]
    base = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2, targets=["k_proj"]), name="mine")
    lorakit.load(base, tmp_path / "vera", name="summarise")
    assert lorakit.inject.adapter_names(base) == ["mine", "summarise"]
    assert lorakit.inject.active_adapters(base) == ("mine",)  # a model that had an active adapter keeps it
    lorakit.set_active(base, "summarise")
    torch.testing.assert_close(base(INPUT).logits, expected)
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]"):
        lorakit.save(model, tmp_path, names=["nope"])


def test_loading_onto_an_existing_name_is_refused_and_changes_nothing(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2, targets=["q_proj"]))
    lorakit.save(model, tmp_path)
    before = model(INPUT).logits
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lorakit.load(model, tmp_path)
    assert lorakit.inject.adapter_names(model) == ["default"]
    torch.testing.assert_close(model(INPUT).logits, before)


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    other = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2, targets=["q_proj"]))
    lorakit.save(other, tmp_path)
    state = lorakit.io.load_file(str(tmp_path / "adapter_model.safetensors"))
    state.pop(next(iter(state)))
    lorakit.io.save_file(state, str(tmp_path / "adapter_model.safetensors"))
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2, targets=["v_proj"]), name="kept")
    with pytest.raises(ValueError, match="missing"):
        lorakit.load(model, tmp_path, name="broken")
    assert lorakit.inject.adapter_names(model) == ["kept"] and lorakit.inject.active_adapters(model) == ("kept",)
    assert not any("broken" in n for n, _ in model.named_parameters())


def test_empty_or_wrong_directory_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        lorakit.load(tiny_llama(), tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        lorakit.load(tiny_llama(), tmp_path)


def test_second_qlora_adapter_loads_onto_the_same_4bit_base(tmp_path):
    first = lorakit.adapt(quantize(tiny_llama()), lorakit.LoRA(r=2, targets=["q_proj"]))
    perturb_trainable(first, seed=1)
    lorakit.save(first, tmp_path / "a")
    second = lorakit.adapt(quantize(tiny_llama()), lorakit.LoRA(r=2, targets=["v_proj"]))
    perturb_trainable(second, seed=2)
    lorakit.save(second, tmp_path / "b")
    served = lorakit.load(tiny_llama(), tmp_path / "a", name="a")  # quantizes the dense base
    lorakit.load(served, tmp_path / "b", name="b")  # the base is already 4-bit: checked, not re-quantized
    lorakit.set_active(served, "b")
    torch.testing.assert_close(served(INPUT).logits, second(INPUT).logits)
    lorakit.remove(served, "a")
    lorakit.remove(served, "b")
    assert lorakit.inject.lorakit_state(served).quantization is not None  # still 4-bit, still recorded


def test_a_layout_decided_in_training_survives_save_and_load(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.DoRA(r=4, targets=["q_proj", "v_proj"]))
    lorakit.inject.reconfigure(model, "default", rank_pattern={"v_proj": 1}, alpha_pattern={"q_proj": 2.0})
    perturb_trainable(model)
    lorakit.save(model, tmp_path)
    meta = json.loads((tmp_path / "lorakit.json").read_text())
    assert meta["config"]["rank_pattern"] == {"v_proj": 1}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == {"v_proj": 1}
    loaded = lorakit.load(tiny_llama(), tmp_path)
    assert {layer.adapter.r for _, layer in lorakit.inject.adapted_layers(loaded)} == {1, 4}
    torch.testing.assert_close(loaded(INPUT).logits, model(INPUT).logits)


def damaged_copies(tmp_path):
    """An adapter directory, then the same with each kind of damage a user's files can have."""
    good = tmp_path / "good"
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2, targets=["q_proj"]))
    lorakit.save(model, good)
    weights = (good / "adapter_model.safetensors").read_bytes()
    meta = (good / "lorakit.json").read_text()
    cases = {
        "truncated": {"adapter_model.safetensors": weights[: len(weights) // 2]},
        "empty": {"adapter_model.safetensors": b""},
        "absurd header": {"adapter_model.safetensors": (10**15).to_bytes(8, "little") + b"{}"},
        "renamed pickle": {"adapter_model.safetensors": b"\x80\x04\x95\x00\x00cos\nsystem\n."},
        "json list": {"lorakit.json": "[1, 2]"},
        "json null config": {"lorakit.json": '{"config": null, "adapted_modules": []}'},
        "json wrong types": {"lorakit.json": meta.replace('"r": 2', '"r": "two"')},
        "json not json": {"lorakit.json": "{not json"},
        "json deep": {"lorakit.json": "[" * 100_000 + "]" * 100_000},
        "peft without type": {"lorakit.json": None, "adapter_config.json": '{"r": 8, "target_modules": ["q_proj"]}'},
    }
    for name, files in cases.items():
        target = tmp_path / name.replace(" ", "-")
        target.mkdir()
        for f in good.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        for file, content in files.items():
            if content is None:
                (target / file).unlink()
            else:
                (target / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        yield name, target


def test_damaged_adapter_files_are_one_clear_error(tmp_path):
    for name, directory in damaged_copies(tmp_path):
        with pytest.raises((ValueError, FileNotFoundError)) as caught:
            lorakit.load(tiny_llama(), directory)
        message = str(caught.value)
        assert str(directory) in message or "peft_type" in message, (name, message)
        assert "Traceback" not in message


def test_integer_tensors_are_refused_not_converted(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2, targets=["q_proj"]))
    lorakit.save(model, tmp_path)
    state = lorakit.io.load_file(str(tmp_path / "adapter_model.safetensors"))
    lorakit.io.save_file({k: v.to(torch.int32) for k, v in state.items()}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="are torch.int32, not floating point"):
        lorakit.load(tiny_llama(), tmp_path)


def test_a_bad_targets_regex_is_caught_when_the_config_is_made():
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        lorakit.LoRA(targets="q_proj[")
    with pytest.raises(ValueError, match="targets must be"):
        lorakit.LoRA(targets=3)
