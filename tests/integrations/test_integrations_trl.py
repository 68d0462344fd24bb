"""lorakit inside TRL's SFTTrainer: a tiny random model for a few steps, and the packaged SmolLM2 on
the shipped Alpaca subset (integration). TRL is a test extra: skipped without it."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import shared_dataset
from lorakit.integrations import LorakitCallback, lorakit_trainer
from lorakit.integrations.checkpoints import EXACT_STATE_NAME
from tiny_lm import CORPUS, save_tiny_llama
from trainer_runs import adapter_tensors, method_config

trl = pytest.importorskip("trl")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def sft_args(out, **overrides):
    settings = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        save_strategy="no",
        max_length=48,
        dataset_num_proc=None,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def prompt_completion_data(n=16):
    import datasets

    words = " ".join(CORPUS).split()
    rows = [
        {"prompt": " ".join(words[i : i + 4]) + " ->", "completion": " " + " ".join(reversed(words[i : i + 4]))}
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def test_the_one_line_recipe_with_sft_trainer(tmp_path, tiny_dir):
    model, tokenizer = tiny(tiny_dir)
    lorakit.adapt(model, method_config("lora"))
    before = adapter_tensors(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_args(tmp_path, save_strategy="steps", save_steps=2),
        train_dataset=prompt_completion_data(),
        processing_class=tokenizer,
        callbacks=[LorakitCallback()],
    )
    trainer.train()
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "lorakit.json", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files


def test_sft_trainer_with_hooks_loraplus_and_exact_resume(tmp_path, tiny_dir):
    def fresh_run(out, resume=None):
        model, tokenizer = tiny(tiny_dir)
        lorakit.adapt(model, method_config("adalora"))
        trainer = lorakit_trainer(trl.SFTTrainer)(
            model=model,
            args=sft_args(out, max_steps=8, save_strategy="steps", save_steps=4),
            train_dataset=prompt_completion_data(),
            processing_class=tokenizer,
            callbacks=[LorakitCallback(loraplus_ratio=8)],
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    whole, trainer = fresh_run(tmp_path / "whole")
    config = lorakit.inject.adapter_config(whole)
    assert config.total_step == 8 and config.rank_pattern  # the allocator ran, over the trainer's run length
    assert any("extra_loss" in entry for entry in trainer.state.log_history)
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}["B"] == pytest.approx(
        8 * {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}["A"]
    )
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert (checkpoint / EXACT_STATE_NAME).is_file() and not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    resumed, _ = fresh_run(tmp_path / "resumed", resume=str(checkpoint))
    expected, got = adapter_tensors(whole), adapter_tensors(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.integration
def test_smollm2_sft_on_alpaca(tmp_path):
    """The packaged SmolLM2-135M with TRL's SFTTrainer and the callback, on the shipped Alpaca subset:
    the loss falls, the checkpoint holds the adapter (with TRL's default gradient checkpointing on), and
    the saved adapter reloads to the same outputs."""
    import datasets

    from lorakit import models

    path = shared_dataset("alpaca", "alpaca_5000.json")
    rows = json.loads(path.read_text())[:48]
    data = datasets.Dataset.from_list(
        [
            {
                "prompt": f"### Instruction:\n{r['instruction']}\n"
                + (f"### Input:\n{r['input']}\n" if r.get("input") else "")
                + "### Response:\n",
                "completion": r["output"],
            }
            for r in rows
        ]
    )
    model = models.load_causal_lm()
    tokenizer = models.load_tokenizer()
    lorakit.adapt(model, lorakit.LoRA(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_args(
            tmp_path,
            max_steps=8,
            learning_rate=3e-3,
            max_length=64,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=8,
            logging_steps=1,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[LorakitCallback()],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    checkpoint = tmp_path / "checkpoint-8"
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 5 * 2**20
    assert not (checkpoint / "model.safetensors").exists()
    model.eval()
    batch = tokenizer(["### Instruction:\nName a color.\n### Response:\n"], return_tensors="pt")
    expected = type(model).forward(model, **batch).logits  # TRL patches the instance's forward (its fused head)
    reloaded = lorakit.load(models.load_causal_lm(), checkpoint).eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-4, rtol=1e-4)
