"""Every architecture x every method (QLoRA over NF4 too), on tiny random models built from
transformers' own configs (tests/architectures.py): adapt; a training step lowers the loss; save ->
load gives the same outputs; merge and merge_and_unload give the same outputs; a causal LM's (and
T5's) `generate` equals the merged model's. PEFT's loading of each is in tests/test_peft.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lorakit
from architectures import ARCHITECTURES, batch, build, head_modules, outputs
from conftest import perturb_trainable
from lorakit.quant import quantize

METHODS = sorted(lorakit.methods.METHODS) + ["qlora"]
CASES = [(a, m) for a in ARCHITECTURES for m in METHODS]


def method_config(method: str, name: str) -> lorakit.methods.AdapterConfig:
    """`method`'s config over every linear layer (heads excepted), small settings for tiny models."""
    cls = lorakit.methods.METHODS["lora" if method == "qlora" else method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"targets": "all-linear", "train_modules": head_modules(name)}
    if "r" in fields:
        kwargs["r"] = 8 if method == "vera" else 2
    if "start_step" in fields:
        kwargs["start_step"] = 0
    if "init_r" in fields:  # AdaLoRA: the allocator prunes from the first step
        kwargs.update(init_r=4, target_r=2, total_step=10)
    if "probe_steps" in fields:  # LoRA-drop: a short stage 1, half the modules keep their own pair
        kwargs.update(probe_steps=2, threshold=0.5)
    return cls(**kwargs)


def adapted(name: str, method: str) -> nn.Module:
    """The architecture's model with the method's adapter (over an NF4 base for QLoRA); LoRA-drop's
    stage 1 has run (its plan shares pairs)."""
    model = build(name)
    if method == "qlora":
        quantize(model, method="nf4")
    torch.manual_seed(0)  # the adapter's random start: the same whatever ran before (test order)
    lorakit.adapt(model, method_config(method, name))
    hooks = lorakit.training_hooks(model)
    hooks.before_training(model, lorakit.hooks.Probe([batch(name, seed=1)], lr=1e-2))
    return model


def train_step(model: nn.Module, inputs: dict[str, torch.Tensor], lr: float = 1e-2) -> None:
    """One optimizer step, with the method's hooks, as `lorakit train` takes it."""
    hooks = lorakit.training_hooks(model)
    optimizer = torch.optim.AdamW(lorakit.param_groups(model, lr=lr, loraplus_ratio=None), lr=lr)
    model.train()
    loss = model(**inputs).loss + hooks.extra_loss(model)
    loss.backward()
    optimizer.step()
    hooks.after_optimizer_step(model, 1)
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def assert_same_greedy(model: nn.Module, reference: nn.Module, inputs: dict[str, torch.Tensor], kind: str) -> None:
    """`generate` (greedy, with the key/value cache) of `model` equals `reference`'s, but where the
    reference's two best next tokens tie within float rounding (tiny random models are close to
    uniform)."""
    prompt = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mine = model.generate(**prompt, **settings)
        theirs = reference.generate(**prompt, **settings)
        if torch.equal(mine, theirs):
            return
        # where they part: the reference's scores for the position must make both choices (near) equal
        if kind == "causal":
            length = prompt["input_ids"].shape[1]
            logits = reference(input_ids=mine, attention_mask=torch.ones_like(mine)).logits[:, length - 1 : -1]
            chosen = mine[:, length:]
        else:
            logits = reference(**prompt, decoder_input_ids=mine[:, :-1]).logits
            chosen = mine[:, 1:]
    picked = logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    gap = logits.max(-1).values - picked
    assert gap.max() < 1e-4, f"generate differs beyond a tie: {mine.tolist()} vs {theirs.tolist()}"


@pytest.mark.parametrize("name,method", CASES)
def test_every_method_on_every_architecture(name, method, tmp_path):
    kind = ARCHITECTURES[name].kind
    inputs = batch(name)
    model = adapted(name, method)
    assert list(lorakit.inject.adapted_layers(model)), "no module adapted"
    if method == "qlora":  # the 4-bit base computes what the dense one does, up to NF4's rounding
        dense, four_bit = outputs(build(name), inputs), outputs(model, inputs)
        assert (four_bit - dense).norm() < 0.5 * dense.norm(), "the 4-bit model is not the dense one rounded"

    # a training step lowers the loss on its batch
    with torch.no_grad():
        before = model(**inputs).loss
    train_step(model, inputs)
    with torch.no_grad():
        after = model(**inputs).loss
    assert after < before, f"loss {before:.6f} -> {after:.6f}"
    perturb_trainable(model)  # every adapter tensor well away from its start: the checks below can fail
    expected = outputs(model, inputs)
    with lorakit.disabled(model):
        assert (outputs(model, inputs) - expected).abs().max() > 1e-4, "the adapter changes nothing (10x the tolerance)"

    # save -> load onto a fresh base: the same outputs
    lorakit.save(model, tmp_path / "adapter")
    loaded = lorakit.load(build(name), tmp_path / "adapter")
    torch.testing.assert_close(outputs(loaded, inputs), expected, atol=1e-5, rtol=1e-5)

    # merge (refused over a 4-bit base, where merge_and_unload is exact), unmerge, merge_and_unload
    if method == "qlora":
        with pytest.raises(ValueError, match="cannot merge into a 4-bit base"):
            lorakit.merge(loaded)
    else:
        lorakit.merge(loaded)
        torch.testing.assert_close(outputs(loaded, inputs), expected, atol=1e-5, rtol=1e-4)
        lorakit.unmerge(loaded)
        torch.testing.assert_close(outputs(loaded, inputs), expected, atol=1e-5, rtol=1e-4)
    plain = lorakit.merge_and_unload(loaded)
    assert not any(isinstance(m, lorakit.inject.AdaptedLayer) for m in plain.modules())
    # over a 4-bit base the unmerged path multiplies by the dequantized weight in its own matmul
    # (another summation order than nn.Linear's): fp32 rounding, amplified by q/k norms, within 1e-4
    tolerance = dict(atol=1e-4, rtol=1e-3) if method == "qlora" else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs(plain, inputs), expected, **tolerance)

    if kind in ("causal", "seq2seq"):  # generation through the adapter equals the merged model's
        assert_same_greedy(model, plain, inputs, kind)


class ConvNet(nn.Module):
    """A model with no linear layer: nothing any method can wrap."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("method", sorted(lorakit.methods.METHODS))
def test_a_model_without_linear_layers_is_refused_clearly(method):
    for targets in ("all-linear", ["conv"]):
        with pytest.raises(
            ValueError,
            match=r"ConvNet has no layer lorakit can adapt: every method wraps linear layers "
            r"\(nn\.Linear, GPT-2's Conv1D, 4-bit Linear4bit\), and this model's layers are "
            r"BatchNorm2d, Conv2d",
        ):
            lorakit.adapt(ConvNet(), dataclasses.replace(method_config(method, "llama"), targets=targets))
    mixed = nn.Sequential(ConvNet(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"target\(s\) \{'0.conv': 'Conv2d'\} are not linear layers lorakit can adapt"):
        lorakit.adapt(mixed, dataclasses.replace(method_config(method, "llama"), targets=["conv"]))
