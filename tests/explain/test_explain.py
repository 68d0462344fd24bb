"""`lorakit explain`: what an adapter does to one input, against naive computations on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_llama
from lorakit import analysis, inject
from lorakit.explain import explain, page, summary
from lorakit.explain.attribution import ABSOLUTE_TOLERANCE, tolerance
from lorakit.targets import layer_index

TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPT = "Reverse: fox dog"


class CharTokenizer:
    """Printable characters as tokens (ids 4..98), bos 1, separator 2, eos 3: enough of a tokenizer for explain."""

    eos_token_id = 3

    def encode_text(self, text: str) -> list[int]:
        return [ord(c) - 28 if 32 <= ord(c) <= 126 else ord("?") - 28 for c in text]

    def __call__(self, text, text_pair=None, add_special_tokens=True, truncation=False, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + self.encode_text(text)
        if text_pair is not None:
            ids += [2] + self.encode_text(text_pair)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        names = {1: "<s>", 2: "<sep>", 3: "</s>"}
        return "".join("" if i in names and skip_special_tokens else names.get(i, chr(i + 28)) for i in ids)


TOKENIZER = CharTokenizer()


def config(method: str, targets=TARGETS) -> lorakit.methods.AdapterConfig:
    kwargs = {"targets": targets}
    if method == "vera":
        kwargs["r"] = 16
    elif method == "adalora":
        kwargs.update(init_r=4, target_r=2)
    else:
        kwargs["r"] = 4
    return lorakit.methods.METHODS[method](**kwargs)


def adapted(method: str, seed: int = 1, std: float = 0.2, targets=TARGETS):
    """A tiny Llama with a perturbed adapter (Delta-LoRA: its base weights moved too) and the base
    weights from before (what `explain` compares against)."""
    model = tiny_llama(seed=seed)
    names = [n for n, _ in model.named_modules() if n.endswith(tuple(targets))]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, config(method, targets))
    perturb_trainable(model, seed=seed + 1, std=std)
    if method == "delta-lora":
        with torch.no_grad():
            for _, layer in inject.adapted_layers(model):
                layer.base_layer.weight.add_(
                    0.02 * torch.randn(layer.base_layer.weight.shape, generator=torch.Generator().manual_seed(5))
                )
    return model.eval(), original


def module_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Each adapted module's input in the adapted model's own forward pass (first batch row)."""
    seen = {}
    handles = [
        layer.register_forward_pre_hook(lambda _, inputs, name=name: seen.__setitem__(name, inputs[0][0].detach()))
        for name, layer in inject.adapted_layers(model)
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return seen


def relative(change: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return change.double().norm(dim=-1) / base.double().norm(dim=-1)


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "delta-lora", "adalora"])
def test_module_sizes_by_hand(method):
    model, original = adapted(method)
    found = explain(model, TOKENIZER, PROMPT, completion=" god", original=original)
    assert found.tokens == ["<s>", *PROMPT, " ", "g", "o", "d"] and found.prompt_length == len(PROMPT) + 1
    inputs = module_inputs(model, found.token_ids)
    layers = dict(inject.adapted_layers(model))
    assert [m.module for m in found.modules] == list(layers)
    for m in found.modules:
        layer, x = layers[m.module], inputs[m.module]
        adapter = layer.adapter
        w0 = original[m.module]
        base = x @ w0.T
        if method in ("lora", "delta-lora"):
            parts = {"update": x @ (adapter.scale * adapter.lora_B @ adapter.lora_A).T}
            if method == "delta-lora":
                parts["moved base"] = x @ (layer.base_layer.weight - w0).T
        elif method == "adalora":
            parts = {"update": x @ (adapter.scale * adapter.lora_B @ (adapter.lora_A * adapter.lora_E)).T}
        elif method == "vera":
            b, d = adapter.vera_lambda_b, adapter.vera_lambda_d
            vera_A = adapter.projections.vera_A[:, : layer.in_features]
            vera_B = adapter.projections.vera_B[: layer.out_features]
            parts = {"update": x @ (b[:, None] * vera_B @ torch.diag(d) @ vera_A).T}
        else:  # DoRA, densely: W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_row
            direction = w0 + adapter.scale * adapter.lora.lora_B @ adapter.lora.lora_A
            ratio = adapter.magnitude / direction.norm(dim=1)
            parts = {
                "magnitude": (ratio - 1) * base,
                "direction": ratio * (x @ (adapter.scale * adapter.lora.lora_B @ adapter.lora.lora_A).T),
            }
            torch.testing.assert_close(
                sum(parts.values()), x @ (ratio[:, None] * direction - w0).T, atol=1e-5, rtol=1e-4
            )
        with torch.no_grad():
            expected = {part: relative(value, base) for part, value in parts.items()}
            total = relative(sum(parts.values()), base)
        assert list(m.parts) == list(expected)
        for part, value in expected.items():
            assert m.parts[part] == pytest.approx(value.tolist(), rel=1e-4, abs=1e-7), (m.module, part)
        assert m.size == pytest.approx(total.tolist(), rel=1e-4, abs=1e-7), m.module


