"""One contract, every method: the properties any lorakit adapter must have.

Parametrized over the method registry, so a new method is covered the moment it registers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_gpt2, tiny_llama
from lorakit.errors import LorakitError

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_config(method: str, arch: str) -> lorakit.methods.AdapterConfig:
    cls = lorakit.methods.METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"targets": TARGETS[arch]}
    if "r" in fields:
        kwargs["r"] = 16 if method == "vera" else 4
    if "start_step" in fields:
        kwargs["start_step"] = 0
    if "init_r" in fields:  # AdaLoRA: a small budget that the allocator prunes from the first step
        kwargs.update(init_r=4, target_r=2, total_step=10)
    return cls(**kwargs)


def one_step(model, input_ids, lr=1e-2):
    hooks = lorakit.training_hooks(model)
    params = [p for _, p in lorakit.adapter_parameters(model)]
    opt = torch.optim.SGD(params, lr=lr)
    loss = model(input_ids, labels=input_ids).loss + hooks.extra_loss(model)
    loss.backward()
    opt.step()
    hooks.after_optimizer_step(model, 1)
    opt.zero_grad()


METHOD_NAMES = sorted(lorakit.methods.METHODS)
CASES = [(m, a) for m in METHOD_NAMES for a in ("llama", "gpt2")]


@pytest.mark.parametrize("method,arch", CASES)
def test_fresh_adapter_equals_base(method, arch, input_ids):
    model = MAKERS[arch]()
    base = model(input_ids).logits
    lorakit.adapt(model, make_config(method, arch))
    torch.testing.assert_close(model(input_ids).logits, base, atol=1e-5, rtol=1e-5)
    layers = list(lorakit.inject.adapted_layers(model))
    assert layers and all(isinstance(layer.adapter, lorakit.methods.Adapter) for _, layer in layers)


@pytest.mark.parametrize("method,arch", CASES)
def test_merged_equals_unmerged_equals_unloaded(method, arch, input_ids):
    """Merging changes no output (twice is once; disabling a merged adapter gives the base), unmerging
    restores the base weights, and merge_and_unload leaves the model's own module types."""
    model = MAKERS[arch]()
    base = model(input_ids).logits
    config = make_config(method, arch)
    module_types = {name: type(module) for name, module in model.named_modules()}
    lorakit.adapt(model, config)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    assert base_weights
    perturb_trainable(model)
    adapted = model(input_ids).logits
    with lorakit.disabled(model):
        torch.testing.assert_close(model(input_ids).logits, base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-4)
    lorakit.merge(model)
    assert all(layer.merged for _, layer in lorakit.inject.adapted_layers(model))
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)
    lorakit.merge(model)
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)
    with lorakit.disabled(model):
        torch.testing.assert_close(model(input_ids).logits, base, atol=1e-5, rtol=1e-5)
    for _, layer in lorakit.inject.adapted_layers(model):  # the change is still known while merged
        assert layer.delta_weight().shape == (layer.out_features, layer.in_features)
    lorakit.unmerge(model)
    for name, p in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(p, base_weights[name], atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)
    with lorakit.disabled(model):
        torch.testing.assert_close(model(input_ids).logits, base, atol=1e-5, rtol=1e-5)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, lorakit.inject.AdaptedLayer) for m in plain.modules())
    assert {name: type(module) for name, module in plain.named_modules()} == module_types
    torch.testing.assert_close(plain(input_ids).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,arch", CASES)
def test_only_adapter_state_changes_in_a_step(method, arch, input_ids):
    model = lorakit.adapt(MAKERS[arch](), make_config(method, arch))
    perturb_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in lorakit.adapter_parameters(model)}
    assert not any(".base_layer." in n for n in trainable)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    # buffers an adapter declares as training state (AdaLoRA's allocator mask) may change too
    trainable |= {
        f"{m}.adapters.{a}.{b}"
        for m, layer in lorakit.inject.adapted_layers(model)
        for a, adapter in layer.adapters.items()
        for b in getattr(adapter, "training_buffers", ())
    }
    one_step(model, input_ids)
    moves_base = getattr(lorakit.inject.adapter_config(model), "moves_base_weights", False)
    for name, tensor in model.state_dict().items():
        if name in trainable:
            continue
        if moves_base and ".base_layer.weight" in name:
            continue  # Delta-LoRA updates the adapted base weights by design
        assert torch.equal(tensor, before[name]), f"{method}: frozen tensor {name} changed"
    assert any(not torch.equal(model.state_dict()[n], before[n]) for n in trainable)
    if moves_base:  # what the method declares it does: each adapted layer's base weight moved
        after = model.state_dict()
        for name, _ in lorakit.inject.adapted_layers(model):
            key = f"{name}.base_layer.weight"
            assert not torch.equal(after[key], before[key]), f"{method}: {key} did not move"


