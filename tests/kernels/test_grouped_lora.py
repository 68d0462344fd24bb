"""LoRA siblings that read one input, computed as one node: against LoRA's math, against each layer
run alone, and every way the model's calls can differ from the planned ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from conftest import each_layer_alone, graph_node_names, perturb_trainable, step_results, tiny_gpt2, tiny_llama
from lorakit.kernels.grouped_lora import GroupedLoRALinear


def graph_nodes(output: torch.Tensor, kind: str) -> int:
    """How many autograd nodes whose name contains `kind` the graph of `output` holds."""
    return sum(kind in name for name in graph_node_names(output))


def members(widths, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for out, r in zip(widths, ranks):
        parts.append(
            {
                "W": torch.randn(out, 10, generator=g),
                "A": torch.randn(r, 10, generator=g).requires_grad_(),
                "B": torch.randn(out, r, generator=g).requires_grad_(),
            }
        )
    return parts


def test_grouped_node_matches_loras_formula_per_member():
    """y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T and every gradient, for members of different widths,
    ranks and scales, one with a bias and one with a frozen A (LoRA-FA), against the naive formula."""
    parts = members([6, 3, 4], [2, 3, 1])
    biases = [torch.randn(6), None, None]
    parts[2]["A"].requires_grad_(False)
    scales = (2.0, 0.5, 1.5)
    x = torch.randn(7, 10, requires_grad=True)
    weights = [torch.randn(out) for out in (6, 3, 4)]

    def loss(outputs):
        return sum((y * w).sum() for y, w in zip(outputs, weights))

    got = GroupedLoRALinear.apply(
        x, scales, *(p["W"] for p in parts), *biases, *(p["A"] for p in parts), *(p["B"] for p in parts)
    )
    loss(got).backward()
    got_grads = [x.grad.clone()] + [p[k].grad.clone() for p in parts for k in "AB" if p[k].requires_grad]
    for t in [x] + [p[k] for p in parts for k in "AB"]:
        t.grad = None
    want = [x @ (p["W"] + s * p["B"] @ p["A"]).T + (0 if b is None else b) for p, b, s in zip(parts, biases, scales)]
    loss(want).backward()
    want_grads = [x.grad] + [p[k].grad for p in parts for k in "AB" if p[k].requires_grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert len(got_grads) == len(want_grads) == 6
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    assert parts[2]["A"].grad is None


def test_an_output_nobody_uses_adds_nothing():
    parts = members([4, 4], [2, 2], seed=1)
    x = torch.randn(5, 10, requires_grad=True)
    tensors = [p["W"] for p in parts] + [None, None] + [p["A"] for p in parts] + [p["B"] for p in parts]
    first, _ = GroupedLoRALinear.apply(x, (1.0, 1.0), *tensors)
    first.sum().backward()
    want_x = torch.ones(5, 4) @ (parts[0]["W"] + parts[0]["B"] @ parts[0]["A"])
    torch.testing.assert_close(x.grad, want_x)
    assert parts[1]["B"].grad is None
    torch.testing.assert_close(parts[1]["A"].grad, torch.zeros(2, 10))


@pytest.mark.parametrize("method", ["lora", "lora-fa", "delta-lora", "lora-drop"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_siblings_run_as_one_node_and_equal_each_alone(method, make_model, input_ids, monkeypatch):
    """From the first forward on, q/k/v and gate/up of every layer are one node each (GPT-2's fused
    c_attn has no siblings), and the step's loss, logits and every gradient equal the same model's
    with each layer run alone."""
    model = lorakit.adapt(make_model(), lorakit.methods.METHODS[method](r=4, targets="all-linear"))
    perturb_trainable(model)
    grouped = graph_nodes(model(input_ids).logits, "GroupedLoRALinear")
    assert grouped == (4 if make_model is tiny_llama else 0)
    together = step_results(model, input_ids)
    each_layer_alone(monkeypatch)
    assert graph_nodes(model(input_ids).logits, "GroupedLoRALinear") == 0
    alone = step_results(model, input_ids)
    torch.testing.assert_close(together[0], alone[0])
    torch.testing.assert_close(together[1], alone[1])
    assert together[2].keys() == alone[2].keys()
    for name, grad in alone[2].items():
        torch.testing.assert_close(together[2][name], grad, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(together[3], alone[3])


@pytest.mark.parametrize("method", ["lora", "lora-fa"])
def test_the_group_keeps_no_more_for_backward_than_each_alone(method, input_ids, monkeypatch):
    """The activation bytes autograd keeps (parameters excluded) are the same grouped or alone:
    x once, z as the members' z side by side, nothing formed for the group (such as the stacked A)."""
    model = lorakit.adapt(tiny_llama(), lorakit.methods.METHODS[method](r=4, targets="all-linear"))
    params = {p.data_ptr() for p in model.parameters()}

    def kept_bytes(groups: int) -> int:
        saved: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids).logits
        assert graph_nodes(logits, "GroupedLoRALinear") == groups
        return sum(saved.values())

    together = kept_bytes(groups=4)
    each_layer_alone(monkeypatch)
    assert together == kept_bytes(groups=0)


