"""Data for an architecture search: the training set split into a weight half and an architecture half.

DARTS never looks at a test set while it searches. It splits the training set in two (``train_portion`` 0.5):
the network weights w are trained on one half and the architecture parameters alpha on the other ("val").
:func:`load_search_data` returns both halves as :class:`Loader` objects that yield ``(x, y)`` batches,
``x`` float32 ``[B, C, H, W]`` and ``y`` int64 ``[B]``.

Reproducibility is the point of this module:

* The split is fixed: a permutation of ``range(N)`` computed from a constant key (never from the run's seed, nor
  from a library's RNG, whose stream may change between versions), so every run searches on the same halves.
* The order of batches and any augmentation in an epoch are a pure function of ``(seed, epoch)``, drawn from a
  :class:`torch.Generator` built for that epoch, never from the global RNG. Call :meth:`Loader.set_epoch` before
  iterating; a search resumed at epoch ``e`` then sees exactly the batches an uninterrupted run saw.

Datasets (:data:`DATASETS`):

* ``digits``: scikit-learn's 1797 real 8x8 handwritten digits, shipped with scikit-learn (no download), held in
  memory, 1 channel, 10 classes.
* ``cifar10``: the 50000 CIFAR-10 training images read from the python-version pickles, held in memory as uint8;
  both halves get the DARTS train augmentation (4-pixel zero padding, random 32x32 crop, random horizontal
  flip), applied to whole batches, as DARTS' two queues both read the augmented training set.
* ``imagenet``: an ImageFolder tree (``train/<class>/<image>``) read by DataLoader workers, with
  RandomResizedCrop + horizontal flip on both halves, as PC-DARTS' ImageNet search.

Nothing is ever downloaded.
"""

from __future__ import annotations

import abc
import hashlib
import math
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fastdarts.errors import UsageError

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["DATASETS", "Loader", "SearchData", "load_search_data"]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "imagenet")

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Key of the fixed split permutation. A constant, so runs with different seeds search on the same halves.
_SPLIT_KEY = 0x5EA2C4_DA275
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_HINT = "data_batch_1 ... data_batch_5 from the CIFAR-10 python version (cifar-10-python.tar.gz)"
_CIFAR_PAD = 4


Batch = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------- seeds and split


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes, platforms and versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _epoch_generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """The generator for one half ("train" or "val") in one epoch: the only source of randomness there."""
    return torch.Generator().manual_seed(_derive_seed("fastdarts.data", seed, epoch, stream))