@pytest.mark.parametrize("method,arch", CASES)
def test_save_load_round_trip(method, arch, input_ids, tmp_path):
    model = lorakit.adapt(MAKERS[arch](), make_config(method, arch))
    perturb_trainable(model)
    one_step(model, input_ids)
    expected = model(input_ids).logits
    lorakit.save(model, tmp_path)
    loaded = lorakit.load(MAKERS[arch](), tmp_path)
    assert type(lorakit.inject.adapter_config(loaded)) is type(lorakit.inject.adapter_config(model))
    torch.testing.assert_close(loaded(input_ids).logits, expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference unless asked
    resumed = lorakit.load(MAKERS[arch](), tmp_path, trainable=True)
    names = {n for n, _ in lorakit.adapter_parameters(model)}
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == names


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_compiles_whole_and_equals_eager(method, input_ids):
    """No graph break in forward or backward (the adapter layers keep the model one graph), and the
    compiled step computes what eager does. `aot_eager` traces exactly as inductor would."""
    model = lorakit.adapt(tiny_llama(), make_config(method, "llama"))
    perturb_trainable(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=input_ids, labels=input_ids, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    def loss_and_grads(forward):
        loss = forward(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lorakit.adapter_parameters(model)}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager_grads = loss_and_grads(model)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=lambda m: f"{method} {name}: {m}")


def takes_dropout(method: str) -> bool:
    """Whether the method's config accepts adapter dropout (Delta-LoRA's refuses any: its update is
    derived for a branch without it)."""
    if "dropout" not in {f.name for f in dataclasses.fields(lorakit.methods.METHODS[method])}:
        return False
    try:
        dataclasses.replace(make_config(method, "llama"), dropout=0.1)
    except (ValueError, LorakitError):
        return False
    return True


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if takes_dropout(m)])
def test_compiles_whole_in_training_with_dropout(method, input_ids):
    """Dropout's path (a training-mode forward) keeps the model one graph too."""
    model = lorakit.adapt(tiny_llama(), dataclasses.replace(make_config(method, "llama"), dropout=0.1)).train()
    perturb_trainable(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=input_ids, labels=input_ids, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bf16_base_keeps_fp32_master_weights(method, input_ids):
    """Over a bf16 base: adapter parameters stay fp32 (their gradients too), the model computes in
    bf16, and the result is the fp32 computation up to bf16 rounding."""
    reference = lorakit.adapt(tiny_llama(), make_config(method, "llama"))
    perturb_trainable(reference)
    model = lorakit.adapt(tiny_llama().to(torch.bfloat16), make_config(method, "llama"))
    with torch.no_grad():
        mine = dict(model.named_parameters())
        for name, p in reference.named_parameters():
            if p.requires_grad:
                mine[name].copy_(p)
    trainable = [p for _, p in lorakit.adapter_parameters(model)]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.float().sum().backward()
    assert embeds.grad.dtype == torch.bfloat16  # the gradient flowing on stays in the activations' dtype
    torch.testing.assert_close(out.logits.float(), reference(input_ids).logits, atol=0.15, rtol=0.05)
    # the config's `dtype` asks for adapter weights in another dtype
    bf16 = lorakit.adapt(tiny_llama(), dataclasses.replace(make_config(method, "llama"), dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for _, p in lorakit.adapter_parameters(bf16))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_hook_state_restores_training_exactly(method, input_ids, tmp_path):
    """What a resume restores (adapter file + hooks' state) continues training bit for bit."""
    model = lorakit.adapt(tiny_llama(), make_config(method, "llama"))
    perturb_trainable(model)
    one_step(model, input_ids)
    hooks = lorakit.training_hooks(model)
    lorakit.save(model, tmp_path)
    twin = lorakit.load(tiny_llama(), tmp_path, trainable=True)
    twin_hooks = lorakit.training_hooks(twin)
    twin_hooks.load_state_dict(hooks.state_dict())
    for m, h in ((model, hooks), (twin, twin_hooks)):
        params = [p for _, p in lorakit.adapter_parameters(m)]
        opt = torch.optim.SGD(params, lr=1e-2)
        (m(input_ids, labels=input_ids).loss + h.extra_loss(m)).backward()
        opt.step()
        h.after_optimizer_step(m, 2)
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(twin.state_dict().items())):
        assert torch.equal(a, b), f"{method}: {name}"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_loraplus_groups_cover_every_trainable_parameter_once(method):
    model = lorakit.adapt(tiny_llama(), make_config(method, "llama"))
    groups = lorakit.param_groups(model, lr=1e-3, loraplus_ratio=8.0)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for _, p in lorakit.adapter_parameters(model)]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    fast = [g for g in groups if g["name"].startswith("B")]
    assert fast and all(g["lr"] == pytest.approx(8e-3) for g in fast)
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups if g["name"].startswith("A"))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_low_rank_factors_are_the_whole_change_or_absent(method, input_ids):
    """What a plain LoRA file (GGUF export) holds: `up @ down` is exactly the adapter's change, scales
    folded in; a method whose change depends on W0 (DoRA) gives None and is exported merged."""
    model = lorakit.adapt(tiny_llama(), make_config(method, "llama"))
    perturb_trainable(model)
    one_step(model, input_ids)  # AdaLoRA prunes triplets in its first step: factors follow the mask
    layers = list(lorakit.inject.adapted_layers(model))
    assert layers
    for _, layer in layers:
        adapter = layer.adapter
        factors = adapter.low_rank_factors() if getattr(adapter, "additive", False) else None
        if not getattr(adapter, "additive", False):
            assert lorakit.methods.METHODS[method] is lorakit.methods.METHODS["dora"]
            continue
        assert factors is not None, f"{method} is additive but gives no low-rank factors"
        down, up = factors
        assert down.shape[1] == layer.in_features and up.shape[0] == layer.out_features and up.shape[1] == down.shape[0]
        expected = layer.delta_weight()
        assert expected.abs().max() > 0
        torch.testing.assert_close(up @ down, expected, atol=1e-6, rtol=1e-5)


