"""The `fastdarts` command.

    fastdarts search --space darts --algo darts --order first --data digits --epochs 10 --out runs/digits
    fastdarts info

Usage errors (an unknown choice, a missing data folder, a corrupt checkpoint, ...) print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from fastdarts.errors import UsageError

log = logging.getLogger("fastdarts")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage block) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _build_parser() -> argparse.ArgumentParser:
    from fastdarts.data import DATASETS
    from fastdarts.search.architect import HVP_MODES, ORDERS
    from fastdarts.search.loop import ALGOS, AMPS, EARLY_STOPS, SearchConfig
    from fastdarts.spaces import SPACES

    d = SearchConfig()
    parser = _Parser(prog="fastdarts", description="Differentiable architecture search, fast.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="search an architecture")
    s.add_argument("--space", default=d.space, choices=list(SPACES))
    s.add_argument("--algo", default=d.algo, choices=list(ALGOS))
    s.add_argument("--order", default=d.order, choices=list(ORDERS), help="first or second order architect")
    s.add_argument(
        "--hvp",
        default=d.hvp,
        choices=list(HVP_MODES),
        help="second order: finite-difference (fd, as DARTS; fd-batched: w+ and w- in one vmap pass) or exact "
        "Hessian-vector product",
    )
    s.add_argument(
        "--partial-channels",
        type=int,
        default=d.partial_channels,
        help="pcdarts, rf-pcdarts: 1/K of each edge's channels go through its candidates "
        "(default 4; 2 on darts-imagenet)",
    )
    s.add_argument(
        "--data",
        default=d.data,
        choices=list(DATASETS),
        help="digits (embedded, no download), cifar10 or imagenet (local folders)",
    )
    s.add_argument(
        "--data-dir",
        default=None,
        help="cifar10: folder with cifar-10-batches-py/; imagenet: ImageFolder root with train/",
    )
    s.add_argument("--image-size", type=int, default=None, help="imagenet crop size (default 224)")
    s.add_argument("--workers", type=int, default=d.workers, help="data loader workers (imagenet)")
    s.add_argument("--epochs", type=int, default=d.epochs)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--layers", type=int, default=d.layers, help="cells in the supernet")
    s.add_argument("--init-channels", type=int, default=d.init_channels, help="channels of the first cell")
    s.add_argument("--lr", type=float, default=d.lr, help="weight learning rate (cosine to --lr-min)")
    s.add_argument("--lr-min", type=float, default=d.lr_min)
    s.add_argument("--momentum", type=float, default=d.momentum)
    s.add_argument("--weight-decay", type=float, default=d.weight_decay)
    s.add_argument("--grad-clip", type=float, default=d.grad_clip)
    s.add_argument("--arch-lr", type=float, default=d.arch_lr)
    s.add_argument("--arch-weight-decay", type=float, default=d.arch_weight_decay)
    s.add_argument(
        "--arch-warmup-epochs",
        type=int,
        default=d.arch_warmup_epochs,
        help="epochs of weight steps only before the architecture steps start (PC-DARTS uses 15)",
    )
    s.add_argument("--train-portion", type=float, default=d.train_portion)
    s.add_argument(
        "--track-eigenvalue",
        action="store_true",
        help="log the largest Hessian eigenvalue of the validation loss in alpha after each epoch",
    )
    s.add_argument(
        "--early-stop",
        default=d.early_stop,
        choices=list(EARLY_STOPS),
        help="eigenvalue: R-DARTS' DARTS-ES, stop when the eigenvalue grows too fast (tracking implied)",
    )
    s.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    s.add_argument(
        "--amp",
        default=d.amp,
        choices=list(AMPS),
        help="bf16: forward passes under torch.autocast in bfloat16",
    )
    s.add_argument(
        "--channels-last", action="store_true", help="model and inputs in channels-last memory format"
    )
    s.add_argument(
        "--recompute-edges",
        action="store_true",
        help="batched cells that keep only each group's input for the backward (far less memory, one more forward)",
    )
    s.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="CUDA: record each epoch's search iteration as a CUDA graph",
    )
    s.add_argument("--out", required=True, help="run folder: checkpoint.pt, genotype.json, alphas.pt")
    s.add_argument("--resume", action="store_true", help="continue the search checkpointed in --out")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")

    sub.add_parser("info", help="show which backends (C++, CUDA, Triton) are live and why not")
    return parser


def _config(args: argparse.Namespace):
    """The SearchConfig of parsed ``search`` arguments: each setting from the flag of its name."""
    from fastdarts.search import SearchConfig

    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    return SearchConfig(**{k: v for k, v in vars(args).items() if k in fields})


def _search(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from fastdarts.backend import tune_cpu_allocator
    from fastdarts.search import run_search

    tune_cpu_allocator()
    config = _config(args)
    bar: tqdm | None = None

    def on_batch(epoch: int, step: int, steps: int, loss: float, acc: float) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            desc = f"epoch {epoch + 1}/{config.epochs}"
            bar = tqdm(total=steps, desc=desc, unit="it", file=sys.stderr, leave=False)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", refresh=False)

    def on_epoch(record) -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None
        log.info("genotype %s", record.genotype)

    result = run_search(config, args.out, resume=args.resume, on_batch=on_batch, on_epoch=on_epoch)
    if result.history:
        last = result.history[-1]
        log.info("supernet validation accuracy %.4f after %d epochs", last.val_acc, len(result.history))
    print(result.genotype)
    log.info("wrote %s/genotype.json and %s/alphas.pt", args.out, args.out)


def _kept(args: argparse.Namespace) -> str:
    """What a stopped search leaves behind, for the last line the command prints."""
    if args.command != "search":
        return ""
    if (Path(args.out) / "checkpoint.pt").is_file():
        return f"; the last finished epoch is in {args.out}/checkpoint.pt (--resume)"
    return "; no epoch had finished, so there is nothing to resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fastdarts` command; returns the exit status."""
    args = _build_parser().parse_args(argv)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    try:
        if args.command == "search":
            _search(args)
        else:
            import fastdarts

            print(json.dumps(fastdarts.info(), indent=2))
    except UsageError as e:
        print(f"fastdarts: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the search diverged
        print(f"fastdarts: error: {e}; try a lower --lr or --arch-lr{_kept(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastdarts: interrupted{_kept(args)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