def naive_integrated_gradients(model, ids, completion_start, steps=24, h=1e-3) -> torch.Tensor:
    """IG of each completion token's log p over a scale on each LoRA module's B, the slow way: the
    midpoint rule over the path, each partial derivative a central difference of the model itself."""
    layers = [layer for _, layer in inject.adapted_layers(model)]
    originals = [layer.adapter.lora_B.detach().clone() for layer in layers]
    targets = torch.tensor(ids[completion_start:])

    def logprobs(scales: list[float]) -> torch.Tensor:
        with torch.no_grad():
            for layer, b, scale in zip(layers, originals, scales):
                layer.adapter.lora_B.copy_(b * scale)
            logits = model(input_ids=torch.tensor([ids])).logits[0, completion_start - 1 : -1].double()
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    total = torch.zeros(len(targets), len(layers), dtype=torch.float64)
    for k in range(steps):
        t = (k + 0.5) / steps
        for m in range(len(layers)):
            up, down = [t] * len(layers), [t] * len(layers)
            up[m] += h
            down[m] -= h
            total[:, m] += (logprobs(up) - logprobs(down)) / (2 * h) / steps
    logprobs([1.0] * len(layers))  # the adapter as it was
    return total


def test_attribution_against_a_naive_integrated_gradients():
    model, _ = adapted("lora", targets=["q_proj", "down_proj"], std=0.3)
    model.double()
    found = explain(model, TOKENIZER, PROMPT, completion=" god")
    naive = naive_integrated_gradients(model, found.token_ids, found.prompt_length)
    computed = torch.tensor([o.attribution for o in found.outputs], dtype=torch.float64)
    assert computed.abs().max() > 0.1  # the test is not trivially passed by zeros
    # each side's quadrature is good to about 2e-4 here (8 Gauss-Legendre nodes; 24 midpoints)
    torch.testing.assert_close(computed, naive, atol=ABSOLUTE_TOLERANCE, rtol=0)


@pytest.mark.parametrize("method", sorted(lorakit.methods.METHODS))
def test_attributions_add_up_to_the_total_for_every_method(method):
    model, original = adapted(method, std=0.3)
    found = explain(model, TOKENIZER, PROMPT, max_new_tokens=4, original=original)
    assert found.completion_source == "generated" and 1 <= len(found.outputs) <= 4
    assert found.within_tolerance and not found.inert
    assert abs(found.total_effect) > 1e-3
    for o in found.outputs:
        assert abs(sum(o.attribution) - o.effect) == pytest.approx(o.completeness_error, abs=1e-9)
        assert o.completeness_error <= tolerance(o.effect)
    assert abs(sum(m.attribution for m in found.modules) - found.total_effect) <= found.tolerance
    with torch.no_grad():  # the adapted and base values are the model's own, with and without the adapter
        logits = model(input_ids=torch.tensor([found.token_ids])).logits[0].log_softmax(-1)
    adapted_values = [float(logits[o.position, o.token_id]) for o in found.outputs]
    assert [o.adapted_value for o in found.outputs] == pytest.approx(adapted_values, abs=1e-4)
    base = tiny_llama(seed=1)
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor([found.token_ids])).logits[0].log_softmax(-1)
    assert [o.base_value for o in found.outputs] == pytest.approx(
        [float(base_logits[o.position, o.token_id]) for o in found.outputs], abs=1e-4
    )


