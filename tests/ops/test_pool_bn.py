"""pool_bn (3x3 max/avg pool -> BatchNorm without affine) against its oracle pool_bn_ref (the eager chain).

Tolerances (BatchNorm's normalisation makes the outputs O(1); S is the largest |x|-weighted sum, as in the other op
tests):
- float64: rtol 1e-7, atol 1e-7 against pool_bn_ref.
- float32: rtol 1e-5, atol 1e-6 * S against pool_bn_ref (output, grad_x, the running statistics).
- float16/bfloat16: the error against the float64 oracle is at most 2x the error of pool_bn_ref computed in the same
  precision, plus a floor of 1e-6 * max|oracle|.
"""

from unittest import mock

import pytest
import torch
from torch import nn

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.nn.operations import OPS, PoolBN
from fastdarts.ops import pool_bn, pool_bn_ref
from tests.ops.helpers import assert_matches, make_tensor, needs_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(3, 5, 9, 7), (4, 8, 2, 2), (2, 3, 5, 1), (5, 2, 1, 1)]


def run(x, kind, stride, stats, training, grad, fn):
    out = fn(x, kind, stride, *stats, training)
    return (out, *torch.autograd.grad(out, x, grad)), stats


def make_stats(C, dtype):
    return torch.randn(C).to(dtype), (torch.rand(C) + 0.5).to(dtype)


def copy_stats(stats, dtype=None):
    return tuple(s.clone() if dtype is None else s.to(dtype) for s in stats)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_reference(dtype, kind, stride, shape, layout, training):
    C = shape[1]
    x = make_tensor(shape, dtype, layout, "cpu").requires_grad_()
    stats = make_stats(C, dtype)
    with torch.no_grad():
        like = pool_bn_ref(x, kind, stride, *copy_stats(stats), training)
    grad = torch.randn(like.shape, dtype=torch.float64).to(dtype)
    actual, actual_stats = run(x, kind, stride, copy_stats(stats), training, grad, pool_bn)
    ref, ref_stats = run(x, kind, stride, copy_stats(stats), training, grad, pool_bn_ref)
    x64 = x.detach().double().requires_grad_()
    oracle, oracle_stats = run(
        x64, kind, stride, copy_stats(stats, torch.float64), training, grad.double(), pool_bn_ref
    )
    for name, a, r, o in zip(("out", "grad_x"), actual, ref, oracle):
        assert_matches(a, r, o, name, reduction_scale=o.abs().max().item())
    for name, a, r, o in zip(("running_mean", "running_var"), actual_stats, ref_stats, oracle_stats):
        assert_matches(a, r, o, name)


@pytest.mark.parametrize(
    "shape", [(50, 2, 8, 8), (70, 3, 5, 5), (33, 2, 1, 3)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_stacked_planes(kind, stride, shape):
    # The CPU kernel stacks the padded planes of one channel (50 of 8x8 as 17 + 17 + 16, 70 of 5x5 as 35 + 35);
    # planes of at most 16 outputs (5x5 and 8x8 at stride 2, 1x3) run with 16 samples side by side, one per vector
    # lane (33 samples: a short last chunk); a 1x3 plane has a row of taps that read only padding
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    stats = make_stats(shape[1], torch.float64)
    with torch.no_grad():
        like = pool_bn_ref(x, kind, stride, *copy_stats(stats), True)
    grad = torch.randn(like.shape, dtype=torch.float64)
    actual, actual_stats = run(x, kind, stride, copy_stats(stats), True, grad, pool_bn)
    ref, ref_stats = run(x, kind, stride, copy_stats(stats), True, grad, pool_bn_ref)
    for name, a, r in zip(("out", "grad_x", "mean", "var"), (*actual, *actual_stats), (*ref, *ref_stats)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)


def test_max_pool_gradient_goes_to_the_first_maximum():
    # ties: every window of a constant plane holds its maximum 9 (or 4, 6) times; ATen gives the gradient to the
    # first in row-major order, so must the kernel
    x = torch.ones(2, 1, 4, 4).requires_grad_()
    grad = torch.randn(2, 1, 4, 4)
    stats = make_stats(1, torch.float32)
    (g,) = torch.autograd.grad(pool_bn(x, "max", 1, *copy_stats(stats), False), x, grad)
    (g_ref,) = torch.autograd.grad(pool_bn_ref(x, "max", 1, *copy_stats(stats), False), x, grad)
    torch.testing.assert_close(g, g_ref)


@needs_ext
@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_winning_taps_are_atens_indices(stride):
    # ties, -inf everywhere in some windows (ATen then names the first pixel inside the image) and NaN (wins)
    x = torch.randint(0, 3, (3, 2, 7, 6)).float()
    x[1, 0, :4, :4] = -float("inf")
    x[2, 1, 2, 3] = float("nan")
    stats = make_stats(2, torch.float32)
    taps = torch.ops.fastdarts_C.pool_bn(x, *stats, True, stride, False, 0.1, 1e-5)[2].long()
    _, indices = torch.nn.functional.max_pool2d(x, 3, stride, 1, return_indices=True)
    oh = torch.arange(taps.shape[2]).view(-1, 1) * stride - 1 + taps // 3
    ow = torch.arange(taps.shape[3]).view(1, -1) * stride - 1 + taps % 3
    assert torch.equal(oh * x.shape[3] + ow, indices)


@needs_ext
def test_deterministic_across_thread_counts():
    x = torch.randn(16, 8, 16, 16, requires_grad=True)
    grad = torch.randn(16, 8, 16, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run(x, "avg", 1, make_stats(8, torch.float32), True, grad, pool_bn)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_gradcheck(backend_name, kind):
    backend.set_backend(backend_name)
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)

    def f(x):  # no running update inside gradcheck's repeated calls
        return pool_bn(x, kind, 2, None, None, True)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@needs_ext
def test_opcheck():
    for is_max, stride, training in [(True, 1, True), (False, 2, False)]:
        x = make_tensor((2, 3, 7, 6), torch.float32, "channels_last", "cpu")
        args = (x, *make_stats(3, torch.float32), is_max, stride, training, 0.1, 1e-5)
        torch.library.opcheck(torch.ops.fastdarts_C.pool_bn.default, args)
        y, p, taps, mean, invstd, _, _ = torch.ops.fastdarts_C.pool_bn(*args)
        grad_args = (torch.randn_like(y), x, p, taps, mean, invstd, is_max, stride, training)
        torch.library.opcheck(torch.ops.fastdarts_C.pool_bn_backward.default, grad_args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)

    def candidate(x):
        return pool_bn(x, "max", 1).square().mean() + pool_bn(x, "avg", 2).square().mean()

    loss = torch.compile(candidate, fullgraph=True)(x)
    expected = pool_bn_ref(x, "max", 1).square().mean() + pool_bn_ref(x, "avg", 2).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x)[0], rtol=1e-5, atol=1e-6
    )


