"""The reports' plots, read as a person reads them: no label overprints another or a point, no
annotation runs out of its axes, no line hides under another; pictures before the tables. Measured
in matplotlib on every figure the reports save (tests/figure_layout.py); the page itself is drawn by
Chromium in test_reports_in_chromium.py."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_llama
from figure_layout import layout_problems
from lorakit import analysis, compare, html_report

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    """The layout problems of every figure a report saves, by the figure's title."""
    found: dict[str, list[str]] = {}
    save = html_report.png

    def checked(figure):
        title = " / ".join(ax.get_title() for ax in figure.axes if ax.get_title())
        found[title] = layout_problems(figure)
        return save(figure)

    monkeypatch.setattr(html_report, "png", checked)
    return found


def result(method: str, trainable: int, metric: float, slope: float, losses=None) -> compare.MethodResult:
    report = {
        "train_seconds": 12.0 * (1 + slope),
        "steps": 40,
        "metric": "accuracy",
        "trainable_params": trainable,
        "total_params": 22_700_000,
        "adapter_bytes": 4 * trainable,
        "peak_memory_mb": 900 + trainable / 1e3,
        "tokens_per_s": 3000.0,
        "final_loss": 0.3 + slope,
        "before": {"accuracy": 0.5},
        "after": {"accuracy": metric},
    }
    losses = losses or [(s, 0.7 * math.exp(-s / (10 + 20 * slope)) + 0.25) for s in range(1, 41)]
    return compare.MethodResult(method, "done", report=report, losses=losses)


def crowded_comparison() -> list[compare.MethodResult]:
    """Methods whose points sit close together (lora and dora: "lodora" before) and whose loss curves
    coincide (lora-fa's is lora's), one at the plot's corner."""
    same = [(s, 0.7 * math.exp(-s / 10) + 0.25) for s in range(1, 41)]
    return [
        result("lora", 338_690, 0.78, 0.0, same),
        result("dora", 353_282, 0.79, 0.1),
        result("vera", 30_722, 0.75, 0.5),
        result("lora-fa", 169_345, 0.78, 0.0, list(same)),
        result("adalora", 340_000, 0.785, 0.2),
        result("qlora", 338_690, 0.781, 0.05),
        result("lora-plus", 338_690, 0.779, 0.02),
        compare.MethodResult("lora-drop", "failed", "simulated failure"),
    ]


def test_compare_report_figures_have_no_overlap_clipping_or_hidden_line(tmp_path, figures):
    results = crowded_comparison()
    compare.write_html(results, compare.rows(results, limit_s=0.2), 0.2, tmp_path / "compare.html", "lorakit compare")
    assert len(figures) == 3
    assert not {title: problems for title, problems in figures.items() if problems}


def tiny_bert(layers: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, vocab_size=64)
    )


@pytest.mark.parametrize("base", ["llama", "bert-24-layers"])
def test_inspect_report_figures_have_no_overlap_or_clipping(tmp_path, figures, base):
    # BERT's module names are long (attention.output.dense next to output.dense): their tick labels crowded
    if base == "llama":
        model, targets = (
            tiny_llama(seed=1),
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
    else:
        model, targets = (
            tiny_bert(24),
            ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        )
    names = [n for n, _ in model.named_modules() if n.endswith(targets)]
    original = analysis.snapshot_base_weights(model, names)
    lorakit.adapt(model, lorakit.DoRA(r=4, targets=list(targets)))
    perturb_trainable(model, seed=2)
    analysis.write_html(analysis.changes(model, original), tmp_path / "inspect.html", "lorakit inspect")
    assert figures and not {title: problems for title, problems in figures.items() if problems}


def test_the_checks_catch_what_they_look_for():
    plt = html_report.pyplot("the test")
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.scatter([1.0, 1.02], [1.0, 1.0])
    ax.annotate("lora", (1.0, 1.0), textcoords="offset points", xytext=(5, 5))
    ax.annotate("dora", (1.02, 1.0), textcoords="offset points", xytext=(5, 5))
    ax.annotate("far away", (1.02, 1.0), textcoords="offset points", xytext=(400, 0))
    ax.plot([1, 2, 3], [1, 2, 3], label="a")
    ax.plot([1, 2, 3], [1, 2, 3], label="b")
    problems = layout_problems(fig)
    plt.close(fig)
    assert any("'lora' overprints 'dora'" in p or "'dora' overprints 'lora'" in p for p in problems), problems
    assert any("'far away' runs out of its axes" in p for p in problems), problems
    assert any("line 'a' hides line 'b'" in p for p in problems), problems


def test_pictures_come_before_the_tables(tmp_path):
    page = html_report.page("t", "intro", html_report.table(["a"], [[1]] * 300), [("a figure", "AAAA")])
    assert page.index("<figure>") < page.index("<table>")