def test_an_adapter_that_changes_one_module_is_attributed_to_it():
    model = tiny_llama(seed=1)
    lorakit.adapt(model, config("lora"))
    only = "model.layers.1.self_attn.v_proj"
    with torch.no_grad():
        model.get_submodule(only).adapter.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    found = explain(model, TOKENIZER, PROMPT, completion=" god")
    assert abs(found.total_effect) > 1e-2
    for m in found.modules:
        if m.module == only:
            assert m.attribution == pytest.approx(found.total_effect, abs=found.tolerance)
            assert min(m.size) > 0
        else:
            assert m.attribution == 0.0 and max(m.size) == 0.0
    assert summary.summary_text(found).split("modules:  ")[1].startswith(f"{only} ")


def test_an_inert_adapter_is_reported_inert(tmp_path):
    model = lorakit.adapt(tiny_llama(seed=1), config("lora"))  # B = 0
    found = explain(model, TOKENIZER, PROMPT, max_new_tokens=3)
    assert found.inert and found.total_effect == 0.0 and found.ig_steps == 0  # nothing to integrate
    assert all(max(m.size) == 0 and m.attribution == 0 for m in found.modules)
    assert found.base_completion == found.completion.replace("</s>", "")
    text = summary.summary_text(found)
    assert "the adapter is inert on this input" in text and "which modules matter" not in text
    page.write_html([found], tmp_path / "x.html", "inert")
    assert "The adapter is inert on this input" in (tmp_path / "x.html").read_text()
    trained = lorakit.adapt(tiny_llama(seed=1), config("lora"))
    perturb_trainable(trained, seed=3)
    assert not explain(trained, TOKENIZER, PROMPT, max_new_tokens=3).inert


def test_rank_components_and_their_drive_by_hand():
    model, _ = adapted("lora")
    found = explain(model, TOKENIZER, PROMPT, completion=" god", components=4)
    inputs = module_inputs(model, found.token_ids)
    layers = dict(inject.adapted_layers(model))
    for m in found.modules:
        adapter, x = layers[m.module].adapter, inputs[m.module].double()
        delta = (adapter.scale * adapter.lora_B @ adapter.lora_A).detach().double()
        u, s, vh = torch.linalg.svd(delta)
        assert [c.label for c in m.components] == ["σ1", "σ2", "σ3", "σ4"]
        assert [c.strength for c in m.components] == pytest.approx(s[:4].tolist(), rel=1e-5)
        base_norm = (x @ layers[m.module].base_layer.weight.double().T).norm(dim=-1)
        for i, c in enumerate(m.components):
            assert c.drive == pytest.approx(((x @ vh[i]).abs() * s[i] / base_norm).tolist(), rel=1e-4, abs=1e-9)
        # the r components are orthogonal: together they are the whole update's size at every token
        together = torch.tensor([c.drive for c in m.components]).pow(2).sum(0).sqrt()
        assert together.tolist() == pytest.approx(m.size, rel=1e-4)
    # AdaLoRA: its own triplets, labelled as its rank pattern counts them
    ada, _ = adapted("adalora")
    components = explain(ada, TOKENIZER, PROMPT, completion=" g").modules[0].components
    assert sorted(c.label for c in components) == [f"triplet {i}" for i in range(4)]


