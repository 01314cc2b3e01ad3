"""depthwise_conv against its pure-PyTorch oracle depthwise_conv_ref (F.conv2d with groups=C).

Tolerances, with S the size of the sums involved (the same computation on |x|, |weight|, |grad|, max over the
tensor: each output element is a sum of k*k products, each grad_weight element one of B*Ho*Wo products):
- float64: rtol 1e-7, atol 1e-7 against depthwise_conv_ref.
- float32: rtol 1e-5, atol 1e-6 * S against depthwise_conv_ref.
- float16/bfloat16: the error against the float64 oracle is at most 2x the error of depthwise_conv_ref computed in
  the same precision, plus a floor of 1e-6 * max|oracle|.
"""

import warnings
from unittest import mock

import pytest
import torch

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.ops import depthwise_conv, depthwise_conv_ref
from tests.ops.helpers import assert_matches, make_tensor, needs_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (k, stride, padding, dilation): the eight DARTS geometries, then no padding and a wide stride.
DARTS_GEOMETRIES = [(k, s, d * (k - 1) // 2, d) for k in (3, 5) for d in (1, 2) for s in (1, 2)]
GEOMETRIES = DARTS_GEOMETRIES + [(3, 1, 0, 1), (3, 3, 1, 1)]
SHAPES = [(3, 5, 9, 7), (2, 4, 8, 8), (1, 3, 2, 2), (2, 2, 1, 11)]


def geometry_id(g):
    return "k{}s{}p{}d{}".format(*g)


def fits(shape, geometry):
    k, _, p, d = geometry
    return min(shape[2:]) + 2 * p >= d * (k - 1) + 1


# Every geometry on every shape it fits (a kernel larger than the padded input is a bad input, tested below).
CASES = [
    pytest.param(g, s, id=f"{geometry_id(g)}-{'x'.join(map(str, s))}")
    for g in GEOMETRIES
    for s in SHAPES
    if fits(s, g)
]


def forward_backward(fn, x, weight, geometry, grad):
    out = fn(x, weight, *geometry[1:])
    grad_x, grad_weight = torch.autograd.grad(out, (x, weight), grad)
    return out, grad_x, grad_weight


def check_against_ref(x, weight, geometry, grad):
    out, grad_x, grad_weight = forward_backward(depthwise_conv, x, weight, geometry, grad)
    ref = forward_backward(depthwise_conv_ref, x, weight, geometry, grad)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    oracle = forward_backward(depthwise_conv_ref, x64, w64, geometry, grad.double())
    a64, aw64 = x64.detach().abs().requires_grad_(), w64.detach().abs().requires_grad_()
    sizes = forward_backward(depthwise_conv_ref, a64, aw64, geometry, grad.double().abs())

    assert out.is_contiguous() and grad_x.shape == x.shape and grad_weight.shape == weight.shape
    for name, actual, r, o, s in zip(
        ("out", "grad_x", "grad_weight"), (out, grad_x, grad_weight), ref, oracle, sizes
    ):
        assert_matches(actual, r, o, name, reduction_scale=s.abs().max().item())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(("geometry", "shape"), CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_reference(device, dtype, geometry, shape, layout):
    k = geometry[0]
    x = make_tensor(shape, dtype, layout, device).requires_grad_()
    weight = make_tensor((shape[1], 1, k, k), dtype, "contiguous", device).requires_grad_()
    with torch.no_grad():
        grad = torch.randn_like(depthwise_conv_ref(x, weight, *geometry[1:]).double()).to(dtype)
    check_against_ref(x, weight, geometry, grad)


@pytest.mark.parametrize("geometry", DARTS_GEOMETRIES, ids=geometry_id)
def test_darts_cifar_shapes(device, geometry):
    # The separable/dilated convolutions of a C=16 DARTS cell on 32x32 CIFAR inputs, batch 4, in float32.
    k, s = geometry[:2]
    x = torch.randn(4, 16, 32, 32, device=device, requires_grad=True)
    weight = torch.randn(16, 1, k, k, device=device, requires_grad=True)
    check_against_ref(x, weight, geometry, torch.randn(4, 16, 32 // s, 32 // s, device=device))


@pytest.mark.parametrize(
    "shape", [(45, 2, 2, 2), (37, 3, 4, 4), (23, 2, 12, 12)], ids=["2x2", "4x4", "12x12"]
)
@pytest.mark.parametrize("geometry", DARTS_GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_stacked_planes(device, dtype, geometry, shape):
    # The CPU kernel stacks the planes of one channel (10 of 12x12 padded to 14x14): several stacks per channel,
    # the last one short. Planes of at most 16 outputs (2x2, 4x4) run with 16 samples side by side instead, one
    # per vector lane: 45 and 37 samples leave a short last chunk; on 2x2 a dilated 5x5 kernel has one live tap.
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(
        shape[1], 1, geometry[0], geometry[0], dtype=dtype, device=device, requires_grad=True
    )
    with torch.no_grad():
        grad = torch.randn_like(depthwise_conv_ref(x, weight, *geometry[1:]))
    check_against_ref(x, weight, geometry, grad)


def test_empty_batch(device):
    x = torch.randn(0, 3, 5, 5, device=device, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, device=device, requires_grad=True)
    out = depthwise_conv(x, weight, 1, 1, 1)
    assert out.shape == (0, 3, 5, 5)
    grad_x, grad_weight = torch.autograd.grad(out.sum(), (x, weight))
    assert grad_x.shape == x.shape and torch.equal(grad_weight, torch.zeros_like(weight))


@pytest.mark.parametrize("needs", ["x", "weight"])
def test_gradients_only_where_needed(device, needs):
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=needs == "x")
    weight = torch.randn(3, 1, 3, 3, device=device, requires_grad=needs == "weight")
    out = depthwise_conv(x, weight, 1, 1, 1)
    (g,) = torch.autograd.grad(out.square().sum(), [x if needs == "x" else weight])
    ref = depthwise_conv_ref(x, weight, 1, 1, 1)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), [x if needs == "x" else weight])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@needs_ext
def test_backward_is_deterministic_across_thread_counts():
    x = torch.randn(16, 8, 32, 32)
    weight = torch.randn(8, 1, 5, 5)
    grad = torch.randn(16, 8, 16, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastdarts_C.depthwise_conv_backward(grad, x, weight, 2, 4, 2, [True, True])
        torch.set_num_threads(max(2, threads))
        many = torch.ops.fastdarts_C.depthwise_conv_backward(grad, x, weight, 2, 4, 2, [True, True])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (5, 2, 4, 2)], ids=geometry_id)
def test_gradcheck(device, backend_name, geometry):
    backend.set_backend(backend_name)
    k, s, p, d = geometry
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(3, 1, k, k, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: depthwise_conv(a, b, s, p, d), (x, weight))
    assert torch.autograd.gradgradcheck(lambda a, b: depthwise_conv(a, b, s, p, d), (x, weight))


@needs_ext
def test_opcheck():
    # the compiled operators against their fake kernels (FakeTensor tracing), schemas and dispatch
    for layout, geometry in [("contiguous", (3, 1, 1, 1)), ("channels_last", (5, 2, 4, 2))]:
        k, s, p, d = geometry
        x = make_tensor((2, 3, 7, 6), torch.float32, layout, "cpu")
        weight = torch.randn(3, 1, k, k)
        torch.library.opcheck(torch.ops.fastdarts_C.depthwise_conv.default, (x, weight, s, p, d))
        grad = torch.randn_like(depthwise_conv_ref(x, weight, s, p, d))
        for mask in ([True, True], [True, False], [False, True]):
            args = (grad, x, weight, s, p, d, mask)
            torch.library.opcheck(torch.ops.fastdarts_C.depthwise_conv_backward.default, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    def sep_half(x, weight):  # the first half of a sep_conv candidate, up to the pointwise convolution
        return depthwise_conv(torch.relu(x), weight, 1, 1, 1).square().mean()

    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    loss = torch.compile(sep_half, fullgraph=True)(x, weight)
    expected_loss = depthwise_conv_ref(torch.relu(x), weight, 1, 1, 1).square().mean()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(torch.autograd.grad(loss, (x, weight)), torch.autograd.grad(expected_loss, (x, weight))):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@needs_ext
def test_backends_choose_the_kernel():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, requires_grad=True)
    fwd = mock.Mock(wraps=torch.ops.fastdarts_C.depthwise_conv)
    bwd = mock.Mock(wraps=torch.ops.fastdarts_C.depthwise_conv_backward)
    with (
        mock.patch.object(torch.ops.fastdarts_C, "depthwise_conv", fwd),
        mock.patch.object(torch.ops.fastdarts_C, "depthwise_conv_backward", bwd),
    ):
        depthwise_conv(x, weight, 1, 1, 1).sum().backward()
        assert fwd.call_count == 1 and bwd.call_count == 1
        backend.set_backend("reference")
        depthwise_conv(x, weight, 1, 1, 1).sum().backward()
        assert fwd.call_count == 1 and bwd.call_count == 1


def bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(4, 1, 3, 3)
    return [
        ((x[0], w, 1, 1, 1), r"x has shape \(4, 8, 8\), expected 4 dims \[B, C, H, W\]"),
        ((x.int(), w, 1, 1, 1), "x has dtype torch.int32, expected one of float32"),
        (
            (x, w[:3], 1, 1, 1),
            r"weight has shape \(3, 1, 3, 3\), expected \(4, 1, k, k\) for x with 4 channels",
        ),
        ((x, w[..., :2], 1, 1, 1), r"weight has shape \(4, 1, 3, 2\), expected \(4, 1, k, k\)"),
        ((x, w.double(), 1, 1, 1), "weight has dtype torch.float64, expected torch.float32 like x"),
        ((x, w, 0, 1, 1), "stride is 0, expected >= 1"),
        ((x, w, 1, -1, 1), "padding is -1, expected >= 0"),
        ((x, w, 1, 1, 0), "dilation is 0, expected >= 1"),
        ((x[..., :2, :2], torch.randn(4, 1, 5, 5), 1, 1, 1), r"too small for a 5x5 kernel with dilation 1"),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_are_named(case):
    args, message = bad_inputs()[case]
    with pytest.raises(UsageError, match=message):
        depthwise_conv(*args)


@needs_ext
@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_are_named_by_compiled_kernel(case):
    args, message = bad_inputs()[case]
    message = message.replace("torch.", "")  # C++ names dtypes without the module
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.fastdarts_C.depthwise_conv(*args)


@needs_ext
def test_bad_grad_is_named_by_compiled_kernel():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3)
    with pytest.raises(
        ValueError, match=r"grad has shape \(2, 4, 4, 4\), expected \(2, 4, 8, 8\) like the output"
    ):
        torch.ops.fastdarts_C.depthwise_conv_backward(torch.randn(2, 4, 4, 4), x, w, 1, 1, 1, [True, True])


@needs_ext
def test_planes_without_pixels_have_zero_weight_gradient():
    # H = 0 but the padding still gives a 2x4 output of zeros: grad_weight is exactly zero, not uninitialised.
    x = torch.randn(2, 3, 0, 2, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, requires_grad=True)
    out = depthwise_conv(x, weight, 1, 2, 1)
    assert out.shape == (2, 3, 2, 4) and torch.equal(out, torch.zeros_like(out))
    grad_x, grad_weight = torch.autograd.grad(out, (x, weight), torch.randn(2, 3, 2, 4))
    assert grad_x.shape == x.shape and torch.equal(grad_weight, torch.zeros_like(weight))


@pytest.mark.parametrize("in_dims", [(1, 0), (1, None), (None, 0)], ids=["both", "x", "weight"])
def test_vmap_runs_one_batched_convolution(in_dims):
    # under torch.func.vmap the op runs the reference, whose batching rule is one convolution for all N (not
    # one per item: the fallback warns), and agrees with it item by item
    gen = torch.Generator().manual_seed(0)
    N, geometry = 3, (2, 2, 2)  # stride, padding, dilation
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64, generator=gen)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=gen)
    x = (
        x.unsqueeze(1).expand(-1, N, -1, -1, -1) + torch.randn(N, 1, 1, 1, dtype=torch.float64)
    ).requires_grad_()
    weight = torch.randn(N, *weight.shape, dtype=torch.float64, generator=gen).requires_grad_()
    x_in = x if in_dims[0] is not None else x[:, 0]
    w_in = weight if in_dims[1] is not None else weight[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "There is a performance drop because we have not yet implemented..."
        out = torch.func.vmap(lambda a, b: depthwise_conv(a, b, *geometry), in_dims)(x_in, w_in)
    items = [
        depthwise_conv_ref(x_in[:, i] if in_dims[0] is not None else x_in, w_in[i] if in_dims[1] is not None else w_in,
                           *geometry) for i in range(N)
    ]  # fmt: skip
    ref = torch.stack(items)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x_in, w_in), grad)
    expected = torch.autograd.grad(ref, (x_in, w_in), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
