"""benchmarks/lora_breakdown.py: its partial nodes compute what they stand for, it puts lorakit's node
back, and a run writes one row a piece."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lora_breakdown  # noqa: E402  (benchmarks/ is not a package)
from lorakit.kernels import fused_lora, grouped_lora  # noqa: E402


def operands(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64)
    lora_A = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    return x, weight, lora_A, lora_B


def test_base_product_only_is_the_frozen_base():
    x, weight, lora_A, lora_B = operands()
    y = lora_breakdown.BaseProductOnly.apply(x, weight, None, lora_A, lora_B, 2.0, None)
    torch.testing.assert_close(y, x @ weight.T)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)
    assert lora_A.grad is None and lora_B.grad is None


def test_lora_forward_only_has_lorakits_forward_and_the_bases_backward():
    x, weight, lora_A, lora_B = operands()
    y = lora_breakdown.LoRAForwardOnly.apply(x, weight, None, lora_A, lora_B, 2.0, None)
    real = fused_lora.FusedLoRALinear.apply(x, weight, None, lora_A, lora_B, 2.0, None)
    torch.testing.assert_close(y, real)
    torch.testing.assert_close(y, x @ weight.T + 2.0 * (x @ lora_A.T) @ lora_B.T)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)
    assert lora_A.grad is None and lora_B.grad is None


def test_node_puts_lorakits_node_back_even_on_error():
    real, real_output = fused_lora.FusedLoRALinear, grouped_lora.SharedInput.output
    with pytest.raises(RuntimeError):
        with lora_breakdown.node(lora_breakdown.BaseProductOnly):
            assert fused_lora.FusedLoRALinear is lora_breakdown.BaseProductOnly
            assert grouped_lora.SharedInput.output is not real_output  # every layer alone
            raise RuntimeError("boom")
    assert fused_lora.FusedLoRALinear is real and grouped_lora.SharedInput.output is real_output


def test_the_partial_conditions_run_every_layer_through_the_swapped_node(input_ids):
    """Inside `node`, sibling groups (after a few forwards) still run each layer alone."""
    import lorakit
    from conftest import graph_node_names, tiny_llama

    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets="all-linear"))
    for _ in range(3):
        model(input_ids)
    with lora_breakdown.node(lora_breakdown.BaseProductOnly):
        logits = model(input_ids).logits
    names = graph_node_names(logits)
    assert not any("LoRALinear" in n for n in names)
    assert sum("BaseProductOnly" in n for n in names) == 14


def test_a_tiny_run_writes_one_row_a_piece(tmp_path):
    out = tmp_path / "breakdown.json"
    result = lora_breakdown.main(["--tiny", "--rounds", "2", "--batch", "2", "--seq", "16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    names = [r["condition"] for r in saved["results"]]
    assert names == [
        "limit",
        "+ adapter layers",
        "+ LoRA forward",
        "+ LoRA backward",
        "siblings as one node",
        "+ optimizer (the whole step)",
    ]
    assert saved["results"][0]["adds_x_limit"] is None and saved["results"][0]["rounds_x_limit"] == [1.0, 1.0]
    assert all(len(r["rounds_x_limit"]) == 2 and min(r["rounds_x_limit"]) > 0 for r in saved["results"])
    assert fused_lora.FusedLoRALinear.__name__ == "FusedLoRALinear"


def test_bad_counts_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_breakdown.main(["--rounds", "0"])
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_an_out_directory_is_refused_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_breakdown.main(["--tiny", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is a directory" in capsys.readouterr().err
