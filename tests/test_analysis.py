"""`lorakit inspect`: the per-module change of an adapter, against naive computations."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_llama
from lorakit import analysis, inject


def test_module_change_against_a_naive_computation():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 10, generator=g)
    delta = torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g) * 0.1  # rank 2
    change = analysis.module_change("model.layers.3.self_attn.q_proj", w0, w0 + delta, adapter_rank=2)
    assert change.layer == 3 and change.kind == "self_attn.q_proj" and change.shape == (12, 10)
    assert analysis.short_labels(["attention.output.dense", "output.dense", "intermediate.dense", "self.query"]) == {
        "attention.output.dense": "attention.output.dense",
        "output.dense": "output.dense",
        "intermediate.dense": "intermediate.dense",
        "self.query": "query",
    }
    assert change.relative_change == pytest.approx(float(delta.norm() / w0.norm()), rel=1e-6)
    singular = torch.linalg.svdvals(delta.double())[:2]  # rank 2: the rest is rounding
    p = singular / singular.sum()
    assert change.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    assert change.rank_90 <= 2 and 1.0 <= change.effective_rank <= 2.0 + 1e-6
    w1 = w0 + delta
    magnitude = sum(abs(float(w1[i].norm() - w0[i].norm())) for i in range(12)) / 12
    direction = sum(1 - float(w1[i] @ w0[i] / (w1[i].norm() * w0[i].norm())) for i in range(12)) / 12
    assert change.magnitude_change == pytest.approx(magnitude, rel=1e-5)
    assert change.direction_change == pytest.approx(direction, rel=1e-5)
    assert not change.inert
    assert analysis.module_change("x", w0, w0.clone(), None).inert


def test_rank_one_update_has_effective_rank_one():
    w0 = torch.randn(8, 8)
    change = analysis.module_change("m", w0, w0 + torch.outer(torch.randn(8), torch.randn(8)), None)
    assert change.effective_rank == pytest.approx(1.0, abs=1e-6) and change.rank_90 == 1


@pytest.mark.parametrize("method", ["lora", "dora", "delta-lora"])
def test_changes_measure_the_weight_the_model_computes_with(method, tmp_path):
    model = tiny_llama(seed=1)
    config = lorakit.methods.METHODS[method](r=4, targets=["q_proj", "v_proj"])
    lorakit.adapt(model, config)
    perturb_trainable(model, seed=2)
    if method == "delta-lora":  # Delta-LoRA moves the base weights themselves
        with torch.no_grad():
            for _, layer in inject.adapted_layers(model):
                layer.base_layer.weight.add_(0.01)
    lorakit.save(model, tmp_path / "adapter")
    x = torch.randint(0, 128, (2, 7))
    expected = model(x).logits

    fresh = tiny_llama(seed=1)
    names = inject.select_targets(fresh, lorakit.io.read_config(tmp_path / "adapter")[0])
    original = analysis.snapshot_base_weights(fresh, names)
    lorakit.load(fresh, tmp_path / "adapter")
    assert torch.allclose(fresh(x).logits, expected, atol=1e-5)
    found = analysis.changes(fresh, original)
    assert [c.module for c in found] == names
    reference = tiny_llama(seed=1)
    modules = dict(reference.named_modules())
    merged = lorakit.merge_and_unload(fresh)
    for change in found:  # the change is exactly what merging writes into the base
        w0 = modules[change.module].weight.detach().double()
        w1 = dict(merged.named_modules())[change.module].weight.detach().double()
        assert change.delta_norm == pytest.approx(float((w1 - w0).norm()), rel=1e-5)


def test_an_inert_adapter_is_flagged():
    model = tiny_llama()
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["q_proj", "v_proj"]))  # B = 0: no change yet
    found = analysis.changes(model, original)
    assert all(c.inert for c in found)
    text = analysis.summary_text(found)
    assert f"warning: {len(found)} of {len(found)} modules did not change" in text and "learned nothing" in text


def test_lorakit_inspect_on_a_trained_run(tmp_path, capsys):
    from lorakit import cli
    from tiny_lm import save_tiny_llama, write_jsonl

    model = str(save_tiny_llama(tmp_path / "m"))
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i} {i + 1}"} for i in range(24)]
    )
    assert (
        cli.main(
            [
                "train",
                "--model",
                model,
                "--data",
                str(data),
                "--out-dir",
                str(tmp_path),
                "--name",
                "r",
                "--steps",
                "3",
                "--lr",
                "1e-2",
                "--no-progress",
                "--method",
                "dora",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "r"), "--json", str(tmp_path / "changes.json")]) == 0
    out = capsys.readouterr().out
    assert "relative change ||ΔW|| / ||W0||" in out and "q_proj" in out and "magnitude vs direction" in out
    numbers = json.loads((tmp_path / "changes.json").read_text())
    assert len(numbers["modules"]) == 14 and not numbers["inert_modules"]
    pytest.importorskip("matplotlib")
    import base64
    import re

    page = (tmp_path / "r" / "inspect.html").read_text()  # a run directory gets its report by default
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert page.count("<tr>") == 15 and "http://" not in page and "https://" not in page
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2


def test_method_specific_views():
    # Delta-LoRA: the base's own movement is told apart from the adapter's part
    model = tiny_llama(seed=3)
    names = [n for n, _ in model.named_modules() if n.endswith("q_proj")]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.DeltaLoRA(r=4, targets=["q_proj"]))
    perturb_trainable(model, seed=4)
    with torch.no_grad():
        for _, layer in inject.adapted_layers(model):
            layer.base_layer.weight.mul_(1.01)
    found = analysis.changes(model, original)
    assert all(c.base_change == pytest.approx(0.01, rel=1e-4) for c in found)
    assert "the base weights themselves moved in 2 modules" in analysis.summary_text(found)

    # VeRA: its vectors' own numbers; AdaLoRA: the rank the allocator kept
    vera = tiny_llama(seed=3)
    original = analysis.snapshot_base_weights(vera, names)
    lorakit.adapt(vera, lorakit.VeRA(r=8, targets=["q_proj"]))
    perturb_trainable(vera, seed=5)
    found = analysis.changes(vera, original)
    layer = dict(inject.adapted_layers(vera))[names[0]]
    d = layer.adapters["default"].vera_lambda_d.detach()
    assert found[0].extras["vera mean |d|"] == pytest.approx(float(d.abs().mean()), rel=1e-6)
    assert "vera mean |b|" in analysis.summary_text(found)
    ada = tiny_llama(seed=3)
    original = analysis.snapshot_base_weights(ada, names)
    lorakit.adapt(ada, lorakit.AdaLoRA(init_r=4, target_r=2, targets=["q_proj"]))
    perturb_trainable(ada, seed=6)
    found = analysis.changes(ada, original)
    assert found[0].extras["adalora rank kept"] == 4.0 and found[0].adapter_rank == 4
    assert len({c.shared_group for c in found}) == len(found)  # nothing shared


def test_lora_drop_importance_and_plan_are_shown(tmp_path):
    from lorakit.methods import lora_drop

    model = tiny_llama(seed=3)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.LoRADrop(r=4, targets=["q_proj", "v_proj"]))
    scores = dict(zip(names, [0.5, 0.05, 0.3, 0.15]))  # layer 0 q, v; layer 1 q, v
    lora_drop.apply_plan(model, "default", scores, threshold=0.8)  # keeps 0.q (0.5) and 1.q (0.3)
    perturb_trainable(model, seed=7)
    lorakit.save(model, tmp_path / "adapter")
    fresh = tiny_llama(seed=3)
    lorakit.load(fresh, tmp_path / "adapter")  # the plan comes back with the adapter
    found = analysis.changes(fresh, original)
    assert {c.module: c.importance for c in found} == pytest.approx(scores)
    assert [c.plan for c in found] == ["own", "v_proj(16x32)", "own", "v_proj(16x32)"]
    text = analysis.summary_text(found)
    assert (
        "LoRA-drop's plan: 2 of 4 modules keep their own pair (their importance adds up to 0.800); the other 2 share "
        "1 pair, one per kind: v_proj(16x32) x2" in text
    )
    grid = text.split("in %; * keeps its own pair):\n")[1].splitlines()
    assert grid[1].split() == ["0", "50.00*", "5.00"] and grid[2].split() == ["1", "30.00*", "15.00"]
    assert json.loads(json.dumps(analysis.report(found)))["modules"][1]["plan"] == "v_proj(16x32)"
    assert analysis.lora_drop_text(analysis.changes(tiny_llama(seed=3), {})) == []  # other methods: nothing
    pytest.importorskip("matplotlib")
    import base64
    import re

    analysis.write_html(found, tmp_path / "inspect.html", "lorakit inspect: LoRA-drop")
    page = (tmp_path / "inspect.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "<th>LoRA-drop importance</th><th>LoRA-drop plan</th>" in page and "<td>50.00 %</td><td>own</td>" in page
    assert "LoRA-drop&#x27;s plan: 2 of 4 modules" in page


def test_low_rank_singular_values_are_the_full_svds():
    g = torch.Generator().manual_seed(5)
    for out, inp, r in [(40, 24, 3), (24, 40, 6), (16, 16, 1), (30, 20, 19)]:
        down, up = (
            torch.randn(r, inp, generator=g, dtype=torch.float64),
            torch.randn(out, r, generator=g, dtype=torch.float64),
        )
        full = torch.linalg.svdvals(up @ down)[:r]
        torch.testing.assert_close(analysis.low_rank_singular_values(down, up), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", sorted(lorakit.methods.METHODS))
def test_changes_equal_the_full_fp64_reference_for_every_method(method, monkeypatch):
    """Where the change is a low-rank pair its spectrum comes from the factors (fast), elsewhere from a full
    SVD; either way every number equals the full fp64 SVD of W - W0 within rounding."""
    model = tiny_llama(seed=1, hidden_size=64)
    config = {"targets": ["q_proj", "v_proj", "down_proj"]}
    if method == "adalora":
        config.update(init_r=6, target_r=3, total_step=10)
    elif method == "lora-drop":
        config.update(r=4)
    elif "r" in lorakit.methods.METHODS[method].__dataclass_fields__:
        config["r"] = 16 if method == "vera" else 4
    names = [n for n, _ in model.named_modules() if n.endswith(tuple(config["targets"]))]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.methods.METHODS[method](**config))
    perturb_trainable(model, seed=3)
    fast = analysis.changes(model, original)
    full_svd = []
    real_svdvals = torch.linalg.svdvals
    monkeypatch.setattr(analysis, "_change_factors", lambda *a: None)  # the reference: the SVD of W - W0 itself
    monkeypatch.setattr(torch.linalg, "svdvals", lambda m: full_svd.append(m.shape) or real_svdvals(m))
    reference = analysis.changes(model, original)
    assert len(full_svd) == len(reference) == len(fast) == len(names)
    for a, b in zip(fast, reference):
        assert a.module == b.module and a.relative_change == b.relative_change
        torch.testing.assert_close(
            torch.tensor(a.top_singular_values),
            torch.tensor(b.top_singular_values)[: len(a.top_singular_values)],
            rtol=1e-5,
            atol=1e-7 * b.top_singular_values[0],
        )
        assert a.effective_rank == pytest.approx(b.effective_rank, rel=1e-4)
        assert a.rank_90 == b.rank_90


def test_inspect_computes_no_full_svd_of_a_low_rank_change(monkeypatch):
    model = tiny_llama(seed=1, hidden_size=64)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.LoRA(r=4, targets=["q_proj", "down_proj"]))
    perturb_trainable(model, seed=3)
    shapes = []
    real_svdvals = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda m: shapes.append(tuple(m.shape)) or real_svdvals(m))
    analysis.changes(model, original)
    assert shapes and all(shape == (4, 4) for shape in shapes)  # the r x r core, never (out, in)
