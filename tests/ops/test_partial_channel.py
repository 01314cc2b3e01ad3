"""partial_channel (PC-DARTS' weighted candidates + bypass + channel shuffle) against partial_channel_ref.

Tolerances (S is the largest |oracle| of a result, so that the sums over planes of grad_weights are judged at
their own scale):
- float64: torch's defaults against partial_channel_ref.
- float32: rtol 1e-5, atol 1e-6 * S against partial_channel_ref.
- float16/bfloat16: the error against the float64 oracle is at most 2x the error of partial_channel_ref computed in
  the same precision, plus a floor of 1e-6 * max|oracle|.
The bypass and the shuffle move values without arithmetic, so they must be exact in every dtype (checked below).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.ops import channel_shuffle, partial_channel, partial_channel_ref
from fastdarts.ops.partial_channel import partial_channel_backward
from tests.ops.helpers import assert_matches, make_tensor, needs_cuda, needs_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (B, C, H, W, groups): PC-DARTS' K = 4 and 2, odd planes, one group (the whole mixed op), one channel per group
SHAPES = [(3, 8, 6, 4, 4), (2, 6, 10, 2, 2), (1, 4, 2, 6, 1), (2, 4, 4, 4, 4), (4, 12, 8, 8, 3)]


def make_inputs(shape, stride, dtype, layout, K=3):
    B, C, H, W, groups = shape
    x = make_tensor((B, C, H, W), dtype, layout, "cpu").requires_grad_()
    out_shape = (B, C // groups, H // stride, W // stride)
    xs = [make_tensor(out_shape, dtype, layout, "cpu", k).requires_grad_() for k in range(K)]
    weights = torch.softmax(torch.randn(K, dtype=torch.float64), 0).to(
        torch.float32 if dtype == torch.float32 else dtype
    )
    return xs, weights.requires_grad_(), x


def run(fn, xs, weights, x, groups, stride, grad):
    out = fn(xs, weights, x, groups, stride)
    return (
        out,
        *torch.autograd.grad(out, [*xs, weights, x], grad, allow_unused=True, materialize_grads=True),
    )


@pytest.mark.parametrize("layout", ["contiguous", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_reference(dtype, stride, shape, layout):
    groups = shape[-1]
    xs, weights, x = make_inputs(shape, stride, dtype, layout)
    with torch.no_grad():
        like = partial_channel_ref(xs, weights, x, groups, stride)
    grad = torch.randn(like.shape, dtype=torch.float64).to(dtype)
    actual = run(partial_channel, xs, weights, x, groups, stride, grad)
    ref = run(partial_channel_ref, xs, weights, x, groups, stride, grad)
    xs64 = [t.detach().double().requires_grad_() for t in xs]
    w64, x64 = weights.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    oracle = run(partial_channel_ref, xs64, w64, x64, groups, stride, grad.double())
    names = ["out", *(f"grad_xs[{k}]" for k in range(len(xs))), "grad_weights", "grad_x"]
    for name, a, r, o in zip(names, actual, ref, oracle):
        assert_matches(a, r, o.to(torch.float64), name, reduction_scale=o.abs().max().item())
    assert actual[0].is_contiguous()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bypass_and_shuffle_are_exact(dtype, stride):
    # out[:, i * groups + g] for g > 0 is x[:, g * c + i] (max-pooled): a copy, bit for bit in every dtype
    B, C, H, W, groups = 2, 8, 4, 6, 4
    xs, weights, x = make_inputs((B, C, H, W, groups), stride, dtype, "contiguous")
    out = partial_channel(xs, weights, x, groups, stride)
    rest = x.detach()[:, C // groups :]
    rest = F.max_pool2d(rest, 2, 2) if stride == 2 else rest
    shuffled = out.detach().view(B, C // groups, groups, H // stride, W // stride)
    expected = rest.view(B, groups - 1, C // groups, H // stride, W // stride).transpose(1, 2)
    assert torch.equal(shuffled[:, :, 1:], expected)


def test_max_pool_bypass_gradient_goes_to_the_first_maximum():
    # ties everywhere (a constant x), and NaN: ATen gives the gradient to the first maximum in row-major order, NaN
    # winning; so must the kernel
    xs, weights, x = make_inputs((2, 4, 4, 4, 2), 2, torch.float32, "contiguous")
    with torch.no_grad():
        x.fill_(1.0)
        x[0, 3, 1, 1] = float("nan")
    grad = torch.randn(2, 4, 2, 2)
    actual = run(partial_channel, xs, weights, x, 2, 2, grad)
    ref = run(partial_channel_ref, xs, weights, x, 2, 2, grad)
    torch.testing.assert_close(actual[0], ref[0], equal_nan=True)
    torch.testing.assert_close(actual[-1], ref[-1])


def test_matches_pcdarts_formula():
    # the layer PC-DARTS writes by hand: split, weighted sum, bypass, cat, shuffle
    xs, weights, x = make_inputs((2, 8, 6, 6, 4), 2, torch.float64, "contiguous")
    mixed = sum(w * t for w, t in zip(weights, xs))
    expected = channel_shuffle(torch.cat([mixed, F.max_pool2d(x[:, 2:], 2, 2)], 1), 4)
    torch.testing.assert_close(partial_channel(xs, weights, x, 4, 2), expected)


def test_channel_shuffle_moves_channel_g_c_plus_i_to_i_groups_plus_g():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


@needs_ext
def test_backward_pass_gives_every_gradient_once():
    xs, weights, x = make_inputs((3, 8, 4, 4, 4), 1, torch.float32, "contiguous")
    grad = torch.randn(3, 8, 4, 4)
    grad_xs, grad_w, grad_x = partial_channel_backward(grad, xs, weights, x, 4, 1)
    refs = torch.autograd.grad(partial_channel_ref(xs, weights, x, 4, 1), [*xs, weights, x], grad)
    for a, r in zip([*grad_xs, grad_w, grad_x], refs):
        torch.testing.assert_close(a, r)
    assert torch.all(grad_x[:, :2] == 0)


@needs_ext
def test_deterministic_across_thread_counts():
    xs, weights, x = make_inputs((16, 16, 8, 8, 4), 1, torch.float32, "contiguous", K=7)
    grad = torch.randn(16, 16, 8, 8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run(partial_channel, xs, weights, x, 4, 1, grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("backend_name", ["auto", "reference"])
def test_gradcheck(backend_name, stride):
    backend.set_backend(backend_name)
    xs, weights, x = make_inputs((2, 6, 4, 2, 3), stride, torch.float64, "contiguous", K=2)
    # distinct values, so that no max-pool window has a tie that a finite difference would split
    with torch.no_grad():
        x.copy_(torch.randperm(x.numel(), dtype=torch.float64).view_as(x) / x.numel())

    def f(weights, x, *xs):
        return partial_channel(list(xs), weights, x, 3, stride)

    assert torch.autograd.gradcheck(f, (weights, x, *xs))
    assert torch.autograd.gradgradcheck(f, (weights, x, *xs))


@pytest.mark.parametrize("stride", [1, 2])
def test_create_graph_gradients_count_each_path_once_when_xs_come_from_x(stride):
    # PC-DARTS' candidates read x's first channels; the gradient taken with create_graph (as the exact
    # Hessian-vector product and the eigenvalue take it) must equal the plain one
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, dtype=torch.float64, requires_grad=True)

    def loss():
        head = x[:, :2]
        xs = [F.avg_pool2d(head, stride) * 2, head[..., ::stride, ::stride].sin()]
        return (partial_channel(xs, weights, x, 3, stride) ** 2).sum()

    plain = torch.autograd.grad(loss(), [x, weights])
    graphed = torch.autograd.grad(loss(), [x, weights], create_graph=True)
    for a, b in zip(plain, graphed, strict=True):
        torch.testing.assert_close(b, a)


@needs_ext
def test_opcheck():
    for stride in (1, 2):
        xs, weights, x = make_inputs((2, 8, 4, 6, 4), stride, torch.float32, "contiguous")
        xs, weights, x = [t.detach() for t in xs], weights.detach(), x.detach()
        torch.library.opcheck(torch.ops.fastdarts_C.partial_channel.default, (xs, weights, x, 4, stride))
        grad = torch.randn(2, 8, 4 // stride, 6 // stride)
        torch.library.opcheck(
            torch.ops.fastdarts_C.partial_channel_backward.default, (grad, xs, weights, x, 4, stride)
        )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    xs, weights, x = make_inputs((2, 8, 4, 4, 4), 2, torch.float32, "contiguous")

    def edge(weights, x, *xs):
        return partial_channel(list(xs), weights, x, 4, 2).square().mean()

    compiled = torch.compile(edge, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(edge(weights, x, *xs), [weights, x, *xs])
    actual = torch.autograd.grad(compiled(weights, x, *xs), [weights, x, *xs])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("fn", [partial_channel, partial_channel_ref])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"groups": 3}, "groups is 3, expected a divisor of the 8 channels of x"),
        ({"stride": 3}, "stride is 3, expected 1 or 2"),
        ({"x": torch.randn(2, 8, 5, 4)}, "expected even H and W for stride 2"),
        ({"xs_shape": (2, 4, 2, 2)}, "xs[0] has shape (2, 4, 2, 2), expected (2, 2, 2, 2)"),
        (
            {"x": torch.randn(2, 8, 4, 4, dtype=torch.float64)},
            "x has dtype torch.float64, expected torch.float32",
        ),
        ({"weights": torch.ones(2)}, "weights has shape (2,), expected (3,) for 3 inputs"),
    ],
)
def test_bad_input_is_named(fn, change, message):
    args = {"groups": 4, "stride": 2, "x": torch.randn(2, 8, 4, 4), "weights": torch.ones(3) / 3}
    args.update(change)
    shape = change.get("xs_shape", (2, 2, 2, 2))
    xs = [torch.randn(shape) for _ in range(3)]
    with pytest.raises(UsageError) as info:
        fn(xs, args["weights"], args["x"], args["groups"], args["stride"])
    assert message in str(info.value)


# ---- the Triton kernels: on the GPU when there is one, else on the CPU under Triton's interpreter ----------------


def _triton_kernels():
    """fastdarts/ops/_triton/partial_channel.py (without a GPU, tests/conftest.py turned on Triton's interpreter)."""
    pytest.importorskip("triton")
    from fastdarts.ops._triton import partial_channel as kernels

    return kernels


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    # the last: planes of several blocks, the last one partly masked
    "shape",
    [(2, 8, 6, 4, 4), (1, 6, 4, 2, 2), (2, 4, 2, 2, 1), (1, 4, 132, 34, 2)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_triton_kernels_match_the_reference(dtype, stride, shape):
    kernels = _triton_kernels()
    groups = shape[-1]
    xs, weights, x = make_inputs(shape, stride, dtype, "mixed")
    xs = [t.detach().to(TRITON_DEVICE) for t in xs]
    weights, x = weights.detach().to(TRITON_DEVICE), x.detach().to(TRITON_DEVICE)
    with torch.no_grad():
        x[0, -1].fill_(0.5)  # a plane of ties: the first maximum of each window wins
    grad = torch.randn(
        x.shape[0], x.shape[1], x.shape[2] // stride, x.shape[3] // stride, dtype=torch.float64
    )
    grad = grad.to(dtype).to(TRITON_DEVICE)
    actual = (
        kernels.forward(xs, weights, x, groups, stride),
        *_flat(kernels.backward(grad, xs, weights, x, groups, stride)),
    )
    ref = (
        partial_channel_ref(xs, weights, x, groups, stride),
        *_flat(partial_channel_backward_ref(grad, xs, weights, x, groups, stride)),
    )
    as64 = [t.double() for t in (*xs, weights, x, grad)]
    oracle = (
        partial_channel_ref(as64[: len(xs)], as64[-3], as64[-2], groups, stride),
        *_flat(partial_channel_backward_ref(as64[-1], as64[: len(xs)], as64[-3], as64[-2], groups, stride)),
    )
    names = ["out", *(f"grad_xs[{k}]" for k in range(len(xs))), "grad_weights", "grad_x"]
    for name, a, r, o in zip(names, actual, ref, oracle, strict=True):
        if dtype == torch.bfloat16 and TRITON_DEVICE == "cpu":
            # Triton's interpreter truncates fp32 -> bfloat16 (it ignores fp_downcast_rounding="rtne"; Triton
            # 3.8), so on the CPU a result may be 1 bfloat16 ulp (2^-7 relative) further off than on the GPU
            torch.testing.assert_close(a.cpu().double(), o.cpu(), rtol=2**-7, atol=1e-6, msg=name)
        else:
            assert_matches(a.cpu(), r.cpu(), o.cpu(), name, reduction_scale=o.abs().max().item())


# Triton's interpreter runs a kernel's Python on NumPy arrays, so it accepts some code that the compiler refuses
# (a type that is not a constexpr where one is needed, mismatched types in a tl.where, ...). This script, run in a
# process without the interpreter, compiles every launch that forward and backward make, for each dtype and stride,
# to machine code for an A100 (sm_80) and an H100 (sm_90); a stand-in driver names the GPU, and nothing runs.
CROSS_COMPILE = """
import json, torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction
from fastdarts.ops._triton import partial_channel as kernels

class Target:  # the driver calls a launch makes; the device number is the architecture (a binder per target)
    def __init__(self, arch): self.arch = arch
    def get_current_target(self): return GPUTarget("cuda", self.arch, 32)
    def get_current_device(self): return self.arch
    def get_current_stream(self, device=None): return 0

launch, compiled = JITFunction.run, []
def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append([self.fn.__name__, arch, str(dtype), stride, size, len(kernel.asm["cubin"])])
JITFunction.run = compile_only
for arch in (80, 90):
    driver.set_active(Target(arch))
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for stride, size in ((1, 8), (2, 8), (1, 32), (2, 32)):  # blocks of 64, 16 (64), 1024 and 256 pixels
            x = torch.randn(2, 8, size, size, dtype=dtype)
            out = (2, 2, size // stride, size // stride)
            xs = [torch.randn(out, dtype=dtype) for _ in range(3)]
            weights = torch.rand(3, dtype=dtype)
            kernels.forward(xs, weights, x, 4, stride)
            kernels.backward(torch.randn(2, 8, *out[2:], dtype=dtype), xs, weights, x, 4, stride)
print(json.dumps(compiled))
"""


def test_triton_kernels_compile_for_a100_and_h100():
    _triton_kernels()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", CROSS_COMPILE], check=False, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = json.loads(out.stdout.splitlines()[-1])
    expected = {
        (name, arch, str(dtype), stride, size)
        for name in ("_forward_kernel", "_backward_kernel")
        for arch in (80, 90)
        for dtype in DTYPES
        for stride in (1, 2)
        for size in (8, 32)
    }
    assert {tuple(c[:5]) for c in compiled} == expected
    assert all(size > 0 for *_, size in compiled), compiled


def _flat(grads):
    grad_xs, grad_w, grad_x = grads
    return (*grad_xs, grad_w, grad_x)


def partial_channel_backward_ref(grad, xs, weights, x, groups, stride):
    """The reference's three gradients (autograd through partial_channel_ref)."""
    backend.set_backend("reference")
    try:
        return partial_channel_backward(grad, xs, weights, x, groups, stride)
    finally:
        backend.set_backend("auto")


@needs_cuda
@pytest.mark.parametrize("stride", [1, 2])
def test_on_cuda_the_op_runs_the_triton_kernels(stride):
    xs, weights, x = make_inputs((4, 16, 8, 8, 4), stride, torch.float32, "contiguous")
    xs = [t.detach().cuda().requires_grad_() for t in xs]
    weights, x = weights.detach().cuda().requires_grad_(), x.detach().cuda().requires_grad_()
    grad = torch.randn(4, 16, 8 // stride, 8 // stride, device="cuda")
    with torch.profiler.profile() as prof:
        actual = run(partial_channel, xs, weights, x, 4, stride, grad)
    assert "_PartialChannel" in {e.name for e in prof.events()}
    ref = run(partial_channel_ref, xs, weights, x, 4, stride, grad)
    for name, a, r in zip(["out", "grad_xs0", "grad_xs1", "grad_xs2", "grad_weights", "grad_x"], actual, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)
