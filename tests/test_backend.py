"""fastdarts.backend: tune_cpu_allocator (freed tensor memory is reused instead of page-faulted back in) and where
Triton kernels run."""

import subprocess
import sys

import pytest
import torch

from fastdarts import backend

PROBE = """
import ctypes, resource, sys, torch
import fastdarts
if sys.argv[1] == "tuned":
    assert fastdarts.tune_cpu_allocator()
else:  # glibc's documented defaults, pinned: left alone its thresholds adapt to what was freed before
    assert ctypes.CDLL(None).mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
def step():  # like a forward and backward: 8 MiB of 1 MiB tensors alive at once, written, then all freed
    alive = [torch.empty(1 << 18).fill_(1.0) for _ in range(8)]
    del alive
for _ in range(3):  # warm up
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_tensor_memory():
    # 20 rounds of 8 MiB: with glibc's default thresholds each 1 MiB tensor is mapped fresh and faulted in (2048
    # pages a round); tuned, the same memory comes back every round.
    plain, tuned = page_faults("plain"), page_faults("tuned")
    assert plain > 20 * 2048 / 2 and tuned < plain / 10, (plain, tuned)


def test_triton_runs_only_on_a_gpu_with_the_auto_backend():
    assert not backend.triton_live(torch.device("cpu"))
    backend.set_backend("reference")
    assert not backend.triton_live(torch.device("cuda"))


COMPILE_FIRST = """
import torch
from fastdarts.ops import pool_bn
x = torch.randn(2, 3, 6, 6)
f = torch.compile(lambda x: pool_bn(x, "max", 1), fullgraph=True)
torch.testing.assert_close(f(x), pool_bn(x, "max", 1))
"""


def test_compile_fullgraph_in_a_fresh_process():
    # the first kernel_live of a process, inside torch.compile: the dispatcher query is not traceable, and a
    # fullgraph compile failed until some eager call had cached its answer
    subprocess.run([sys.executable, "-c", COMPILE_FIRST], check=True, capture_output=True)


def test_kernels_off_under_torch_func_transforms():
    cpu = torch.device("cpu")
    live = backend.kernel_live("mixed_op", cpu)
    seen = []
    torch.func.vmap(lambda x: seen.append(backend.kernel_live("mixed_op", cpu)) or x)(torch.ones(2, 3))
    assert seen == [False]
    assert backend.kernel_live("mixed_op", cpu) == live


def _compiled_transform_cases():
    from fastdarts.ops import depthwise_conv, dil_conv, mixed_op, pool_bn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    dw, pw = torch.randn(3, 1, 3, 3, generator=gen), torch.randn(4, 3, 1, 1, generator=gen)
    ys = list(torch.randn(3, 2, 3, 4, 4, generator=gen))
    return {
        "depthwise_conv": (lambda w: depthwise_conv(x, w, 1, 1, 1), dw),
        "dil_conv": (lambda a: dil_conv(a, dw, pw, None, None, None, None, 1, 1, 1, True, 0.1, 1e-5), x),
        "pool_bn": (lambda a: pool_bn(a, "max", 2), x),
        "mixed_op": (lambda w: mixed_op(ys, w), torch.tensor([0.2, 0.3, 0.5])),
    }


@pytest.mark.parametrize("op", ["depthwise_conv", "dil_conv", "pool_bn", "mixed_op"])
def test_compiled_gradient_inside_a_transform_is_the_references(op):
    # a compiled kernel traced inside torch.func.grad lost its autograd: the gradient came out zero, silently
    fn, arg = _compiled_transform_cases()[op]
    # (weighted by fixed random numbers: a BatchNorm output's sum of squares is nearly constant, its gradient ~eps)
    weights = torch.randn(fn(arg).shape, generator=torch.Generator().manual_seed(1))
    loss = lambda a: (fn(a) * weights).sum()
    expected = torch.func.grad(loss)(arg)
    got = torch.compile(torch.func.grad(loss), backend="eager", fullgraph=True)(arg)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
