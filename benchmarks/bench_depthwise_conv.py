"""CPU micro-benchmark of depthwise_conv: the fastdarts op (compiled kernel) against depthwise_conv_ref (ATen's
F.conv2d with groups=C, oneDNN on CPU).

Real DARTS shapes, fp32: the normal cells of the digits default search (batch 64, C=8, 8x8), its reductions
(C=16 at 4x4, C=32 at 2x2) and a CIFAR cell (batch 16, C=16, 32x32); each with sep_conv_3x3's kernel
(k=3, d=1) and dil_conv_5x5's (k=5, d=2). Forward+backward, as in a search step.

    pytest benchmarks/bench_depthwise_conv.py      # add --benchmark-json benchmarks/results/<name>.json to keep
"""

import pytest
import torch

from fastdarts import backend
from fastdarts.ops import depthwise_conv, depthwise_conv_ref

SHAPES = [(64, 8, 8, 8), (64, 16, 4, 4), (64, 32, 2, 2), (16, 16, 32, 32)]
GEOMETRIES = {
    "k3d1": (3, 1, 1, 1),
    "k5d2": (5, 1, 4, 2),
    "k3d1s2": (3, 2, 1, 1),
}  # (k, stride, padding, dilation)
IMPLS = {"fastdarts": depthwise_conv, "reference": depthwise_conv_ref}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_depthwise_conv_cpu(benchmark, shape, geometry, impl):
    if impl == "fastdarts" and not backend.kernel_live("depthwise_conv", torch.device("cpu")):
        pytest.skip(f"the compiled CPU kernel is not live: {backend.info()['cpp']['why']}")
    k, stride, padding, dilation = GEOMETRIES[geometry]
    fn = IMPLS[impl]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    weight = torch.randn(shape[1], 1, k, k, generator=gen).requires_grad_()
    grad = torch.randn_like(depthwise_conv_ref(x, weight, stride, padding, dilation))

    def step():
        return torch.autograd.grad(fn(x, weight, stride, padding, dilation), (x, weight), grad)

    for _ in range(
        5
    ):  # warm-up: first-call costs of the dispatcher, oneDNN's primitive cache, the thread pool
        step()
    benchmark.group = f"depthwise_conv {'x'.join(map(str, shape))} {geometry} fp32 forward+backward"
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark(step)
