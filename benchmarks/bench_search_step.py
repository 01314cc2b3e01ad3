"""One whole search iteration (architecture step + weight step) of the DARTS supernet on the CPU: the default
backend (fastdarts' compiled kernels) against the pure-PyTorch reference path, in the same run.

Shapes: the `make search` default (5 cells, C=8, batch 64, 8x8 digits, 1 channel) and a CIFAR-sized supernet
(8 cells, C=16, batch 16, 32x32, 3 channels); first and second order (finite-difference HVP) at both; PC-DARTS
(K = 4, edge normalisation) first order at the CIFAR size. The iteration is the GPU suite's
(``benchmarks.run.search_step``: as ``fastdarts search`` runs it, gradient clipping included).
(benchmarks/conftest.py runs the process with fastdarts.tune_cpu_allocator(), as `fastdarts search` does.)

    pytest benchmarks/bench_search_step.py         # add --benchmark-json benchmarks/results/<name>.json to keep
"""

import pytest
import torch

import fastdarts
from benchmarks.run import search_step
from fastdarts.nn import SearchNetwork

# (name, layers, C, batch, image size, image channels, order, algo)
CASES = [
    ("digits-5x8-b64", 5, 8, 64, 8, 1, "first", "darts"),
    ("digits-5x8-b64", 5, 8, 64, 8, 1, "second", "darts"),
    ("cifar-8x16-b16", 8, 16, 16, 32, 3, "first", "darts"),
    ("cifar-8x16-b16", 8, 16, 16, 32, 3, "second", "darts"),
    ("cifar-8x16-b16", 8, 16, 16, 32, 3, "first", "pcdarts"),
]
# PC-DARTS: K = 4 partial channels and edge normalisation
VARIANTS = {"darts": {}, "pcdarts": {"partial_channels": 4, "edge_normalization": True}}


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[-2]}-{c[-1]}")
def test_search_step_cpu(benchmark, case, backend_name):
    name, layers, C, batch, size, channels, order, algo = case
    fastdarts.set_backend(backend_name)
    torch.manual_seed(0)
    net = SearchNetwork(C, 10, layers, in_channels=channels, **VARIANTS[algo])
    x, y = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))
    x_val, y_val = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))
    step = search_step(net, order, (x, y), (x_val, y_val))
    benchmark.group = f"search step {name} {algo} {order} order"
    benchmark.extra_info.update(
        threads=torch.get_num_threads(), torch=torch.__version__, backend=backend_name
    )
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
