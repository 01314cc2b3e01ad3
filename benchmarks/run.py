"""The benchmark suite: fastdarts against the plain PyTorch reference, measured in the same run, on the GPU.

    python -m benchmarks.run                        # every case on cuda -> benchmarks/results/<gpu>-suite.json
    python -m benchmarks.run --only 'step/cifar*'   # the cases matching any of these patterns (fnmatch)
    python -m benchmarks.run --compile              # also the reference under torch.compile (slow to compile)
    python -m benchmarks.run --only 'step/imagenet*,compat/*' --merge   # add to the results file (split runs)
    python -m benchmarks.run --impls 'fastdarts,reference'   # only these impls of each case (fnmatch)
    python -m benchmarks.run --list                 # the case names
    python -m benchmarks.run --report FILE          # the table of a results file again
    python -m benchmarks.run --report FILE --plot benchmarks/results/speedups.svg   # and a bar chart of it
    python -m benchmarks.run --device cpu --quick   # tiny shapes, a few runs: checks that the suite runs

Cases (``--quick`` shrinks every shape to 3 cells, C=8, batch 2):
- ``step/<net>/<order>``: one search iteration as ``fastdarts search`` runs it (architecture step, then the weight
  step with gradient clipping at 5), first and second order (finite-difference HVP), on the DARTS supernet at
  CIFAR shapes (8 cells, C=16, 32x32) at batch 64 and 256 and on the ImageNet-style supernet (224x224, batch
  128), and PC-DARTS first order (K=4 at CIFAR batch 256, K=2 on ImageNet batch 128, edge normalisation).
  Impls: ``fastdarts`` (backend "auto", eager), its options ``fastdarts-graphs`` (``--cuda-graphs``: recorded once
  as a CUDA graph, then replayed; CUDA only),
  ``fastdarts-per-edge`` on CUDA and ``fastdarts-batched`` elsewhere (the cells' edges one by one, or batched by
  the states they read: ``fastdarts.nn.batched``, the default on CUDA), ``fastdarts-recompute``
  (``--recompute-edges``: batched, each group recomputed in the backward), ``fastdarts-bf16`` (``--amp bf16``:
  the forward passes under ``torch.autocast`` in bfloat16) and ``fastdarts-channels-last`` (``--channels-last``),
  ``reference`` (backend "reference": plain PyTorch, eager) and with ``--compile`` ``reference-compiled`` (the
  reference supernet under ``torch.compile``); second order also ``fastdarts-hvp-batched`` (``--hvp fd-batched``:
  w+ and w- in one vmap pass).
- ``hvp/cifar-b64``: the finite-difference Hessian-vector product alone: fastdarts' in-place
  ``Architect.fd_hvp`` (``fastdarts``: one side after the other; ``fastdarts-batched``: both in one vmap pass;
  ``fastdarts-reference-cells``: one side after the other on the reference backend's cells, so that only the way
  the HVP is taken differs from the baseline) against the copy-model approach of the DARTS code bases (a deep
  copy of the supernet per side) on the reference path.
- ``op/fd_hvp/...``: fd_hvp's own work on that supernet's weights (w + eps v, w - eps v and back, the gradient
  passes left out), its multi-tensor ops against ``fd_hvp_ref``'s one op per tensor.
- ``op/mixed_op/...``, ``op/partial_channel/...``: the fused kernels (forward+backward, and the partial channel's
  forward alone) against their ``<op>_ref``; the partial channel also against a plain copy of its output bytes.
- ``compat/<code base>``: one iteration of each original code base's own loop on ``fastdarts.compat`` against the
  plain oracle of that code base (``benchmarks/bench_compat.py``).
- ``agreement/cifar-b64``: 50 first-order search iterations (5 with --quick) from one seed in fp32 on both
  backends; the largest difference between their alphas, whether it is within the 1e-3 the speed issue sets, and
  the float32 noise floor: the reference against itself with each batch's samples in reverse order.

Every timing is the median of ``torch.utils.benchmark.Timer.blocked_autorange`` after warm-up (the accelerator
synchronised); peak memory is ``torch.cuda.max_memory_allocated`` from the build of the callable to the end of
the timed runs (a CUDA graph's pool is taken when it is recorded; none on the CPU); the ATen calls of one call are
counted with a dispatch mode (the kernel launches an eager call makes on a GPU; a CUDA graph's replay makes none).
A case that fails (out of memory, a compile that outlasts --compile-timeout) is recorded with its error and the suite
goes on. The results file is rewritten after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import gc
import html
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark as torch_benchmark
from torch.utils._python_dispatch import TorchDispatchMode

import fastdarts
from fastdarts.nn import SearchNetwork
from fastdarts.ops import fd_hvp, fd_hvp_ref, mixed_op, mixed_op_ref, partial_channel, partial_channel_ref
from fastdarts.search import Architect, ArchitectConfig
from fastdarts.search.graphs import GraphedStep
from fastdarts.spaces import DARTS, DARTS_IMAGENET, SearchSpace

RESULTS = Path(__file__).with_name("results")
LR = 0.025
K = 7  # candidates of a DARTS edge that run (the 8 primitives minus 'none')


@dataclass(frozen=True)
class Net:
    """A supernet and its batch. partial_channels > 1: PC-DARTS (with edge normalisation)."""

    layers: int
    C: int
    batch: int
    size: int
    classes: int = 10
    space: SearchSpace = DARTS
    partial_channels: int = 1

    def quick(self) -> Net:
        size = 32 if self.space.stem == "imagenet" else 8  # the ImageNet stem divides by 8
        return dataclasses.replace(self, layers=3, C=8, batch=2, size=size, classes=10)


NETS = {
    "cifar-b64": Net(8, 16, 64, 32),
    "cifar-b256": Net(8, 16, 256, 32),
    "imagenet-b128": Net(8, 16, 128, 224, 1000, DARTS_IMAGENET),
    "pcdarts-cifar-b256": Net(8, 16, 256, 32, partial_channels=4),
    "pcdarts-imagenet-b128": Net(8, 16, 128, 224, 1000, DARTS_IMAGENET, partial_channels=2),
}
STEPS = [
    (net, order) for net in ("cifar-b64", "cifar-b256", "imagenet-b128") for order in ("first", "second")
]
STEPS += [("pcdarts-cifar-b256", "first"), ("pcdarts-imagenet-b128", "first")]
# (B, C, H, W) of one edge's candidate outputs: the CIFAR supernet's three stages at batch 64, the first at 256
MIXED_SHAPES = [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8), (256, 16, 32, 32)]
# (B, C, H, W, stride, K) of a PC-DARTS edge's input: CIFAR batch 256 normal and reduction edges, ImageNet 128
PARTIAL_SHAPES = [(256, 16, 32, 32, 1, 4), (256, 32, 32, 32, 2, 4), (128, 16, 28, 28, 1, 2)]
# the code bases' own loops, at each original's own shapes (bench_compat.CASES)
COMPAT = ("darts", "ptdarts", "pcdarts", "pcdarts-imagenet")
IMPL_BACKEND = {"fastdarts": "auto", "reference": "reference", "reference-compiled": "reference",
                "fastdarts-reference-cells": "reference"}  # fmt: skip
# the impls fastdarts is compared against; every other impl is fastdarts or one of its options
BASELINES = ("reference", "reference-compiled", "original", "copy")


# ---- what is measured ------------------------------------------------------------------------------------------


def supernet(net: Net, device: torch.device, seed: int = 0):
    """The supernet of ``net`` on ``device`` with a training and a validation batch, from ``seed``."""
    torch.manual_seed(seed)
    pc = net.partial_channels
    model = SearchNetwork(net.C, net.classes, net.layers, net.space, 3, pc, edge_normalization=pc > 1)
    model.to(device)

    def batch():
        x = torch.randn(net.batch, 3, net.size, net.size, device=device)
        return x, torch.randint(0, net.classes, (net.batch,), device=device)

    return model, batch(), batch()


def search_step(
    model: SearchNetwork, order: str, train, val, capturable: bool = False, hvp: str = "fd"
) -> Callable[[], None]:
    """One search iteration as ``fastdarts search`` runs it: the architecture step, then the weight step (SGD
    with momentum and weight decay, gradients clipped at norm 5). capturable: Adam's state on the GPU, so that
    the step can be recorded as a CUDA graph; hvp: the second order's Hessian-vector product mode."""
    weights = model.weight_parameters()
    optimizer = torch.optim.SGD(weights, LR, momentum=0.9, weight_decay=3e-4, foreach=True)  # as Search's
    architect = Architect(model, ArchitectConfig(order=order, hvp=hvp, capturable=capturable))

    def step():
        architect.step(*train, *val, LR, optimizer)
        optimizer.zero_grad(set_to_none=True)
        model.loss(*train).backward()
        nn.utils.clip_grad_norm_(weights, 5.0)
        optimizer.step()

    return step


