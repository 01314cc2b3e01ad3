"""Tests for fastdarts.data: the fixed split, (seed, epoch)-reproducible batches, and the three datasets.

CIFAR-10 and ImageFolder trees are built in tmp_path in the real on-disk formats; nothing is downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdarts.data import DATASETS, Loader, SearchData, load_search_data
from fastdarts.errors import UsageError
from tests.helpers import write_image_folder

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
CIFAR_PER_BATCH = 6  # 5 files x 6 images = 30 training images, 15 per half


def epoch_batches(loader: Loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


def concat(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# --------------------------------------------------------------------------------------------- digits


def digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.int64), bunch.target.astype(np.int64)


def test_datasets_constant() -> None:
    assert DATASETS == ("digits", "cifar10", "imagenet")


def test_digits_shapes_dtypes_and_metadata() -> None:
    data = load_search_data("digits", batch_size=64)
    assert isinstance(data, SearchData)
    assert (data.in_channels, data.num_classes, data.image_size) == (1, 10, 8)
    assert (data.train.num_samples, data.val.num_samples) == (898, 899)
    for loader in (data.train, data.val):
        batches = list(loader)
        assert len(batches) == len(loader) == 15  # ceil(898 / 64) = ceil(899 / 64) = 15
        for x, y in batches[:-1]:
            assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
            assert y.shape == (64,) and y.dtype == torch.int64
        x, y = batches[-1]  # the final short batch
        assert x.shape == (loader.num_samples - 14 * 64, 1, 8, 8) and y.shape == (x.shape[0],)


def test_digits_halves_are_disjoint_and_cover_the_set() -> None:
    data = load_search_data("digits")
    train, val = data.train.indices, data.val.indices
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(1797))
    # A fixed permutation, not the first half: both halves reach across the whole set.
    assert train.min() < 100 and train.max() > 1700 and val.min() < 100 and val.max() > 1700


def test_digits_split_ignores_the_seed_and_follows_train_portion() -> None:
    a = load_search_data("digits", seed=0)
    b = load_search_data("digits", seed=123)
    assert torch.equal(a.train.indices, b.train.indices) and torch.equal(a.val.indices, b.val.indices)
    quarter = load_search_data("digits", train_portion=0.25)
    assert (quarter.train.num_samples, quarter.val.num_samples) == (449, 1348)


def test_digits_normalised_over_the_set_and_decode_to_the_real_images() -> None:
    data = load_search_data("digits", batch_size=500)
    x_train, y_train = concat(list(data.train))
    x_val, y_val = concat(list(data.val))
    x_all = torch.cat([x_train, x_val]).double()
    assert abs(x_all.mean().item()) < 1e-5
    assert abs(x_all.std().item() - 1.0) < 1e-3

    # Undo the normalisation with the set's statistics: every pixel must land on an integer level 0..16.
    images, targets = digits_raw()
    scaled = torch.from_numpy(images / 16.0)
    mean, std = scaled.mean().item(), scaled.std().item()
    for loader, x, y in ((data.train, x_train, y_train), (data.val, x_val, y_val)):
        levels = (x.double() * std + mean) * 16.0
        raw = levels.round()
        assert torch.allclose(levels, raw, atol=1e-3)
        got = sorted((bytes(r.to(torch.uint8).flatten().tolist()), int(t)) for r, t in zip(raw, y))
        idx = loader.indices.numpy()
        want = sorted(
            (bytes(img.astype(np.uint8).flatten().tolist()), int(t))
            for img, t in zip(images[idx], targets[idx])
        )
        assert got == want


def test_same_seed_and_epoch_give_identical_batches() -> None:
    a = load_search_data("digits", seed=7, batch_size=32)
    b = load_search_data("digits", seed=7, batch_size=32)
    for loader_a, loader_b in ((a.train, b.train), (a.val, b.val)):
        assert_same_batches(epoch_batches(loader_a, 3), epoch_batches(loader_b, 3))
        # Iterating again in the same epoch, even after a partial pass, repeats the epoch.
        next(iter(loader_a))
        assert_same_batches(list(loader_a), epoch_batches(loader_b, 3))


def test_order_changes_with_epoch_and_seed() -> None:
    data = load_search_data("digits", seed=0, batch_size=64)
    other = load_search_data("digits", seed=1, batch_size=64)
    _, y0 = concat(epoch_batches(data.train, 0))
    _, y1 = concat(epoch_batches(data.train, 1))
    _, y0_other_seed = concat(epoch_batches(other.train, 0))
    assert not torch.equal(y0, y1)
    assert not torch.equal(y0, y0_other_seed)
    # Same samples every epoch, only the order changes.
    assert torch.equal(torch.sort(y0).values, torch.sort(y1).values)


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_resumed_loader_sees_the_uninterrupted_batches(name: str, tmp_path: Path) -> None:
    data_dir = write_cifar(tmp_path)[0] if name == "cifar10" else None
    kwargs = {"data_dir": data_dir, "batch_size": 8, "seed": 5}
    running = load_search_data(name, **kwargs)
    epoch_batches(running.train, 0)
    epoch_batches(running.val, 0)
    uninterrupted = epoch_batches(running.train, 1), epoch_batches(running.val, 1)
    resumed = load_search_data(name, **kwargs)
    resumed.set_epoch(1)
    assert_same_batches(list(resumed.train), uninterrupted[0])
    assert_same_batches(list(resumed.val), uninterrupted[1])


def test_half_smaller_than_a_batch_gives_one_short_batch() -> None:
    data = load_search_data("digits", batch_size=5000)
    assert len(data.train) == 1
    (x, y), *rest = list(data.train)
    assert not rest and x.shape == (898, 1, 8, 8) and y.shape == (898,)


# --------------------------------------------------------------------------------------------- cifar10


def write_cifar(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A CIFAR-10 python-version tree with 5 x 6 random images; returns (parent dir, images [N,3,32,32], labels)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(5 * CIFAR_PER_BATCH, 3072), dtype=np.uint8)
    labels = [i % 10 for i in range(len(rows))]
    for b in range(5):
        part = slice(b * CIFAR_PER_BATCH, (b + 1) * CIFAR_PER_BATCH)
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": labels[part],
            b"data": rows[part],
            b"filenames": [f"img_{i}.png".encode() for i in range(CIFAR_PER_BATCH)],
        }
        with (folder / f"data_batch_{b + 1}").open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    # Rows are R, G, B planes of 32x32 row-major pixels.
    images = np.stack([rows[:, p * 1024 : (p + 1) * 1024].reshape(-1, 32, 32) for p in range(3)], axis=1)
    return tmp_path, images, np.array(labels)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the CIFAR normalisation: float [B, 3, 32, 32] -> uint8 pixels (exact, or the test fails)."""
    pixels = (x * CIFAR_STD + CIFAR_MEAN) * 255.0
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    return pixels.round().to(torch.uint8)


