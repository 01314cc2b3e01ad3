"""Where one search iteration's time goes: the iteration of ``benchmarks.run``'s ``step/<net>/<order>`` case under
``torch.profiler``, its ops by self time on the device (CUDA kernels on a GPU, CPU time elsewhere); or, with
``--traffic``, the bytes its ATen calls read and write (every tensor argument and result counted once per call: an
upper bound of the memory traffic when nothing stays in cache, the lower bound of its time at a given bandwidth).

    python -m benchmarks.profile_step                               # cifar-b64, first order, backend auto, cuda
    python -m benchmarks.profile_step --net cifar-b64 --order second --backend reference --rows 30
    python -m benchmarks.profile_step --device cpu --batched --traffic   # the GPU's batched cells, counted on a CPU
    python -m benchmarks.profile_step --device cpu --quick          # tiny shapes: checks that it runs
"""

import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastdarts
from benchmarks.run import NETS, _CallCount, search_step, supernet
from fastdarts.nn.batched import batched_plan


class _Traffic(TorchDispatchMode):
    """Bytes of the tensor arguments and results of each computing ATen call (views and allocations left out)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.calls = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _CallCount.SKIP:
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
            self.calls[name] += 1
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="cifar-b64", choices=sorted(NETS))
    parser.add_argument("--order", default="first", choices=("first", "second"))
    parser.add_argument("--backend", default="auto", choices=("auto", "reference"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batched", action="store_true", help="the cells batched, as on a GPU, on any device")
    parser.add_argument("--traffic", action="store_true", help="count the bytes of each ATen call instead")
    parser.add_argument("--steps", type=int, default=1, help="iterations profiled, after two of warm-up")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="the suite's tiny shapes (3 cells, C=8, batch 2)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rows < 1:
        print(f"benchmarks.profile_step: --steps {args.steps} and --rows {args.rows} must be at least 1",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device(args.device)
    fastdarts.set_backend(args.backend)
    net = NETS[args.net].quick() if args.quick else NETS[args.net]
    model, train, val = supernet(net, device)
    if args.batched:
        for cell in model.cells:
            cell.batched_edges = True
    step = search_step(model, args.order, train, val)
    for _ in range(2):
        step()
    cells = "batched" if batched_plan(model.cells[0], train[0]) is not None else "edge by edge"
    print(f"{args.net} {args.order} order, backend {args.backend}, cells {cells}, {args.steps} iterations on {device}")
    if args.traffic:
        with _Traffic() as traffic:
            for _ in range(args.steps):
                step()
        total = sum(traffic.bytes.values()) / args.steps
        print(f"per iteration: {sum(traffic.calls.values()) // args.steps} ATen calls, {total / 1e9:.2f} GB")
        for name, n in traffic.bytes.most_common(args.rows):
            print(f"  {name:40s} {n / args.steps / 1e9:8.2f} GB {traffic.calls[name] // args.steps:7d} calls")
        return 0
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    if cuda:  # the device's own events (a CPU op's self device time repeats its kernels')
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
        launches = sum(e.count for e in kernels) // args.steps
        print(f"device work per iteration: {launches} kernels, {busy:.2f} ms of kernel time")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