def _step_case(net: Net, order: str, impl: str, device):
    model, train, val = supernet(net, device)
    if impl == "reference-compiled":
        model.compile()
    edges = {"fastdarts-batched": (True, False), "fastdarts-per-edge": (False, False),
             "fastdarts-recompute": (True, True)}  # fmt: skip
    if impl in edges:  # the cells' edges batched or not, and recomputed, whatever the device
        for cell in model.cells:
            cell.batched_edges, cell.recompute_edges = edges[impl]
    if impl == "fastdarts-channels-last":
        model.to(memory_format=torch.channels_last)
        train, val = ((x.contiguous(memory_format=torch.channels_last), y) for x, y in (train, val))
    hvp = "fd-batched" if impl == "fastdarts-hvp-batched" else "fd"
    step = search_step(model, order, train, val, capturable=impl == "fastdarts-graphs", hvp=hvp)
    if impl == "fastdarts-graphs":  # what --cuda-graphs does: the iteration recorded once, then replayed
        graphed = GraphedStep(lambda: step() or ())
        for _ in range(graphed.warmup + 1):  # the eager warm-up and the recording, before any timing
            graphed()

        def graphed_step():
            graphed()
            if graphed.failed:  # an eager step must not be timed as a graphed one
                raise RuntimeError("recording the search step as a CUDA graph failed (see the log)")

        return graphed_step
    if impl != "fastdarts-bf16":
        return step

    def autocast_step():  # what --amp bf16 does: the forward passes under autocast
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step()

    return autocast_step


