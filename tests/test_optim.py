"""LoRA+ parameter groups: which parameter lands in which group, at which lr, for every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.optim import param_groups

TARGETS = ["q_proj", "v_proj", "down_proj"]


def groups_by_name(groups):
    return {g["name"]: g for g in groups}


def names_in(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def check_partition(model, groups):
    """Every trainable parameter exactly once, nothing frozen."""
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for _, p in lorakit.adapter_parameters(model)]
    assert len(listed) == len(set(listed)) and set(listed) == set(trainable)


def test_lora_b_gets_ratio_times_lr_a_and_head_gets_lr():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    model = BertForSequenceClassification(config)
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["query", "value"], train_modules=["classifier"]))
    groups = param_groups(model, lr=1e-4, loraplus_ratio=16.0, weight_decay=0.1)
    check_partition(model, groups)
    by = groups_by_name(groups)
    assert set(by) == {"A", "A/no_decay", "B"}
    assert by["B"]["lr"] == pytest.approx(1.6e-3) and by["A"]["lr"] == by["A/no_decay"]["lr"] == 1e-4
    assert names_in(model, by["B"]) == {n for n, _ in model.named_parameters() if n.endswith("lora_B")}
    a_side = {n for n, _ in model.named_parameters() if n.endswith("lora_A")}
    assert names_in(model, by["A"]) == a_side | {"classifier.weight"}
    assert names_in(model, by["A/no_decay"]) == {"classifier.bias"}
    assert by["A"]["weight_decay"] == by["B"]["weight_decay"] == 0.1 and by["A/no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize("ratio", [None, 1, 1.0])
def test_ratio_none_or_one_is_plain_training(ratio):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=TARGETS))
    groups = param_groups(model, lr=3e-4, loraplus_ratio=ratio)
    check_partition(model, groups)
    assert all(g["lr"] == 3e-4 and g["weight_decay"] == 0.0 for g in groups)


def test_bad_ratio_is_an_error():
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=TARGETS))
    with pytest.raises(ValueError, match="loraplus_ratio"):
        param_groups(model, lr=1e-3, loraplus_ratio=0.0)


def test_adam_first_step_moves_b_ratio_times_further(input_ids):
    """Adam's first update is about lr per element: B's should be 16x A's."""
    torch.manual_seed(0)
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=TARGETS))
    with torch.no_grad():
        for _, layer in lorakit.inject.adapted_layers(model):
            layer.adapter.lora_B.normal_(std=0.1)  # so that A gets a gradient too
    before = {n: p.detach().clone() for n, p in lorakit.adapter_parameters(model)}
    opt = torch.optim.Adam(param_groups(model, lr=1e-4, loraplus_ratio=16.0))
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    for name, p in lorakit.adapter_parameters(model):
        step = (p.detach() - before[name]).abs().max().item()
        expected = 1.6e-3 if name.endswith("lora_B") else 1e-4
        assert step == pytest.approx(expected, rel=1e-3), name


def test_lora_fa_only_b_and_delta_lora_like_lora():
    fa = lorakit.adapt(tiny_llama(), lorakit.LoRAFA(r=4, targets=TARGETS))
    groups = param_groups(fa, lr=1e-4)
    check_partition(fa, groups)
    assert [g["name"] for g in groups] == ["B"] and groups[0]["lr"] == pytest.approx(1.6e-3)

    delta = lorakit.adapt(tiny_llama(), lorakit.DeltaLoRA(r=4, targets=TARGETS))
    by = groups_by_name(param_groups(delta, lr=1e-4, loraplus_ratio=20))
    assert set(by) == {"A", "B"} and by["B"]["lr"] == pytest.approx(2e-3)
    assert all(n.endswith("lora_B") for n in names_in(delta, by["B"]))
    assert all(n.endswith("lora_A") for n in names_in(delta, by["A"]))


def test_dora_magnitude_and_b_are_fast_a_slow():
    from lorakit.methods.dora import DoRAAdapter

    if "loraplus_fast" not in vars(DoRAAdapter):
        pytest.skip("DoRAAdapter does not declare loraplus_fast = ('magnitude',) yet")
    model = lorakit.adapt(tiny_llama(), lorakit.DoRA(r=4, targets=TARGETS))
    groups = param_groups(model, lr=1e-4, weight_decay=0.01)
    check_partition(model, groups)
    by = groups_by_name(groups)
    assert names_in(model, by["B"]) == {n for n, _ in model.named_parameters() if n.endswith("lora_B")}
    assert names_in(model, by["B/no_decay"]) == {n for n, _ in model.named_parameters() if n.endswith("magnitude")}
    assert names_in(model, by["A"]) == {n for n, _ in model.named_parameters() if n.endswith("lora_A")}
    assert by["B/no_decay"]["lr"] == pytest.approx(1.6e-3) and by["B/no_decay"]["weight_decay"] == 0.0


def test_dora_inner_lora_pair_is_split_even_without_a_declaration():
    """The nested LoRAAdapter declares lora_B fast, whatever the DoRA wrapper declares."""
    model = lorakit.adapt(tiny_llama(), lorakit.DoRA(r=4, targets=TARGETS))
    groups = param_groups(model, lr=1e-4)
    check_partition(model, groups)
    fast = {n for g in groups if g["name"].startswith("B") for n in names_in(model, g)}
    assert {n for n, _ in model.named_parameters() if n.endswith("lora_B")} <= fast
    assert not any(n.endswith("lora_A") for n in fast)


