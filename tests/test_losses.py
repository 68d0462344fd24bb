"""The chunked causal-LM loss against transformers' own loss: same value, same gradients."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_gpt2, tiny_llama
from lorakit import losses


def batch(seed: int = 0, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[1, 8:] = -100
    return input_ids, attention_mask, labels


def count_chunked_losses(monkeypatch) -> dict[str, int]:
    """Counts calls of `losses.linear_cross_entropy` (the chunked path) while the test runs."""
    calls = {"n": 0}
    real = losses.linear_cross_entropy

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "linear_cross_entropy", counted)
    return calls


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("chunk", [5, 4096])
@pytest.mark.parametrize("num_items", [None, 7.0])
def test_chunked_loss_equals_transformers_loss_and_gradients(make, chunk, num_items):
    model = make(seed=1)
    lorakit.adapt(model, lorakit.LoRA(r=4, targets="all-linear"))
    for _, p in lorakit.adapter_parameters(model):
        torch.nn.init.normal_(p, std=0.05)  # B != 0: gradients reach every adapter matrix
    input_ids, attention_mask, labels = batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    reference.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    mine = losses.causal_lm_loss(model, input_ids, attention_mask, labels, num_items, chunk=chunk)
    mine.backward()
    got = grads(model)
    assert torch.allclose(mine, reference, rtol=1e-6, atol=1e-6), (mine, reference)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_trainable_head_gets_its_gradient_and_bias():
    torch.manual_seed(0)
    hidden = torch.randn(9, 6, requires_grad=True)
    weight = torch.randn(13, 6, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 4, 5, 12, 0, -100, 3])
    loss = losses.linear_cross_entropy(hidden, weight, bias, targets, chunk=4)
    loss.backward()
    mine = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=-100)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-6)
    for got, want in zip(mine, (hidden.grad, weight.grad, bias.grad)):
        assert torch.allclose(got, want, atol=1e-6)


def test_bf16_autocast_matches_within_bf16_tolerance():
    model = tiny_llama(seed=2)
    lorakit.adapt(model, lorakit.LoRA(r=4))
    input_ids, attention_mask, labels = batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        mine = losses.causal_lm_loss(model, input_ids, attention_mask, labels, chunk=8)
    assert torch.allclose(mine, reference, rtol=2e-2)
    mine.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in lorakit.adapter_parameters(model))


def test_models_without_a_plain_head_are_refused():
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["lm_head"]))  # the head itself adapted: not a plain linear
    assert losses.plain_head(model) is None
    with pytest.raises(ValueError, match="plain"):
        losses.ChunkedLossModel(model)
    other = tiny_llama()
    other.config.model_type = "gemma2"  # soft-capped logits: not this loss
    assert losses.plain_head(other) is None


def test_lorakit_train_uses_it_and_trains_the_same_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lorakit.train import TrainConfig, train
    from tiny_lm import save_tiny_llama, write_jsonl

    model = str(save_tiny_llama(tmp_path / "m"))
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i} {i + 1} {i + 2}"} for i in range(24)]
    )
    calls = count_chunked_losses(monkeypatch)
    monkeypatch.setattr(losses, "MIN_CHUNKED_LOGIT_BYTES", 0)  # chunk even these tiny batches
    runs = {
        flag: train(
            TrainConfig(
                model=model,
                data=str(data),
                out_dir=str(tmp_path),
                name=f"c{flag}",
                steps=3,
                batch_size=4,
                lr=1e-2,
                dropout=0.0,
                progress=False,
                chunked_loss=flag,
            ),
            echo=lambda *_: None,
        )
        for flag in (True, False)
    }
    assert calls["n"] == 3  # one chunked loss per step of the chunked run, none in the other
    a, b = (load_file(str(runs[f].run_dir / "adapter" / "adapter_model.safetensors")) for f in (True, False))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert abs(runs[True].final_loss - runs[False].final_loss) < 1e-5


def test_small_batches_take_the_models_own_loss(monkeypatch):
    model = tiny_llama(seed=1)
    lorakit.adapt(model, lorakit.LoRA(r=4))
    input_ids, attention_mask, labels = batch()
    wrapped = losses.ChunkedLossModel(model)  # 33 tokens x 128 vocabulary: far below the threshold
    calls = count_chunked_losses(monkeypatch)
    small = wrapped(input_ids, labels, attention_mask).loss
    chunked = losses.ChunkedLossModel(model, min_logit_bytes=0)(input_ids, labels, attention_mask).loss
    assert calls["n"] == 1 and torch.allclose(small, chunked, atol=1e-6)
