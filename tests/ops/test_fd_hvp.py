"""fd_hvp: the multi-tensor finite difference equals its one-tensor-at-a-time reference, converges to the exact
Hessian-vector product on a smooth function, and leaves the weights bit-exactly as they were; fd_hvp_batched (both
sides in one vmap pass) agrees with it."""

import pytest
import torch

from fastdarts.errors import UsageError
from fastdarts.ops import fd_hvp, fd_hvp_batched, fd_hvp_ref
from tests.conftest import DEVICES

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _problem(dtype, device, seed=0):
    """A smooth loss of weights w (odd shapes, one non-contiguous) and alphas a; g(w) = grad_a L(w, a)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    w = [rand(3, 5).requires_grad_(), rand(5, 2).t().requires_grad_(), rand(1).requires_grad_()]
    alphas = [rand(5).requires_grad_(), rand(2, 1).requires_grad_()]
    x = rand(4, 3)

    def loss(ws=w):
        h = torch.tanh(x @ ws[0] * alphas[0]) @ torch.sigmoid(ws[1].t() @ alphas[1])
        return (h * torch.cos(ws[2])).square().sum()

    def grad_at():
        return torch.autograd.grad(loss(), alphas)

    v = [rand(*t.shape) for t in w]
    return w, alphas, v, loss, grad_at


def _batched(loss, alphas):
    """fd_hvp_batched with fd_hvp's arguments: grad_at's loss, differentiated with respect to the alphas."""
    return lambda _, w, v, r=0.01, center=None: fd_hvp_batched(loss, alphas, w, v, r, center)


def _impl(name, loss, alphas):
    return {"fd_hvp": fd_hvp, "fd_hvp_ref": fd_hvp_ref, "fd_hvp_batched": _batched(loss, alphas)}[name]


IMPLS = ["fd_hvp", "fd_hvp_ref", "fd_hvp_batched"]


def _rel(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_the_one_tensor_reference(dtype, device):
    w, _, v, _, grad_at = _problem(dtype, device)
    fast, ref = fd_hvp(grad_at, w, v), fd_hvp_ref(grad_at, w, v)
    exact = device == "cpu" or dtype in (torch.float64, torch.float32)
    for f, r in zip(fast, ref):
        assert f.dtype == r.dtype == dtype and f.shape == r.shape
        if exact:  # the same elementwise steps: the same numbers, bit for bit
            assert torch.equal(f, r)
        else:  # CUDA's multi-tensor kernels may round the scaled step another way in half precision
            torch.testing.assert_close(f, r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_equals_the_sequential_difference(dtype, device):
    # the same w+ and w- (bit for bit), L(w+) - L(w-) differentiated once instead of each side: the rounding of
    # the loss differences, divided by 2 eps, is all that may differ
    w, alphas, v, loss, grad_at = _problem(dtype, device)
    seq, batched = fd_hvp(grad_at, w, v), fd_hvp_batched(loss, alphas, w, v)
    for s, b in zip(seq, batched):
        assert b.dtype == dtype and b.shape == s.shape
    if dtype in (torch.float64, torch.float32):
        assert _rel(batched, seq) < (1e-10 if dtype == torch.float64 else 1e-4)
        return
    # in half precision the difference at r = 0.01 is mostly rounding: error against the fp64 oracle at most 2x
    # the sequential one's
    w64, _, v64, _, grad_at64 = _problem(torch.float64, device)
    oracle = fd_hvp(grad_at64, w64, v64)
    assert oracle[0].abs().max() > 0 and _rel(batched, oracle) <= 2 * _rel(seq, oracle)


@pytest.mark.parametrize("name", IMPLS)
def test_converges_to_the_exact_product_on_a_smooth_function(name):
    w, alphas, v, loss, grad_at = _problem(torch.float64, "cpu")
    impl = _impl(name, loss, alphas)
    g = torch.autograd.grad(loss(), w, create_graph=True)
    exact = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), alphas)
    errors = {r: _rel(impl(grad_at, w, v, r), exact) for r in (1e-2, 1e-4)}
    assert errors[1e-4] < 1e-7 and errors[1e-4] < errors[1e-2], errors
    # the finite difference of several re-implementations, (gp - gm) / 2 * eps, is nowhere near it
    eps = 1e-4 / torch.cat([t.flatten() for t in v]).norm()
    buggy = [h * (2 * eps) / 2 * eps for h in impl(grad_at, w, v, 1e-4)]  # (gp - gm) / 2 * eps
    assert _rel(buggy, exact) > 0.99


@pytest.mark.parametrize("name", IMPLS)
def test_weights_end_bit_exactly_at_the_center(name):
    w, alphas, v, loss, grad_at = _problem(torch.float32, "cpu")
    impl = _impl(name, loss, alphas)
    with torch.no_grad():
        w[0][0, 0] = -0.0  # the sign of a zero survives too
        w[0][1, 1] = 1 + 2**-23  # a value that w + eps v - eps v would round away
    before = [t.detach().clone() for t in w]
    impl(grad_at, w, v)
    assert all(torch.equal(a, b) for a, b in zip(w, before)) and torch.signbit(w[0][0, 0])
    if name == "fd_hvp_batched":  # it only reads them: around another center they stay as they are
        center = [t + 1 for t in before]
        batched = impl(grad_at, w, v, center=center)
        assert all(torch.equal(a, b) for a, b in zip(w, before)) and all(t.requires_grad for t in w)
        torch.testing.assert_close(batched, fd_hvp(grad_at, w, v, center=center))
        return
    # around another center: the weights end there, whatever they held on entry
    center = [t + 1 for t in before]
    impl(grad_at, w, v, center=center)
    assert all(torch.equal(a, b) for a, b in zip(w, center))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", IMPLS)
def test_a_zero_vector_gives_a_zero_product(name, dtype):
    # eps = r / ||v|| would be r / 0 (NaN out): the product of the Hessian with 0 is 0, and the weights stay as
    # they are. One side after the other, g(w) - g(w) is exactly 0; in one vmap pass the two sides' losses may
    # round apart in the last bit, which the huge eps scales to below the smallest normal number.
    w, alphas, v, loss, grad_at = _problem(dtype, "cpu")
    before = [t.detach().clone() for t in w]
    hvp = _impl(name, loss, alphas)(grad_at, w, [torch.zeros_like(t) for t in v])
    bound = torch.finfo(hvp[0].dtype).tiny if name == "fd_hvp_batched" else 0.0
    assert all(h.abs().max().item() <= bound for h in hvp)
    assert all(torch.equal(a, b) for a, b in zip(w, before))


@pytest.mark.parametrize("impl", [fd_hvp, fd_hvp_ref])
def test_weights_are_put_back_when_a_pass_raises(impl):
    w, _, v, _, grad_at = _problem(torch.float32, "cpu")
    before = [t.detach().clone() for t in w]
    calls = []

    def fails_on_the_second_side():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory on w - eps v")
        return grad_at()

    with pytest.raises(RuntimeError, match="w - eps v"):
        impl(fails_on_the_second_side, w, v)
    assert all(torch.equal(a, b) for a, b in zip(w, before))


@pytest.mark.parametrize("name", IMPLS)
def test_bad_input_names_the_value(name):
    w, alphas, v, loss, grad_at = _problem(torch.float32, "cpu")
    impl = _impl(name, loss, alphas)
    with pytest.raises(UsageError, match=r"v has 2 tensors, expected 3, one per weight"):
        impl(grad_at, w, v[:2])
    with pytest.raises(UsageError, match=r"v\[1\] has shape \(5, 2\), expected \(2, 5\) like weights\[1\]"):
        impl(grad_at, w, [v[0], v[1].t(), v[2]])
    with pytest.raises(UsageError, match=r"center\[0\] has shape \(5, 3\), expected \(3, 5\)"):
        impl(grad_at, w, v, center=[v[0].t(), v[1], v[2]])
    with pytest.raises(UsageError, match=r"r must be > 0, got 0"):
        impl(grad_at, w, v, 0)
