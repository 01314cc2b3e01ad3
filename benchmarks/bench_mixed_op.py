"""CPU micro-benchmark of mixed_op: the fastdarts op (compiled kernel) against mixed_op_ref (plain PyTorch).

Real DARTS shapes: K = 7 candidates (the 8 primitives of the DARTS CNN space minus 'none'), fp32, forward and
forward+backward. One benchmark group per (shape, pass), so each group compares the op with the reference.

    pytest benchmarks/bench_mixed_op.py            # add --benchmark-json benchmarks/results/<name>.json to keep
"""

import pytest
import torch

from fastdarts import backend
from fastdarts.ops import mixed_op, mixed_op_ref

K = 7
SHAPES = [(64, 16, 8, 8), (64, 64, 2, 2), (16, 16, 32, 32)]
IMPLS = {"fastdarts": mixed_op, "reference": mixed_op_ref}


def make_inputs(shape, requires_grad):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=gen).requires_grad_(requires_grad) for _ in range(K)]
    alpha = torch.randn(K, generator=gen)
    weights = torch.softmax(alpha, 0).requires_grad_(requires_grad)
    return xs, weights, torch.randn(shape, generator=gen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mixed_op_cpu(benchmark, shape, pass_, impl):
    if impl == "fastdarts" and not backend.kernel_live("mixed_op", torch.device("cpu")):
        pytest.skip(f"the compiled CPU kernel is not live: {backend.info()['cpp']['why']}")
    fn = IMPLS[impl]
    xs, weights, grad = make_inputs(shape, requires_grad=pass_ != "forward")

    if pass_ == "forward":

        def step():
            with torch.no_grad():
                return fn(xs, weights)
    else:

        def step():
            return torch.autograd.grad(fn(xs, weights), [*xs, weights], grad)

    for _ in range(5):  # warm-up: first-call costs of the dispatcher and the thread pool
        step()
    benchmark.group = f"mixed_op K={K} {'x'.join(map(str, shape))} fp32 {pass_}"
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark(step)