def dropout_config(method: str, p: float) -> lorakit.methods.AdapterConfig | None:
    """The contract's config with input dropout `p`, or None for a method without one (Delta-LoRA refuses it)."""
    config = make_config(method, "llama")
    if "dropout" not in {f.name for f in dataclasses.fields(config)}:
        return None
    try:
        return dataclasses.replace(config, dropout=p)
    except ValueError:
        return None


DROPOUT_METHODS = [m for m in METHOD_NAMES if dropout_config(m, 0.3) is not None]


def saved_activation_bytes(model, input_ids) -> int:
    """Bytes autograd keeps for backward in one forward: distinct storages, parameters and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids, labels=input_ids).loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("method", DROPOUT_METHODS)
def test_dropout_keeps_no_more_activations_than_none(method, input_ids):
    """A training step with dropout keeps no more for backward than one without: no dropped-out
    copy, no mask (it is drawn again from its seed in backward)."""
    sizes = []
    for p in (0.0, 0.3):
        model = lorakit.adapt(tiny_llama(), dropout_config(method, p)).train()
        perturb_trainable(model)
        sizes.append(saved_activation_bytes(model, input_ids))
    assert sizes[1] <= sizes[0], f"{method}: {sizes[1]} bytes saved with dropout, {sizes[0]} without"


@pytest.mark.parametrize("method", DROPOUT_METHODS)
def test_dropout_gradients_are_those_of_the_same_mask(method, input_ids, monkeypatch):
    """With dropout, loss and gradients equal a reference that applies the same masks as plain
    autograd ops (`x * m / (1 - p)`, every layer unfused): the mask backward draws again is the
    mask forward used. A new step draws new masks."""
    from lorakit.kernels.dropout import AdapterDropout, DropoutDraw, draw_seed

    model = lorakit.adapt(tiny_llama(), dropout_config(method, 0.3)).train()
    perturb_trainable(model)

    def loss_and_grads():
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lorakit.adapter_parameters(model)}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    torch.manual_seed(5)
    loss, grads = loss_and_grads()
    other_step, _ = loss_and_grads()
    assert other_step != loss  # new masks
    monkeypatch.setattr(AdapterDropout, "draw", lambda self: None)
    monkeypatch.setattr(
        AdapterDropout, "forward", lambda self, x: x * DropoutDraw(self.p, draw_seed()).factor(x) if self.active else x
    )
    for _, layer in lorakit.inject.adapted_layers(model):
        for adapter in layer.adapters.values():
            if hasattr(adapter, "fused_forward"):
                monkeypatch.setattr(adapter, "fused_forward", lambda x, base_layer: None)
    torch.manual_seed(5)
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=lambda m: f"{method} {name}: {m}")


@pytest.mark.parametrize("method", DROPOUT_METHODS)
def test_compiles_whole_with_dropout(method, input_ids):
    """Training with dropout under torch.compile: no graph break (dropout runs as the compiler's own)."""
    model = lorakit.adapt(tiny_llama(), dropout_config(method, 0.3)).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=input_ids, labels=input_ids, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons


PEFT_TYPED = sorted(m for m, cls in lorakit.methods.METHODS.items() if cls.peft_type is not None)


@pytest.mark.parametrize("method", PEFT_TYPED)
def test_from_peft_takes_values_as_written_and_refuses_wrong_types(method):
    """A PEFT adapter_config.json is user input: every setting the method reads from it is taken as
    written, and a string where a number or a flag belongs ("8", "False") is refused, not coerced."""
    cls = lorakit.methods.METHODS[method]
    body = make_config(method, "llama").to_peft(["model.layers.0.self_attn.q_proj"])
    base = cls.from_peft(body)
    read = []
    for key, value in body.items():
        if isinstance(value, bool):
            other = not value
        elif isinstance(value, (int, float)):
            other = value + 1
        else:
            continue
        try:
            changed = cls.from_peft({**body, key: other}) != base
        except ValueError:  # out of range: read and checked
            changed = True
        if changed:
            read.append(key)
    assert read
    for key in read:
        try:
            cls.from_peft({**body, key: str(body[key])})
        except ValueError:
            continue
        pytest.fail(f"{method}: the PEFT setting {key}={str(body[key])!r} (a string) was accepted")


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_change_parts_and_rank_components_rebuild_the_change(method, input_ids):
    """What `lorakit explain` reads of every adapter: `change_parts` add up to the change its forward
    makes, and `rank_components` (unit input directions, strongest first) rebuild the part they name."""
    from lorakit.methods.base import change_parts, rank_components

    model = lorakit.adapt(tiny_llama(), make_config(method, "llama"))
    perturb_trainable(model)
    one_step(model, input_ids)
    layers = list(lorakit.inject.adapted_layers(model))
    assert layers
    for _, layer in layers:
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
        adapter, base = layer.adapter, layer.base_layer
        base_out = base(x)
        with torch.no_grad():
            parts = change_parts(adapter, x, base_out, base)
            whole = adapter(x, base_out, base_out, base) - base_out
        assert parts and all(p.shape == base_out.shape for p in parts.values())
        torch.testing.assert_close(sum(parts.values()), whole, atol=1e-5, rtol=1e-4)
        assert whole.abs().max() > 0
        components = rank_components(adapter, base)
        assert components is not None, f"{method} gives no rank components"
        assert components.part in parts and len(components.labels) == components.down.shape[0] > 0
        torch.testing.assert_close(components.down.norm(dim=1), torch.ones(len(components.labels)), atol=1e-5, rtol=0)
        strengths = components.strengths
        assert torch.all(strengths[:-1] >= strengths[1:] - 1e-7)
        rebuilt = x @ components.down.T @ components.up.T
        torch.testing.assert_close(rebuilt, parts[components.part], atol=1e-5, rtol=1e-4)
