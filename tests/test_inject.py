"""The shared machinery for named adapters: add, activate, compose, route per sample, merge, remove,
reconfigure. Method-specific math is tested in each method's own module; here every method is one
entry of the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import perturb_trainable, tiny_llama
from test_contract import METHOD_NAMES, make_config

INPUT = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))


def two_adapters(first: str = "lora", second: str = "dora"):
    """A tiny Llama with adapter "a" (method `first`) and "b" (method `second`), both perturbed."""
    model = tiny_llama()
    lorakit.adapt(model, make_config(first, "llama"), name="a")
    perturb_trainable(model, seed=1)
    lorakit.adapt(model, make_config(second, "llama"), name="b")
    perturb_trainable(model, seed=2)
    return model


def logits_with(model, names):
    lorakit.set_active(model, names)
    return model(INPUT).logits


def test_adding_a_second_adapter_activates_it_and_freezes_the_first():
    model = two_adapters()
    assert lorakit.inject.adapter_names(model) == ["a", "b"] and lorakit.inject.active_adapters(model) == ("b",)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)
    layer = model.model.layers[0].self_attn.v_proj
    assert set(layer.adapters) == {"a", "b"}
    lorakit.set_active(model, ["a", "b"])
    with pytest.raises(AttributeError, match="use layer.adapters"):
        layer.adapter


@pytest.mark.parametrize("second", METHOD_NAMES)
def test_active_adapters_add_their_changes(second):
    """On each adapted layer, two active adapters give base + change_a + change_b, each change
    measured alone (DoRA's too: it adds its own W'x - W0x)."""
    model = two_adapters("lora", second)
    for name, layer in lorakit.inject.adapted_layers(model):
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
        with lorakit.disabled(model):
            base = layer(x)
        lorakit.set_active(model, "a")
        only_a = layer(x)
        lorakit.set_active(model, "b")
        only_b = layer(x)
        lorakit.set_active(model, ["a", "b"])
        torch.testing.assert_close(layer(x), only_a + only_b - base, atol=1e-5, rtol=1e-5, msg=name)
    with lorakit.disabled(model):
        base_logits = model(INPUT).logits
    assert not torch.allclose(logits_with(model, ["a", "b"]), base_logits, atol=1e-4)


@pytest.mark.parametrize("second", METHOD_NAMES)
def test_mixed_batch_equals_each_adapter_alone(second):
    model = two_adapters("lora", second)
    expected = [logits_with(model, ["a"])[0], logits_with(model, ["b"])[1]]
    with lorakit.disabled(model):
        expected.append(model(INPUT).logits[2])
    lorakit.set_active(model, ["a", "b"])  # the per-sample choice overrides the active set
    mixed = model(INPUT, adapter_names=["a", "b", "__base__"]).logits
    for row, want in enumerate(expected):
        torch.testing.assert_close(mixed[row], want, atol=1e-5, rtol=1e-5)
    # and the routing does not outlive the call
    torch.testing.assert_close(model(INPUT).logits, logits_with(model, ["a", "b"]))


def test_mixed_batch_generation_equals_each_adapter_alone():
    model = two_adapters("lora", "lora")
    prompts = INPUT[:, :4]
    alone = []
    for row, name in enumerate(["a", "b", "__base__"]):
        if name == "__base__":
            with lorakit.disabled(model):
                alone.append(
                    model.generate(prompts[row : row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)[0]
                )
        else:
            lorakit.set_active(model, name)
            alone.append(model.generate(prompts[row : row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)[0])
    with lorakit.inject.per_sample_adapters(model, ["a", "b", "__base__"]):
        together = model.generate(prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row in range(3):
        assert torch.equal(together[row], alone[row])


def test_mixed_batch_errors():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]"):
        model(INPUT, adapter_names=["a", "c", "b"])
    with pytest.raises(ValueError, match="2 names for a batch of 3"):
        model(INPUT, adapter_names=["a", "b"])
    lorakit.merge(model)
    with pytest.raises(ValueError, match="unmerged adapters"):
        model(INPUT, adapter_names=["a", "b", "a"])


@pytest.mark.parametrize("first,second", [("lora", "vera"), ("dora", "lora-fa"), ("vera", "dora")])
def test_merging_several_adapters_equals_running_them(first, second):
    model = two_adapters(first, second)
    expected = logits_with(model, ["a", "b"])
    lorakit.merge(model)
    torch.testing.assert_close(model(INPUT).logits, expected, atol=1e-4, rtol=1e-4)
    if first == "dora":  # DoRA's change depends on W0: it cannot run over a base holding b
        with pytest.raises(ValueError, match="'a' \\(DoRA\\) would run unmerged"):
            lorakit.unmerge(model, "a")
    else:
        lorakit.unmerge(model, "a")  # b stays merged, a runs unmerged
    torch.testing.assert_close(model(INPUT).logits, expected, atol=1e-4, rtol=1e-4)
    lorakit.unmerge(model)
    torch.testing.assert_close(model(INPUT).logits, expected, atol=1e-4, rtol=1e-4)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, lorakit.inject.AdaptedLayer) for m in plain.modules())
    assert lorakit.inject.lorakit_state(plain) is None
    torch.testing.assert_close(plain(INPUT).logits, expected, atol=1e-4, rtol=1e-4)


def test_two_dora_adapters_cannot_share_a_merged_weight():
    model = two_adapters("dora", "dora")
    lorakit.set_active(model, ["a", "b"])
    with pytest.raises(ValueError, match="cannot merge adapters"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match="'b' \\(DoRA\\) would run unmerged"):
        lorakit.merge(model, "a")  # b would run over a base that holds a
    expected = logits_with(model, ["a"])
    lorakit.merge(model, "a")  # with b inactive, a merges alone
    torch.testing.assert_close(model(INPUT).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'b' \\(DoRA\\) would run unmerged"):
        lorakit.set_active(model, ["a", "b"])
    assert lorakit.inject.active_adapters(model) == ("a",)  # the refused call changed nothing


def test_merge_and_unload_of_one_adapter_drops_the_others():
    model = two_adapters("lora", "lora")
    expected = logits_with(model, ["a"])
    plain = lorakit.merge_and_unload(model, "a")
    torch.testing.assert_close(plain(INPUT).logits, expected, atol=1e-4, rtol=1e-4)
    assert not lorakit.inject.adapter_names(plain)


def test_remove_returns_plain_modules_and_keeps_the_rest():
    model = two_adapters("lora", "lora")
    only_b = logits_with(model, ["b"])
    lorakit.set_active(model, ["a", "b"])
    lorakit.remove(model, "a")
    assert lorakit.inject.adapter_names(model) == ["b"] and lorakit.inject.active_adapters(model) == ("b",)
    torch.testing.assert_close(model(INPUT).logits, only_b)
    base = tiny_llama()(INPUT).logits
    lorakit.remove(model, "b")
    assert not any(isinstance(m, lorakit.inject.AdaptedLayer) for m in model.modules())
    assert lorakit.inject.lorakit_state(model) is None
    torch.testing.assert_close(model(INPUT).logits, base)
    # the model accepts a new adapter afterwards, and no stale forward hook is left
    lorakit.adapt(model, lorakit.LoRA(r=2, targets=["q_proj"]))
    torch.testing.assert_close(model(INPUT).logits, base)


def test_remove_of_a_merged_adapter_unmerges_it():
    model = two_adapters("lora", "lora")
    only_b = logits_with(model, ["b"])
    lorakit.set_active(model, ["a", "b"])
    lorakit.merge(model)
    lorakit.remove(model, "a")
    torch.testing.assert_close(model(INPUT).logits, only_b, atol=1e-5, rtol=1e-5)


def test_names_are_checked():
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoRA(targets=["q_proj"]), name="a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        lorakit.adapt(model, lorakit.LoRA(targets=["q_proj"]), name="a")
    for bad in ("__base__", "a.b", "", "1x", 3):
        with pytest.raises(ValueError, match="adapter name"):
            lorakit.adapt(model, lorakit.LoRA(targets=["q_proj"]), name=bad)
    with pytest.raises(ValueError, match=r"no adapter named \['z'\]"):
        lorakit.set_active(model, ["z"])
    with pytest.raises(ValueError, match="repeat"):
        lorakit.set_active(model, ["a", "a"])
    with pytest.raises(ValueError, match="expected an adapter name or a list of names, got 3"):
        lorakit.set_active(model, 3)
    with pytest.raises(ValueError, match="must be strings"):
        lorakit.set_active(model, ["a", None])
    with pytest.raises(ValueError, match="one name per sample"):
        model(INPUT, adapter_names="a")
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        lorakit.remove(model, "z")
    lorakit.adapt(model, lorakit.LoRA(targets=["v_proj"]), name="b")
    lorakit.set_active(model, ["a", "b"])
    with pytest.raises(ValueError, match="name the one you mean"):
        lorakit.inject.adapter_config(model)
    assert lorakit.inject.adapter_config(model, "b").targets == ["v_proj"]


def test_no_adapter_errors_are_clear():
    with pytest.raises(ValueError, match="model has no lorakit adapter"):
        lorakit.set_active(tiny_llama(), "default")
    with pytest.raises(ValueError, match="model has no lorakit adapter"):
        lorakit.save(tiny_llama(), "/nonexistent")


def test_one_adapter_step_has_no_extra_work():
    """A single active adapter's layer runs the base once and that adapter once, nothing else."""
    model = lorakit.adapt(nn.Sequential(nn.Linear(8, 8)), lorakit.LoRA(r=2, targets=["0"]))
    calls = []
    model[0].base_layer.register_forward_hook(lambda *a: calls.append("base"))
    model[0].adapters["default"].register_forward_hook(lambda *a: calls.append("adapter"))
    model(torch.randn(2, 8))
    assert calls == ["base", "adapter"]


