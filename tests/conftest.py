"""Shared fixtures: tiny random models (fast), and the real packaged ones (integration)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Test modules import the shared helpers beside this file (tiny_lm, architectures, step_runs, ...) and, where one
# reuses another's helpers, that test module, by bare name from any directory under tests/ (pytest's prepend mode
# puts only this directory and the importing file's own on sys.path). Test file basenames are unique across
# tests/, so appending the subdirectories shadows nothing.
_TESTS = Path(__file__).resolve().parent
for _directory in sorted({path.parent for path in _TESTS.rglob("test_*.py")} - {_TESTS}):
    if str(_directory) not in sys.path:
        sys.path.append(str(_directory))

# What a quick local run (`python3 -m pytest -q --quick`) leaves out; CI and the plain command run all of it.
QUICK_RUN_SKIPS = ("fuzz", "distributed", "llama_cpp", "chromium", "integration")


def pytest_addoption(parser):
    parser.addoption(
        "--quick", action="store_true", help="a quick local run: deselect the " + ", ".join(QUICK_RUN_SKIPS) + " tests"
    )


def pytest_configure(config):
    if config.getoption("--quick"):  # as -m would (and together with a -m given too)
        quick = "not (" + " or ".join(QUICK_RUN_SKIPS) + ")"
        config.option.markexpr = f"({config.option.markexpr}) and {quick}" if config.option.markexpr else quick


# torch.compile's on-disk kernel cache is keyed without the CPU's vector ISA: kernels built under one
# ATEN_CPU_CAPABILITY (or on another CPU sharing the directory) were seen to crash or return wrong gradients
# under another. Each test session compiles into its own directory unless the caller chose one.
_OWN_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorakit-inductor-")


def pytest_collection_modifyitems(config, items):
    """Every test of a tests/test_fuzz*.py file carries the `fuzz` marker: `pytest -m "not fuzz"` is
    the quick local run, the default run keeps them."""
    for item in items:
        if item.path.name.startswith("test_fuzz"):
            item.add_marker(pytest.mark.fuzz)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tiny_llama(seed: int = 0, hidden_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def perturb_trainable(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every trainable parameter a random non-zero value (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def shared_dataset(*parts: str) -> Path:
    """A file under ../shared/datasets, or skip (users may clone the project alone)."""
    path = SHARED.joinpath("datasets", *parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def graph_node_names(output: torch.Tensor) -> list[str]:
    """Names of every autograd node in the graph that produced `output`."""
    seen, stack, names = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack += [n for n, _ in node.next_functions]
    return names


def each_layer_alone(monkeypatch):
    """No sibling groups (q/k/v, gate/up as one node: tests/kernels/test_grouped_lora.py): every
    adapted layer through its own node."""
    from lorakit.kernels.grouped_lora import SharedInput

    monkeypatch.setattr(SharedInput, "output", lambda self, layer, x: None)


def step_results(model, input_ids, autocast=False):
    """Loss, logits, every trainable gradient and the input embeddings' gradient of one step."""
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(inputs_embeds=embeds, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits.detach().float(), grads, embeds.grad