def _fixed_permutation(n: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends on ``n`` alone: indices sorted by a splitmix64 hash.

    Hand-rolled rather than ``randperm`` so that the split cannot change when torch or numpy change their RNGs.
    """
    x = np.arange(n, dtype=np.uint64) + np.uint64(_SPLIT_KEY)
    # uint64 arithmetic wraps modulo 2**64, which is what splitmix64 wants.
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return np.argsort(x, kind="stable")


def _split(n: int, train_portion: float) -> tuple[Tensor, Tensor]:
    """The fixed split of ``range(n)`` into (weight half, architecture half), each sorted, int64."""
    n_train = math.floor(train_portion * n)
    if n_train < 1 or n_train > n - 1:
        raise UsageError(
            f"train_portion {train_portion!r} leaves {n_train} of {n} training images for the weight half and "
            f"{n - n_train} for the architecture half; expected a value in (0, 1) that leaves at least one "
            "image in each half"
        )
    perm = _fixed_permutation(n)
    train = torch.from_numpy(np.sort(perm[:n_train]).astype(np.int64))
    val = torch.from_numpy(np.sort(perm[n_train:]).astype(np.int64))
    return train, val


# --------------------------------------------------------------------------------------------- loaders


class Loader(abc.ABC):
    """Batches ``(x, y)`` of one half of the training set; ``x`` float32 ``[B, C, H, W]``, ``y`` int64 ``[B]``.

    Every batch holds ``batch_size`` samples except possibly the last, shorter one (``drop_last=False``).
    Each epoch visits every sample of the half once, in an order (and with an augmentation) that depends only on
    ``(seed, epoch)``; iterating twice in the same epoch gives the same batches. The epoch does not advance by
    itself: call :meth:`set_epoch` at the start of each epoch.

    Attributes:
        batch_size: samples per batch (the last batch may be shorter).
        seed: the run's seed.
    """

    def __init__(self, indices: Tensor, batch_size: int, seed: int, stream: str) -> None:
        self._indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self._stream = stream
        self._epoch = 0

    @property
    def indices(self) -> Tensor:
        """Positions in the full training set of this half's samples, ``[num_samples]`` int64, sorted."""
        return self._indices.clone()

    @property
    def num_samples(self) -> int:
        """Number of samples in this half."""
        return int(self._indices.numel())

    @property
    def epoch(self) -> int:
        """The epoch whose batches :meth:`__iter__` yields."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batch order and augmentation the next iteration produces.

        Args:
            epoch: a non-negative int.

        Raises:
            UsageError: for a negative or non-integer epoch.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UsageError(f"epoch {epoch!r} is not valid; expected an int >= 0")
        self._epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch: ``ceil(num_samples / batch_size)``."""
        return (self.num_samples + self.batch_size - 1) // self.batch_size

    def _generator(self) -> torch.Generator:
        return _epoch_generator(self.seed, self._epoch, self._stream)

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """Yield this epoch's batches ``(x [B, C, H, W] float32, y [B] int64)``."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._stream}, num_samples={self.num_samples}, "
            f"batch_size={self.batch_size}, batches={len(self)}, seed={self.seed}, epoch={self._epoch})"
        )


class _TensorLoader(Loader):
    """A half of an in-memory dataset: batches are made by indexing tensors in the calling thread.

    ``augment(x, generator)`` (optional) transforms a raw batch with the epoch's generator; ``prepare(x)`` turns
    the raw batch into the float32 network input.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Tensor,
        batch_size: int,
        seed: int,
        stream: str,
        prepare: Callable[[Tensor], Tensor],
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        super().__init__(indices, batch_size, seed, stream)
        self._images = images
        self._labels = labels
        self._prepare = prepare
        self._augment = augment

    def __iter__(self) -> Iterator[Batch]:
        g = self._generator()
        order = self._indices[torch.randperm(self.num_samples, generator=g)]
        for start in range(0, self.num_samples, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self._images[idx]
            if self._augment is not None:
                x = self._augment(x, g)
            yield self._prepare(x), self._labels[idx]


class _KeyedSampler(torch.utils.data.Sampler):
    """Yields ``(index, augmentation seed)`` pairs: a shuffled half, each sample with its own seed.

    Giving every sample its own seed makes the augmentation independent of how samples are dealt out to
    DataLoader workers, so the batches are the same for any number of workers.
    """

    def __init__(self, order: Tensor, sample_seeds: Tensor) -> None:
        self._order = order.tolist()
        self._seeds = sample_seeds.tolist()

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._order, self._seeds))


class _FolderHalf(torch.utils.data.Dataset):
    """One half of an ImageFolder: ``dataset[(index, seed)]`` -> (image [3, S, S] float32, label)."""

    def __init__(self, samples: list[tuple[str, int]], loader: Callable, transform: Callable) -> None:
        self._samples = samples
        self._loader = loader
        self._transform = transform

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        path, label = self._samples[index]
        try:
            image = self._loader(path)
        except OSError as e:  # (PIL's UnidentifiedImageError is one)
            raise UsageError(f"imagenet image '{path}' could not be read ({type(e).__name__}: {e}); "
                             "expected an image file: remove or replace it") from e  # fmt: skip
        return self._transform(image, torch.Generator().manual_seed(seed)), label


class _FolderLoader(Loader):
    """A half of an ImageFolder, read by a torch DataLoader with ``workers`` worker processes."""

    def __init__(
        self, half: _FolderHalf, indices: Tensor, batch_size: int, seed: int, stream: str, workers: int
    ) -> None:
        super().__init__(indices, batch_size, seed, stream)
        self._half = half
        self._workers = workers

    def __iter__(self) -> Iterator[Batch]:
        g = self._generator()
        order = self._indices[torch.randperm(self.num_samples, generator=g)]
        sample_seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g)
        loader = torch.utils.data.DataLoader(
            self._half,
            batch_size=self.batch_size,
            sampler=_KeyedSampler(order, sample_seeds),
            num_workers=self._workers,
            # Seeds the workers' own RNGs (torch, random, numpy) from (seed, epoch) too, for any transform that
            # draws from them; ours draw only from their per-sample generators.
            generator=torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g))),
            drop_last=False,
        )
        try:
            yield from loader
        except UsageError as e:  # from a worker, re-raised here with the worker's traceback as its message,
            # whose last line is the error's own one
            raise UsageError(str(e).rstrip().rsplit("UsageError: ", 1)[-1]) from None


