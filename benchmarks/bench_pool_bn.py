"""CPU micro-benchmark of pool_bn (3x3 max/avg pool -> BatchNorm without affine, DARTS' pooling candidates): the
fastdarts op (compiled kernel) against pool_bn_ref (ATen's max_pool2d / avg_pool2d and batch_norm).

Real DARTS shapes, fp32, training mode with running statistics, forward+backward: the digits default search's
cell states (batch 64: C=8 at 8x8, C=16 at 4x4, C=32 at 2x2) and a CIFAR cell state (batch 16, C=16, 32x32), at
stride 1 (normal edges) and 2 (reduction edges).

    pytest benchmarks/bench_pool_bn.py      # add --benchmark-json benchmarks/results/<name>.json to keep
"""

import pytest
import torch

from fastdarts import backend
from fastdarts.ops import pool_bn, pool_bn_ref

SHAPES = [(64, 8, 8, 8), (64, 16, 4, 4), (64, 32, 2, 2), (16, 16, 32, 32)]
IMPLS = {"fastdarts": pool_bn, "reference": pool_bn_ref}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pool_bn_cpu(benchmark, shape, kind, stride, impl):
    if impl == "fastdarts" and not backend.kernel_live("pool_bn", torch.device("cpu")):
        pytest.skip(f"the compiled CPU kernel is not live: {backend.info()['cpp']['why']}")
    fn = IMPLS[impl]
    C = shape[1]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    grad = torch.randn_like(pool_bn_ref(x, kind, stride, running_mean, running_var))

    def step():
        return torch.autograd.grad(fn(x, kind, stride, running_mean, running_var), x, grad)

    for _ in range(5):  # warm-up
        step()
    benchmark.group = f"pool_bn {kind} s{stride} {'x'.join(map(str, shape))} fp32 forward+backward"
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark(step)
