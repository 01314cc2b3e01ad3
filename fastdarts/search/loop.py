"""The search loop: alternate architecture and weight steps, one epoch at a time, with checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastdarts.data import DATASETS, Loader, load_search_data, search_image_size
from fastdarts.errors import UsageError
from fastdarts.nn import SearchNetwork
from fastdarts.nn.network import check_image_size
from fastdarts.search.algorithms import ALGORITHMS, freeze_random_features
from fastdarts.search.architect import HVP_MODES, ORDERS, Architect, ArchitectConfig, check_hvp_order
from fastdarts.search.checkpoint import load_checkpoint, save_atomic
from fastdarts.search.curvature import early_stop_epoch, hessian_eigenvalue
from fastdarts.search.graphs import GraphedStep
from fastdarts.select import Genotype, derive_genotype
from fastdarts.spaces import SPACES, get_space

log = logging.getLogger(__name__)

ALGOS = tuple(ALGORITHMS)
EARLY_STOPS = ("none", "eigenvalue")
AMPS = ("none", "bf16")
CHECKPOINT = "checkpoint.pt"
# Settings that may change between a run and its resumption without changing its result.
# settings a resumed run may change: where it runs, and where its data lies (the same data on another machine)
RESUMABLE_CHANGES = ("device", "workers", "cuda_graphs", "data_dir")


@dataclass
class SearchConfig:
    """Everything that defines a search run. Defaults are the DARTS paper's CIFAR-10 search.

    Attributes:
        space, algo, order, hvp: what to search and how (see fastdarts.search.algorithms and .architect).
        partial_channels: PC-DARTS' K (pcdarts, rf-pcdarts); None: the space's default (4, 2 on darts-imagenet).
        data, data_dir, image_size, workers, train_portion: the data (see fastdarts.data).
        epochs, batch_size, seed: the run.
        layers, init_channels: the supernet (cells, channels of the first cell).
        lr, lr_min, momentum, weight_decay, grad_clip: SGD on the weights, lr cosine-annealed to lr_min.
        arch_lr, arch_weight_decay: Adam on the alphas (betas 0.5, 0.999).
        arch_warmup_epochs: epochs of weight steps only before the architecture steps start (PC-DARTS: 15).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        track_eigenvalue: after each epoch, the largest eigenvalue of the Hessian of L_val in alpha (on the
            epoch's first validation batch; see fastdarts.search.curvature).
        early_stop: "none", or "eigenvalue": R-DARTS' DARTS-ES on the tracked eigenvalue (tracking implied).
        cuda_graphs: record each epoch's search iteration as a CUDA graph and replay it (fastdarts.search.graphs;
            CUDA only; off by default until its replay test has passed on a GPU and its memory is measured).
        amp: "none", or "bf16": the forward passes of the search steps and of the evaluation under
            ``torch.autocast`` in bfloat16 (weights, alphas and optimiser states stay float32).
        channels_last: the model and its inputs in the channels-last memory format.
        recompute_edges: run the cells' edges batched (fastdarts.nn.batched, on any device) and keep only each
            group's inputs for the backward, which computes the group's forward again: a fraction of the
            activation memory for one more forward of the candidates.
    """

    space: str = "darts"
    algo: str = "darts"
    order: str = "first"
    hvp: str = "fd"
    partial_channels: int | None = None
    data: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    workers: int = 0
    train_portion: float = 0.5
    epochs: int = 50
    batch_size: int = 64
    seed: int = 0
    layers: int = 8
    init_channels: int = 16
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-4
    arch_weight_decay: float = 1e-3
    arch_warmup_epochs: int = 0
    device: str = "auto"
    track_eigenvalue: bool = False
    early_stop: str = "none"
    amp: str = "none"
    channels_last: bool = False
    cuda_graphs: bool = False
    recompute_edges: bool = False

    def __post_init__(self) -> None:
        choices = {"space": tuple(SPACES), "algo": ALGOS, "order": ORDERS, "hvp": HVP_MODES, "data": DATASETS,
                   "early_stop": EARLY_STOPS, "amp": AMPS}  # fmt: skip
        for field, allowed in choices.items():
            value = getattr(self, field)
            if value not in allowed:
                raise UsageError(f"unknown {field} {value!r}, expected one of: {', '.join(allowed)}")
        check_hvp_order(self.hvp, self.order)
        for field in ("epochs", "batch_size", "layers", "init_channels"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{field} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UsageError(f"seed must be a whole number in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.arch_warmup_epochs, int) or self.arch_warmup_epochs < 0:
            raise UsageError(
                f"arch_warmup_epochs must be a whole number >= 0, got {self.arch_warmup_epochs!r}"
            )
        # (train_portion is checked by fastdarts.data)
        for field in (
            "lr",
            "lr_min",
            "momentum",
            "weight_decay",
            "grad_clip",
            "arch_lr",
            "arch_weight_decay",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(f"{field} must be a finite number, got {value!r}")
        for field in ("lr", "lr_min", "arch_lr", "grad_clip"):
            if not getattr(self, field) > 0:
                raise UsageError(f"{field} must be > 0, got {getattr(self, field)!r}")
        for field in ("momentum", "weight_decay", "arch_weight_decay"):
            if getattr(self, field) < 0:
                raise UsageError(f"{field} must be >= 0, got {getattr(self, field)!r}")
        if self.lr_min > self.lr:
            raise UsageError(f"lr_min {self.lr_min!r} is above lr {self.lr!r}; the cosine schedule goes from lr "
                             "down to lr_min")  # fmt: skip
        if self.partial_channels is not None:
            if not ALGORITHMS[self.algo].partial_channels:
                raise UsageError(
                    f"partial_channels is for algo pcdarts or rf-pcdarts, got algo {self.algo!r}"
                )
            if not isinstance(self.partial_channels, int) or self.partial_channels < 1:
                raise UsageError(
                    f"partial_channels must be a whole number >= 1, got {self.partial_channels!r}"
                )
        K = self.resolve_partial_channels()
        if self.init_channels % K:
            raise UsageError(f"init_channels {self.init_channels} is not a multiple of partial_channels {K}")

    def resolve_partial_channels(self) -> int:
        """PC-DARTS' K of this run: 1 without partial channels, else the setting or the space's default."""
        if not ALGORITHMS[self.algo].partial_channels:
            return 1
        return self.partial_channels or get_space(self.space).partial_channels

    def resolve_device(self) -> torch.device:
        """The torch device this run uses."""
        try:
            device = torch.device(
                ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            )
        except RuntimeError as e:
            raise UsageError(f"unknown device {self.device!r}, expected auto, cpu, cuda or cuda:N") from e
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"device {self.device!r} is not supported, expected auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {self.device!r} asked for, but torch sees no CUDA GPU")
        if self.cuda_graphs and device.type != "cuda":
            raise UsageError(f"cuda_graphs needs a CUDA device, but device {self.device!r} is {device.type}")
        return device


@dataclass
class EpochRecord:
    """What one epoch did: mean training loss/accuracy of the weight steps, validation loss/accuracy after."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    genotype: Genotype
    eigenvalue: float | None = None  # with track_eigenvalue / early_stop="eigenvalue"