# --- per-module settings (rank_pattern / alpha_pattern) --------------------------------------------


@pytest.mark.parametrize("method", ["lora", "lora-fa", "dora", "delta-lora"])
def test_rank_and_alpha_patterns_resolve_per_module(method):
    config = lorakit.methods.METHODS[method](
        r=4,
        alpha=8.0,
        targets="all-linear",
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6},
        alpha_pattern={"v_proj": 3.0},
    )
    model = lorakit.adapt(tiny_llama(), config)
    ranks = {name: layer.adapter.r for name, layer in lorakit.inject.adapted_layers(model)}
    scales = {name: layer.adapter.scale for name, layer in lorakit.inject.adapted_layers(model)}
    assert ranks["model.layers.0.self_attn.q_proj"] == ranks["model.layers.1.self_attn.q_proj"] == 2
    assert ranks["model.layers.1.mlp.up_proj"] == ranks["model.layers.1.mlp.down_proj"] == 6
    assert ranks["model.layers.0.mlp.up_proj"] == 4 and scales["model.layers.0.mlp.up_proj"] == 2.0
    assert scales["model.layers.0.self_attn.v_proj"] == 3.0 / 4 and scales["model.layers.0.self_attn.q_proj"] == 8.0 / 2


def test_bad_patterns_are_clear_errors():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] must be an integer from 1 to 65536"):
        lorakit.LoRA(rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="rank_pattern must be a mapping"):
        lorakit.LoRA(rank_pattern=["q_proj"])
    with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\] must be a number"):
        lorakit.LoRA(alpha_pattern={"q_proj": "high"})
    with pytest.raises(Exception, match="unterminated|missing"):
        lorakit.LoRA(rank_pattern={"q_proj[": 2})
    for bad in (0, -1, 10**6):
        with pytest.raises(ValueError, match="integer from 1 to 65536"):
            lorakit.LoRA(r=bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(ValueError, match="LoRA.r must be an integer"):
            lorakit.LoRA(r=bad)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        lorakit.DoRA(dropout=1.0)
    with pytest.raises(ValueError, match="VeRA rank r must be an integer from 1 to 65536"):
        lorakit.VeRA(r=0)


# --- the declared channel for what training decides ------------------------------------------------


def test_reconfigure_rebuilds_only_changed_modules_and_saves_the_layout(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    before = {n: layer.adapter for n, layer in lorakit.inject.adapted_layers(model)}
    rebuilt = lorakit.inject.reconfigure(model, "default", rank_pattern={r"layers\.0\.self_attn\.q_proj": 2})
    assert rebuilt == ["model.layers.0.self_attn.q_proj"]
    after = {n: layer.adapter for n, layer in lorakit.inject.adapted_layers(model)}
    assert after[rebuilt[0]].r == 2 and after[rebuilt[0]].lora_A.requires_grad
    assert all(after[n] is before[n] for n in after if n not in rebuilt)
    assert lorakit.inject.lorakit_state(model).layout_version == 1
    perturb_trainable(model)
    expected = model(INPUT).logits
    lorakit.save(model, tmp_path)
    loaded = lorakit.load(tiny_llama(), tmp_path)
    assert lorakit.inject.adapter_config(loaded).rank_pattern == {r"layers\.0\.self_attn\.q_proj": 2}
    torch.testing.assert_close(loaded(INPUT).logits, expected)
    with pytest.raises(ValueError, match="not layout fields"):
        lorakit.inject.reconfigure(model, "default", r=3)


# --- hot-swap ---------------------------------------------------------------------------------------


def test_hotswap_replaces_weights_in_place_without_recompiling(tmp_path):
    import torch._dynamo

    task_a = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    perturb_trainable(task_a, seed=1)
    lorakit.save(task_a, tmp_path / "a")
    task_b = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    perturb_trainable(task_b, seed=2)
    lorakit.save(task_b, tmp_path / "b")
    expected_a, expected_b = task_a(INPUT).logits, task_b(INPUT).logits

    serving = lorakit.load(tiny_llama(), tmp_path / "a")
    tensors = [p for _, layer in lorakit.inject.adapted_layers(serving) for p in layer.adapter.parameters()]
    torch._dynamo.reset()
    frames = []
    compiled = torch.compile(serving, backend=lambda gm, inputs: frames.append(gm) or gm.forward)
    with torch.no_grad():
        torch.testing.assert_close(compiled(INPUT).logits, expected_a, atol=1e-5, rtol=1e-5)
        compiled_once = len(frames)
        lorakit.io.hotswap(serving, tmp_path / "b")
        torch.testing.assert_close(compiled(INPUT).logits, expected_b, atol=1e-5, rtol=1e-5)
    assert len(frames) == compiled_once, "the swap made torch.compile compile again"
    assert [p for _, layer in lorakit.inject.adapted_layers(serving) for p in layer.adapter.parameters()] == tensors


def test_hotswap_refuses_a_different_layout(tmp_path):
    other = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=2, targets=["q_proj", "v_proj"]))
    lorakit.save(other, tmp_path / "r2")
    other_modules = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj"]))
    lorakit.save(other_modules, tmp_path / "q_only")
    other_alpha = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, alpha=4.0, targets=["q_proj", "v_proj"]))
    lorakit.save(other_alpha, tmp_path / "alpha")
    serving = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"cannot hot-swap .*'r': 2.* vs the model's .*'r': 4"):
        lorakit.io.hotswap(serving, tmp_path / "r2")
    with pytest.raises(ValueError, match="adapted modules differ"):
        lorakit.io.hotswap(serving, tmp_path / "q_only")
    with pytest.raises(ValueError, match="alpha"):
        lorakit.io.hotswap(serving, tmp_path / "alpha")
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        lorakit.io.hotswap(serving, tmp_path / "r2", name="x")