def crops_and_flips(images: torch.Tensor) -> torch.Tensor:
    """Every 32x32 crop of each 4-zero-padded image, plain and flipped: [N, 81 * 2, 3, 32, 32]."""
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    crops = torch.stack([padded[:, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)], dim=1)
    return torch.cat([crops, crops.flip(-1)], dim=1)


def test_cifar10_shapes_and_both_data_dir_forms(tmp_path: Path) -> None:
    parent, _, _ = write_cifar(tmp_path)
    by_parent = load_search_data("cifar10", data_dir=str(parent), batch_size=8)
    by_folder = load_search_data("cifar10", data_dir=parent / "cifar-10-batches-py", batch_size=8)
    assert (by_parent.in_channels, by_parent.num_classes, by_parent.image_size) == (3, 10, 32)
    assert (by_parent.train.num_samples, by_parent.val.num_samples) == (15, 15)
    batches = list(by_parent.train)
    assert len(batches) == len(by_parent.train) == 2
    assert [tuple(x.shape) for x, _ in batches] == [(8, 3, 32, 32), (7, 3, 32, 32)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    for a, b in ((by_parent.train, by_folder.train), (by_parent.val, by_folder.val)):
        assert_same_batches(list(a), list(b))


@pytest.mark.parametrize("half", ["train", "val"])
def test_cifar10_each_half_is_a_crop_and_flip_of_the_originals(tmp_path: Path, half: str) -> None:
    # Both halves are augmented, as DARTS' two queues both read the training set with its train transform; the
    # images are decoded here independently of fastdarts (plane by plane), so a match also checks the decoding.
    parent, images, labels = write_cifar(tmp_path)
    data = load_search_data("cifar10", data_dir=parent, batch_size=16, seed=3)
    loader = getattr(data, half)
    candidates = crops_and_flips(torch.from_numpy(images))  # [N, 162, 3, 32, 32]
    (x, y), *rest = epoch_batches(loader, 0)
    assert not rest and x.shape == (15, 3, 32, 32)
    pixels = to_uint8(x)
    seen, flipped, shifted = [], 0, 0
    for image, label in zip(pixels, y):
        # (original, candidate) pairs equal to this image; candidate = flip * 81 + row offset * 9 + col offset.
        hits = torch.nonzero((candidates == image).flatten(2).all(2)).tolist()
        assert len(hits) == 1, f"a {half} image is not a padded crop (maybe flipped) of exactly one original"
        original, candidate = hits[0]
        assert labels[original] == label
        seen.append(original)
        flipped += candidate >= 81
        shifted += candidate % 81 != 4 * 9 + 4
    assert sorted(seen) == loader.indices.tolist()
    # Both random parts of the augmentation are at work (about half flipped, 80 of 81 offsets shift).
    assert 3 <= flipped <= 12 and shifted >= 12
    # Deterministic per (seed, epoch), different across epochs.
    again = load_search_data("cifar10", data_dir=parent, batch_size=16, seed=3)
    assert_same_batches(epoch_batches(getattr(again, half), 0), [(x, y)])
    x1, _ = epoch_batches(getattr(again, half), 1)[0]
    assert not torch.equal(torch.sort(x1.flatten(1), 0).values, torch.sort(x.flatten(1), 0).values)


def test_cifar10_missing_folder_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UsageError, match="nowhere.*does not exist"):
        load_search_data("cifar10", data_dir=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty.*cifar-10-batches-py"):
        load_search_data("cifar10", data_dir=tmp_path / "empty")
    with pytest.raises(UsageError, match="needs --data-dir"):
        load_search_data("cifar10")


def test_cifar10_missing_batch_file_raises_naming_it(tmp_path: Path) -> None:
    parent, _, _ = write_cifar(tmp_path)
    path = parent / "cifar-10-batches-py" / "data_batch_4"
    path.unlink()
    with pytest.raises(UsageError) as info:
        load_search_data("cifar10", data_dir=parent)
    assert str(path) in str(info.value) and "missing" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a pickle",
        pickle.dumps({b"data": np.zeros((6, 3072), np.uint8)}),  # no labels
        pickle.dumps({b"data": np.zeros((6, 1024), np.uint8), b"labels": [0] * 6}),  # not 3x32x32
        pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0] * 5}),  # labels too short
        pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [[1], 2, 3, 4, 5, 6]}),  # ragged
        pickle.dumps([1, 2, 3]),
    ],
    ids=["garbage", "no-labels", "bad-shape", "short-labels", "ragged-labels", "not-a-dict"],
)
def test_cifar10_malformed_batch_raises_naming_it(tmp_path: Path, content: bytes) -> None:
    parent, _, _ = write_cifar(tmp_path)
    path = parent / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        load_search_data("cifar10", data_dir=parent)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- imagenet