@dataclass
class SearchResult:
    genotype: Genotype  # of the last epoch, or of the epoch early stopping went back to
    history: list[EpochRecord]
    alphas_normal: torch.Tensor  # [epochs, num_edges, K] after each epoch
    alphas_reduce: torch.Tensor
    stopped_at: int | None = None  # early stopping: the epoch whose genotype is returned
    betas_normal: torch.Tensor | None = None  # [epochs, num_edges] with edge normalisation (PC-DARTS)
    betas_reduce: torch.Tensor | None = None

    def arch_history(self) -> dict[str, torch.Tensor]:
        """The architecture parameters after each epoch by name (the betas only with edge normalisation)."""
        names = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


# (epoch, step, steps in the epoch, mean loss and accuracy of the epoch's weight steps so far)
BatchHook = Callable[[int, int, int, float, float], None]
EpochHook = Callable[[EpochRecord], None]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cycle(loader: Loader) -> Iterator:
    """Batches of loader, starting over when it runs out (the val half may be a batch shorter)."""
    while True:
        yield from loader


def _autocast(device: torch.device, amp: str, graphed: bool = False) -> torch.autocast:
    """The autocast context of ``amp`` ("none": off) for ``device``; ``graphed``: inside a step recorded as a CUDA
    graph, which asks for autocast's cache of cast weights to be off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16", cache_enabled=not graphed)


def _inputs(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch on ``device``, in the channels-last memory format when asked."""
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=memory_format)