def copy_model_fd_hvp(model: SearchNetwork, v, x, y, r: float = 0.01):
    """The finite-difference HVP as the DARTS code bases take it, on deep copies of the model (one per side)."""
    eps = r / torch.cat([t.flatten() for t in v]).norm()
    sides = []
    for sign in (1.0, -1.0):
        side = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(side.weight_parameters(), v):
                p.add_(sign * eps * t)
        sides.append(torch.autograd.grad(side.loss(x, y), side.arch_parameters()))
    return [(gp - gm) / (2 * eps) for gp, gm in zip(*sides)]


def _hvp_case(net: Net, impl: str, device):
    model, train, _ = supernet(net, device)
    v = [torch.randn_like(p) for p in model.weight_parameters()]
    if impl != "reference":  # fastdarts-reference-cells: the in-place HVP on the reference's cells
        hvp = "fd-batched" if impl == "fastdarts-batched" else "fd"
        architect = Architect(model, ArchitectConfig(order="second", hvp=hvp))
        return lambda: architect.fd_hvp(v, *train)
    return lambda: copy_model_fd_hvp(model, v, *train)


def _fd_hvp_case(net: Net, impl: str, device):
    """fd_hvp's own work on the supernet's weights: w + eps v, w - eps v and back (grad_at returns at once)."""
    model, _, _ = supernet(net, device)
    weights = model.weight_parameters()
    v = [torch.randn_like(p) for p in weights]
    alphas = model.alphas_normal.detach()
    fn = fd_hvp if impl == "fastdarts" else fd_hvp_ref
    return lambda: fn(lambda: [alphas], weights, v)


def _mixed_case(shape, impl: str, device):
    gen = torch.Generator(device).manual_seed(0)
    xs = [torch.randn(shape, device=device, generator=gen, requires_grad=True) for _ in range(K)]
    weights = torch.softmax(torch.randn(K, device=device, generator=gen), 0).requires_grad_()
    grad = torch.randn(shape, device=device, generator=gen)
    fn = mixed_op if impl == "fastdarts" else mixed_op_ref
    return lambda: torch.autograd.grad(fn(xs, weights), [*xs, weights], grad)


