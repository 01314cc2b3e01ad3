"""CPU micro-benchmark of dil_conv (ReLU -> depthwise -> pointwise -> BatchNorm, the unit of sep_conv and
dil_conv): the fastdarts op (compiled kernel) against dil_conv_ref (the eager ATen chain, oneDNN on CPU).

Real DARTS shapes, fp32, training-mode BatchNorm with running statistics, forward+backward as in a search step:
the digits default search's normal cells (batch 64, C=8, 8x8) and reductions (C=16 at 4x4, C=32 at 2x2) and a
CIFAR cell (batch 16, C=16, 32x32); with sep_conv_3x3's unit (k=3, d=1), dil_conv_5x5's (k=5, d=2) and a
stride-2 sep_conv_3x3 unit of a reduction edge.

    pytest benchmarks/bench_dil_conv.py      # add --benchmark-json benchmarks/results/<name>.json to keep
"""

import pytest
import torch

from fastdarts import backend
from fastdarts.ops import dil_conv, dil_conv_ref

SHAPES = [(64, 8, 8, 8), (64, 16, 4, 4), (64, 32, 2, 2), (16, 16, 32, 32)]
GEOMETRIES = {
    "k3d1": (3, 1, 1, 1),
    "k5d2": (5, 1, 4, 2),
    "k3d1s2": (3, 2, 1, 1),
}  # (k, stride, padding, dilation)
IMPLS = {"fastdarts": dil_conv, "reference": dil_conv_ref}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dil_conv_cpu(benchmark, shape, geometry, impl):
    if impl == "fastdarts" and not backend.kernel_live("dil_conv", torch.device("cpu")):
        pytest.skip(f"the compiled CPU kernel is not live: {backend.info()['cpp']['why']}")
    k, stride, padding, dilation = GEOMETRIES[geometry]
    fn = IMPLS[impl]
    C = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    dw = torch.randn(C, 1, k, k, generator=gen).requires_grad_()
    pw = torch.randn(C, C, 1, 1, generator=gen).requires_grad_()
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    args = (None, None, running_mean, running_var, stride, padding, dilation)
    grad = torch.randn_like(dil_conv_ref(x, dw, pw, *args))

    def step():
        return torch.autograd.grad(fn(x, dw, pw, *args), (x, dw, pw), grad)

    for _ in range(5):  # warm-up: the dispatcher, oneDNN's primitive cache, the thread pool
        step()
    benchmark.group = f"dil_conv {'x'.join(map(str, shape))} {geometry} fp32 forward+backward"
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark(step)
