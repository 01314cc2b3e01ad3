"""dil_conv (ReLU -> depthwise -> pointwise -> BatchNorm) against its oracle dil_conv_ref (the eager chain).

Tolerances, with S the size of the sums involved (the same computation on |x|, |weights|, |grad|, max over the
tensor; BatchNorm's normalisation makes the outputs O(1)):
- float64: rtol 1e-7, atol 1e-7 against dil_conv_ref.
- float32: rtol 1e-5, atol 1e-6 * S against dil_conv_ref (outputs, every gradient, the running statistics).
- float16/bfloat16: the error against the float64 oracle is at most 2x the error of dil_conv_ref computed in the same
  precision, plus a floor of 1e-6 * max|oracle|.
"""

from unittest import mock

import pytest
import torch

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.nn.operations import DilConv, SepConv
from fastdarts.ops import dil_conv, dil_conv_ref
from tests.ops.helpers import assert_matches, make_tensor, needs_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (k, stride, padding, dilation) of the DARTS candidates: sep_conv 3x3/5x5 and dil_conv 3x3/5x5, stride 1 and 2
GEOMETRIES = [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 2, 2), (5, 1, 4, 2)]
SHAPES = [(3, 5, 9, 7), (4, 8, 2, 2), (2, 3, 5, 1)]
NAMES = ("out", "grad_x", "grad_dw_weight", "grad_pw_weight", "grad_bn_weight", "grad_bn_bias")


def geometry_id(g):
    return "k{}s{}p{}d{}".format(*g)


def run(fn, x, params, stats, geometry, training, grad):
    """Output, every gradient and the running statistics after one call."""
    dw, pw, bw, bb = params
    out = fn(x, dw, pw, bw, bb, *stats, *geometry[1:], training, 0.1, 1e-5)
    wanted = [t for t in (x, dw, pw, bw, bb) if t is not None]
    return (out, *torch.autograd.grad(out, wanted, grad)), stats


def make_case(shape, dtype, layout, device, geometry, affine, C_out=6):
    C = shape[1]
    k = geometry[0]
    x = make_tensor(shape, dtype, layout, device).requires_grad_()
    dw = make_tensor((C, 1, k, k), dtype, "contiguous", device).requires_grad_()
    pw = make_tensor((C_out, C, 1, 1), dtype, "contiguous", device).requires_grad_()
    bw = bb = None
    if affine:
        bw = (1 + 0.5 * make_tensor((C_out,), torch.float64, "contiguous", device)).to(dtype).requires_grad_()
        bb = make_tensor((C_out,), dtype, "contiguous", device).requires_grad_()
    stats = (torch.randn(C_out, device=device).to(dtype), (torch.rand(C_out, device=device) + 0.5).to(dtype))
    return x, (dw, pw, bw, bb), stats


def copy_stats(stats, dtype=None):
    return tuple(s.clone() if dtype is None else s.to(dtype) for s in stats)


def to64(params):
    return tuple(None if t is None else t.detach().double().requires_grad_() for t in params)


def abs64(params):
    return tuple(None if t is None else t.detach().double().abs().requires_grad_() for t in params)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_reference(device, dtype, geometry, shape, layout, affine, training):
    x, params, stats = make_case(shape, dtype, layout, device, geometry, affine)
    with torch.no_grad():
        like = dil_conv_ref(x, *params, *copy_stats(stats), *geometry[1:], training)
    grad = torch.randn(like.shape, dtype=torch.float64, device=device).to(dtype)
    actual, actual_stats = run(dil_conv, x, params, copy_stats(stats), geometry, training, grad)
    ref, ref_stats = run(dil_conv_ref, x, params, copy_stats(stats), geometry, training, grad)
    x64 = x.detach().double().requires_grad_()
    oracle, oracle_stats = run(
        dil_conv_ref, x64, to64(params), copy_stats(stats, torch.float64), geometry, training, grad.double()
    )
    sizes, _ = run(
        dil_conv_ref, x64.detach().abs().requires_grad_(), abs64(params), copy_stats(stats, torch.float64),
        geometry, training, grad.double().abs(),
    )  # fmt: skip
    assert actual[0].shape == ref[0].shape and actual[0].is_contiguous()
    for name, a, r, o, s in zip(NAMES, actual, ref, oracle, sizes):
        assert_matches(a, r, o, name, reduction_scale=s.abs().max().item())
    for name, a, r, o in zip(("running_mean", "running_var"), actual_stats, ref_stats, oracle_stats):
        assert_matches(a, r, o, name)