def _partial_case(shape, pass_: str, impl: str, device):
    B, C, H, W, stride, groups = shape
    gen = torch.Generator(device).manual_seed(0)
    grad = pass_ == "forward+backward"
    out = (B, C, H // stride, W // stride)
    xs = [torch.randn((B, C // groups, *out[2:]), device=device, generator=gen, requires_grad=grad)
          for _ in range(K)]  # fmt: skip
    weights = torch.softmax(torch.randn(K, device=device, generator=gen), 0).requires_grad_(grad)
    x = torch.randn(shape[:4], device=device, generator=gen, requires_grad=grad)
    if impl == "copy":  # the floor of any op that writes its output once
        src, dst = torch.randn(out, device=device, generator=gen), torch.empty(out, device=device)
        return lambda: dst.copy_(src)
    fn = partial_channel if impl == "fastdarts" else partial_channel_ref
    if not grad:
        return lambda: fn(xs, weights, x, groups, stride)
    g = torch.randn(out, device=device, generator=gen)
    return lambda: torch.autograd.grad(fn(xs, weights, x, groups, stride), [*xs, weights, x], g)


def _compat_case(base: str, quick: bool, impl: str, device):
    from benchmarks.bench_compat import CASES, compat_loop  # imports the originals' oracles from tests/

    if quick:
        return compat_loop(base, impl, device, 2, C=8, layers=3, image_size=32)
    return compat_loop(base, impl, device, CASES[base][0])


def agreement(net: Net, steps: int, device) -> dict:
    """The largest |alpha difference| between the two backends after ``steps`` first-order iterations, in float32
    (TF32 convolutions off for the run: cuDNN's default on a GPU rounds their inputs to 10 mantissa bits), and the
    float32 noise floor of that figure: the reference against itself with the samples of each batch in another
    order, the same iteration in exact arithmetic (BatchNorm and the mean loss do not depend on the order) rounded
    differently."""
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        runs = [_alphas_after(name, net, steps, device) for name in ("auto", "reference")]
        reordered = _alphas_after("reference", net, steps, device, reorder=True)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    diff, floor = (_max_diff(a, runs[1]) for a in (runs[0], reordered))
    return {
        "steps": steps,
        "max_abs_alpha_diff": diff,
        "reference_reordered_diff": floor,
        "alpha_scale": max(a.abs().max().item() for a in runs[1]),
        "within_1e-3": diff <= 1e-3,
    }


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _alphas_after(backend: str, net: Net, steps: int, device, reorder: bool = False) -> list[torch.Tensor]:
    fastdarts.set_backend(backend)
    model, train, val = supernet(net, device)
    if reorder:  # the samples of each batch reversed
        train, val = ((x.flip(0), y.flip(0)) for x, y in (train, val))
    step = search_step(model, "first", train, val)
    for _ in range(steps):
        step()
    return [a.detach().double() for a in model.arch_parameters()]


@dataclass(frozen=True)
class Case:
    name: str
    impls: tuple[str, ...]
    build: Callable  # (impl, device) -> the callable that is timed


def cases(quick: bool, compile_reference: bool, cuda: bool = False) -> dict[str, Case]:
    """Every case of the suite by name (fastdarts-graphs only on CUDA)."""
    nets = {name: net.quick() if quick else net for name, net in NETS.items()}
    step_impls = ("fastdarts",) + (("fastdarts-graphs",) if cuda else ())
    step_impls += ("fastdarts-bf16", "fastdarts-channels-last", "reference")
    step_impls += ("reference-compiled",) if compile_reference else ()
    # the other side of batched cells (fastdarts.nn.batched: by default on a GPU)
    step_impls += (("fastdarts-per-edge",) if cuda else ("fastdarts-batched",)) + ("fastdarts-recompute",)
    out = []
    for n, o in STEPS:
        impls = step_impls + (("fastdarts-hvp-batched",) if o == "second" else ())
        out.append(Case(f"step/{n}/{o}", impls, lambda i, d, n=n, o=o: _step_case(nets[n], o, i, d)))
    hvp_impls = ("fastdarts", "fastdarts-batched", "fastdarts-reference-cells", "reference")
    out.append(Case("hvp/cifar-b64", hvp_impls, lambda i, d: _hvp_case(nets["cifar-b64"], i, d)))
    name = "op/fd_hvp/cifar-b64-weights-moved"
    out.append(Case(name, ("fastdarts", "reference"), lambda i, d: _fd_hvp_case(nets["cifar-b64"], i, d)))
    for shape in MIXED_SHAPES:
        shape = (2, shape[1] // 4, 4, 4) if quick else shape
        name = f"op/mixed_op/{'x'.join(map(str, shape))}/forward+backward"
        out.append(Case(name, ("fastdarts", "reference"), lambda i, d, s=shape: _mixed_case(s, i, d)))
    for shape in PARTIAL_SHAPES:
        shape = (2, 8, 4, 4, *shape[4:]) if quick else shape
        for pass_ in ("forward", "forward+backward"):
            impls = ("fastdarts", "reference") + (("copy",) if pass_ == "forward" else ())
            name = f"op/partial_channel/{'x'.join(map(str, shape))}/{pass_}"
            out.append(Case(name, impls, lambda i, d, s=shape, p=pass_: _partial_case(s, p, i, d)))
    for base in COMPAT:
        out.append(Case(f"compat/{base}", ("fastdarts", "original"),
                        lambda i, d, b=base: _compat_case(b, quick, i, d)))  # fmt: skip
    return {case.name: case for case in out}


# ---- measuring -------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise _Timeout


class _CallCount(TorchDispatchMode):
    """Counts the ATen calls that compute (views, metadata and allocations left out): on a GPU, the kernel launches
    of an eager call, whatever its speed here."""

    SKIP = frozenset({
        "view", "_unsafe_view", "expand", "t", "slice", "select", "unsqueeze", "squeeze", "split", "split_with_sizes",
        "as_strided", "detach", "alias", "permute", "transpose", "reshape", "unbind", "_reshape_alias", "empty",
        "empty_like", "new_empty", "new_empty_strided", "empty_strided", "promote_types", "lift_fresh", "set_",
    })  # fmt: skip

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket.__name__ not in self.SKIP
        return func(*args, **(kwargs or {}))


def aten_calls(fn: Callable) -> int:
    """The ATen calls one call of ``fn`` makes (:class:`_CallCount`)."""
    with _CallCount() as count:
        fn()
    return count.calls


def measure(build: Callable[[], Callable], device: torch.device, warmup: int, min_time: float,
            timeout: float, count: bool = True) -> dict:  # fmt: skip
    """Builds the callable, runs it ``warmup`` times (the first call timed: compiles, caches), counts the ATen calls
    of one call (``count``; not under torch.compile, which a dispatch mode would send back to eager) and times it."""
    if device.type == "cuda":  # from before the build: a CUDA graph takes its memory pool when it is recorded
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:  # a torch.compile that does not finish in time must not take the whole suite with it
        signal.signal(signal.SIGALRM, _raise_timeout)
        signal.alarm(max(1, int(timeout)))
    try:
        fn = build()
        fn()
        _sync(device)
    except _Timeout:
        return {"error": f"the first call did not finish within {timeout:.0f} s"}
    finally:
        if use_alarm:
            signal.alarm(0)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    calls = aten_calls(fn) if count else None
    _sync(device)
    m = torch_benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": len(m.times) * m.number_per_run,
            "peak_gib": peak, "first_call_s": first, "aten_calls": calls}  # fmt: skip


def _release(device: torch.device) -> None:
    fastdarts.set_backend("auto")
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_one(case: Case, impl: str, device, args) -> dict:
    fastdarts.set_backend(IMPL_BACKEND.get(impl, "auto"))
    try:
        return measure(
            lambda: case.build(impl, device), device, args.warmup, args.min_time, args.compile_timeout,
            count=impl != "reference-compiled",
        )  # fmt: skip
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # noqa: BLE001 - one broken case is recorded, the suite goes on
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        _release(device)


# ---- the results file -----------------------------------------------------------------------------------------


def _git_revision() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], capture_output=True, text=True, check=False).stdout.strip()

    if "FASTDARTS_GIT_REVISION" in os.environ:  # a copy of the tree sent to another machine: what the sender says
        return os.environ["FASTDARTS_GIT_REVISION"] + " (as sent)"
    revision = git("rev-parse", "HEAD") or "unknown"
    return revision + (" (dirty)" if git("status", "--porcelain", "--untracked-files=no") else "")


def environment(device: torch.device) -> dict:
    """The device, the versions and the git revision a results file was measured with."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name, "device_type": device.type, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "python": platform.python_version(), "git": _git_revision(), "fastdarts": fastdarts.info(),
    }  # fmt: skip


def summary(results: dict) -> list[str]:
    """The results as lines of a markdown table: fastdarts' median and peak memory, the baseline's, the ratio;
    then the second-order over first-order cost of each implementation per supernet (issue 6's measure)."""
    lines = [
        "| case | fastdarts | baseline | speed-up | peak memory (fastdarts / baseline) | ATen calls (fastdarts / baseline) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, fast, other in _pairs(results):
        lines.append(f"| {label} | {_cell(fast)} | {_cell(other)} | {_ratio(other, fast)} | "
                     f"{_memory(fast, other)} | {_calls(fast, other)} |")  # fmt: skip
    for net in dict.fromkeys(net for net, _ in STEPS):
        first, second = results["cases"].get(f"step/{net}/first"), results["cases"].get(f"step/{net}/second")
        if first and second:
            for impl in second:  # fastdarts-hvp-batched against fastdarts' first order
                base = first.get("fastdarts" if impl == "fastdarts-hvp-batched" else impl)
                if base:
                    lines.append(f"| step/{net} second/first order ({impl}) | | | {_ratio(second[impl], base)} | "
                                 f"{_memory(second[impl], base)} |")  # fmt: skip
    if "agreement" in results:
        lines.append(f"\nagreement: {json.dumps(results['agreement'])}")
    return lines


def _pairs(results: dict) -> list[tuple[str, dict, dict]]:
    """(label, fastdarts result, baseline result) for each fastdarts impl (fastdarts and its variants such as
    fastdarts-bf16) and each baseline of every case."""
    out = []
    for name, impls in results["cases"].items():
        for impl, fast in impls.items():
            if impl in BASELINES:
                continue
            for base, other in impls.items():
                if base in BASELINES:
                    variant = "" if impl == "fastdarts" else f"{impl} vs "
                    out.append((f"{name} ({variant}{base})", fast, other))
    return out


def speedups(results: dict) -> list[tuple[str, float]]:
    """(case and baseline, baseline ms / fastdarts ms) for every pair measured."""
    return [(label, other["ms"] / fast["ms"]) for label, fast, other in _pairs(results)
            if "ms" in fast and "ms" in other]  # fmt: skip


def plot(results: dict, path: Path) -> None:
    """A horizontal bar chart of the speed-ups (log scale, a line at 1x) as an SVG file."""
    rows = speedups(results)
    left, width, row, top = 430, 360, 18, 40
    lo, hi = math.log10(0.1), math.log10(max([100.0, *(r for _, r in rows)]))

    def x(ratio: float) -> float:
        return left + width * (math.log10(min(max(ratio, 0.1), 10**hi)) - lo) / (hi - lo)

    env = results["environment"]
    title = f"fastdarts speed-up over the baseline: {env['device']}, torch {env['torch']}, {env['git'][:10]}"
    parts = [f'<text x="10" y="20" font-weight="bold">{html.escape(title)}</text>']
    for tick in (0.1, 1, 10, 100):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top - 8}" x2="{x(tick):.1f}" y2="{top + row * len(rows)}" '
                     f'stroke="{"#000" if tick == 1 else "#ccc"}"/>'
                     f'<text x="{x(tick):.1f}" y="{top - 10}" text-anchor="middle">{tick:g}x</text>')  # fmt: skip
    for i, (label, ratio) in enumerate(rows):
        y = top + i * row
        color = "#2a7" if ratio >= 1 else "#c44"
        x0, x1 = sorted((x(1), x(ratio)))
        parts.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(label)}</text>'
                     f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 1):.1f}" height="{row - 6}" fill="{color}"/>'
                     f'<text x="{x1 + 4:.1f}" y="{y + 13}">{ratio:.2f}x</text>')  # fmt: skip
    height = top + row * len(rows) + 10
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{height}" '
           f'font-family="sans-serif" font-size="11">{"".join(parts)}</svg>\n')  # fmt: skip
    path.write_text(svg)