@needs_ext
def test_backends_choose_the_kernel():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    fwd = mock.Mock(wraps=torch.ops.fastdarts_C.pool_bn)
    bwd = mock.Mock(wraps=torch.ops.fastdarts_C.pool_bn_backward)
    with (
        mock.patch.object(torch.ops.fastdarts_C, "pool_bn", fwd),
        mock.patch.object(torch.ops.fastdarts_C, "pool_bn_backward", bwd),
    ):
        pool_bn(x, "avg", 1).backward(torch.randn(2, 3, 6, 6))
        assert fwd.call_count == 1 and bwd.call_count == 1
        backend.set_backend("reference")
        pool_bn(x, "avg", 1).backward(torch.randn(2, 3, 6, 6))
        assert fwd.call_count == 1 and bwd.call_count == 1


@pytest.mark.parametrize("name", ["max_pool_3x3", "avg_pool_3x3"])
@pytest.mark.parametrize("stride", [1, 2])
def test_module_keeps_batchnorm_semantics(name, stride):
    def build():
        return PoolBN(OPS[name](4, stride, False), nn.BatchNorm2d(4, affine=False))

    fast, ref = build(), build()
    assert list(fast.state_dict()) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    for step in range(3):
        grads = []
        for backend_name, m in (("auto", fast), ("reference", ref)):
            backend.set_backend(backend_name)
            m.train(step < 2)
            y = m(x)
            grads.append((y, torch.autograd.grad(y, x, torch.linspace(-1, 1, y.numel()).view_as(y))[0]))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for (key, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_module_runs_other_pools_as_modules():
    # not DARTS' pooling (affine BatchNorm, another kernel size, unequal strides): the modules run as they are
    with mock.patch.object(torch.ops.fastdarts_C, "pool_bn") as kernel:
        for m in (
            PoolBN(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(4, affine=True)),
            PoolBN(nn.AvgPool2d(5, 1, 2, count_include_pad=False), nn.BatchNorm2d(4, affine=False)),
            PoolBN(nn.MaxPool2d(3, (2, 1), 1), nn.BatchNorm2d(4, affine=False)),
        ):
            x = torch.randn(2, 4, 6, 6)
            torch.testing.assert_close(m(x), m[1](m[0](x)))
        assert kernel.call_count == 0


def bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    s = torch.ones(4)
    return [
        ((x[0], "max", 1), r"x has shape \(4, 8, 8\), expected 4 dims \[B, C, H, W\]"),
        ((x.int(), "max", 1), "x has dtype torch.int32, expected one of float32"),
        ((x, "min", 1), "kind is 'min', expected 'max' or 'avg'"),
        ((x, "max", 3), "stride is 3, expected 1 or 2"),
        ((x, "avg", 1, s, None), "running_mean and running_var must be given together"),
        ((x, "avg", 1, s[:3], s[:3]), r"running_mean has shape \(3,\), expected \(4,\)"),
        ((x, "avg", 1, None, None, False), "training is False but running_mean and running_var are None"),
    ]


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_are_named(case, backend_name):
    backend.set_backend(backend_name)
    args, message = bad_inputs()[case]
    with pytest.raises(UsageError, match=message):
        pool_bn(*args)


def test_one_value_per_channel_is_refused():
    for name in ("auto", "reference"):
        backend.set_backend(name)
        with pytest.raises(ValueError, match="more than 1 value per channel|more than one value"):
            pool_bn(torch.randn(1, 3, 1, 1), "max", 1)