def test_under_bf16_autocast_as_each_alone(input_ids, monkeypatch):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets="all-linear"))
    perturb_trainable(model)
    together = step_results(model, input_ids, autocast=True)
    each_layer_alone(monkeypatch)
    alone = step_results(model, input_ids, autocast=True)
    torch.testing.assert_close(together[1], alone[1], atol=2e-2, rtol=2e-2)
    for name, grad in alone[2].items():
        assert together[2][name].dtype == torch.float32
        torch.testing.assert_close(together[2][name], grad, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


def test_dropout_and_several_adapters_run_alone(input_ids):
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, dropout=0.1, targets="all-linear")).train()
    for _ in range(3):
        assert graph_nodes(model(input_ids).logits, "GroupedLoRALinear") == 0
    model.eval()  # no mask drawn: the pairs may group again
    assert graph_nodes(model(input_ids).logits, "GroupedLoRALinear") == 4
    lorakit.adapt(model, lorakit.LoRA(r=2, targets="all-linear"), name="second")
    lorakit.set_active(model, ["default", "second"])
    for _ in range(3):
        assert graph_nodes(model(input_ids).logits, "GroupedLoRALinear") == 0


class TwoReaders(nn.Module):
    """A parent whose two adapted children read whatever the caller hands each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(8, 6)
        self.k = nn.Linear(8, 4)

    def forward(self, x, y=None, between=None):
        a = self.q(x)
        if between is not None:
            between(x)
        return a, self.k(x if y is None else y)


def reference(model, x, y=None):
    """Each layer's output by LoRA's formula, from the layers' own tensors."""
    outs = []
    for layer, inp in ((model.q, x), (model.k, x if y is None else y)):
        adapter = layer.adapter
        w = layer.base_layer.weight + adapter.scale * adapter.lora_B @ adapter.lora_A
        outs.append(inp @ w.T + layer.base_layer.bias)
    return outs


def adapted_readers():
    model = lorakit.adapt(TwoReaders(), lorakit.LoRA(r=2, targets=["q", "k"]))
    perturb_trainable(model)
    return model


@pytest.mark.parametrize(
    "case",
    ["other input", "input changed in place", "grad mode changed", "leader twice"],
)
def test_a_call_other_than_the_learned_one_ends_grouping_and_stays_exact(case):
    model = adapted_readers()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    group = model.q.siblings
    assert group.members == (model.q, model.k) and model.k.siblings is group
    assert graph_nodes(model(x)[0], "GroupedLoRALinear") == 1 and group.active
    if case == "other input":
        got = model(x, y)
        want = reference(model, x, y)
    elif case == "input changed in place":
        x = torch.randn(3, 8)
        got = model(x, between=lambda t: t.mul_(2.0))
        want = [reference(model, x / 2.0)[0], reference(model, x)[1]]
    elif case == "grad mode changed":

        def no_grad_between(t):
            torch.set_grad_enabled(False)

        try:
            got = model(x, between=no_grad_between)
        finally:
            torch.set_grad_enabled(True)
        want = reference(model, x)
    else:
        model.q(x)
        got = model(x)
        want = reference(model, x)
    assert not group.active
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    again = model(x)  # from now on each runs alone
    assert graph_nodes(again[0], "GroupedLoRALinear") == 0
    for a, b in zip(again, reference(model, x)):
        torch.testing.assert_close(a, b)


def test_inference_mode_and_copies(input_ids):
    model = adapted_readers()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        out = model(torch.randn(3, 8))
    assert not any(t.grad_fn for t in out)
    assert graph_nodes(model(x)[0], "GroupedLoRALinear") == 1
    copied = copy.deepcopy(model)  # the copy's group holds the copy's own layers
    assert copied.q.siblings.members == (copied.q, copied.k)
    for a, b in zip(copied(x), reference(copied, x)):
        torch.testing.assert_close(a, b)
    assert graph_nodes(copied(x)[0], "GroupedLoRALinear") == 1


def test_only_named_siblings_of_one_width_group(input_ids):
    """o_proj and down_proj read other tensors: alone. A set with one member adapted: alone."""
    model = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets="all-linear"))
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.siblings.members == (attention.q_proj, attention.k_proj, attention.v_proj)
    assert attention.o_proj.siblings is None and model.model.layers[0].mlp.down_proj.siblings is None
    only_q = lorakit.adapt(tiny_llama(), lorakit.LoRA(r=4, targets=["q_proj", "o_proj"]))
    assert all(layer.siblings is None for _, layer in lorakit.inject.adapted_layers(only_q))
    assert graph_nodes(only_q(input_ids).logits, "GroupedLoRALinear") == 0
    lorakit.remove(model, "default")
    assert graph_nodes(model(input_ids).logits, "LoRALinear") == 0
