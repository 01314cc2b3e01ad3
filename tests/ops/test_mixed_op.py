"""mixed_op (out = sum_k weights[k] * xs[k]) against its pure-PyTorch oracle mixed_op_ref.

Tolerances:
- float64: torch's float64 defaults (rtol 1e-7, atol 1e-7) against mixed_op_ref.
- float32: rtol 1e-5, atol 1e-6 against mixed_op_ref; grad_weights is a reduction over every element, so its
  atol is 1e-6 * max_k sum|grad * xs[k]| (the scale its rounding error grows with).
- float16/bfloat16 results: the error against the float64 oracle is at most 2x the error of mixed_op_ref
  computed in the same precision, plus a floor of 1e-6 * max|oracle| for the cases where the reference happens
  to be exact.
"""

from unittest import mock

import pytest
import torch

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.ops import mixed_op, mixed_op_ref
from fastdarts.ops.mixed_op import mixed_op_backward
from tests.ops.helpers import assert_matches, make_tensor, needs_cuda, needs_ext

# (xs dtype, weights dtype): weights are float32 or the dtype of xs.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
SHAPES = [(3, 5, 7, 9), (1, 1, 1, 1), (6, 10)]
# contiguous; channels-last (a transposed view for 2-D); strided = transposed slices (not dense);
# mixed = xs with different layouts (the kernels copy them to contiguous)
LAYOUTS = ["contiguous", "channels_last", "strided", "mixed"]


def make_inputs(shape, K, dtype, w_dtype, layout, device):
    xs = [make_tensor(shape, dtype, layout, device, k).requires_grad_() for k in range(K)]
    weights = (
        torch.softmax(torch.randn(K, dtype=torch.float64, device=device), 0).to(w_dtype).requires_grad_()
    )
    return xs, weights


def forward_backward(fn, xs, weights, grad):
    out = fn(xs, weights)
    *grad_xs, grad_w = torch.autograd.grad(out, [*xs, weights], grad)
    return out, grad_xs, grad_w


def check_against_ref(xs, weights):
    with torch.no_grad():
        grad = torch.randn_like(mixed_op(xs, weights))  # in the layout of the output
    out, grad_xs, grad_w = forward_backward(mixed_op, xs, weights, grad)
    ref, ref_grad_xs, ref_grad_w = forward_backward(mixed_op_ref, xs, weights, grad)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    w64 = weights.detach().double().requires_grad_()
    oracle, oracle_grad_xs, oracle_grad_w = forward_backward(mixed_op_ref, xs64, w64, grad.double())

    assert_matches(out, ref, oracle, "out")
    for k, (gx, rgx, ogx) in enumerate(zip(grad_xs, ref_grad_xs, oracle_grad_xs)):
        assert_matches(gx, rgx, ogx, f"grad_xs[{k}]")
    scale = max((grad.double() * x.double()).abs().sum().item() for x in xs)
    assert_matches(grad_w, ref_grad_w, oracle_grad_w, "grad_weights", reduction_scale=scale)
    return out, grad_xs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("K", [1, 2, 7, 8])