def test_vera_b_fast_d_slow():
    from lorakit.methods.vera import VeRAAdapter

    if "loraplus_fast" not in vars(VeRAAdapter):
        pytest.skip("VeRAAdapter does not declare loraplus_fast = ('vera_lambda_b',) yet")
    model = lorakit.adapt(tiny_llama(), lorakit.VeRA(r=16, targets=TARGETS))
    groups = param_groups(model, lr=1e-3)
    check_partition(model, groups)
    by = groups_by_name(groups)
    assert names_in(model, by["B/no_decay"]) == {n for n, _ in model.named_parameters() if n.endswith("vera_lambda_b")}
    assert names_in(model, by["A/no_decay"]) == {n for n, _ in model.named_parameters() if n.endswith("vera_lambda_d")}
    assert by["B/no_decay"]["lr"] == pytest.approx(1.6e-2)


class UndeclaredAdapter(lorakit.methods.base.AdditiveAdapter, nn.Module):
    """An adapter of a method that says nothing about LoRA+."""

    def __init__(self, in_f: int, out_f: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(2, in_f))
        self.lora_B = nn.Parameter(torch.zeros(out_f, 2))
        self.gate = nn.Parameter(torch.ones(out_f))

    def forward(self, x, result, base_out, base_layer):
        return result + self.gate * (x @ self.lora_A.T @ self.lora_B.T)

    def delta_weight(self, base_weight):
        return self.gate[:, None] * (self.lora_B @ self.lora_A)


def test_undeclared_adapter_defaults_to_lora_b_fast():
    model = nn.Sequential(nn.Linear(8, 8))
    config = lorakit.LoRA(targets=["0"])
    config.make_adapter = lambda name, base: UndeclaredAdapter(8, 8)  # instance attribute wins
    lorakit.adapt(model, config)
    by = groups_by_name(param_groups(model, lr=1.0, loraplus_ratio=4.0))
    assert names_in(model, by["B"]) == {"0.adapters.default.lora_B"}
    assert names_in(model, by["A"]) == {"0.adapters.default.lora_A"}
    assert names_in(model, by["A/no_decay"]) == {"0.adapters.default.gate"} and by["B"]["lr"] == 4.0


def test_exported():
    assert lorakit.param_groups is param_groups


def test_adalora_singular_values_get_no_weight_decay_like_vectors():
    """E (r x 1) holds AdaLoRA's singular values: a vector stored as a column, not a matrix; decaying
    it would pull the kept triplets toward zero, as decaying DoRA's magnitude or VeRA's vectors would."""
    model = lorakit.adapt(tiny_llama(), lorakit.AdaLoRA(init_r=4, target_r=2, targets=TARGETS))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    check_partition(model, groups)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in names_in(model, g)}
    assert decayed and not any(n.endswith("lora_E") for n in decayed)
    assert {n for n, _ in lorakit.adapter_parameters(model) if n.endswith("lora_E")} <= {
        n for g in groups if g["weight_decay"] == 0 for n in names_in(model, g)
    }


# --- lorakit.optim.adamw: the optimizer `lorakit train` builds ------------------------------------


def adapted_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=TARGETS))


def test_adamw_takes_the_fused_kernel_where_torch_has_one():
    from lorakit.optim import adamw

    model = adapted_tiny()
    opt = adamw(param_groups(model, lr=1e-3), lr=1e-3)
    assert opt.defaults["fused"] is True
    # explicit choices are the caller's
    assert not adamw(param_groups(model, lr=1e-3), lr=1e-3, foreach=True).defaults["fused"]
    assert not adamw(param_groups(model, lr=1e-3), lr=1e-3, fused=False).defaults["fused"]


def test_adamw_falls_back_where_torch_has_no_fused_kernel(monkeypatch):
    from lorakit import optim

    real = torch.optim.AdamW

    class NoFused(real):
        def __init__(self, params, **kwargs):
            if kwargs.get("fused"):
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    opt = optim.adamw(param_groups(adapted_tiny(), lr=1e-3), lr=1e-3)
    assert isinstance(opt, NoFused) and not opt.defaults["fused"]


def test_fused_adamw_trains_as_the_default_adamw():
    """Ten steps of LoRA+ groups with weight decay: the fused optimizer's parameters track torch's
    default implementation's (the two differ only in rounding)."""
    from lorakit.optim import adamw

    models = [adapted_tiny(seed=0), adapted_tiny(seed=0)]
    opts = [
        adamw(param_groups(models[0], lr=1e-2, weight_decay=0.1), lr=1e-2),
        torch.optim.AdamW(param_groups(models[1], lr=1e-2, weight_decay=0.1), lr=1e-2),
    ]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(10):
        for model, opt in zip(models, opts):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = 0
    for (name, p), (_, q) in zip(lorakit.adapter_parameters(models[0]), lorakit.adapter_parameters(models[1])):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        moved += int("lora_B" in name and p.abs().max() > 0)
    assert moved  # B left zero: the steps did train


def test_lorakit_train_builds_the_fused_adamw():
    from lorakit.train.config import TrainConfig
    from lorakit.train.optimizer import make_optimizer

    assert make_optimizer(adapted_tiny(), TrainConfig(lr=1e-3)).defaults["fused"] is True