@torch.no_grad()
def evaluate(
    model: SearchNetwork, loader: Loader, device: torch.device, amp: str = "none", channels_last: bool = False
) -> tuple[float, float]:
    """Mean loss and accuracy of the supernet in eval mode (BatchNorm running statistics) over loader."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = _inputs(x, device, channels_last), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()  # summed in fp32 under amp
        correct += (logits.argmax(1) == y).sum().item()
        count += y.numel()
    return total_loss / max(count, 1), correct / max(count, 1)


class Search:
    """A search run: model, optimisers, data and the epochs done so far, restartable from a checkpoint."""

    def __init__(self, config: SearchConfig, out_dir: str | Path | None = None):
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = config.resolve_device()
        _seed_everything(config.seed)
        algo = ALGORITHMS[config.algo]
        space = get_space(config.space)
        self.space = dataclasses.replace(space, affine=True) if algo.random_features else space
        # the image size is checked against the supernet before any data is read (an ImageNet tree's scan)
        last_size = check_image_size(
            self.space, config.layers, search_image_size(config.data, config.image_size)
        )
        self.data = load_search_data(
            config.data, data_dir=config.data_dir, batch_size=config.batch_size, seed=config.seed,
            train_portion=config.train_portion, image_size=config.image_size, workers=config.workers,
        )  # fmt: skip
        if last_size == 1:
            _check_single_image_batches(
                self.data.image_size, weight=self.data.train, architecture=self.data.val
            )
        K = config.resolve_partial_channels()
        self.model = SearchNetwork(
            config.init_channels, self.data.num_classes, config.layers, self.space, self.data.in_channels,
            partial_channels=K, edge_normalization=algo.edge_normalization,
        ).to(self.device)  # fmt: skip
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if config.recompute_edges:
            for cell in self.model.cells:
                cell.batched_edges = cell.recompute_edges = True
        # the weights that train (all but the alphas; RF-DARTS: the BatchNorm affine ones), listed once
        self.weights = (
            freeze_random_features(self.model) if algo.random_features else self.model.weight_parameters()
        )
        # foreach: torch picks it on GPUs only, but on the CPU too it is the same numbers bit for bit in half the
        # time of the per-tensor loop (5.8 ms against 10.5 ms a step for the 889 weights of the digits supernet)
        self.optimizer = torch.optim.SGD(
            self.weights,
            config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            foreach=True,
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, config.epochs, config.lr_min
        )
        arch_config = ArchitectConfig(
            order=config.order, hvp=config.hvp, lr=config.arch_lr, weight_decay=config.arch_weight_decay,
            capturable=config.cuda_graphs,
        )  # fmt: skip
        self.architect = Architect(self.model, arch_config, config.momentum, config.weight_decay)
        self.epoch = 0
        self.history: list[EpochRecord] = []
        # the architecture parameters after each epoch: (alphas_normal, alphas_reduce[, betas_normal, betas_reduce])
        self.alphas: list[tuple[torch.Tensor, ...]] = []

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT if self.out_dir is not None else None

    def genotype(self) -> Genotype:
        model = self.model
        return derive_genotype(model.alphas_normal, model.alphas_reduce, self.space, model.edge_strengths())

    def train_epoch(self, on_batch: BatchHook | None = None) -> tuple[float, float]:
        """One epoch of alternating architecture and weight steps; mean loss and accuracy of the weight steps."""
        cfg, model, device = self.config, self.model, self.device
        lr = self.scheduler.get_last_lr()[0]
        self.data.train.set_epoch(self.epoch)
        self.data.val.set_epoch(self.epoch)
        val_batches = _cycle(self.data.val)
        total_loss, correct, count = 0.0, 0, 0
        one_step = self.step_fn(lr, self.epoch >= cfg.arch_warmup_epochs)
        if cfg.cuda_graphs:  # recorded anew each epoch: the learning rate is a constant of the recording
            one_step = GraphedStep(one_step)
        model.train()
        for step, (x, y) in enumerate(self.data.train):
            x_val, y_val = next(val_batches)
            x, x_val = _inputs(x, device, cfg.channels_last), _inputs(x_val, device, cfg.channels_last)
            y, y_val = y.to(device, non_blocking=True), y_val.to(device, non_blocking=True)
            loss, logits = one_step(x, y, x_val, y_val)

            batch_loss = loss.item()
            if not math.isfinite(batch_loss):
                raise FloatingPointError(
                    f"training loss became {batch_loss} in epoch {self.epoch + 1}, batch {step + 1}"
                )
            batch_correct = (logits.argmax(1) == y).sum().item()
            total_loss += batch_loss * y.numel()
            correct += batch_correct
            count += y.numel()
            if on_batch is not None:
                on_batch(self.epoch, step, len(self.data.train), total_loss / count, correct / count)
        return total_loss / max(count, 1), correct / max(count, 1)

    def step_fn(self, lr: float, arch_step: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """One search iteration at learning rate ``lr``: ``(x, y, x_val, y_val) -> (loss, logits)`` of the weight
        step (detached), after the architecture step when ``arch_step``. No host synchronisation inside (so that
        it can be recorded as a CUDA graph)."""
        cfg, model, device = self.config, self.model, self.device

        def one_step(x, y, x_val, y_val):
            if arch_step:
                with _autocast(device, cfg.amp, cfg.cuda_graphs):
                    self.architect.step(x, y, x_val, y_val, lr, self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            with _autocast(device, cfg.amp, cfg.cuda_graphs):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.weights, cfg.grad_clip)
            self.optimizer.step()
            return loss.detach(), logits.detach()

        return one_step

    @property
    def stopped_at(self) -> int | None:
        """The epoch whose genotype early stopping keeps, once it has fired (recomputed from the history, so a
        resumed run stops where an uninterrupted one does)."""
        if self.config.early_stop != "eigenvalue":
            return None
        return early_stop_epoch([r.eigenvalue for r in self.history])

    def eigenvalue(self) -> float:
        """The largest Hessian eigenvalue of L_val in alpha on this epoch's first validation batch (a random start
        seeded by the run's seed and the epoch)."""
        self.data.val.set_epoch(self.epoch)
        x, y = next(iter(self.data.val))
        generator = torch.Generator().manual_seed(self.config.seed * 100003 + self.epoch)
        self.model.train()
        return hessian_eigenvalue(self.model, x.to(self.device), y.to(self.device), generator=generator)

    def run(self, on_batch: BatchHook | None = None, on_epoch: EpochHook | None = None) -> SearchResult:
        """Run the remaining epochs, checkpointing after each; returns the final genotype and history."""
        log.info("search on %s from epoch %d: %s", self.device, self.epoch, dataclasses.asdict(self.config))
        if self.config.arch_warmup_epochs >= self.config.epochs:
            log.warning("arch_warmup_epochs %d >= epochs %d: no architecture step runs, the alphas stay at their "
                        "initial values", self.config.arch_warmup_epochs, self.config.epochs)  # fmt: skip
        tracking = self.config.track_eigenvalue or self.config.early_stop == "eigenvalue"
        while self.epoch < self.config.epochs and self.stopped_at is None:
            lr = self.scheduler.get_last_lr()[0]
            train_loss, train_acc = self.train_epoch(on_batch)
            self.scheduler.step()
            val_loss, val_acc = evaluate(
                self.model, self.data.val, self.device, self.config.amp, self.config.channels_last
            )
            if not math.isfinite(val_loss):
                raise FloatingPointError(f"validation loss became {val_loss} after epoch {self.epoch + 1}")
            record = EpochRecord(self.epoch, lr, train_loss, train_acc, val_loss, val_acc, self.genotype(),
                                 self.eigenvalue() if tracking else None)  # fmt: skip
            self.history.append(record)
            self.alphas.append(tuple(a.detach().cpu().clone() for a in self.model.arch_parameters()))
            self.epoch += 1
            log.info(
                "epoch %d/%d lr %.5f train loss %.4f acc %.4f val loss %.4f acc %.4f%s",
                self.epoch, self.config.epochs, lr, train_loss, train_acc, val_loss, val_acc,
                "" if record.eigenvalue is None else f" eigenvalue {record.eigenvalue:.4g}",
            )  # fmt: skip
            if self.stopped_at is not None:
                log.info("early stop: the Hessian eigenvalue grew too fast; keeping epoch %d's genotype",
                         self.stopped_at + 1)  # fmt: skip
            if self.out_dir is not None:
                self.save()
            if on_epoch is not None:
                on_epoch(record)
        return self.result()

    def result(self) -> SearchResult:
        count = len(self.model.arch_parameters())
        if self.alphas:
            history = [torch.stack(ts) for ts in zip(*self.alphas)]
        else:
            history = [torch.empty(0)] * count
        betas = history[2:] if count == 4 else [None, None]
        stopped = self.stopped_at
        return SearchResult(
            genotype=self.genotype() if stopped is None else self.history[stopped].genotype,
            stopped_at=stopped,
            history=list(self.history),
            alphas_normal=history[0],
            alphas_reduce=history[1],
            betas_normal=betas[0],
            betas_reduce=betas[1],
        )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "arch_optimizer": self.architect.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": [_record_to_dict(r) for r in self.history],
            "alphas": [list(params) for params in self.alphas],
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_rng_state(),
                "python": list(random.getstate()[1]),
            },
        }

    def save(self) -> None:
        """Write the checkpoint (atomically) to out_dir/checkpoint.pt."""
        save_atomic(self.state_dict(), self.checkpoint_path)

    def load_state_dict(self, ckpt: dict) -> None:
        missing = sorted(set(self.state_dict()) - set(ckpt))
        if missing:
            raise UsageError(f"the checkpoint has no {', '.join(missing)}: it was not written by this version of "
                             "fastdarts' search; use another --out")  # fmt: skip
        saved = ckpt["config"]
        current = dataclasses.asdict(self.config)
        for key in sorted(set(saved) | set(current)):
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key):
                raise UsageError(
                    f"the checkpoint was written with {key}={saved.get(key)!r}, but this run has "
                    f"{key}={current.get(key)!r}; resume with the same settings or use another --out"
                )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        # Adam's capturable (state on the GPU for CUDA graphs) follows this run's cuda_graphs, not the saved run's;
        # set before loading, so that its step counts are placed for it
        arch_state = ckpt["arch_optimizer"]
        groups = [{**g, "capturable": self.config.cuda_graphs} for g in arch_state["param_groups"]]
        self.architect.optimizer.load_state_dict({**arch_state, "param_groups": groups})
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch = ckpt["epoch"]
        self.history = [_record_from_dict(d) for d in ckpt["history"]]
        self.alphas = [tuple(params) for params in ckpt["alphas"]]
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        random.setstate((3, tuple(rng["python"]), None))


