"""AdaLoRA: the SVD-form layer against its formula, the regulariser, the budget schedule and the
pruning edges, the allocator's layout saved and resumed. Parity with PEFT's AdaLoRA is in
tests/test_peft.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from conftest import perturb_trainable, tiny_llama
from lorakit.methods.adalora import AdaLoRAAdapter, budget_at, prune_to_budget


def test_forward_and_grads_match_the_formula():
    torch.manual_seed(0)
    model = lorakit.adapt(
        nn.Sequential(nn.Linear(12, 6)), lorakit.AdaLoRA(init_r=3, target_r=2, alpha=5.0, targets=["0"])
    )
    perturb_trainable(model)
    layer, adapter = model[0], model[0].adapter
    x = torch.randn(4, 12, requires_grad=True)
    y = model(x)
    P, E, Q = (t.detach().clone().requires_grad_(True) for t in (adapter.lora_B, adapter.lora_E, adapter.lora_A))
    ref = (
        x.detach() @ layer.base_layer.weight.T
        + layer.base_layer.bias
        + x.detach() @ (P @ torch.diag(E.view(-1)) @ Q).T * 5.0 / (3 + 1e-5)
    )
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    ref.square().sum().backward()
    for mine, theirs in ((adapter.lora_B, P), (adapter.lora_E, E), (adapter.lora_A, Q)):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_fresh_adapter_starts_at_the_base_with_peft_init():
    adapter = AdaLoRAAdapter(64, 32, init_r=12, alpha=8.0)
    assert torch.equal(adapter.lora_E, torch.zeros(12, 1))
    assert 0.015 < adapter.lora_A.std() < 0.025 and 0.015 < adapter.lora_B.std() < 0.025
    assert adapter.scale == 8.0 / (12 + 1e-5) and adapter.r == 12


def test_regulariser_is_the_mean_frobenius_distance_from_orthogonality():
    model = lorakit.adapt(
        tiny_llama(), lorakit.AdaLoRA(init_r=4, target_r=2, targets=["q_proj", "v_proj"], orth_reg_weight=0.3)
    )
    hooks = lorakit.training_hooks(model, total_steps=10)
    terms = []
    for _, layer in lorakit.inject.adapted_layers(model):
        Q, P = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
        terms += [torch.linalg.norm(Q @ Q.T - torch.eye(4)), torch.linalg.norm(P.T @ P - torch.eye(4))]
    torch.testing.assert_close(hooks.extra_loss(model), 0.3 * torch.stack(terms).mean())
    zero = lorakit.adapt(tiny_llama(), lorakit.AdaLoRA(targets=["q_proj"], orth_reg_weight=0.0))
    assert lorakit.training_hooks(zero, total_steps=10).extra_loss(zero) == 0.0


@pytest.mark.parametrize("tinit,tfinal,delta_t", [(0, 0, 1), (3, 2, 1), (2, 3, 4)])
def test_budget_schedule_at_its_boundaries(tinit, tfinal, delta_t):
    b0, bT, T = 48, 16, 20
    for step in range(0, tinit + 1):
        assert budget_at(step, b0, bT, tinit, tfinal, T, delta_t) == (b0, False)
    for step in range(tinit + 1, T - tfinal + 1):
        expected = int((b0 - bT) * (1 - (step - tinit) / (T - tfinal - tinit)) ** 3 + bT)
        assert budget_at(step, b0, bT, tinit, tfinal, T, delta_t) == (expected, step % delta_t == 0)
    assert budget_at(T - tfinal, b0, bT, tinit, tfinal, T, delta_t)[0] == bT  # the cubic reaches the target
    for step in range(T - tfinal + 1, T + 3):
        assert budget_at(step, b0, bT, tinit, tfinal, T, delta_t) == (bT, True)


def test_pruning_edges_where_peft_raised():
    scores = {"a": torch.tensor([0.3, 0.1, 0.5]), "b": torch.tensor([0.2, 0.4, 0.05])}
    assert all(k.all() for k in prune_to_budget(scores, 6, 6).values())  # budget = everything: k would be 0
    assert not any(k.any() for k in prune_to_budget(scores, 6, 0).values())  # budget = nothing
    assert not any(k.any() for k in prune_to_budget(scores, 6, -3).values())
    kept = prune_to_budget(scores, 6, 4)  # the two lowest, 0.05 and 0.1, go
    assert kept["a"].tolist() == [True, False, True] and kept["b"].tolist() == [True, True, False]
    one = prune_to_budget({"only": torch.tensor([1.0, 2.0, 3.0, 4.0])}, 4, 1)
    assert one["only"].tolist() == [False, False, False, True]
    ties = prune_to_budget({"a": torch.tensor([1.0, 1.0, 2.0])}, 3, 2)  # at or below the threshold goes
    assert ties["a"].tolist() == [False, False, True]


def train_steps(model, hooks, steps, input_ids, lr=5e-2):
    optimizer = torch.optim.AdamW([p for _, p in lorakit.adapter_parameters(model)], lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids, labels=input_ids).loss + hooks.extra_loss(model)
        loss.backward()
        optimizer.step()
        hooks.after_optimizer_step(model, step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_the_final_allocation_is_the_saved_layout_and_merges_exactly(tmp_path, input_ids):
    config = lorakit.AdaLoRA(init_r=4, target_r=2, targets=["q_proj", "v_proj", "up_proj"], tinit=1, tfinal=2)
    model = lorakit.adapt(tiny_llama(), config)
    hooks = lorakit.training_hooks(model, total_steps=8)
    assert lorakit.inject.adapter_config(model).total_step == 8  # the run's length is recorded
    train_steps(model, hooks, 8, input_ids)
    final = lorakit.inject.adapter_config(model).rank_pattern
    assert set(final) == {n for n, _ in lorakit.inject.adapted_layers(model)}
    assert sum(sum(k) for k in final.values()) <= 2 * 6  # target_r x modules, ties may prune more
    ranks = {n: layer.adapter.r for n, layer in lorakit.inject.adapted_layers(model)}
    assert ranks == {n: sum(k) for n, k in final.items()} and len(set(ranks.values())) > 1
    for name, layer in lorakit.inject.adapted_layers(model):
        pruned = ~torch.tensor(final[name])
        assert torch.all(layer.adapter.lora_E[pruned] == 0)
    assert "rank" in lorakit.summary(model, per_module=True)
    expected = model(input_ids).logits
    lorakit.save(model, tmp_path)
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "ADALORA" and peft_config["total_step"] == 8
    assert peft_config["rank_pattern"] == {f"{m}.lora_E": k for m, k in final.items()}
    loaded = lorakit.load(tiny_llama(), tmp_path)
    assert {n: layer.adapter.r for n, layer in lorakit.inject.adapted_layers(loaded)} == ranks
    torch.testing.assert_close(loaded(input_ids).logits, expected)
    merged = lorakit.merge_and_unload(loaded)
    torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_one_step_run_allocates_at_its_only_step(input_ids):
    """total_step = tfinal + 1: the final allocation is the first step, with the importance of that
    step's own gradients (there is no earlier one)."""
    config = lorakit.AdaLoRA(init_r=4, target_r=2, targets=["q_proj", "v_proj"], total_step=1)
    model = lorakit.adapt(tiny_llama(), config)
    train_steps(model, lorakit.training_hooks(model), 1, input_ids)
    final = lorakit.inject.adapter_config(model).rank_pattern
    assert set(final) == {n for n, _ in lorakit.inject.adapted_layers(model)}
    assert sum(sum(k) for k in final.values()) <= 2 * len(final)