def test_imagenet_shapes_labels_and_classes(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = write_image_folder(tmp_path)
    data = load_search_data("imagenet", data_dir=root, image_size=16, batch_size=4)
    assert (data.in_channels, data.num_classes, data.image_size) == (3, 3, 16)
    assert (data.train.num_samples, data.val.num_samples) == (6, 6)
    targets = torch.tensor(ImageFolder(str(root / "train")).targets)
    for loader in (data.train, data.val):
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
        assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
        _, y = concat(batches)
        assert torch.equal(torch.sort(y).values, torch.sort(targets[loader.indices]).values)


def test_imagenet_is_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path)
    kwargs = {"data_dir": root, "image_size": 16, "batch_size": 6, "seed": 2}
    a = load_search_data("imagenet", **kwargs)
    b = load_search_data("imagenet", **kwargs)
    a0 = epoch_batches(a.train, 0)
    assert_same_batches(a0, epoch_batches(b.train, 0))
    assert_same_batches(epoch_batches(a.val, 1), epoch_batches(b.val, 1))
    # Epoch 1 draws new crops: the same samples come out as different pixels.
    a1 = epoch_batches(a.train, 1)
    assert not torch.equal(
        torch.sort(a1[0][0].flatten(1), 0).values, torch.sort(a0[0][0].flatten(1), 0).values
    )
    # The val half is augmented too (as in PC-DARTS' ImageNet search): new crops in a new epoch.
    v0, v1 = concat(epoch_batches(a.val, 0))[0], concat(epoch_batches(a.val, 1))[0]
    assert not torch.equal(torch.sort(v0.flatten(1), 0).values, torch.sort(v1.flatten(1), 0).values)