@pytest.mark.parametrize(("dtype", "w_dtype"), DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_reference(device, dtype, w_dtype, K, shape, layout):
    xs, weights = make_inputs(shape, K, dtype, w_dtype, layout, device)
    out, _ = check_against_ref(xs, weights)
    # The output keeps a layout shared by all inputs (e.g. channels-last) and is contiguous otherwise.
    if layout in ("contiguous", "mixed", "strided"):
        assert out.is_contiguous()
    else:
        assert out.stride() == xs[0].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_over_many_chunks(device, dtype):
    # 5 x 7 x 41 x 43 = 61705 elements: several parallel chunks of the CPU kernel and a ragged tail.
    xs, weights = make_inputs((5, 7, 41, 43), 7, dtype, torch.float32, "contiguous", device)
    check_against_ref(xs, weights)


def test_empty_tensors(device):
    xs, weights = make_inputs((0, 3), 3, torch.float32, torch.float32, "contiguous", device)
    out = mixed_op(xs, weights)
    assert out.shape == (0, 3)
    grad_xs, grad_w = mixed_op_backward(torch.zeros_like(out), xs, weights)
    assert [g.shape for g in grad_xs] == [(0, 3)] * 3
    assert torch.equal(grad_w, torch.zeros(3, device=device))


@pytest.mark.parametrize("needs", ["xs", "weights", "some_xs"])
def test_gradients_only_where_needed(device, needs):
    xs, weights = make_inputs((2, 3, 4, 5), 4, torch.float32, torch.float32, "contiguous", device)
    if needs == "xs":
        weights.requires_grad_(False)
    elif needs == "weights":
        for x in xs:
            x.requires_grad_(False)
    else:
        xs[1].requires_grad_(False)
    wanted = [t for t in [*xs, weights] if t.requires_grad]
    grad = torch.randn(2, 3, 4, 5, device=device)
    got = torch.autograd.grad(mixed_op(xs, weights), wanted, grad)
    expected = torch.autograd.grad(mixed_op_ref(xs, weights), wanted, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)


@needs_ext
def test_backward_is_deterministic_across_thread_counts():
    xs, weights = make_inputs((5, 7, 41, 43), 7, torch.float32, torch.float32, "contiguous", "cpu")
    grad = torch.randn(5, 7, 41, 43)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = mixed_op_backward(grad, xs, weights)
        torch.set_num_threads(max(2, threads))
        _, many = mixed_op_backward(grad, xs, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
def test_gradcheck(device, backend_name):
    backend.set_backend(backend_name)
    xs, weights = make_inputs((2, 3, 2, 3), 3, torch.float64, torch.float64, "contiguous", device)
    assert torch.autograd.gradcheck(lambda *a: mixed_op(list(a[:-1]), a[-1]), (*xs, weights))
    assert torch.autograd.gradgradcheck(lambda *a: mixed_op(list(a[:-1]), a[-1]), (*xs, weights))


def test_gradcheck_reference(device):
    xs, weights = make_inputs((2, 3, 2, 3), 3, torch.float64, torch.float64, "strided", device)
    assert torch.autograd.gradcheck(lambda *a: mixed_op_ref(list(a[:-1]), a[-1]), (*xs, weights))


def opcheck_samples(device):
    samples = []
    for layout, requires_grad in [("contiguous", True), ("channels_last", True), ("mixed", False)]:
        xs, weights = make_inputs((2, 3, 4, 5), 3, torch.float32, torch.float32, layout, device)
        for t in [*xs, weights]:
            t.requires_grad_(requires_grad)
        samples.append((xs, weights))
    return samples


@needs_ext
def test_opcheck(device):
    # the compiled operators (their autograd, the autograd.Function _MixedOp, is tested above)
    if device == "cuda" and not backend.info()["cuda"]["live"]:
        pytest.skip(backend.info()["cuda"]["why"])
    for xs, weights in opcheck_samples(device):
        xs, weights = [x.detach() for x in xs], weights.detach()
        torch.library.opcheck(torch.ops.fastdarts_C.mixed_op.default, (xs, weights))
        grad = torch.randn_like(mixed_op(xs, weights))
        torch.library.opcheck(torch.ops.fastdarts_C.mixed_op_backward.default, (grad, xs, weights))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    # A DARTS edge: softmax over the architecture parameters, then the mixed op, then a loss.
    def edge(xs, alpha):
        return mixed_op(xs, torch.softmax(alpha, 0)).square().mean()

    xs, alpha = make_inputs((2, 4, 6, 6), 5, torch.float32, torch.float32, "contiguous", "cpu")
    compiled = torch.compile(edge, fullgraph=True)
    loss = compiled(xs, alpha)
    grads = torch.autograd.grad(loss, [*xs, alpha])
    expected_loss = mixed_op_ref(xs, torch.softmax(alpha, 0)).square().mean()
    expected = torch.autograd.grad(expected_loss, [*xs, alpha])
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# ---- backend selection ------------------------------------------------------------------------------------


@needs_ext
def test_reference_backend_bypasses_compiled_kernel(device):
    xs, weights = make_inputs((2, 3, 4, 5), 3, torch.float32, torch.float32, "contiguous", device)
    backend.set_backend("reference")
    assert not backend.kernel_live("mixed_op", torch.device(device))
    boom = mock.Mock(side_effect=AssertionError("the compiled kernel ran under the reference backend"))
    with (
        mock.patch.object(torch.ops.fastdarts_C, "mixed_op", boom),
        mock.patch.object(torch.ops.fastdarts_C, "mixed_op_backward", boom),
    ):
        out = mixed_op(xs, weights)
        out.sum().backward()
    boom.assert_not_called()
    torch.testing.assert_close(out, mixed_op_ref(xs, weights))


@needs_ext
def test_auto_backend_uses_compiled_kernel(device):
    if device == "cuda" and not backend.info()["cuda"]["live"]:
        pytest.skip(backend.info()["cuda"]["why"])
    xs, weights = make_inputs((2, 3, 4, 5), 3, torch.float32, torch.float32, "contiguous", device)
    assert backend.get_backend() == "auto"
    assert backend.kernel_live("mixed_op", torch.device(device))
    fwd = mock.Mock(wraps=torch.ops.fastdarts_C.mixed_op)
    bwd = mock.Mock(wraps=torch.ops.fastdarts_C.mixed_op_backward)
    with (
        mock.patch.object(torch.ops.fastdarts_C, "mixed_op", fwd),
        mock.patch.object(torch.ops.fastdarts_C, "mixed_op_backward", bwd),
    ):
        mixed_op(xs, weights).sum().backward()
    assert fwd.call_count == 1 and bwd.call_count == 1


def test_info_reports_backends():
    info = backend.info()
    assert {"backend", "cpp", "cuda", "triton", "build", "torch", "version"} <= info.keys()
    assert info["backend"] == "auto"
    for name in ("cpp", "cuda", "triton"):
        assert isinstance(info[name]["live"], bool) and info[name]["why"]
    if not torch.cuda.is_available():
        assert not info["cuda"]["live"] and not info["triton"]["live"]
    build = info["build"]
    if build is None or not build["ext"]:
        pytest.skip("installed without the extension (FASTDARTS_SKIP_EXT=1)")
    # A normal build must give live C++ kernels.
    assert info["cpp"]["live"], info["cpp"]["why"]
    assert backend.kernel_live("mixed_op", torch.device("cpu"))
    assert not backend.kernel_live("mixed_op", torch.device("meta"))


def test_extension_built_for_another_torch_is_refused():
    # _load_extension checks the build info before importing fastdarts._C; nothing is imported here.
    live, why = backend._load_extension({"ext": True, "torch": "2.0.1+cu118"})
    assert not live
    assert f"built against torch 2.0.1+cu118 but torch {torch.__version__} is running" in why
    assert "pip install --no-deps --no-build-isolation -e ." in why
    live, why = backend._load_extension({"ext": False, "torch": None})
    assert not live and "FASTDARTS_SKIP_EXT=1" in why


def test_set_backend():
    backend.set_backend("reference")
    assert backend.get_backend() == "reference" and backend.info()["backend"] == "reference"
    backend.set_backend("auto")
    assert backend.get_backend() == "auto"
    with pytest.raises(UsageError, match=r"backend 'cuda' is unknown, expected one of 'auto', 'reference'"):
        backend.set_backend("cuda")
    assert backend.get_backend() == "auto"


# ---- bad inputs -------------------------------------------------------------------------------------------


def bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    return [
        ([], torch.ones(0), r"xs is empty, expected at least one tensor"),
        ([x, x, x, torch.randn(2, 4, 7, 7)], torch.ones(4),
         r"xs\[3\] has shape \(2, 4, 7, 7\), expected \(2, 4, 8, 8\) like xs\[0\]"),
        ([x, x.double()], torch.ones(2), r"xs\[1\] has dtype .*float64, expected .*float32 like xs\[0\]"),
        ([x] * 8, torch.ones(7), r"weights has shape \(7,\), expected \(8,\) for 8 inputs"),
        ([x] * 2, torch.ones(2, 1), r"weights has shape \(2, 1\), expected \(2,\) for 2 inputs"),
        ([x] * 2, torch.ones(2, dtype=torch.float64),
         r"weights has dtype \S*float64, expected \S*float32 like xs"),
        ([x.half()] * 2, torch.ones(2, dtype=torch.float64),
         r"weights has dtype \S*float64, expected \S*float32 or \S*float16 like xs"),
        ([x.long()] * 2, torch.ones(2), r"xs\[0\] has dtype \S+, expected one of float32, float64"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_are_named(case):
    xs, weights, message = bad_inputs()[case]
    with pytest.raises(UsageError, match=message):
        mixed_op(xs, weights)
    with pytest.raises(UsageError, match=message):
        mixed_op_ref(xs, weights)


@needs_ext
@pytest.mark.parametrize("case", range(1, len(bad_inputs())))  # case 0, xs=[], has no device to dispatch on
def test_bad_inputs_are_named_by_compiled_kernel(case):
    xs, weights, message = bad_inputs()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.fastdarts_C.mixed_op(xs, weights)
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.fastdarts_C.mixed_op_backward(torch.zeros_like(xs[0]), xs, weights)


def test_bad_grad_and_device_are_named():
    x = torch.randn(2, 3)
    with pytest.raises(UsageError, match=r"grad has shape \(3, 2\), expected \(2, 3\) like xs\[0\]"):
        mixed_op_backward(torch.zeros(3, 2), [x, x], torch.ones(2))
    with pytest.raises(UsageError, match=r"weights is on meta, expected cpu like xs"):
        mixed_op([x, x], torch.ones(2, device="meta"))


# ---- CUDA only --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_unaligned_and_large(dtype):
    # Slicing one element off makes the pointers 16-byte unaligned (the scalar path); 3 x 65537 elements
    # spread the backward over many blocks and exercise the two-stage reduction.
    xs = [torch.randn(3 * 65537 + 1, device="cuda", dtype=torch.float64).to(dtype)[1:].requires_grad_()
          for _ in range(7)]  # fmt: skip
    weights = torch.softmax(torch.randn(7, device="cuda"), 0).requires_grad_()
    check_against_ref(xs, weights)
    aligned = [x.detach().clone().requires_grad_() for x in xs]
    check_against_ref(aligned, weights)


@pytest.mark.cuda
@needs_cuda
def test_cuda_more_than_16_inputs_fall_back_to_reference():
    xs, weights = make_inputs((2, 3, 4, 5), 17, torch.float32, torch.float32, "contiguous", "cuda")
    check_against_ref(xs, weights)


@pytest.mark.cuda
@needs_cuda
def test_cuda_backward_is_deterministic():
    xs, weights = make_inputs((8, 16, 32, 32), 7, torch.float32, torch.float32, "contiguous", "cuda")
    grad = torch.randn(8, 16, 32, 32, device="cuda")
    _, first = mixed_op_backward(grad, xs, weights)
    _, second = mixed_op_backward(grad, xs, weights)
    assert torch.equal(first, second)
