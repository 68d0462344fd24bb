"""Delta-LoRA: the base update against a hand computation, the hook's resume, saving moved W."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from conftest import perturb_trainable, tiny_gpt2, tiny_llama
from lorakit.base_layers import dense_weight

TARGETS = ["q_proj", "v_proj", "down_proj"]


def sgd_step(model, input_ids, hooks, step, lr=0.05):
    opt = torch.optim.SGD([p for _, p in lorakit.adapter_parameters(model)], lr=lr)
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    hooks.after_optimizer_step(model, step)
    opt.zero_grad()


def snapshot(model):
    """{name: (W, A, B)} of every adapted layer, detached copies."""
    return {
        name: (
            dense_weight(layer.base_layer).detach().clone(),
            layer.adapter.lora_A.detach().clone(),
            layer.adapter.lora_B.detach().clone(),
        )
        for name, layer in lorakit.inject.adapted_layers(model)
    }


def test_dropout_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no dropout.*surrogate"):
        lorakit.DeltaLoRA(dropout=0.1)
    with pytest.raises(ValueError, match="start_step"):
        lorakit.DeltaLoRA(start_step=-1)


def test_forward_is_lora_without_dropout(input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.DeltaLoRA(r=4, alpha=8, targets=["q_proj"]))
    perturb_trainable(model)
    model.train()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 32)
    a, b = layer.adapter.lora_A, layer.adapter.lora_B
    torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + 2.0 * b @ a).T)


@pytest.mark.parametrize("make_model,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_base_update_equals_hand_computation(input_ids, make_model, targets):
    """W_{t+1} = W_t + λ s (B_{t+1} A_{t+1} - B_t A_t), exactly (float64), per adapted layer."""
    lam, alpha, r = 0.7, 6.0, 4
    model = lorakit.adapt(
        make_model().double(), lorakit.DeltaLoRA(r=r, alpha=alpha, delta_lambda=lam, targets=targets, dtype="float64")
    )
    perturb_trainable(model)  # B != 0, so B_t A_t matters too
    hooks = lorakit.training_hooks(model)
    before = snapshot(model)
    sgd_step(model, input_ids, hooks, step=1)
    after = snapshot(model)
    s = alpha / r
    for name, (w0, a0, b0) in before.items():
        w1, a1, b1 = after[name]
        assert not torch.equal(a1, a0) and not torch.equal(b1, b0)
        expected = w0 + lam * s * (b1 @ a1 - b0 @ a0)
        torch.testing.assert_close(w1, expected, rtol=0, atol=1e-13)
        wrong = w0 + lam * s * ((b1 - b0) @ (a1 - a0))  # the known wrong implementation
        assert not torch.allclose(w1, wrong, rtol=0, atol=1e-9)
    # The base weights are in the model's own storage (Conv1D keeps its (in, out) layout).
    if make_model is tiny_gpt2:
        layer = model.get_submodule("transformer.h.0.attn.c_attn")
        torch.testing.assert_close(layer.base_layer.weight.T, after["transformer.h.0.attn.c_attn"][0], rtol=0, atol=0)


def test_start_step_and_telescoping_sum(input_ids):
    """W moves only after steps t > K; over a run, W - W0 = λ s (B_T A_T - B_K A_K)."""
    lam, k = 0.5, 2
    model = lorakit.adapt(
        tiny_llama().double(),
        lorakit.DeltaLoRA(r=4, alpha=8, delta_lambda=lam, start_step=k, targets=TARGETS, dtype="float64"),
    )
    hooks = lorakit.training_hooks(model)
    start = snapshot(model)
    for step in range(1, k + 1):
        sgd_step(model, input_ids, hooks, step)
    at_k = snapshot(model)
    for name, (w, _, b) in at_k.items():
        assert torch.equal(w, start[name][0])  # frozen up to K ...
    assert any(not torch.equal(b, start[n][2]) for n, (_, _, b) in at_k.items())  # ... while B trains
    for step in range(k + 1, k + 4):
        sgd_step(model, input_ids, hooks, step)
    end = snapshot(model)
    for name, (w, a, b) in end.items():
        _, a_k, b_k = at_k[name]
        torch.testing.assert_close(w - start[name][0], lam * 2.0 * (b @ a - b_k @ a_k), rtol=0, atol=1e-12)


def train_then_resume(tmp_path, input_ids):
    """(straight, resumed) models after 4 steps; resumed one is saved and reloaded after step 2."""
    config = lorakit.DeltaLoRA(r=4, alpha=8, delta_lambda=0.5, start_step=1, targets=TARGETS)

    def fresh():
        torch.manual_seed(5)  # same adapter init for both runs
        return lorakit.adapt(tiny_llama(), config)

    def step(model, opt, hooks, t):
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        hooks.after_optimizer_step(model, t)
        opt.zero_grad()

    straight = fresh()
    opt = torch.optim.AdamW(lorakit.param_groups(straight, lr=1e-2))
    hooks = lorakit.training_hooks(straight)
    for t in range(1, 5):
        step(straight, opt, hooks, t)

    model = fresh()
    opt = torch.optim.AdamW(lorakit.param_groups(model, lr=1e-2))
    hooks = lorakit.training_hooks(model)
    for t in range(1, 3):
        step(model, opt, hooks, t)
    lorakit.save(model, tmp_path)
    checkpoint = {"hooks": hooks.state_dict(), "optimizer": opt.state_dict()}

    resumed = lorakit.load(tiny_llama(), tmp_path, trainable=True)
    opt = torch.optim.AdamW(lorakit.param_groups(resumed, lr=1e-2))
    opt.load_state_dict(checkpoint["optimizer"])
    hooks = lorakit.training_hooks(resumed)
    hooks.load_state_dict(checkpoint["hooks"])
    for t in range(3, 5):
        step(resumed, opt, hooks, t)
    return straight, resumed


def test_save_hook_state_and_resume_continue_exactly(tmp_path, input_ids):
    straight, resumed = train_then_resume(tmp_path, input_ids)
    for (name, w, a, b), (_, w2, a2, b2) in zip(
        [(n, *v) for n, v in snapshot(straight).items()], [(n, *v) for n, v in snapshot(resumed).items()]
    ):
        assert torch.equal(w, w2) and torch.equal(a, a2) and torch.equal(b, b2), name
    assert torch.equal(straight(input_ids).logits, resumed(input_ids).logits)


@pytest.mark.parametrize("make_model,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_save_stores_moved_base_weights_and_reload_gives_identical_logits(tmp_path, input_ids, make_model, targets):
    model = lorakit.adapt(make_model(), lorakit.DeltaLoRA(r=4, targets=targets))
    perturb_trainable(model)
    hooks = lorakit.training_hooks(model)
    for t in range(1, 3):
        sgd_step(model, input_ids, hooks, t)
    moved = snapshot(model)
    fresh_base = make_model()
    assert any(not torch.equal(w, dense_weight(fresh_base.get_submodule(n))) for n, (w, _, _) in moved.items())
    expected = model(input_ids).logits
    lorakit.save(model, tmp_path)

    assert not (tmp_path / "adapter_config.json").exists()  # no PEFT counterpart
    meta = json.loads((tmp_path / "lorakit.json").read_text())
    assert meta["config"]["method"] == "delta-lora" and "base_weight" in meta["config"]["saved_base_weights"]
    loaded = lorakit.load(make_model(), tmp_path)
    assert isinstance(lorakit.inject.adapter_config(loaded), lorakit.DeltaLoRA)
    assert torch.equal(loaded(input_ids).logits, expected)
    for name, (w, _, _) in moved.items():
        assert torch.equal(dense_weight(loaded.get_submodule(name).base_layer), w)

    # Saving a merged model stores the unmerged W, so the reload is the same.
    lorakit.merge(model)
    lorakit.save(model, tmp_path / "merged")
    again = lorakit.load(make_model(), tmp_path / "merged")
    torch.testing.assert_close(again(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_load_without_base_weights_is_an_error(tmp_path, input_ids):
    from safetensors.torch import load_file, save_file

    model = lorakit.adapt(tiny_llama(), lorakit.DeltaLoRA(r=4, targets=["q_proj"]))
    lorakit.save(model, tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    dropped = {k: v for k, v in state.items() if not k.endswith("layers.1.self_attn.q_proj.base_weight")}
    assert len(dropped) == len(state) - 1
    save_file(dropped, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="moved base weights.*layers.1.self_attn.q_proj"):
        lorakit.load(tiny_llama(), tmp_path)


def test_merge_is_exact(input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.DeltaLoRA(r=4, alpha=8, targets=TARGETS))
    perturb_trainable(model)
    expected = model(input_ids).logits
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    w = layer.base_layer.weight.detach().clone()
    lorakit.merge(model)
    torch.testing.assert_close(
        layer.base_layer.weight, w + 2.0 * layer.adapter.lora_B @ layer.adapter.lora_A, rtol=0, atol=1e-7
    )
    torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_hook_state_must_match_the_model():
    model = lorakit.adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), lorakit.DeltaLoRA(r=2, targets=["0", "1"]))
    other = lorakit.adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), lorakit.DeltaLoRA(r=2, targets=["0"]))
    with pytest.raises(ValueError, match="other adapted modules"):
        lorakit.training_hooks(other).load_state_dict(lorakit.training_hooks(model).state_dict())