def test_imagenet_batches_do_not_depend_on_worker_count(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, per_class=2)
    kwargs = {"data_dir": root, "image_size": 16, "batch_size": 2, "seed": 4}
    in_process = load_search_data("imagenet", workers=0, **kwargs)
    with_workers = load_search_data("imagenet", workers=2, **kwargs)
    assert_same_batches(epoch_batches(in_process.train, 1), epoch_batches(with_workers.train, 1))


def test_imagenet_missing_data_raises(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nowhere.*does not exist"):
        load_search_data("imagenet", data_dir=tmp_path / "nowhere")
    with pytest.raises(UsageError, match="no train/"):
        load_search_data("imagenet", data_dir=tmp_path)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images"):
        load_search_data("imagenet", data_dir=tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_imagenet_unreadable_image_raises_naming_it(tmp_path: Path, workers: int) -> None:
    root = write_image_folder(tmp_path, per_class=2)
    bad = root / "train" / "bee" / "9.jpg"
    bad.write_bytes(b"not an image")
    data = load_search_data("imagenet", data_dir=root, image_size=16, batch_size=8, workers=workers)
    with pytest.raises(UsageError) as caught:
        list(data.train) + list(data.val)
    message = str(caught.value)
    assert message.startswith(f"imagenet image '{bad}' could not be read (UnidentifiedImageError: ")
    assert "\n" not in message and message.endswith("remove or replace it")


# --------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"name": "mnist"}, "'mnist'"),
        ({"name": "digits", "batch_size": 0}, "batch_size 0"),
        ({"name": "digits", "batch_size": 2.5}, "batch_size 2.5"),
        ({"name": "digits", "train_portion": 0.0}, "train_portion 0.0"),
        ({"name": "digits", "train_portion": 1.0}, "train_portion 1.0"),
        ({"name": "digits", "train_portion": 1.5}, "train_portion 1.5"),
        ({"name": "digits", "train_portion": 0.0001}, "train_portion 0.0001"),
        ({"name": "imagenet", "image_size": 0}, "image_size 0"),
        ({"name": "digits", "image_size": 32}, "image_size 32"),
        ({"name": "digits", "workers": -1}, "workers -1"),
        ({"name": "digits", "seed": "zero"}, "seed 'zero'"),
    ],
)
def test_bad_arguments_raise_usage_error_naming_the_value(kwargs: dict, shown: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(UsageError) as info:
        load_search_data(name, **kwargs)
    assert shown in str(info.value) and "expected" in str(info.value)


def test_bad_epoch_raises() -> None:
    data = load_search_data("digits")
    with pytest.raises(UsageError, match="epoch -1"):
        data.train.set_epoch(-1)