def test_without_the_run_length_the_allocator_says_what_it_needs(input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.AdaLoRA(targets=["q_proj"]))
    with pytest.raises(ValueError, match="total step count"):
        train_steps(model, lorakit.training_hooks(model), 1, input_ids)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="target_r must be an integer in 1..init_r=4"):
        lorakit.AdaLoRA(init_r=4, target_r=6)
    with pytest.raises(ValueError, match="total_step=3 must be an integer above tinit"):
        lorakit.AdaLoRA(tinit=2, tfinal=1, total_step=3)
    with pytest.raises(ValueError, match="beta1 must be in"):
        lorakit.AdaLoRA(beta1=1.0)
    with pytest.raises(ValueError, match="delta_t must be an integer >= 1"):
        lorakit.AdaLoRA(delta_t=0)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] must be 12 booleans"):
        lorakit.AdaLoRA(rank_pattern={"q_proj": [True]})
    with pytest.raises(ValueError, match="orth_reg_weight must be >= 0"):
        lorakit.AdaLoRA(orth_reg_weight=-1.0)


@pytest.mark.parametrize("cut_in_step", [3, 5])
def test_lorakit_train_runs_the_allocator_and_resumes_exactly(cut_in_step, tmp_path, monkeypatch):
    """`--method adalora`: the run's length reaches the allocator, the final ranks are saved, and a run
    cut in the middle of the budget's fall (step 3) or after the allocation froze (step 5) resumes to
    bit-identical weights (pruned rows included)."""
    from lorakit.train import TrainConfig, train
    from test_hooks import interrupted_then_resumed
    from test_train_loop import adapter_tensors, assert_bit_equal, quiet
    from tiny_lm import save_tiny_llama, write_jsonl

    model_dir = str(save_tiny_llama(tmp_path / "model"))
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": f"say {w}", "completion": f" {w} {w}"}
            for w in "red green blue cyan pink gold gray navy".split() * 3
        ],
    )

    def cfg_of(out, **extra):
        return TrainConfig(
            model=model_dir,
            data=str(data),
            out_dir=str(out),
            name="run",
            steps=6,
            batch_size=4,
            lr=2e-2,
            progress=False,
            checkpoint_every=0,
            method="adalora",
            r=4,
            targets="q_proj,v_proj",
            method_args={"target_r": 2, "tinit": 1, "tfinal": 2},
            **extra,
        )

    reference = train(cfg_of(tmp_path / "ref"), echo=quiet)
    meta = json.loads((reference.run_dir / "adapter" / "lorakit.json").read_text())["config"]
    assert meta["total_step"] == 6 and meta["init_r"] == 4 and len(meta["rank_pattern"]) == 4
    resumed = interrupted_then_resumed(cfg_of, tmp_path, monkeypatch, at_index=cut_in_step - 1)
    assert_bit_equal(adapter_tensors(resumed.run_dir), adapter_tensors(reference.run_dir))
    record = json.loads((reference.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["extra_loss"] > 0  # the regulariser is logged apart from the task loss


def test_a_schedule_longer_than_the_run_is_one_clear_error(tmp_path, capsys):
    from lorakit import cli
    from tiny_lm import save_tiny_llama, write_jsonl

    model_dir = str(save_tiny_llama(tmp_path / "model"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}] * 8)
    code = cli.main(
        [
            "train",
            "--model",
            model_dir,
            "--data",
            str(data),
            "--steps",
            "3",
            "--method",
            "adalora",
            "--method-arg",
            "tinit=2",
            "--method-arg",
            "tfinal=2",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: total_step=3 must be an integer above tinit + tfinal = 4")
    code = cli.main(
        [
            "train",
            "--model",
            model_dir,
            "--data",
            str(data),
            "--steps",
            "3",
            "--method",
            "adalora",
            "--r",
            "4",
            "--out-dir",
            str(tmp_path),
            "--name",
            "x",
            "--no-progress",
        ]
    )
    assert code == 2 and "target_r must be an integer in 1..init_r=4" in capsys.readouterr().err


def test_from_peft_refuses_a_rank_pattern_of_other_than_booleans():
    body = lorakit.AdaLoRA(init_r=2, target_r=1, targets=["q_proj"]).to_peft(["q_proj"])
    ok = lorakit.AdaLoRA.from_peft({**body, "rank_pattern": {"q_proj.lora_E": [True, False]}})
    assert ok.rank_pattern == {"q_proj": [True, False]}
    for bad in ({"q_proj.lora_E": [1, 0]}, {"q_proj.lora_E": ["yes", "no"]}, ["q_proj"]):
        with pytest.raises(ValueError, match="rank_pattern"):
            lorakit.AdaLoRA.from_peft({**body, "rank_pattern": bad})
