"""The DARTS CNN search space (Liu et al., 2019) as data."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastdarts.errors import UsageError

STEMS = ("cifar", "imagenet")


@dataclass(frozen=True)
class SearchSpace:
    """A cell-based CNN search space.

    Attributes:
        name: the name used on the command line.
        primitives: candidate operations on every edge, in alpha column order.
        steps: intermediate nodes per cell; node i has 2 + i incoming edges.
        multiplier: how many of the last intermediate nodes a cell concatenates as its output.
        stem_multiplier: the stem has stem_multiplier * C channels.
        affine: BatchNorm affine inside the candidate operations (off in the DARTS search phase).
        stem: "cifar" (one 3x3 convolution, the input's resolution) or "imagenet" (three stride-2 3x3
            convolutions, stem0 and stem1 as in PC-DARTS: 224x224 inputs reach the cells at 28x28).
        partial_channels: PC-DARTS' default K on this space's input sizes (4 on CIFAR, 2 on ImageNet).
    """

    name: str
    primitives: tuple[str, ...]
    steps: int = 4
    multiplier: int = 4
    stem_multiplier: int = 3
    affine: bool = False
    stem: str = "cifar"
    partial_channels: int = 4

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise UsageError(f"unknown stem {self.stem!r}, expected one of: {', '.join(STEMS)}")

    @property
    def num_edges(self) -> int:
        """Edges in one cell: sum of (2 + i) over the intermediate nodes (14 for 4 steps)."""
        return sum(2 + i for i in range(self.steps))

    def reduction_layers(self, layers: int) -> tuple[int, ...]:
        """Indices of the reduction cells: at 1/3 and 2/3 of the depth."""
        return tuple(sorted({layers // 3, 2 * layers // 3}))


DARTS = SearchSpace(
    name="darts",
    primitives=(
        "none",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    ),
)

# The ImageNet-style supernet of PC-DARTS (``model_search_imagenet.py``): the DARTS cell on a stride-8 stem.
DARTS_IMAGENET = replace(DARTS, name="darts-imagenet", stem="imagenet", partial_channels=2)

SPACES = {space.name: space for space in (DARTS, DARTS_IMAGENET)}


def get_space(name: str) -> SearchSpace:
    """Look a search space up by its command-line name."""
    if name not in SPACES:
        raise UsageError(f"unknown search space {name!r}, expected one of: {', '.join(SPACES)}")
    return SPACES[name]
