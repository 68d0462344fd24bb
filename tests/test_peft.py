"""Numerical parity and file interchange with Hugging Face PEFT, every method that PEFT implements.

PEFT is a test dependency only: without it this whole module is skipped, and nothing else is.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import perturb_trainable, tiny_gpt2, tiny_llama
from lorakit.methods.vera import shared_projections

peft = pytest.importorskip("peft")


# --- LoRA --------------------------------------------------------------------------------------
def copy_into_peft_lora(ours: nn.Module, theirs: nn.Module) -> None:
    """Give PEFT's LoRA modules the same A and B as ours."""
    for name, layer in lorakit.inject.adapted_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(layer.adapter.lora_A)
            module.lora_B["default"].weight.copy_(layer.adapter.lora_B)


@pytest.mark.parametrize(
    "make_model,targets",
    [
        (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
    ],
)
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_outputs_and_gradients_match_peft(make_model, targets, rslora, input_ids):
    ours = lorakit.adapt(make_model(), lorakit.LoRA(r=4, alpha=12, targets=targets, rslora=rslora))
    perturb_trainable(ours)
    config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora, fan_in_fan_out=make_model is tiny_gpt2
    )
    theirs = peft.get_peft_model(make_model(), config)
    copy_into_peft_lora(ours, theirs)
    out_ours = ours(input_ids, labels=input_ids)
    out_theirs = theirs(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in lorakit.inject.adapted_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.adapter.lora_A.grad, module.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            layer.adapter.lora_B.grad, module.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4
        )