# --------------------------------------------------------------------------------------------- the result


@dataclass
class SearchData:
    """The two halves of a search's training data and the shape of its samples.

    Attributes:
        train: batches ``(x [B, C, H, W] float32, y [B] int64)`` for the weight step.
        val: batches for the architecture step (and the epoch's validation accuracy).
        in_channels: C; 1 for digits, 3 for cifar10 and imagenet.
        num_classes: 10 for digits and cifar10, the number of class folders for imagenet.
        image_size: H = W; 8 for digits, 32 for cifar10, the ``image_size`` argument for imagenet.
    """

    train: Loader
    val: Loader
    in_channels: int
    num_classes: int
    image_size: int

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of both halves (see :meth:`Loader.set_epoch`)."""
        self.train.set_epoch(epoch)
        self.val.set_epoch(epoch)


# --------------------------------------------------------------------------------------------- digits


def _load_digits(batch_size: int, seed: int, train_portion: float) -> SearchData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16: scale to [0, 1], then standardise with the statistics of the whole set.
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64) / 16.0).unsqueeze(1)
    x = ((x - x.mean()) / x.std()).to(torch.float32).contiguous()
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, val_idx = _split(len(y), train_portion)
    return SearchData(
        train=_TensorLoader(x, y, train_idx, batch_size, seed, "train", prepare=_identity),
        val=_TensorLoader(x, y, val_idx, batch_size, seed, "val", prepare=_identity),
        in_channels=1,
        num_classes=10,
        image_size=8,
    )


def _identity(x: Tensor) -> Tensor:
    return x


# --------------------------------------------------------------------------------------------- cifar10


def _cifar_folder(data_dir: str | os.PathLike[str] | None) -> Path:
    """The ``cifar-10-batches-py`` folder, given it or its parent."""
    wanted = f"a folder holding {_CIFAR_FOLDER}/ ({_CIFAR_HINT})"
    if data_dir is None or str(data_dir) == "":
        raise UsageError(f"cifar10 needs --data-dir: {wanted}; got none")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UsageError(f"cifar10 needs --data-dir: {wanted}; got '{data_dir}', which does not exist")
    if not root.is_dir():
        raise UsageError(f"cifar10 needs --data-dir: {wanted}; got '{data_dir}', which is not a folder")
    if (root / _CIFAR_FOLDER).is_dir():
        return root / _CIFAR_FOLDER
    if root.name == _CIFAR_FOLDER or (root / _CIFAR_BATCHES[0]).exists():
        return root
    raise UsageError(
        f"cifar10 needs --data-dir: {wanted}; got '{data_dir}', which holds no {_CIFAR_FOLDER}/ folder"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-version batch file -> (images uint8 [n, 3, 32, 32], labels int64 [n])."""
    expected = "a pickled dict with b'data' (uint8 [n, 3072]) and b'labels' (n ints in 0..9)"
    if not path.is_file():
        raise UsageError(f"cifar10 batch file '{path}' is missing; put {_CIFAR_HINT} in '{path.parent}'")
    try:
        # CIFAR-10 is distributed as pickles (which can run code when loaded): read only files you trust.
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # a damaged pickle can raise almost any exception type
        raise UsageError(
            f"cifar10 batch file '{path}' could not be unpickled ({type(e).__name__}: {e}); expected {expected}, "
            f"as in {_CIFAR_HINT}"
        ) from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise UsageError(f"cifar10 batch file '{path}' holds {found}; expected {expected}")
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except (TypeError, ValueError) as e:  # ragged or non-numeric lists
        raise UsageError(f"cifar10 batch file '{path}' has unreadable b'data' or b'labels' ({e}); "
                         f"expected {expected}") from e  # fmt: skip
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(
            f"cifar10 batch file '{path}' has b'data' {data.dtype} {list(data.shape)}; expected {expected}"
        )
    if (
        labels.shape != (data.shape[0],)
        or not np.issubdtype(labels.dtype, np.integer)
        or (labels.size and (labels.min() < 0 or labels.max() > 9))
    ):
        raise UsageError(
            f"cifar10 batch file '{path}' has b'labels' {labels.dtype} {list(labels.shape)} for "
            f"{data.shape[0]} images; expected {expected}"
        )
    # Each row is three 32x32 row-major planes, R then G then B.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _random_crop_flip(x: Tensor, g: torch.Generator) -> Tensor:
    """The DARTS CIFAR train augmentation on a batch: zero-pad by 4, random 32x32 crop, random horizontal flip.

    Args:
        x: ``[B, C, H, W]`` images (uint8 here, so the padding is black before normalisation, as in DARTS).
        g: the epoch's generator; draws ``B`` row offsets, ``B`` column offsets and ``B`` flips, in that order.

    Returns:
        ``[B, C, H, W]``, same dtype: ``out[b] = flip_b(pad(x[b])[:, r_b : r_b + H, c_b : c_b + W])``.
    """
    b, c, h, w = x.shape
    p = _CIFAR_PAD
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    rows = torch.randint(0, 2 * p + 1, (b,), generator=g)
    cols = torch.randint(0, 2 * p + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    r = (rows[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    col_offsets = torch.arange(w)
    # A flipped crop reads its columns right to left.
    col_offsets = torch.where(flip[:, None], col_offsets.flip(0), col_offsets)  # [B, W]
    cc = (cols[:, None] + col_offsets)[:, None, None, :]  # [B, 1, 1, W]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], r, cc]


class _Normalize:
    """uint8 ``[B, C, H, W]`` -> float32 ``(x / 255 - mean) / std``, per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.to(torch.float32) / 255.0 - self._mean) / self._std


def _load_cifar10(
    data_dir: str | os.PathLike[str] | None, batch_size: int, seed: int, train_portion: float
) -> SearchData:
    folder = _cifar_folder(data_dir)
    parts = [_read_cifar_batch(folder / name) for name in _CIFAR_BATCHES]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts])).contiguous()
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    train_idx, val_idx = _split(len(y), train_portion)
    normalize = _Normalize(CIFAR10_MEAN, CIFAR10_STD)
    return SearchData(
        train=_TensorLoader(x, y, train_idx, batch_size, seed, "train", normalize, _random_crop_flip),
        val=_TensorLoader(x, y, val_idx, batch_size, seed, "val", normalize, _random_crop_flip),
        in_channels=3,
        num_classes=10,
        image_size=32,
    )


# --------------------------------------------------------------------------------------------- imagenet


def _resized_crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """Inception-style crop box (top, left, height, width): scale in [0.08, 1], aspect ratio in [3/4, 4/3].

    Ten tries at a random box that fits; otherwise the largest centred box whose ratio is in range.
    """
    scale, ratio = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(scale[0], scale[1], generator=g))
        aspect = math.exp(float(torch.empty(()).uniform_(log_ratio[0], log_ratio[1], generator=g)))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _ImageNetTrainTransform:
    """PIL image -> RandomResizedCrop(size) + RandomHorizontalFlip + ToTensor + Normalize, ``[3, size, size]``.

    All randomness comes from the generator passed in.
    """

    def __init__(self, size: int) -> None:
        self._size = size

    def __call__(self, image: Image, g: torch.Generator) -> Tensor:
        from torchvision.transforms import functional as tf

        top, left, h, w = _resized_crop_box(image.width, image.height, g)
        image = tf.resized_crop(image, top, left, h, w, [self._size, self._size], antialias=True)
        if float(torch.rand((), generator=g)) < 0.5:
            image = tf.hflip(image)
        return tf.normalize(tf.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def _load_imagenet(
    data_dir: str | os.PathLike[str] | None,
    batch_size: int,
    seed: int,
    train_portion: float,
    image_size: int,
    workers: int,
) -> SearchData:
    from torchvision.datasets import ImageFolder

    wanted = "an ImageFolder root holding train/ with one folder of images per class"
    if data_dir is None or str(data_dir) == "":
        raise UsageError(f"imagenet needs --data-dir: {wanted}; got none")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UsageError(f"imagenet needs --data-dir: {wanted}; got '{data_dir}', which {what}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UsageError(
            f"imagenet --data-dir '{data_dir}' has no train/ folder ('{train_dir}'); expected {wanted}"
        )
    try:
        folder = ImageFolder(str(train_dir))
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UsageError(f"imagenet found no images in '{train_dir}' ({e}); expected {wanted}") from e
    train_idx, val_idx = _split(len(folder.samples), train_portion)
    half = _FolderHalf(folder.samples, folder.loader, _ImageNetTrainTransform(image_size))
    return SearchData(
        train=_FolderLoader(half, train_idx, batch_size, seed, "train", workers),
        val=_FolderLoader(half, val_idx, batch_size, seed, "val", workers),
        in_channels=3,
        num_classes=len(folder.classes),
        image_size=image_size,
    )


# --------------------------------------------------------------------------------------------- entry point


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def load_search_data(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    train_portion: float = 0.5,
    image_size: int | None = None,
    workers: int = 0,
) -> SearchData:
    """Load a dataset's training set, split into the weight half and the architecture half.

    The first ``floor(train_portion * N)`` entries of a fixed permutation of the N training samples form the
    weight half (``train``), the rest the architecture half (``val``); the permutation does not depend on
    ``seed``. Both halves are reshuffled and augmented every epoch from ``(seed, epoch)`` (each half from its own
    stream).

    Args:
        name: one of :data:`DATASETS`: ``"digits"`` (embedded, 1x8x8), ``"cifar10"`` (3x32x32) or
            ``"imagenet"`` (3 x image_size x image_size).
        data_dir: cifar10: the ``cifar-10-batches-py`` folder of the CIFAR-10 python version, or its parent.
            imagenet: an ImageFolder root holding ``train/<class>/<image>``. Ignored for digits.
        batch_size: samples per batch, >= 1; the last batch of an epoch may be shorter.
        seed: the run's seed; with the epoch it fixes the batch order and augmentation.
        train_portion: fraction of the training set in the weight half, in (0, 1); DARTS uses 0.5.
        image_size: imagenet crop size, >= 1 (default 224). digits and cifar10 have fixed sizes (8, 32) and
            accept only ``None`` or that size.
        workers: DataLoader worker processes for imagenet, >= 0; digits and cifar10 batch in the calling thread.

    Returns:
        :class:`SearchData` whose loaders yield ``(x [B, C, H, W] float32, y [B] int64)``.

    Raises:
        UsageError: for an unknown name, a bad argument, or data that is missing or not in the expected format.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise UsageError(f"dataset {name!r} is not known; expected one of {', '.join(DATASETS)}")
    if not _is_int(batch_size) or batch_size < 1:
        raise UsageError(f"batch_size {batch_size!r} is not valid; expected an int >= 1")
    if not _is_int(seed):
        raise UsageError(f"seed {seed!r} is not valid; expected an int")
    if (
        isinstance(train_portion, bool)
        or not isinstance(train_portion, (int, float))
        or not 0.0 < train_portion < 1.0
    ):
        raise UsageError(
            f"train_portion {train_portion!r} is not valid; expected a number in (0, 1), e.g. 0.5"
        )
    size = search_image_size(name, image_size)
    if not _is_int(workers) or workers < 0:
        raise UsageError(f"workers {workers!r} is not valid; expected an int >= 0")
    batch_size, seed, workers = int(batch_size), int(seed), int(workers)
    train_portion = float(train_portion)
    if name == "digits":
        return _load_digits(batch_size, seed, train_portion)
    if name == "cifar10":
        return _load_cifar10(data_dir, batch_size, seed, train_portion)
    return _load_imagenet(data_dir, batch_size, seed, train_portion, size, workers)


def search_image_size(name: str, image_size: int | None = None) -> int:
    """The side length of the images :func:`load_search_data` yields for these arguments, known before any data
    is read (so that a supernet can refuse it before an ImageNet tree is scanned): 8 for digits, 32 for
    cifar10, ``image_size`` (default 224) for imagenet. Raises UsageError for a size the dataset cannot give."""
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
        raise UsageError(f"image_size {image_size!r} is not valid; expected an int >= 1")
    native = {"digits": 8, "cifar10": 32}
    if name in native and image_size is not None and int(image_size) != native[name]:
        raise UsageError(
            f"image_size {image_size!r} is not valid for {name}, whose images are "
            f"{native[name]}x{native[name]}; expected {native[name]} or none (image_size applies to imagenet)"
        )
    return native.get(name, 224 if image_size is None else int(image_size))
