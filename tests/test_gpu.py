"""What only a GPU shows: the Triton NF4 kernel bit-exact with bitsandbytes' CUDA kernel, the fused
layers in bf16 and fp16, dropout's device path, and `torch.compile` (inductor) against eager.

Skipped as a whole without CUDA. `benchmarks/gpu_suite.sh` runs this file on a GPU machine; its
`--cpu-smoke` mode runs it with LORAKIT_GPU_TESTS_ON_CPU=1, which puts the same tests on the CPU
(bf16 and fp16 matmuls, the compiler with `aot_eager`, bitsandbytes' reference kernels) so that the
code paths are exercised where no GPU is.
"""

from __future__ import annotations

import os

import pytest
import torch

import lorakit
from conftest import perturb_trainable, tiny_gpt2, tiny_llama

ON_CPU = os.environ.get("LORAKIT_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE != "cuda" and not ON_CPU, reason="needs CUDA (LORAKIT_GPU_TESTS_ON_CPU=1 runs the same tests on the CPU)"
)
HALF = [torch.bfloat16, torch.float16]
TOLERANCE = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}


# --- NF4 on the GPU: lorakit's Triton kernel against bitsandbytes ----------------------------------


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 2048), (33, 17), (3, 5, 11)])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_nf4_is_bit_exact_with_bitsandbytes(shape, dtype, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    from lorakit.quant import nf4
    from lorakit.quant.triton_kernels import dequantize, triton_available

    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(DEVICE, dtype)
    q = nf4.quantize_nf4(weight, double_quant=double_quant)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(q.packed.reshape(-1).cpu(), packed.reshape(-1).view(torch.uint8).cpu())
    ours = dequantize(q.packed, q.block_absmax(), q.shape, q.blocksize, dtype)
    if DEVICE == "cuda":
        assert triton_available(), "the GPU suite expects triton (it ships with CUDA PyTorch)"
        theirs = F.dequantize_4bit(packed, state)
    else:  # bitsandbytes' native CPU kernel is wrong on some shapes (tests/bnb_reference.py)
        from bnb_reference import reference_dequantize_4bit

        theirs = reference_dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


# --- the fused layers in half precision ----------------------------------------------------------


def unfused(monkeypatch):
    """Every adapter takes its unfused path (base, then the method's own `forward`)."""
    from lorakit.methods.lora import LoRAAdapter
    from lorakit.methods.lora_fa import LoRAFAAdapter
    from lorakit.methods.vera import VeRAAdapter

    for cls in (LoRAAdapter, LoRAFAAdapter, VeRAAdapter):
        monkeypatch.setattr(cls, "fused_forward", lambda self, x, base_layer: None)


def loss_and_grads(model, input_ids, seed=3, forward=None):
    """Loss and adapter gradients of one step of `model` (run through `forward`, e.g. its compiled self)."""
    torch.manual_seed(seed)
    loss = (model if forward is None else forward)(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in lorakit.adapter_parameters(model)}
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def check_close(got, expected, dtype, what):
    loss, grads = got
    ref_loss, ref_grads = expected
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[dtype])
    for name, grad in ref_grads.items():
        scale = grad.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(
            grads[name] / scale,
            grad / scale,
            atol=TOLERANCE[dtype]["atol"] * 3,
            rtol=0,
            msg=lambda m: f"{what} {name}: {m}",
        )


CONFIGS = {
    "lora": lambda: lorakit.LoRA(r=8, alpha=16, targets="all-linear"),
    "lora-dropout": lambda: lorakit.LoRA(r=8, alpha=16, dropout=0.1, targets="all-linear"),
    "lora-fa-dropout": lambda: lorakit.LoRAFA(r=8, alpha=16, dropout=0.1, targets="all-linear"),
    "vera": lambda: lorakit.VeRA(r=32, targets="all-linear"),
}
FUSED = sorted(CONFIGS)  # the methods with a fused node
CONFIGS["dora"] = lambda: lorakit.DoRA(r=8, alpha=16, targets="all-linear")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", FUSED)
def test_fused_layers_in_half_precision_match_the_unfused_path(name, dtype, input_ids, monkeypatch):
    """Over a bf16 / fp16 base, fp32 master weights: the fused nodes compute what the method's own
    formula computes (the same dropout masks), within the half-precision rounding."""
    model = lorakit.adapt(tiny_llama().to(DEVICE, dtype), CONFIGS[name]()).train()
    perturb_trainable(model)
    ids = input_ids.to(DEVICE)
    fused = loss_and_grads(model, ids)
    unfused(monkeypatch)
    check_close(fused, loss_and_grads(model, ids), dtype, name)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_qlora_fused_node_in_half_precision(dtype, dropout, input_ids, monkeypatch):
    """LoRA over a 4-bit base computing in bf16 / fp16 (QLoRA's GPU setting) runs one fused node per
    layer and equals the unfused path; autocast over an fp32 model does too."""
    model = lorakit.quantize(tiny_gpt2().to(DEVICE), compute_dtype=dtype)
    model = lorakit.adapt(model.to(dtype), lorakit.LoRA(r=8, alpha=16, dropout=dropout)).train()
    perturb_trainable(model)
    ids = input_ids.to(DEVICE)
    fused = loss_and_grads(model, ids)
    unfused(monkeypatch)
    check_close(fused, loss_and_grads(model, ids), dtype, "qlora")


def test_autocast_qlora_matches_unfused(input_ids, monkeypatch):
    dtype = torch.bfloat16
    model = lorakit.quantize(tiny_llama().to(DEVICE), compute_dtype=dtype)
    model = lorakit.adapt(model, lorakit.LoRA(r=8, alpha=16, dropout=0.1)).train()
    perturb_trainable(model)
    ids = input_ids.to(DEVICE)

    def step():
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
            return loss_and_grads(model, ids)

    fused = step()
    unfused(monkeypatch)
    check_close(fused, step(), dtype, "autocast qlora")


def test_dropout_on_the_device_draws_the_same_mask_in_backward():
    from lorakit.kernels.dropout import AdapterDropout, DropoutDraw, draw_seed

    x = torch.randn(4096, 64, device=DEVICE, requires_grad=True)
    a = torch.randn(8, 64, device=DEVICE, requires_grad=True)
    torch.manual_seed(0)
    z = AdapterDropout(0.25).train().down_projection(x, a)
    torch.manual_seed(0)
    draw = DropoutDraw(0.25, draw_seed())
    keep = draw.mask(x.shape, x.device)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    x_ref, a_ref = x.detach().clone().requires_grad_(True), a.detach().clone().requires_grad_(True)
    z_ref = (x_ref * draw.factor(x_ref)) @ a_ref.T
    torch.testing.assert_close(z, z_ref)
    z.sum().backward()
    z_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(a.grad, a_ref.grad)


# --- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lora", "dora", "vera", "qlora"])
def test_compiled_step_equals_eager(name, input_ids):
    """The whole model compiled (inductor on the GPU; `aot_eager` in the CPU smoke run), one graph,
    the same loss and gradients as eager (no dropout: the compiler draws its own random numbers)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    base = tiny_llama().to(DEVICE, dtype)
    if name == "qlora":
        base = lorakit.quantize(base, compute_dtype=dtype)
    config = CONFIGS["lora" if name == "qlora" else name]()
    model = lorakit.adapt(base, config).train()
    perturb_trainable(model)
    ids = input_ids.to(DEVICE)
    eager = loss_and_grads(model, ids)
    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got = loss_and_grads(model, ids, forward=compiled)
    tolerance = dtype if dtype in TOLERANCE else torch.float16
    check_close(got, eager, tolerance, f"compiled {name}")
