"""CPU micro-benchmark of fd_hvp's own work, the weights moved to w + eps v, w - eps v and back (the two gradient
passes left out: ``grad_at`` returns at once): fd_hvp's multi-tensor ops against fd_hvp_ref's one op per tensor.
On the weights of the `make search` supernet (5 cells, C=8) and of the CIFAR one (8 cells, C=16), fp32.

On the CPU torch's multi-tensor ops loop over the tensors as the reference does, so little is expected here; the
GPU suite (``python -m benchmarks.run --only 'op/fd_hvp*'``) measures the saving in kernel launches.

    pytest benchmarks/bench_fd_hvp.py              # add --benchmark-json benchmarks/results/<name>.json to keep
"""

import pytest
import torch

from fastdarts.nn import SearchNetwork
from fastdarts.ops import fd_hvp, fd_hvp_ref

NETS = {"digits-5x8": (8, 5, 1), "cifar-8x16": (16, 8, 3)}  # (C, layers, image channels)
IMPLS = {"fastdarts": fd_hvp, "reference": fd_hvp_ref}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("net", NETS)
def test_fd_hvp_cpu(benchmark, net, impl):
    C, layers, channels = NETS[net]
    torch.manual_seed(0)
    model = SearchNetwork(C, 10, layers, in_channels=channels)
    weights = model.weight_parameters()
    v = [torch.randn_like(p) for p in weights]
    alphas = model.alphas_normal.detach()

    def step():
        return IMPLS[impl](lambda: [alphas], weights, v)

    for _ in range(3):  # warm-up
        step()
    benchmark.group = f"fd_hvp weights moved, {net} supernet ({len(weights)} tensors) fp32"
    benchmark.extra_info.update(
        threads=torch.get_num_threads(), torch=torch.__version__, tensors=len(weights)
    )
    benchmark(step)