@pytest.mark.parametrize("task", ["classify", "regress"])
def test_sequence_classifiers_and_regressors(task):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            num_labels=3 if task == "classify" else 1,
        )
    )
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["query", "value"], train_modules=["classifier"]))
    perturb_trainable(model, seed=2, std=0.5)
    model.eval()
    found = explain(model, TOKENIZER, "good film", text_pair="great", task=task, label_names=["neg", "neu", "pos"])
    assert found.tokens[0] == "<s>" and "<sep>" in found.tokens and len(found.outputs) == 1
    (output,) = found.outputs
    assert found.within_tolerance and abs(sum(output.attribution) - output.effect) <= tolerance(output.effect)
    encoded = TOKENIZER("good film", "great", return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0]
    if task == "classify":
        assert output.token == ["neg", "neu", "pos"][int(logits.argmax())] and len(output.adapted_top) == 3
        assert output.adapted_value == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-5)
        other = explain(model, TOKENIZER, "good film", text_pair="great", task=task, label=0).outputs[0]
        assert other.token == "class 0" and other.token_id == 0
        with pytest.raises(ValueError, match="label 7 is not a class"):
            explain(model, TOKENIZER, "good film", task=task, label=7)
    else:
        assert output.token == "score" and output.adapted_value == pytest.approx(float(logits[0]), abs=1e-5)
        assert "score: base" in summary.summary_text(found)


def test_several_active_adapters_and_a_merged_one_are_explained_and_left_as_they_were():
    model = tiny_llama(seed=1)
    lorakit.adapt(model, config("lora"))
    lorakit.adapt(model, config("dora"), name="second")
    perturb_trainable(model, seed=4)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for _, layer in inject.adapted_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.2)
    lorakit.set_active(model, ["default", "second"])
    lorakit.merge(model, ["second"])
    ids = torch.tensor([TOKENIZER(PROMPT)["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    found = explain(model, TOKENIZER, PROMPT, completion=" god")
    assert list(found.modules[0].parts) == ["default: update", "second: magnitude", "second: direction"]
    assert found.within_tolerance and found.methods == ["dora", "lora"]
    assert [layer.merged for _, layer in inject.adapted_layers(model)] == [("second",)] * 6
    assert all(layer.enabled for _, layer in inject.adapted_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_what_it_refuses():
    model, original = adapted("delta-lora")
    with pytest.raises(ValueError, match="moves the base weights"):
        explain(model, TOKENIZER, PROMPT)
    with pytest.raises(ValueError, match="no active adapter"):
        explain(tiny_llama(), TOKENIZER, PROMPT)
    model, _ = adapted("lora")
    with pytest.raises(ValueError, match="prompt is empty"):
        explain(model, TOKENIZER, "")
    with pytest.raises(ValueError, match="completion has no tokens"):
        explain(model, TOKENIZER, PROMPT, completion="")
    with pytest.raises(ValueError, match="task must be one of"):
        explain(model, TOKENIZER, PROMPT, task="translate")


def test_json_holds_every_number_and_no_infinities(tmp_path):
    model, _ = adapted("dora")
    found = explain(model, TOKENIZER, PROMPT, completion=" go", top=3, components=2)
    found.modules[0].size[0] = math.inf  # a token whose base path is zero: its ratio is infinite
    page.write_json([found], tmp_path / "e.json", {"adapter": "x"})
    data = json.loads((tmp_path / "e.json").read_text())
    (record,) = data["inputs"]
    assert data["adapter"] == "x" and record["modules"][0]["size"][0] is None and record["depth_check"] == []
    assert (
        record["completion"] == " go" and len(record["outputs"]) == 3 and len(record["outputs"][0]["adapted_top"]) == 3
    )
    module = record["modules"][1]
    assert set(module["parts"]) == {"magnitude", "direction"} and len(module["components"]) == 2
    assert len(module["size"]) == len(record["tokens"]) == len(module["components"][0]["drive"])
    assert (
        record["attribution"]["within_tolerance"]
        and record["attribution"]["completeness_error"] <= record["attribution"]["tolerance"]
    )
    assert sum(m["attribution"] for m in record["modules"]) == pytest.approx(
        record["total_effect"], abs=record["attribution"]["tolerance"]
    )


def test_a_4bit_base():
    """QLoRA: the base path is the dequantized 4-bit weight the adapter was trained against."""
    from lorakit import base_layers

    model = lorakit.quantize(tiny_llama(seed=1, hidden_size=64))
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))
    perturb_trainable(model, seed=2, std=0.3)
    found = explain(model, TOKENIZER, PROMPT, completion=" god")
    assert found.within_tolerance and abs(found.total_effect) > 1e-2
    inputs = module_inputs(model, found.token_ids)
    for m in found.modules:
        layer, x = dict(inject.adapted_layers(model))[m.module], inputs[m.module]
        with torch.no_grad():
            expected = relative(x @ layer.delta_weight().T, x @ base_layers.dense_weight(layer.base_layer).float().T)
        assert m.size == pytest.approx(expected.tolist(), rel=1e-4)


@pytest.mark.integration
def test_on_smollm2():
    """The real packaged model: a fresh adapter is inert; a perturbed one on two module kinds has
    parts that add up to its change."""
    from lorakit import models

    try:
        tokenizer, model = models.load_tokenizer(), models.load_causal_lm()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["v_proj", "down_proj"], layers=list(range(0, 30, 3))))
    prompt = "Reverse the order of the words: red fox\nAnswer:"
    fresh = explain(model, tokenizer, prompt, completion=" fox red", steps=8)
    assert fresh.inert and fresh.total_effect == 0.0 and len(fresh.modules) == 20
    assert "the adapter is inert on this input" in summary.summary_text(fresh)
    perturb_trainable(model, seed=0, std=0.02)
    found = explain(model, tokenizer, prompt, completion=" fox red")
    assert not found.inert and abs(found.total_effect) > 0.01 and found.within_tolerance
    assert found.completeness_error <= found.tolerance
    assert found.tokens[-2:] == [" fox", " red"] and all(len(m.components) == 4 for m in found.modules)


