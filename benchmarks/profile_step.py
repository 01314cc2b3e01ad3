"""Where one search iteration's time goes: the iteration of ``benchmarks.run``'s ``step/<net>/<order>`` case under
``torch.profiler``, its ops by self time on the device (CUDA kernels on a GPU, CPU time elsewhere).

    python -m benchmarks.profile_step                               # cifar-b64, first order, backend auto, cuda
    python -m benchmarks.profile_step --net cifar-b64 --order second --backend reference --rows 30
    python -m benchmarks.profile_step --device cpu --quick          # tiny shapes: checks that it runs
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fastdarts
from benchmarks.run import NETS, search_step, supernet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="cifar-b64", choices=sorted(NETS))
    parser.add_argument("--order", default="first", choices=("first", "second"))
    parser.add_argument("--backend", default="auto", choices=("auto", "reference"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    step = search_step(model, args.order, train, val)
    for _ in range(2):
        step()
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
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"{args.net} {args.order} order, backend {args.backend}, {args.steps} iterations on {device}")
    if cuda:
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        busy = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
        print(f"device work per iteration: {kernels // args.steps} kernels, {busy:.2f} ms of kernel time")
    print(events.table(sort_by=key, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