def test_lora_peft_loads_lorakit_adapter(tmp_path, input_ids):
    ours = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
    perturb_trainable(ours)
    lorakit.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(theirs(input_ids=input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_lorakit_loads_peft_adapter(tmp_path, input_ids, targets):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), config)
    theirs.save_pretrained(str(tmp_path))
    ours = lorakit.load(tiny_llama(), tmp_path)
    assert len(list(lorakit.inject.adapted_layers(ours))) == (4 if isinstance(targets, list) else 14)
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_lorakit_loads_peft_gpt2_adapter(tmp_path, input_ids):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    theirs = peft.get_peft_model(tiny_gpt2(), config)
    theirs.save_pretrained(str(tmp_path))
    ours = lorakit.load(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


# --- DoRA --------------------------------------------------------------------------------------
DORA_CASES = [(tiny_llama, ["q_proj", "v_proj", "o_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])]


def peft_dora(make_model, targets, **kwargs):
    config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=targets, use_dora=True, fan_in_fan_out=make_model is tiny_gpt2, **kwargs
    )
    return peft.get_peft_model(make_model(), config)


def copy_into_peft_dora(ours: nn.Module, theirs: nn.Module) -> None:
    for name, layer in lorakit.inject.adapted_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(layer.adapter.lora.lora_A)
            module.lora_B["default"].weight.copy_(layer.adapter.lora.lora_B)
            module.lora_magnitude_vector["default"].weight.copy_(layer.adapter.magnitude)


@pytest.mark.parametrize("make_model,targets", DORA_CASES)
def test_dora_magnitude_init_matches_peft(make_model, targets):
    ours = lorakit.adapt(make_model(), lorakit.DoRA(r=4, alpha=12, targets=targets))
    theirs = peft_dora(make_model, targets)
    for name, layer in lorakit.inject.adapted_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.adapter.magnitude, module.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("make_model,targets", DORA_CASES)
def test_dora_outputs_and_gradients_match_peft(make_model, targets, dropout, input_ids):
    """With dropout the comparison runs in eval mode (see the module docstring of lorakit.methods.dora)."""
    ours = lorakit.adapt(make_model(), lorakit.DoRA(r=4, alpha=12, dropout=dropout, targets=targets))
    perturb_trainable(ours)
    theirs = peft_dora(make_model, targets, lora_dropout=dropout)
    copy_into_peft_dora(ours, theirs)
    for model in (ours, theirs):
        model.train(dropout == 0.0)
    out_ours = ours(input_ids, labels=input_ids)
    out_theirs = theirs(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in lorakit.inject.adapted_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        pairs = [
            (layer.adapter.lora.lora_A, module.lora_A["default"].weight),
            (layer.adapter.lora.lora_B, module.lora_B["default"].weight),
            (layer.adapter.magnitude, module.lora_magnitude_vector["default"].weight),
        ]
        for mine, peft_param in pairs:
            torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make_model,targets", DORA_CASES)
def test_dora_peft_loads_lorakit_adapter(make_model, targets, tmp_path, input_ids):
    ours = lorakit.adapt(make_model(), lorakit.DoRA(r=4, alpha=8, targets=targets))
    perturb_trainable(ours)
    lorakit.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model(), str(tmp_path))
    torch.testing.assert_close(theirs(input_ids=input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_model,targets", DORA_CASES)
def test_dora_lorakit_loads_peft_adapter(make_model, targets, tmp_path, input_ids):
    theirs = peft_dora(make_model, targets)
    perturb_trainable(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = lorakit.load(make_model(), tmp_path)
    assert type(lorakit.inject.adapter_config(ours)) is lorakit.DoRA
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


# --- LoRA-FA (read by PEFT as plain LoRA) ------------------------------------------------------
@pytest.mark.parametrize(
    "make_model,targets",
    [(tiny_llama, ["q_proj", "v_proj", "gate_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])],
)
def test_lora_fa_peft_loads_lora_fa_adapter_with_equal_outputs(tmp_path, input_ids, make_model, targets):
    ours = lorakit.adapt(make_model(), lorakit.LoRAFA(r=4, alpha=12, targets=targets))
    perturb_trainable(ours)
    lorakit.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model(), str(tmp_path))
    torch.testing.assert_close(theirs(input_ids=input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)


# --- VeRA --------------------------------------------------------------------------------------
VERA_CASES = [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])]


def peft_vera(make_model, targets, **kwargs):
    config = peft.VeraConfig(r=16, target_modules=targets, fan_in_fan_out=make_model is tiny_gpt2, **kwargs)
    return peft.get_peft_model(make_model(), config)


def copy_into_peft_vera(ours: nn.Module, theirs: nn.Module) -> None:
    for name, layer in lorakit.inject.adapted_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            module.vera_lambda_b["default"].copy_(layer.adapter.vera_lambda_b)
            module.vera_lambda_d["default"].copy_(layer.adapter.vera_lambda_d)


@pytest.mark.parametrize("make_model,targets", VERA_CASES)
def test_vera_same_seed_same_projections_as_peft(make_model, targets):
    ours = lorakit.adapt(make_model(), lorakit.VeRA(r=16, projection_prng_key=5, targets=targets))
    theirs = peft_vera(make_model, targets, projection_prng_key=5)
    proj = shared_projections(ours, "default")
    assert torch.equal(proj.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("make_model,targets", VERA_CASES)
def test_vera_outputs_and_gradients_match_peft(make_model, targets, input_ids):
    ours = lorakit.adapt(make_model(), lorakit.VeRA(r=16, targets=targets))
    perturb_trainable(ours)
    theirs = peft_vera(make_model, targets)
    copy_into_peft_vera(ours, theirs)
    out_ours = ours(input_ids, labels=input_ids)
    out_theirs = theirs(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in lorakit.inject.adapted_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.adapter.vera_lambda_b.grad, module.vera_lambda_b["default"].grad, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            layer.adapter.vera_lambda_d.grad, module.vera_lambda_d["default"].grad, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("save_projection", [False, True])
@pytest.mark.parametrize("make_model,targets", VERA_CASES)
def test_vera_peft_loads_lorakit_adapter(make_model, targets, save_projection, tmp_path, input_ids):
    ours = lorakit.adapt(
        make_model(), lorakit.VeRA(r=16, projection_prng_key=3, save_projection=save_projection, targets=targets)
    )
    perturb_trainable(ours)
    lorakit.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model(), str(tmp_path))
    assert torch.equal(theirs.base_model.vera_A["default"], shared_projections(ours, "default").vera_A)
    torch.testing.assert_close(theirs(input_ids=input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save_projection", [False, True])
@pytest.mark.parametrize("make_model,targets", VERA_CASES)
def test_vera_lorakit_loads_peft_adapter(make_model, targets, save_projection, tmp_path, input_ids):
    theirs = peft_vera(make_model, targets, projection_prng_key=11, save_projection=save_projection)
    perturb_trainable(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = lorakit.load(make_model(), tmp_path)
    config = lorakit.inject.adapter_config(ours)
    assert (
        isinstance(config, lorakit.VeRA)
        and config.projection_prng_key == 11
        and config.save_projection == save_projection
    )
    peft_layers = [n for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.vera.VeraLayer)]
    assert sorted(n for n, _ in lorakit.inject.adapted_layers(ours)) == sorted(peft_layers)
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


# --- several named adapters and per-module ranks ---------------------------------------------------


def test_peft_reads_each_of_several_lorakit_adapters(tmp_path, input_ids):
    ours = tiny_llama()
    lorakit.adapt(ours, lorakit.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    lorakit.adapt(
        ours,
        lorakit.LoRA(
            r=4,
            alpha=8,
            targets="all-linear",
            rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6},
            alpha_pattern={"v_proj": 3.0},
        ),
        name="sql",
    )
    lorakit.adapt(ours, lorakit.DoRA(r=2, targets=["o_proj", "up_proj"]), name="chat")
    for name in lorakit.inject.adapter_names(ours):
        lorakit.set_active(ours, name)
        for p in (
            p for _, layer in lorakit.inject.adapted_layers(ours, name) for p in layer.adapters[name].parameters()
        ):
            torch.nn.init.normal_(p.data, std=0.1)
    lorakit.save(ours, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "sql" / "adapter_config.json").is_file()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "sql"), adapter_name="sql")
    theirs.load_adapter(str(tmp_path / "chat"), adapter_name="chat")
    for name in ("default", "sql", "chat"):
        theirs.set_adapter(name)
        lorakit.set_active(ours, name)
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)
    assert theirs.peft_config["sql"].rank_pattern == {"q_proj": 2, r"layers\.1\.mlp\..*": 6}


def test_lorakit_reads_a_peft_multi_adapter_directory(tmp_path, input_ids):
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    theirs.add_adapter(
        "other",
        peft.LoraConfig(
            r=8,
            lora_alpha=4,
            target_modules=["k_proj", "down_proj"],
            rank_pattern={"down_proj": 3},
            alpha_pattern={"k_proj": 2.0},
            init_lora_weights=False,
        ),
    )
    theirs.save_pretrained(str(tmp_path))
    ours = lorakit.load(tiny_llama(), tmp_path)
    assert lorakit.inject.adapter_names(ours) == ["default", "other"] and lorakit.inject.active_adapters(ours) == (
        "default",
    )
    assert lorakit.inject.adapter_config(ours, "other").rank_pattern == {"down_proj": 3}
    for name in ("default", "other"):
        theirs.set_adapter(name)
        lorakit.set_active(ours, name)
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)
    # PEFT's multiple active adapters add up; so do lorakit's
    theirs.base_model.set_adapter(["default", "other"])
    lorakit.set_active(ours, ["default", "other"])
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rank_and_alpha_patterns_match_peft(method, tmp_path, input_ids):
    patterns = {"rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6}, "alpha_pattern": {"v_proj": 3.0}}
    theirs = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            use_dora=method == "dora",
            init_lora_weights=False,
            **patterns,
        ),
    )
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = lorakit.load(tiny_llama(), tmp_path / "peft")
    assert lorakit.inject.adapter_config(ours).method == method
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5)
    lorakit.save(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(again(input_ids=input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)


# --- the contract: every registered method with a PEFT counterpart --------------------------------

PEFT_METHODS = sorted(m for m, cls in lorakit.methods.METHODS.items() if cls.peft_type is not None)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_round_trip_through_peft(method, tmp_path, input_ids):
    """lorakit saves -> PEFT loads (same logits) -> PEFT saves -> lorakit loads (same logits)."""
    from test_contract import make_config

    ours = lorakit.adapt(tiny_llama(), make_config(method, "llama"))
    perturb_trainable(ours)
    expected = ours(input_ids).logits
    lorakit.save(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = lorakit.load(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


# --- AdaLoRA ----------------------------------------------------------------------------------------

ADALORA = dict(init_r=4, target_r=2, tinit=1, tfinal=2, beta1=0.85, beta2=0.85, orth_reg_weight=0.1)
ADALORA_TARGETS = ["q_proj", "v_proj", "up_proj"]


def peft_adalora(total_step):
    config = peft.AdaLoraConfig(
        lora_alpha=8, target_modules=ADALORA_TARGETS, deltaT=1, total_step=total_step, **ADALORA
    )
    return peft.get_peft_model(tiny_llama(), config)


def test_adalora_allocates_as_peft_does(input_ids):
    """Same start, data and optimizer: the same losses (task + regulariser) and the same kept triplets
    after every allocation round, through the final allocation and the frozen phase."""
    steps = 8
    theirs = peft_adalora(steps).train()
    ours = lorakit.adapt(tiny_llama(), lorakit.AdaLoRA(alpha=8.0, targets=ADALORA_TARGETS, **ADALORA))
    with torch.no_grad():
        for name, layer in lorakit.inject.adapted_layers(ours):
            module = theirs.base_model.model.get_submodule(name)
            for kind in ("lora_A", "lora_B", "lora_E"):
                getattr(layer.adapter, kind).copy_(getattr(module, kind)["default"])
    hooks = lorakit.training_hooks(ours, total_steps=steps)
    opt_ours = torch.optim.AdamW([p for _, p in lorakit.adapter_parameters(ours)], lr=0.05)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, steps + 1):
        # through AdaLoraModel.forward, which adds the regulariser: PeftModel.forward calls the wrapped
        # model directly and silently leaves it out (PEFT 0.21)
        loss_theirs = theirs.base_model(input_ids=input_ids, labels=input_ids).loss
        loss_ours = ours(input_ids, labels=input_ids).loss + hooks.extra_loss(ours)
        torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        loss_ours.backward(), loss_theirs.backward()
        opt_ours.step(), opt_theirs.step()
        hooks.after_optimizer_step(ours, step)
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad(), opt_theirs.zero_grad()
        for name, layer in lorakit.inject.adapted_layers(ours):
            their_E = theirs.base_model.model.get_submodule(name).lora_E["default"]
            assert torch.equal(layer.adapter.lora_E == 0, their_E == 0), f"step {step}, {name}"
    their_pattern = theirs.peft_config["default"].rank_pattern
    assert lorakit.inject.adapter_config(ours).rank_pattern == {
        name: their_pattern[f"{name}.lora_E.default"] for name, _ in lorakit.inject.adapted_layers(ours)
    }


def test_adalora_adapters_load_both_ways(tmp_path, input_ids):
    steps = 6
    ours = lorakit.adapt(tiny_llama(), lorakit.AdaLoRA(alpha=8.0, targets=ADALORA_TARGETS, **ADALORA))
    hooks = lorakit.training_hooks(ours, total_steps=steps)
    opt = torch.optim.AdamW([p for _, p in lorakit.adapter_parameters(ours)], lr=0.05)
    for step in range(1, steps + 1):
        (ours(input_ids, labels=input_ids).loss + hooks.extra_loss(ours)).backward()
        opt.step()
        hooks.after_optimizer_step(ours, step)
        opt.zero_grad()
    ours.eval()
    lorakit.save(ours, tmp_path / "ours")
    loaded_by_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(loaded_by_peft(input_ids=input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)
    loaded_by_peft.save_pretrained(str(tmp_path / "theirs"))
    back = lorakit.load(tiny_llama(), tmp_path / "theirs")
    assert lorakit.inject.adapter_config(back).rank_pattern == lorakit.inject.adapter_config(ours).rank_pattern
    torch.testing.assert_close(back(input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=1e-5)


# --- every architecture: PEFT loads what lorakit saved ----------------------------------------------

from architectures import ARCHITECTURES  # noqa: E402

ARCH_PEFT_CASES = [(a, m) for a in ARCHITECTURES for m in PEFT_METHODS + ["qlora"]]


def dequantized(model: nn.Module) -> nn.Module:
    """The model with each 4-bit layer replaced by a dense one holding its dequantized weight: the
    base a QLoRA adapter trained over, as PEFT (without bitsandbytes) can hold it."""
    from lorakit.quant import quantized_layers
    from lorakit.targets import set_submodule

    for name, layer in quantized_layers(model):
        set_submodule(model, name, layer.merged_module(layer.dense_weight()))
    return model


@pytest.mark.parametrize("name,method", ARCH_PEFT_CASES)
def test_peft_loads_every_architectures_adapter_equal(name, method, tmp_path):
    from architectures import batch, build, outputs
    from lorakit.quant import quantize
    from test_architectures import adapted, train_step

    inputs = batch(name)
    ours = adapted(name, method)
    train_step(ours, inputs)
    perturb_trainable(ours)  # every tensor of the file well away from its start
    lorakit.save(ours, tmp_path)
    base = build(name)
    if method == "qlora":
        base = dequantized(quantize(base, method="nf4"))
    expected = outputs(ours, inputs)
    assert (outputs(base, inputs) - expected).abs().max() > 1e-4  # the adapter changes 10x the tolerance below, or more
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(outputs(theirs, inputs), expected, atol=1e-5, rtol=1e-4)
