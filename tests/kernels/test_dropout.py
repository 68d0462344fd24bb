"""The adapters' dropout (kernels/dropout.py): nn.Dropout's distribution, a mask drawn again from its
seed instead of kept, the same bits from the native kernel and from PyTorch."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.kernels import dropout
from lorakit.kernels.dropout import AdapterDropout, DropoutDraw, draw_seed

MASK64 = (1 << 64) - 1


def splitmix_words(seed: int, n: int) -> list[int]:
    """The stream in plain Python integers: word 2j / 2j + 1 = low / high half of SplitMix64's output j."""
    words = []
    for j in range((n + 1) // 2):
        z = (seed + (j + 1) * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        words += [z & 0xFFFFFFFF, z >> 32]
    return words[:n]


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test on the native kernel and on the PyTorch path (LORAKIT_NATIVE=0)."""
    if request.param == "native":
        if not dropout.native_enabled():
            pytest.skip("the native dropout kernel is not built (python setup.py build_ext --inplace)")
    else:
        monkeypatch.setenv("LORAKIT_NATIVE", "0")
    return request.param


def test_native_library_is_built_where_a_compiler_exists():
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    assert dropout.native_enabled(), "build it: python setup.py build_ext --inplace"


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 2, 0x0123456789ABCDEF])
def test_mask_is_the_documented_stream(path, seed):
    p = 0.3
    words = splitmix_words(seed, 37)
    expected = [w < dropout.keep_threshold(p) for w in words]
    assert DropoutDraw(p, seed).mask((37,)).tolist() == expected


def test_native_and_torch_paths_give_the_same_bits(monkeypatch):
    if not dropout.native_enabled():
        pytest.skip("the native dropout kernel is not built")
    draw = DropoutDraw(0.1, draw_seed())
    x = torch.randn(301, 77)  # odd sizes: pairs of elements straddle rows and thread chunks
    x[3, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40])
    acc = torch.randn_like(x)
    native = draw.mask(x.shape), draw.apply(x), draw.accumulate(acc.clone(), x)
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    plain = draw.mask(x.shape), draw.apply(x), draw.accumulate(acc.clone(), x)
    for a, b in zip(native, plain):
        assert torch.equal(
            a.view(torch.int32) if a.is_floating_point() else a, b.view(torch.int32) if b.is_floating_point() else b
        )


def test_threads_split_a_tensor_without_changing_it(monkeypatch):
    if not dropout.native_enabled():
        pytest.skip("the native dropout kernel is not built")
    draw = DropoutDraw(0.25, 12345)
    x = torch.randn(3 * dropout.ELEMENTS_PER_THREAD + 7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = draw.apply(x), draw.mask(x.shape)
        torch.set_num_threads(3)
        several = draw.apply(x), draw.mask(x.shape)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], several[0]) and torch.equal(one[1], several[1])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_scaling_and_independence_as_nn_dropout(path, p):
    n = 400_000
    x = torch.rand(n) + 1.0  # no zeros: a zero output means dropped
    torch.manual_seed(0)
    draws = [DropoutDraw(p, draw_seed()) for _ in range(3)]
    masks = [d.mask((n,)) for d in draws]
    sigma = math.sqrt(p * (1 - p) / n)
    for d, m in zip(draws, masks):
        assert abs(m.float().mean().item() - (1 - p)) < 5 * sigma
        y = d.apply(x)
        assert torch.equal(y != 0, m)
        # kept elements scaled by nn.Dropout's own fp32 factor 1 / (1 - p)
        reference = x * (torch.ones(1).div_(1 - p))
        assert torch.equal(y[m], reference[m])
    # successive draws (steps, layers) are independent: both kept at rate (1 - p)^2
    both = (masks[0] & masks[1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
    # so are neighbouring elements (two halves of one 64-bit output, and across outputs)
    for a, b in ((masks[2][0::2], masks[2][1::2]), (masks[2][1:-1:2], masks[2][2::2])):
        both = (a & b).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / a.numel())


def test_same_seed_same_mask_new_seed_new_mask(path):
    assert torch.equal(DropoutDraw(0.5, 7).mask((1000,)), DropoutDraw(0.5, 7).mask((1000,)))
    assert not torch.equal(DropoutDraw(0.5, 7).mask((1000,)), DropoutDraw(0.5, 8).mask((1000,)))
    torch.manual_seed(3)
    seeds = [draw_seed() for _ in range(3)]
    torch.manual_seed(3)
    assert [draw_seed() for _ in range(3)] == seeds and len(set(seeds)) == 3


def test_dropped_down_projection_keeps_x_only_and_matches_autograd(path):
    """dropout(x) A^T as one node: x saved (A trains), no copy, no mask; gradients those of the
    plain expression with the same mask."""
    torch.manual_seed(0)
    x = torch.randn(50, 24, requires_grad=True)
    a = torch.randn(4, 24, requires_grad=True)
    module = AdapterDropout(0.4).train()
    saved = []
    torch.manual_seed(11)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = module.down_projection(x, a)
    activations = [t for t in saved if t.data_ptr() != a.data_ptr()]
    assert [t.data_ptr() for t in activations] == [x.data_ptr()]
    torch.manual_seed(11)
    draw = DropoutDraw(0.4, draw_seed())
    x_ref, a_ref = x.detach().clone().requires_grad_(True), a.detach().clone().requires_grad_(True)
    z_ref = (x_ref * draw.factor(x_ref)) @ a_ref.T
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    g = torch.randn_like(z)
    z.backward(g)
    z_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(a.grad, a_ref.grad)


def test_frozen_down_projection_keeps_nothing_of_x(path):
    x = torch.randn(30, 16, requires_grad=True)
    a = torch.randn(4, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = AdapterDropout(0.2).train().down_projection(x, a)
    assert all(t.data_ptr() != x.data_ptr() for t in saved)
    z.sum().backward()
    assert x.grad is not None and (x.grad == 0).any()


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(8, 6)
    a = torch.randn(2, 6)
    assert AdapterDropout(0.5).eval().draw() is None
    assert AdapterDropout(0.0).train().draw() is None
    torch.testing.assert_close(AdapterDropout(0.5).eval().down_projection(x, a), x @ a.T)
    assert AdapterDropout(0.5).eval()(x) is x


def test_bf16_and_autocast_inputs():
    torch.manual_seed(0)
    x = torch.randn(20, 8, requires_grad=True)
    a = torch.randn(3, 8, requires_grad=True)
    module = AdapterDropout(0.3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = module.down_projection(x, a)
    assert z.dtype == torch.bfloat16
    z.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    zb = module.down_projection(xb, a.detach().to(torch.bfloat16))
    assert zb.dtype == torch.bfloat16
    zb.sum().backward()
    assert xb.grad.dtype == torch.bfloat16
