"""Training hooks in the trainer: the extra loss's weight, a before-training phase whose decisions are
replayed (not re-run) on resume, and a layout changed mid-run that save, load and resume all keep.

The hooks belong to toy methods registered for these tests only (a subclass of LoRA), so the trainer
reaches them exactly as it reaches a real method's."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass

import pytest
import torch

import lorakit
from lorakit.methods.base import METHODS, register
from lorakit.train import TrainingInterrupted, train
from lorakit.train import data as data_mod
from test_train_loop import adapter_tensors, assert_bit_equal, config, in_training_loop, pc_data, quiet, tiny_model  # noqa: F401

EXTRA_WEIGHT = 0.125
EVENTS: list[tuple] = []
FIRST_Q = "model.layers.0.self_attn.q_proj"


class ExtraLossHook:
    """extra_loss = EXTRA_WEIGHT * sum(A) of one module; records A's gradient after step 1. At step 1
    B is zero, so the task loss gives A no gradient: all of it is the extra loss's."""

    def __init__(self, name):
        self.name = name

    def extra_loss(self, model):
        return EXTRA_WEIGHT * model.get_submodule(FIRST_Q).adapters[self.name].lora_A.sum()

    def after_optimizer_step(self, model, step):
        if step == 1:
            EVENTS.append(("grad_A", model.get_submodule(FIRST_Q).adapters[self.name].lora_A.grad.clone()))


class ProbeThenShrinkHook:
    """Before training: trains briefly on the probe, then gives the first q_proj rank 2 (a decision)."""

    def __init__(self, name):
        self.name = name

    def before_training(self, model, probe):
        losses = probe.train(model, steps=3, lr=1e-2)
        EVENTS.append(("before_training", losses))
        lorakit.inject.reconfigure(model, self.name, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2})


class ShrinkAtStep2Hook:
    """After optimizer step 2: the first q_proj's rank goes 4 -> 2, keeping the leading components."""

    def __init__(self, name):
        self.name = name

    def after_optimizer_step(self, model, step):
        if step != 2:
            return
        old = model.get_submodule(FIRST_Q).adapters[self.name]
        (rebuilt,) = lorakit.inject.reconfigure(model, self.name, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2})
        new = model.get_submodule(rebuilt).adapters[self.name]
        with torch.no_grad():
            new.lora_A.copy_(old.lora_A[:2])
            new.lora_B.copy_(old.lora_B[:, :2])
        EVENTS.append(("shrunk", step))


def toy_method(method_name, hook_class):
    @register
    @dataclass
    class Toy(lorakit.LoRA):
        method = method_name

        def training_hooks(self, model, name, total_steps=None):
            return [hook_class(name)]

    return Toy


@pytest.fixture
def toy_methods():
    EVENTS.clear()
    made = [
        toy_method("toy-extra", ExtraLossHook),
        toy_method("toy-probe", ProbeThenShrinkHook),
        toy_method("toy-shrink", ShrinkAtStep2Hook),
    ]
    yield made
    for cls in made:
        METHODS.pop(cls.method)


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_extra_loss_counts_once_per_step_whatever_the_accumulation(
    grad_accum, toy_methods, tiny_model, pc_data, tmp_path
):
    cfg = config(
        tiny_model,
        pc_data,
        tmp_path,
        method="toy-extra",
        steps=1,
        grad_accum=grad_accum,
        batch_size=2,
        grad_clip=None,
        dropout=0.0,
        targets="q_proj",
        r=4,
    )
    result = train(cfg, echo=quiet)
    (grad,) = [e[1] for e in EVENTS if e[0] == "grad_A"]
    torch.testing.assert_close(grad, torch.full_like(grad, EXTRA_WEIGHT))
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert "extra_loss" in record and record["loss"] > 0


def interrupted_then_resumed(cfg_of, tmp_path, monkeypatch, at_index):
    original = data_mod.micro_batch

    def interrupt(examples, index, batch_size, seed):
        if index == at_index and in_training_loop():
            os.kill(os.getpid(), signal.SIGINT)
        return original(examples, index, batch_size, seed)

    monkeypatch.setattr(data_mod, "micro_batch", interrupt)
    with pytest.raises(TrainingInterrupted):
        train(cfg_of(tmp_path / "cut"), echo=quiet)
    monkeypatch.setattr(data_mod, "micro_batch", original)
    return train(cfg_of(tmp_path / "cut", resume=str(tmp_path / "cut" / "run")), echo=quiet)


def test_before_training_decides_once_and_resume_replays_it(toy_methods, tiny_model, pc_data, tmp_path, monkeypatch):
    def cfg_of(out, **extra):
        return config(
            tiny_model,
            pc_data,
            out,
            method="toy-probe",
            steps=4,
            grad_accum=1,
            checkpoint_every=0,
            targets="q_proj,v_proj",
            r=4,
            **extra,
        )

    reference = train(cfg_of(tmp_path / "ref"), echo=quiet)
    assert [e[0] for e in EVENTS] == ["before_training"] and len(EVENTS[0][1]) == 3
    EVENTS.clear()
    resumed = interrupted_then_resumed(cfg_of, tmp_path, monkeypatch, at_index=2)
    assert [e[0] for e in EVENTS] == ["before_training"]  # the first run only: the resume replays the layout
    assert_bit_equal(adapter_tensors(resumed.run_dir), adapter_tensors(reference.run_dir))
    assert adapter_tensors(reference.run_dir)[f"base_model.model.{FIRST_Q}.lora_A.weight"].shape[0] == 2


def test_a_rank_changed_mid_run_survives_save_load_and_resume(toy_methods, tiny_model, pc_data, tmp_path, monkeypatch):
    def cfg_of(out, **extra):
        return config(
            tiny_model,
            pc_data,
            out,
            method="toy-shrink",
            steps=4,
            grad_accum=1,
            checkpoint_every=0,
            targets="q_proj,v_proj",
            r=4,
            dropout=0.0,
            **extra,
        )

    reference = train(cfg_of(tmp_path / "ref"), echo=quiet)
    assert ("shrunk", 2) in EVENTS
    saved = adapter_tensors(reference.run_dir)
    assert saved[f"base_model.model.{FIRST_Q}.lora_A.weight"].shape == (2, 32)
    resumed = interrupted_then_resumed(cfg_of, tmp_path, monkeypatch, at_index=2)  # cut in step 3, after the change
    assert_bit_equal(adapter_tensors(resumed.run_dir), saved)
    # reloading the saved adapter (a plain LoRA file with a rank_pattern) gives the trained model's logits
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    one = lorakit.load(AutoModelForCausalLM.from_pretrained(tiny_model), reference.run_dir / "adapter")
    two = lorakit.load(AutoModelForCausalLM.from_pretrained(tiny_model), resumed.run_dir / "adapter")
    assert lorakit.inject.adapter_config(one).rank_pattern == {r"layers\.0\.self_attn\.q_proj": 2}
    torch.testing.assert_close(one(ids).logits, two(ids).logits, rtol=0, atol=0)
