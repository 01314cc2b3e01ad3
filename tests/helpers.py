"""Small builders shared by the tests: tiny supernets, batches and image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastdarts.nn import SearchNetwork
from fastdarts.spaces import DARTS, SearchSpace

# A space whose supernet is smooth once its ReLUs are softplus: no max pooling, no kinks.
SMOOTH = SearchSpace(name="smooth", primitives=("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"))


def tiny_network(
    space: SearchSpace = DARTS,
    dtype=torch.float32,
    seed: int = 0,
    layers: int = 3,
    C: int = 4,
    in_channels: int = 3,
    num_classes: int = 5,
    smooth: bool = False,
    **variant,
) -> SearchNetwork:
    """A 3-cell supernet (normal, reduce, reduce) with C=4, alphas spread out so their gradients matter;
    variant: SearchNetwork's partial_channels / edge_normalization."""
    torch.manual_seed(seed)
    model = SearchNetwork(C, num_classes, layers, space, in_channels, **variant)
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5)
    if smooth:
        _replace_relu(model)
    return model.to(dtype)


def _replace_relu(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus())
        else:
            _replace_relu(child)


def batch(
    n: int = 6, size: int = 8, in_channels: int = 3, num_classes: int = 5, dtype=torch.float32, seed: int = 1
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_channels, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


IMAGENET_CLASSES = ("ant", "bee", "cat")


def write_image_folder(tmp_path: Path, per_class: int = 4) -> Path:
    """An ImageFolder tree under tmp_path/train: per_class random RGB images of odd sizes (PNG and JPEG) for each
    of IMAGENET_CLASSES; returns tmp_path."""
    from PIL import Image

    rng = np.random.default_rng(1)
    sizes = [(20, 28), (30, 18), (24, 24), (40, 22)]
    for c, name in enumerate(IMAGENET_CLASSES):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            suffix = "png" if (c + i) % 2 else "jpg"
            Image.fromarray(pixels).save(folder / f"{i}.{suffix}")
    return tmp_path
