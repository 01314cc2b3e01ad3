"""CPU micro-benchmark of partial_channel: the fastdarts op (compiled kernel) against partial_channel_ref (split,
weighted sum, max pool, cat and shuffle in plain PyTorch) and against a plain copy of the output's bytes (the floor
for any op that writes its output once).

Real PC-DARTS shapes: K = 4 groups, 7 candidates (the DARTS primitives minus 'none'), fp32, a normal edge (stride
1) and a reduction edge (stride 2); forward and forward+backward. One benchmark group per (shape, pass).

    pytest benchmarks/bench_partial_channel.py     # add --benchmark-json benchmarks/results/<name>.json to keep
"""

import pytest
import torch

from fastdarts import backend
from fastdarts.ops import partial_channel, partial_channel_ref

K, GROUPS = 7, 4
# (B, C, H, W, stride): the digits default's first cell, a reduction edge there, and a CIFAR cell at batch 16
SHAPES = [(64, 8, 8, 8, 1), (64, 16, 8, 8, 2), (16, 16, 32, 32, 1)]
IMPLS = {"fastdarts": partial_channel, "reference": partial_channel_ref, "copy": None}


def make_inputs(shape, requires_grad):
    B, C, H, W, stride = shape
    gen = torch.Generator().manual_seed(0)
    out = (B, C // GROUPS, H // stride, W // stride)
    xs = [torch.randn(out, generator=gen).requires_grad_(requires_grad) for _ in range(K)]
    weights = torch.softmax(torch.randn(K, generator=gen), 0).requires_grad_(requires_grad)
    x = torch.randn(B, C, H, W, generator=gen).requires_grad_(requires_grad)
    return xs, weights, x, torch.randn(B, C, H // stride, W // stride, generator=gen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_partial_channel_cpu(benchmark, shape, pass_, impl):
    if impl == "fastdarts" and not backend.kernel_live("partial_channel", torch.device("cpu")):
        pytest.skip(f"the compiled CPU kernel is not live: {backend.info()['cpp']['why']}")
    if impl == "copy" and pass_ != "forward":
        pytest.skip("the copy is the forward's floor only")
    xs, weights, x, grad = make_inputs(shape, requires_grad=pass_ != "forward")
    stride = shape[-1]
    fn = IMPLS[impl]
    if impl == "copy":
        src, dst = grad, torch.empty_like(grad)

        def step():
            return dst.copy_(src)
    elif pass_ == "forward":

        def step():
            with torch.no_grad():
                return fn(xs, weights, x, GROUPS, stride)
    else:

        def step():
            return torch.autograd.grad(fn(xs, weights, x, GROUPS, stride), [*xs, weights, x], grad)

    for _ in range(5):  # warm-up: first-call costs of the dispatcher and the thread pool
        step()
    benchmark.group = f"partial_channel K={GROUPS} {'x'.join(map(str, shape))} fp32 {pass_}"
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark(step)
