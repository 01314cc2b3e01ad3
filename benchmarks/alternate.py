"""CPU per-op timing with the two paths alternating, for machines whose speed drifts between runs (this project's
2-core CPU does by tens of percent, more than the differences at the smallest shapes): forward+backward of the
fastdarts op and of its reference, 100 calls of one then 100 of the other, 30 rounds, the median of each.

    python -m benchmarks.alternate    # prints one line per case: reference us, fastdarts us, their ratio

The cases are bench_pool_bn.py's stride-2 max and average pools on the digits search's small planes, where the two
paths are closest.
"""

import statistics
import time

import torch

import fastdarts
from fastdarts.ops import pool_bn, pool_bn_ref

CASES = [((64, 8, 8, 8), "max"), ((64, 16, 4, 4), "max"), ((64, 32, 2, 2), "max"), ((64, 16, 4, 4), "avg")]
CALLS, ROUNDS = 100, 30


def _per_call_us(fn) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e6


def _path(op, x, kind, stats, grad):
    return lambda: torch.autograd.grad(op(x, kind, 2, *stats), x, grad)


def main() -> None:
    fastdarts.tune_cpu_allocator()
    for shape, kind in CASES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
        stats = torch.zeros(shape[1]), torch.ones(shape[1])
        grad = torch.randn_like(pool_bn_ref(x, kind, 2, *stats))
        paths = [_path(f, x, kind, stats, grad) for f in (pool_bn_ref, pool_bn)]
        for _ in range(50):  # warm-up
            for path in paths:
                path()
        times = [[], []]
        for _ in range(ROUNDS):
            for path, kept in zip(paths, times):
                kept.append(_per_call_us(path))
        ref, fast = (statistics.median(t) for t in times)
        size = "x".join(map(str, shape))
        print(f"pool_bn {kind} s2 {size} fp32 forward+backward: {ref:.0f} us reference, {fast:.0f} us fastdarts, "
              f"{ref / fast:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