def _check_single_image_batches(image_size: int, **halves: Loader) -> None:
    """Refuses a batch of one image when the last cells' feature maps are 1x1: BatchNorm in training mode needs
    more than one value per channel."""
    for half, loader in halves.items():
        if loader.batch_size == 1 or loader.num_samples % loader.batch_size == 1:
            raise UsageError(
                f"image size {image_size} leaves 1x1 feature maps in the last cells, and the {half} half "
                f"({loader.num_samples} images in batches of {loader.batch_size}) has a batch of one image, which "
                "BatchNorm cannot normalise in training; change --batch-size or --image-size"
            )


def _numpy_rng_state() -> list:
    """numpy's global RNG state as plain lists and numbers (so torch.load(weights_only=True) reads it)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _record_to_dict(r: EpochRecord) -> dict:
    d = dataclasses.asdict(r)
    d["genotype"] = r.genotype.to_json()
    return d


def _record_from_dict(d: dict) -> EpochRecord:
    return EpochRecord(**{**d, "genotype": Genotype.from_json(d["genotype"])})


def run_search(
    config: SearchConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_batch: BatchHook | None = None,
    on_epoch: EpochHook | None = None,
) -> SearchResult:
    """Run a search (or resume one from out_dir) and write its results to out_dir.

    out_dir receives checkpoint.pt after every epoch, and at the end genotype.json and alphas.pt
    ({"alphas_normal": [epochs, num_edges, K], "alphas_reduce": ..., "primitives": [...]}, and with edge
    normalisation "betas_normal" and "betas_reduce", [epochs, num_edges]), each row after one epoch.
    A fresh run refuses an out_dir that already holds a checkpoint, so that nothing is overwritten by mistake.
    """
    path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    ckpt = None
    if resume:
        if path is None:
            raise UsageError("resuming needs the output folder that holds the checkpoint")
        ckpt = load_checkpoint(path)
    elif path is not None and path.exists():
        raise UsageError(f"{path} exists; pass --resume to continue that search or choose another --out")
    search = Search(config, out_dir)
    if path is not None:  # made before the first epoch, not after it (once the data and settings are checked)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"output folder {str(out_dir)!r} cannot be made: {e.strerror}") from e
    if ckpt is not None:
        search.load_state_dict(ckpt)
    result = search.run(on_batch, on_epoch)
    if out_dir is not None:
        out = Path(out_dir)
        (out / "genotype.json").write_text(result.genotype.to_json() + "\n")
        save_atomic({**result.arch_history(), "primitives": list(search.space.primitives)}, out / "alphas.pt")
    return result
