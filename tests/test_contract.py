"""One contract, every method: the properties any lorakit adapter must have.

Parametrized over the method registry, so a new method is covered the moment it registers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit

from conftest import perturb_trainable, tiny_gpt2, tiny_llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_config(method: str, arch: str) -> lorakit.AdapterConfig:
    cls = lorakit.METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"targets": TARGETS[arch]}
    if "r" in fields:
        kwargs["r"] = 16 if method == "vera" else 4
    if "start_step" in fields:
        kwargs["start_step"] = 0
    return cls(**kwargs)


def one_step(model, input_ids, lr=1e-2):
    hooks = lorakit.training_hooks(model)
    params = [p for _, p in lorakit.adapter_parameters(model)]
    opt = torch.optim.SGD(params, lr=lr)
    loss = model(input_ids, labels=input_ids).loss + hooks.extra_loss(model)
    loss.backward()
    opt.step()
    hooks.after_optimizer_step(model, 1)
    opt.zero_grad()


METHOD_NAMES = sorted(lorakit.METHODS)
CASES = [(m, a) for m in METHOD_NAMES for a in ("llama", "gpt2")]


@pytest.mark.parametrize("method,arch", CASES)
def test_fresh_adapter_equals_base(method, arch, input_ids):
    model = MAKERS[arch]()
    base = model(input_ids).logits
    lorakit.adapt(model, make_config(method, arch))
    torch.testing.assert_close(model(input_ids).logits, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,arch", CASES)
def test_merged_equals_unmerged_equals_unloaded(method, arch, input_ids):
    model = lorakit.adapt(MAKERS[arch](), make_config(method, arch))
    perturb_trainable(model)
    adapted = model(input_ids).logits
    with lorakit.disabled(model):
        base = model(input_ids).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    lorakit.merge(model)
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)
    lorakit.unmerge(model)
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)
    with lorakit.disabled(model):
        torch.testing.assert_close(model(input_ids).logits, base, atol=1e-5, rtol=1e-5)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, lorakit.AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,arch", CASES)
def test_only_adapter_state_changes_in_a_step(method, arch, input_ids):
    model = lorakit.adapt(MAKERS[arch](), make_config(method, arch))
    perturb_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    one_step(model, input_ids)
    moves_base = getattr(lorakit.adapter_config(model), "moves_base_weights", False)
    for name, tensor in model.state_dict().items():
        if name in trainable:
            continue
        if moves_base and ".base_layer.weight" in name:
            continue  # Delta-LoRA updates the adapted base weights by design
        assert torch.equal(tensor, before[name]), f"{method}: frozen tensor {name} changed"
    assert any(not torch.equal(model.state_dict()[n], before[n]) for n in trainable)


@pytest.mark.parametrize("method,arch", CASES)
def test_save_load_round_trip(method, arch, input_ids, tmp_path):
    model = lorakit.adapt(MAKERS[arch](), make_config(method, arch))
    perturb_trainable(model)
    one_step(model, input_ids)
    expected = model(input_ids).logits
    lorakit.save(model, tmp_path)
    loaded = lorakit.load(MAKERS[arch](), tmp_path)
    assert type(lorakit.adapter_config(loaded)) is type(lorakit.adapter_config(model))
    torch.testing.assert_close(loaded(input_ids).logits, expected, atol=1e-6, rtol=1e-6)