def test_mixed_batch_refuses_a_layer_that_does_not_see_the_batch_dimension():
    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x.reshape(-1, 4)).reshape(x.shape)

    model = Flattening()
    lorakit.adapt(model, lorakit.LoRA(r=2, targets=["proj"]), name="a")
    with pytest.raises(ValueError, match="6 rows in dim 0 for 2 samples"):
        model(torch.randn(2, 3, 4), adapter_names=["a", "__base__"])


def test_disabled_blocks_nest():
    model = two_adapters("lora", "lora")
    base = tiny_llama()(INPUT).logits
    with lorakit.disabled(model):
        with lorakit.disabled(model):
            pass
        torch.testing.assert_close(model(INPUT).logits, base)  # still the base after the inner block
    assert not torch.allclose(model(INPUT).logits, base, atol=1e-4)


def test_merging_into_a_4bit_base_is_refused_and_merge_and_unload_is_exact():
    from lorakit.quant import quantize

    model = lorakit.adapt(quantize(tiny_llama()), lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    perturb_trainable(model)
    expected = model(INPUT).logits
    with lorakit.disabled(model):
        base = model(INPUT).logits
    with pytest.raises(ValueError, match="cannot merge into a 4-bit base.*merge_and_unload"):
        lorakit.merge(model)
    with lorakit.disabled(model):
        torch.testing.assert_close(model(INPUT).logits, base, rtol=0, atol=0)  # nothing moved
    torch.testing.assert_close(lorakit.merge_and_unload(model)(INPUT).logits, expected, atol=1e-4, rtol=1e-4)


def test_merging_into_a_tied_output_head_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            tie_word_embeddings=True,
        )
    )
    lorakit.adapt(model, lorakit.LoRA(r=2, targets=["lm_head", "q_proj"]))
    perturb_trainable(model)
    expected = model(INPUT).logits
    embedding = model.model.embed_tokens.weight.detach().clone()
    for merge in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(
            ValueError, match="cannot merge into lm_head: its weight is tied to model.embed_tokens.weight"
        ):
            merge(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    torch.testing.assert_close(model(INPUT).logits, expected)


def test_a_deep_copy_routes_its_own_mixed_batches():
    import copy

    model = two_adapters("lora", "lora")
    twin = copy.deepcopy(model)
    expected = model(INPUT, adapter_names=["a", "b", "__base__"]).logits
    torch.testing.assert_close(twin(INPUT, adapter_names=["a", "b", "__base__"]).logits, expected)
    lorakit.remove(twin, "a")
    lorakit.remove(twin, "b")
    assert not twin._forward_pre_hooks and not twin._forward_hooks  # the copy's hooks went with its adapters
    torch.testing.assert_close(
        model(INPUT, adapter_names=["a", "b", "__base__"]).logits, expected
    )  # the original's stay


def test_a_whole_adapted_model_pickles_with_its_routing(tmp_path):
    """torch.save(model) of an adapted model (the routing hooks included) loads back and routes
    mixed batches as the original does, and removing its adapters removes its hooks."""
    model = two_adapters("lora", "lora")
    expected = model(INPUT, adapter_names=["a", "b", "__base__"]).logits
    torch.save(model, tmp_path / "model.pt")
    twin = torch.load(tmp_path / "model.pt", weights_only=False)  # our own file, written just above
    torch.testing.assert_close(twin(INPUT, adapter_names=["a", "b", "__base__"]).logits, expected)
    torch.testing.assert_close(twin(INPUT).logits, model(INPUT).logits)
    lorakit.remove(twin, "a")
    lorakit.remove(twin, "b")
    assert not twin._forward_pre_hooks and not twin._forward_hooks


def test_merge_and_unload_checks_every_layer_before_changing_any():
    """A later layer that cannot merge (two DoRA adapters on it) leaves every layer as it was."""
    model = tiny_llama()
    lorakit.adapt(model, lorakit.DoRA(r=4, targets=["q_proj", "v_proj"]), name="a")
    perturb_trainable(model, seed=1)
    lorakit.adapt(model, lorakit.DoRA(r=4, targets=["model.layers.1.self_attn.v_proj"]), name="b")
    perturb_trainable(model, seed=2)
    lorakit.set_active(model, ["a", "b"])
    expected = model(INPUT).logits
    layers = dict(lorakit.inject.adapted_layers(model))
    with pytest.raises(ValueError, match="cannot merge adapters"):
        lorakit.merge_and_unload(model)
    assert dict(lorakit.inject.adapted_layers(model)) == layers  # no layer replaced by its base
    assert all(layer.active == ("a", "b") and not layer.merged for layer in layers.values())
    assert lorakit.inject.adapter_names(model) == ["a", "b"] and lorakit.inject.active_adapters(model) == ("a", "b")
    torch.testing.assert_close(model(INPUT).logits, expected)
    plain = lorakit.merge_and_unload(model, "a")  # one of them merges
    assert not any(isinstance(m, lorakit.inject.AdaptedLayer) for m in plain.modules())


def test_hasattr_adapter_is_false_on_an_ambiguous_layer():
    model = two_adapters("lora", "lora")
    lorakit.set_active(model, ["a", "b"])
    layer = model.model.layers[0].self_attn.q_proj
    assert not hasattr(layer, "adapter")
    with pytest.raises(AttributeError, match=r"holds adapters \['a', 'b'\].*layer.adapters\[name\]"):
        layer.adapter
    lorakit.set_active(model, ["b"])
    assert layer.adapter is layer.adapters["b"]