def test_darts_cifar_shape(device):
    # a sep_conv_3x3 unit of a C=16 cell on 32x32 CIFAR inputs, batch 4, float32
    x, params, stats = make_case(
        (4, 16, 32, 32), torch.float32, "contiguous", device, (3, 1, 1, 1), False, 16
    )
    grad = torch.randn(4, 16, 32, 32, device=device)
    actual, actual_stats = run(dil_conv, x, params, copy_stats(stats), (3, 1, 1, 1), True, grad)
    ref, ref_stats = run(dil_conv_ref, x, params, copy_stats(stats), (3, 1, 1, 1), True, grad)
    for name, a, r in zip(NAMES, actual, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=name)
    for a, r in zip(actual_stats, ref_stats):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("shape", [(45, 8, 2, 2), (37, 8, 4, 4), (21, 8, 6, 6)], ids=["2x2", "4x4", "6x6"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_stacked_small_planes(device, geometry, shape):
    # The CPU kernel runs 2x2 and 4x4 planes with 16 samples side by side (one per vector lane; 45 and 37 samples
    # leave a short last chunk) and stacks 6x6 planes per channel; the 1x1 convolution's weight gradient copies
    # the ragged rows of 2x2 and 6x6 planes channel-major first
    x, params, stats = make_case(shape, torch.float64, "contiguous", device, geometry, True, 8)
    with torch.no_grad():
        like = dil_conv_ref(x, *params, *copy_stats(stats), *geometry[1:], True)
    grad = torch.randn(like.shape, dtype=torch.float64, device=device)
    actual, actual_stats = run(dil_conv, x, params, copy_stats(stats), geometry, True, grad)
    ref, ref_stats = run(dil_conv_ref, x, params, copy_stats(stats), geometry, True, grad)
    for name, a, r in zip(
        (*NAMES, "running_mean", "running_var"), (*actual, *actual_stats), (*ref, *ref_stats)
    ):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("shape", [(37, 8, 4, 4), (3, 5, 9, 7)], ids=["lanes", "stacked"])
@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (5, 2, 2, 1)], ids=geometry_id)
def test_relu_backward_zeroes_an_infinite_gradient(device, geometry, shape):
    # ReLU's backward is 0 where x <= 0 whatever arrives there, inf and NaN included (a masking multiply would give
    # NaN): one infinite output gradient spreads to a window of input pixels, about half of them negative
    x, params, stats = make_case(shape, torch.float64, "contiguous", device, geometry, True)
    with torch.no_grad():
        like = dil_conv_ref(x, *params, *copy_stats(stats), *geometry[1:], False)
    grad = torch.randn(like.shape, dtype=torch.float64, device=device)
    grad[1, 0, 1, 1] = float("inf")
    actual, _ = run(dil_conv, x, params, copy_stats(stats), geometry, False, grad)
    ref, _ = run(dil_conv_ref, x, params, copy_stats(stats), geometry, False, grad)
    hit = ~ref[1].isfinite()
    assert hit.any() and (ref[1][x <= 0] == 0).all()  # (the case means something: non-finite where x > 0)
    torch.testing.assert_close(actual[1], ref[1], rtol=1e-9, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("needs", ["x", "dw", "pw"])
def test_gradients_only_where_needed(device, needs):
    x, (dw, pw, _, _), stats = make_case(
        (2, 3, 6, 6), torch.float32, "contiguous", device, (3, 1, 1, 1), False
    )
    for name, t in (("x", x), ("dw", dw), ("pw", pw)):
        t.requires_grad_(name == needs)
    target = {"x": x, "dw": dw, "pw": pw}[needs]
    grad = torch.randn(
        2, 6, 6, 6, device=device
    )  # (a normalised output's square sum would have zero gradient)
    (g,) = torch.autograd.grad(dil_conv(x, dw, pw, None, None, *stats, 1, 1, 1), [target], grad)
    (g_ref,) = torch.autograd.grad(dil_conv_ref(x, dw, pw, None, None, *stats, 1, 1, 1), [target], grad)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("shape", [(16, 8, 16, 16), (40, 8, 2, 2)], ids=["16x16", "2x2"])
def test_deterministic_across_thread_counts(shape):
    x, params, stats = make_case(shape, torch.float32, "contiguous", "cpu", (5, 1, 4, 2), True, 8)
    grad = torch.randn(shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run(dil_conv, x, params, copy_stats(stats), (5, 1, 4, 2), True, grad)
        torch.set_num_threads(max(2, threads))
        many, _ = run(dil_conv, x, params, copy_stats(stats), (5, 1, 4, 2), True, grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(device, backend_name, training):
    backend.set_backend(backend_name)
    x, params, stats = make_case((3, 2, 5, 4), torch.float64, "contiguous", device, (3, 2, 2, 2), True, 3)

    def f(*inputs):  # no running update inside gradcheck's repeated calls (momentum 0)
        return dil_conv(*inputs, *stats, 2, 2, 2, training, 0.0, 1e-5)

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@needs_ext
def test_opcheck():
    # the compiled operators themselves (their autograd is the autograd.Function tested above)
    for training, affine in [(True, False), (False, True)]:
        x, params, stats = make_case(
            (2, 3, 7, 6), torch.float32, "channels_last", "cpu", (5, 2, 2, 1), affine
        )
        args = tuple(t if t is None else t.detach() for t in (x, *params)) + (
            *stats,
            2,
            2,
            1,
            training,
            0.1,
            1e-5,
        )
        torch.library.opcheck(torch.ops.fastdarts_C.dil_conv.default, args)
        y, d, p, mean, invstd, _, _ = torch.ops.fastdarts_C.dil_conv(*args)
        dw, pw, bw = args[1:4]
        for mask in ([True] * 5, [False, True, False, True, False], [True, False, False, False, False]):
            grad_args = (
                torch.randn_like(y),
                args[0],
                dw,
                pw,
                bw,
                d,
                p,
                mean,
                invstd,
                2,
                2,
                1,
                training,
                mask,
            )
            torch.library.opcheck(torch.ops.fastdarts_C.dil_conv_backward.default, grad_args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    x, params, _ = make_case((2, 4, 6, 6), torch.float32, "contiguous", "cpu", (3, 1, 1, 1), False, 4)

    def unit(x, dw, pw):
        return dil_conv(x, dw, pw, None, None, None, None, 1, 1, 1).square().mean()

    loss = torch.compile(unit, fullgraph=True)(x, *params[:2])
    expected = dil_conv_ref(x, *params[:2], None, None, None, None, 1, 1, 1).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(
        torch.autograd.grad(loss, (x, *params[:2])), torch.autograd.grad(expected, (x, *params[:2]))
    ):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@needs_ext
def test_backends_choose_the_kernel():
    x, params, stats = make_case((2, 3, 6, 6), torch.float32, "contiguous", "cpu", (3, 1, 1, 1), False)
    fwd = mock.Mock(wraps=torch.ops.fastdarts_C.dil_conv)
    bwd = mock.Mock(wraps=torch.ops.fastdarts_C.dil_conv_backward)
    with (
        mock.patch.object(torch.ops.fastdarts_C, "dil_conv", fwd),
        mock.patch.object(torch.ops.fastdarts_C, "dil_conv_backward", bwd),
    ):
        dil_conv(x, *params, *stats, 1, 1, 1).sum().backward()
        assert fwd.call_count == 1 and bwd.call_count == 1
        backend.set_backend("reference")
        dil_conv(x, *params, *stats, 1, 1, 1).sum().backward()
        assert fwd.call_count == 1 and bwd.call_count == 1


@pytest.mark.parametrize("module", ["dil", "sep"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_modules_keep_batchnorm_semantics(module, momentum):
    # DilConv / SepConv through the kernel and through the reference: same outputs, gradients, running statistics
    # and num_batches_tracked over train and eval calls, and unchanged parameter and buffer names.
    def build():
        torch.manual_seed(0)
        m = (
            DilConv(4, 6, 3, 2, 2, 2, affine=True)
            if module == "dil"
            else SepConv(4, 6, 5, 1, 2, affine=False)
        )
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.momentum = momentum
        return m

    fast, ref = build(), build()
    assert list(fast.state_dict()) == list(torch.nn.Sequential(*fast.op).state_dict(prefix="op."))
    x = torch.randn(3, 4, 8, 8)
    for step in range(3):
        outs = []
        for name, m in (("auto", fast), ("reference", ref)):
            backend.set_backend(name)
            m.train(step < 2)
            y = m(x)
            if m.training:
                y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            outs.append(y)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    dw, pw, s = torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1), torch.ones(6)
    return [
        (
            (x, dw[:3], pw),
            r"dw_weight has shape \(3, 1, 3, 3\), expected \(4, 1, k, k\) for x with 4 channels",
        ),
        ((x, dw, pw[:, :3]), r"pw_weight has shape \(6, 3, 1, 1\), expected \(C_out, 4, 1, 1\)"),
        ((x, dw, pw.double()), "pw_weight has dtype torch.float64, expected torch.float32 like x"),
        ((x, dw, pw, s, None), "bn_weight and bn_bias must be given together"),
        ((x, dw, pw, s[:5], s[:5]), r"bn_weight has shape \(5,\), expected \(6,\) for 6 output channels"),
        ((x, dw, pw, None, None, s, s[:2]), r"running_var has shape \(2,\), expected \(6,\)"),
        (
            (x, dw, pw, None, None, None, None, 1, 1, 1, False),
            "training is False but running_mean and running_var",
        ),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_are_named(case):
    args, message = bad_inputs()[case]
    full = list(args) + [None] * (7 - min(len(args), 7)) + [1, 1, 1, True, 0.1, 1e-5][max(0, len(args) - 7) :]
    backend.set_backend("reference")
    with pytest.raises(UsageError, match=message):
        dil_conv(*full)


@needs_ext
@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_are_named_by_compiled_kernel(case):
    args, message = bad_inputs()[case]
    full = list(args) + [None] * (7 - min(len(args), 7)) + [1, 1, 1, True, 0.1, 1e-5][max(0, len(args) - 7) :]
    with pytest.raises((ValueError, TypeError), match=message.replace("torch.", "")):
        torch.ops.fastdarts_C.dil_conv(*full)


def test_one_value_per_channel_is_refused():
    x, params, stats = make_case((1, 3, 1, 1), torch.float32, "contiguous", "cpu", (3, 1, 1, 1), False)
    for name in ("auto", "reference"):
        backend.set_backend(name)
        with pytest.raises(
            (ValueError, TypeError), match="more than 1 value per channel|more than one value"
        ):
            dil_conv(x, *params, *stats, 1, 1, 1)
