"""How far DARTS' finite-difference Hessian-vector product is from the exact one during a real search.

Runs a digits search (by default `make search`'s: 5 cells, C=8, batch 64, first order, seed 0) and after each
epoch takes, on the epoch's first training and validation batches, the Hessian-vector product of the
second-order step, H v with v = grad_w' L_val(w', alpha), both ways (Architect.hvp_pair):

    fd    = (grad_alpha L_train(w + eps v) - grad_alpha L_train(w - eps v)) / (2 eps),  eps = 0.01 / ||v||
    exact = grad_alpha <grad_w L_train(w, alpha), v>   (double backprop)

and records ||fd - exact|| / ||exact|| and ||fd|| / ||exact||, with the largest Hessian eigenvalue of L_val in
alpha. ReLU and max-pool kinks inside the eps ball are what can make the two differ.

    python -m benchmarks.fd_vs_exact --epochs 10 --out benchmarks/results/fd-vs-exact-digits-cpu.json
"""

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch

import fastdarts
from fastdarts.search import Search, SearchConfig


def _norm(ts) -> float:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in ts)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--init-channels", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fastdarts.tune_cpu_allocator()
    search = Search(SearchConfig(data="digits", layers=args.layers, init_channels=args.init_channels,
                                 batch_size=args.batch_size, epochs=args.epochs, seed=args.seed))  # fmt: skip
    rows = []
    while search.epoch < args.epochs:
        lr = search.scheduler.get_last_lr()[0]
        search.train_epoch()
        search.scheduler.step()
        (x, y), (xv, yv) = next(iter(search.data.train)), next(iter(search.data.val))
        device = search.device
        search.model.train()
        fd, exact = search.architect.hvp_pair(x.to(device), y.to(device), xv.to(device), yv.to(device), lr,
                                              search.optimizer)  # fmt: skip
        rows.append({
            "epoch": search.epoch,
            "relative_error": _norm([a - b for a, b in zip(fd, exact)]) / _norm(exact),
            "norm_ratio": _norm(fd) / _norm(exact),
            "exact_norm": _norm(exact),
            "eigenvalue": search.eigenvalue(),
        })  # fmt: skip
        print(json.dumps(rows[-1]))
        search.epoch += 1
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    revision = git.stdout.strip()
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "git": revision, "config": vars(args)}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "epochs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