@pytest.mark.parametrize("out_features,rank,in_features", [(12, 4, 10), (6, 16, 10), (12, 16, 5), (5, 3, 5)])
def test_svd_components_of_a_factored_update(out_features, rank, in_features):
    """More factors than rows or columns (VeRA's r = 256 over a 192-row k_proj) included."""
    from lorakit.methods.base import svd_components

    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)
    found = svd_components("update", up, down)
    singular = torch.linalg.svdvals((up @ down).double())
    assert found.strengths.tolist() == pytest.approx(singular[: len(found.labels)].tolist(), rel=1e-5)
    assert len(found.labels) == min(out_features, rank, in_features)
    torch.testing.assert_close(found.up @ found.down, up @ down, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found.down @ found.down.T, torch.eye(len(found.labels)), atol=1e-5, rtol=0)
    assert all(row[row.abs().argmax()] > 0 for row in found.down)  # the sign convention that makes them unique
    zero = svd_components("update", torch.zeros(out_features, rank), down)
    assert zero.labels == [] and zero.up.shape == (out_features, 0)


def test_the_exact_check_by_depth_against_removing_the_update_by_hand():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
    ).eval()
    lorakit.adapt(model, config("lora"))
    perturb_trainable(model, seed=1, std=0.3)
    found = explain(model, TOKENIZER, PROMPT, completion=" god", steps=8)
    assert [d.layers for d in found.depth] == [[0, 1], [2], [3]]
    ids = torch.tensor([found.token_ids])
    targets = torch.tensor(found.token_ids[found.prompt_length :])
    saved = {name: layer.adapter.lora_B.detach().clone() for name, layer in inject.adapted_layers(model)}

    def changes(keep) -> list[float]:
        with torch.no_grad():
            for name, layer in inject.adapted_layers(model):
                layer.adapter.lora_B.copy_(saved[name] * float(keep(layer_index(name))))
            logits = model(input_ids=ids).logits[0, found.prompt_length - 1 : -1].log_softmax(-1)
        values = logits.gather(-1, targets[:, None]).squeeze(-1)
        return [float(v) - o.base_value for v, o in zip(values, found.outputs)]

    for d in found.depth:
        assert d.only == pytest.approx(changes(lambda layer: layer in d.layers), abs=1e-5)
        assert d.without == pytest.approx(changes(lambda layer: layer not in d.layers), abs=1e-5)
    assert "by depth, exact" in summary.summary_text(found)
    assert explain(adapted("lora")[0], TOKENIZER, PROMPT, completion=" g").depth == []  # 2 layers: no thirds
