"""The real packaged models: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 (safetensors)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.load_tokenizer(), models.load_causal_lm()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_smollm2_lora_trains_saves_and_reloads(smollm2, tmp_path):
    tokenizer, model = smollm2
    lorakit.adapt(model, lorakit.LoRA(r=8, alpha=16, targets="all-linear"))
    assert len(list(lorakit.inject.adapted_layers(model))) == 30 * 7
    text = ["The capital of Zorbania is Plimth. The capital of Zorbania is Plimth."] * 2
    batch = tokenizer(text, return_tensors="pt")
    params = [p for _, p in lorakit.adapter_parameters(model)]
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    model.train()
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    lorakit.save(model, tmp_path)
    reloaded = lorakit.load(models.load_causal_lm(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=0)


def test_minilm_loads_offline_and_adapts():
    try:
        model = models.load_classifier(num_labels=2)
        tokenizer = models.load_tokenizer(task="classify")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["query", "value"], train_modules=["classifier"]))
    assert len(list(lorakit.inject.adapted_layers(model))) == 6 * 2
    batch = tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