def _cell(r: dict) -> str:
    if "ms" not in r:
        return r.get("error", "not run")
    return f"{r['ms']:.3f} ms" + (f", {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "")


def _ratio(slow: dict, fast: dict) -> str:
    return f"{slow['ms'] / fast['ms']:.2f}x" if "ms" in slow and "ms" in fast else "-"


def _calls(a: dict, b: dict) -> str:
    return f"{a['aten_calls']} / {b['aten_calls']}" if a.get("aten_calls") and b.get("aten_calls") else "-"


def _memory(a: dict, b: dict) -> str:
    return f"{a['peak_gib'] / b['peak_gib']:.2f}" if a.get("peak_gib") and b.get("peak_gib") else "-"


def _write(path: Path, results: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def _default_out(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return RESULTS / f"{slug}-torch{torch.__version__.split('+')[0]}-suite.json"


# what reading a file that is not a results file raises: not there, not JSON, JSON of another shape
UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _matches(name: str, patterns: list[str]) -> bool:
    """Whether name matches any of the fnmatch patterns."""
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _usage(message: str) -> int:
    print(f"benchmarks.run: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="*", help="comma-separated fnmatch patterns of case names")
    parser.add_argument(
        "--impls", default="*", help="comma-separated fnmatch patterns of the impls to run in each case"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks that every case runs)")
    parser.add_argument("--compile", action="store_true", help="also time the reference under torch.compile")
    parser.add_argument(
        "--compile-timeout", type=float, default=300.0, help="seconds for a case's first call"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="calls before timing (the first one timed apart)"
    )
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per measurement")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the cases of an existing --out file that this run does not measure",
    )
    parser.add_argument("--agreement-steps", type=int, default=None, help="default 50 (5 with --quick)")
    parser.add_argument(
        "--out", default=None, help="results file (default benchmarks/results/<device>-suite.json)"
    )
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--report", default=None, help="print the table of a results file and exit")
    parser.add_argument(
        "--plot", default=None, help="with --report: also draw the speed-ups into this SVG file"
    )
    args = parser.parse_args(argv)
    for name, value, least in [
        ("--warmup", args.warmup, 1),
        ("--agreement-steps", args.agreement_steps, 1),
        ("--min-time", args.min_time, 1e-9),
        ("--compile-timeout", args.compile_timeout, 1),
    ]:
        if value is not None and not value >= least:
            return _usage(f"{name} {value} is too small, expected at least {least:g}")
    if args.report:
        try:
            results = json.loads(Path(args.report).read_text())
            table = summary(results)
        except UNREADABLE as e:
            return _usage(f"--report {args.report!r} is not a results file that can be read: {e!r}")
        print("\n".join(table))
        if args.plot:
            plot(results, Path(args.plot))
        return 0
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return _usage(f"--device {args.device!r} is not a device, expected cpu, cuda or cuda:N")
    patterns, impl_patterns = args.only.split(","), args.impls.split(",")
    selected = {n: c for n, c in cases(args.quick, args.compile, device.type == "cuda").items()
                if _matches(n, patterns)}  # fmt: skip
    run_agreement = _matches("agreement/cifar-b64", patterns)

    def wanted(impl: str) -> bool:
        return _matches(impl, impl_patterns)

    if not selected and not run_agreement:
        return _usage(f"--only {args.only!r} matches no case; --list names them")
    if selected and not any(wanted(impl) for case in selected.values() for impl in case.impls):
        return _usage(f"--impls {args.impls!r} matches no impl of the selected cases")
    if args.list:
        print("\n".join([*selected, *(["agreement/cifar-b64"] if run_agreement else [])]))
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        return _usage(f"--device {args.device}: no CUDA device is available here")
    out = Path(args.out) if args.out else _default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("list", "report", "plot")}
    results = {"environment": environment(device), "config": config, "cases": {}}
    if args.merge and out.exists():  # a suite split over several commands: one file (the newest environment)
        try:
            earlier = json.loads(out.read_text())
            results["cases"] = earlier["cases"]  # a case measured again keeps the impls this run leaves out
            for name in selected.keys() & earlier["cases"].keys():
                results["cases"][name] = {i: r for i, r in earlier["cases"][name].items() if not wanted(i)}
            results["earlier"] = earlier.get("earlier", []) + [{"environment": earlier["environment"],
                                                                  "config": earlier["config"]}]  # fmt: skip
        except UNREADABLE as e:
            return _usage(f"--merge: {str(out)!r} is not a results file that can be read: {e!r}")
        if "agreement" in earlier and not run_agreement:
            results["agreement"] = earlier["agreement"]
    for name, case in selected.items():
        for impl in filter(wanted, case.impls):
            r = _run_one(case, impl, device, args)
            results["cases"].setdefault(name, {})[impl] = r
            _write(out, results)
            print(f"{name} [{impl}]: {_cell(r)}", flush=True)
    if run_agreement:
        net = NETS["cifar-b64"].quick() if args.quick else NETS["cifar-b64"]
        steps = args.agreement_steps or (5 if args.quick else 50)
        results["agreement"] = {"case": "cifar-b64", **agreement(net, steps, device)}
        fastdarts.set_backend("auto")
        _write(out, results)
    print("\n".join(summary(results)))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
