"""The DARTS search network: a stem, a stack of normal and reduction cells, and a classifier."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdarts.errors import UsageError
from fastdarts.nn.cell import Cell
from fastdarts.spaces import DARTS, SearchSpace


def check_image_size(space: SearchSpace, layers: int, image_size: int) -> int:
    """Refuses an image side length that the supernet would halve at an odd size: a reduction cell's input (the
    next cell's FactorizedReduce and the 2x2 max pool of partial channels halve it) and, with the ImageNet stem,
    stem0's output (the first cell's FactorizedReduce). Returns the side length of the last cells' feature maps."""
    size, halved = image_size, []
    if space.stem == "imagenet":
        size = -(-size // 4)  # stem0: two 3x3 stride-2 convolutions with padding 1
        halved.append(size)
        size = -(-size // 2)  # stem1
    reductions = space.reduction_layers(layers)
    for _ in reductions:
        halved.append(size)
        size = -(-size // 2)
    if any(n % 2 for n in halved):
        multiple = 2 ** (len(reductions) + (3 if space.stem == "imagenet" else 0))
        raise UsageError(
            f"image size {image_size} is halved at an odd size in space {space.name!r} (sizes halved: "
            f"{', '.join(map(str, halved))}); use an image size divisible by {multiple}"
        )
    return size


class SearchNetwork(nn.Module):
    """The supernet searched by DARTS: every candidate on every edge, mixed by softmax(alphas).

    All normal cells share ``alphas_normal`` and all reduction cells ``alphas_reduce``, each
    [num_edges, len(primitives)], initialised to 1e-3 * N(0, 1) as in DARTS. They are registered parameters
    (so they are saved with the model) but are kept apart from the weights: the architecture optimiser
    trains :meth:`arch_parameters`, the weight optimiser :meth:`weight_parameters`.

    PC-DARTS (Xu et al., 2020) is two switches: ``partial_channels`` K > 1 sends 1 / K of each edge's channels
    through its candidates (:class:`~fastdarts.nn.cell.PartialMixedOp`), and ``edge_normalization`` adds
    ``betas_normal`` / ``betas_reduce`` ([num_edges] each, 1e-3 * N(0, 1)): each node weights its incoming edges
    by the softmax of their betas, and the genotype ranks edges by edge weight x op weight.

    Args:
        C: channels of the first cells (16 in DARTS); doubled at each reduction.
        num_classes: classifier outputs.
        layers: number of cells (8 in the DARTS search); reductions at layers // 3 and 2 * layers // 3.
        space: the search space (primitives, steps, multiplier, stem, stem multiplier, affine).
        in_channels: image channels (3 for CIFAR-10 and ImageNet, 1 for digits).
        partial_channels: 1 (DARTS) or PC-DARTS' K.
        edge_normalization: learn betas (PC-DARTS' edge normalisation).
    """

    _checked_size = None  # the last input size forward checked (a class default: older pickles lack it)

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        space: SearchSpace = DARTS,
        in_channels: int = 3,
        partial_channels: int = 1,
        edge_normalization: bool = False,
    ):
        super().__init__()
        if layers < 1 or C < 1 or num_classes < 1:
            raise ValueError(
                f"need layers, C and num_classes >= 1, got layers={layers}, C={C}, {num_classes=}"
            )
        if partial_channels < 1 or C % partial_channels:
            raise ValueError(
                f"partial_channels {partial_channels} must divide the {C} channels of the first cells"
            )
        self.space = space
        self._layers = layers
        self.partial_channels = partial_channels
        self.edge_normalization = edge_normalization
        C_curr = space.stem_multiplier * C
        if (
            space.stem == "imagenet"
        ):  # three stride-2 convolutions, the last one's input kept for the first cell
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C_curr // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C_curr // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C_curr // 2, C_curr, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=True),
                nn.Conv2d(C_curr, C_curr, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        reductions = space.reduction_layers(layers)
        self.cells = nn.ModuleList()
        reduction_prev = space.stem == "imagenet"  # the first cell's s0 is twice the size of its s1
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            cell = self.make_cell(C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, space.multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        shape = (space.num_edges, len(space.primitives))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(shape))
        if edge_normalization:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(space.num_edges))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(space.num_edges))

    def make_cell(self, C_prev_prev: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool) -> Cell:
        """One cell of the space (a code base with other module names overrides this)."""
        s = self.space
        return Cell(
            s.steps, s.multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, s.primitives, s.affine,
            self.partial_channels,
        )  # fmt: skip

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters [alphas_normal, alphas_reduce], then [betas_normal, betas_reduce] with
        edge normalisation."""
        betas = [self.betas_normal, self.betas_reduce] if self.edge_normalization else []
        return [self.alphas_normal, self.alphas_reduce, *betas]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter but the architecture parameters, with its name."""
        arch = {id(p) for p in self.arch_parameters()}
        return ((n, p) for n, p in self.named_parameters() if id(p) not in arch)

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the architecture parameters: what the weight optimiser trains."""
        return [p for _, p in self.named_weight_parameters()]

    def edge_weights(self, betas: Tensor) -> Tensor:
        """[num_edges] betas -> their softmax over each node's incoming edges, node by node."""
        sizes = [2 + i for i in range(self.space.steps)]
        return torch.cat([F.softmax(b, dim=-1) for b in betas.split(sizes)])

    def cell_weights(self) -> dict[bool, tuple[Tensor, ...]]:
        """What a cell gets after its two inputs, for normal (False) and reduction (True) cells: the softmax of
        their alphas, and with edge normalisation the edge weights."""
        weights = {
            False: (F.softmax(self.alphas_normal, dim=-1),),
            True: (F.softmax(self.alphas_reduce, dim=-1),),
        }
        if not self.edge_normalization:
            return weights
        betas = {False: self.betas_normal, True: self.betas_reduce}
        return {r: (*weights[r], self.edge_weights(betas[r])) for r in (False, True)}

    def edge_strengths(self) -> tuple[Tensor, Tensor] | None:
        """The detached edge weights ([num_edges] each) of normal and reduction cells with edge normalisation,
        which the genotype derivation multiplies into the op weights (PC-DARTS); None without."""
        if not self.edge_normalization:
            return None
        with torch.no_grad():
            return self.edge_weights(self.betas_normal), self.edge_weights(self.betas_reduce)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]; H and W as :func:`check_image_size` says (checked
        once per size)."""
        if not torch.compiler.is_compiling() and x.shape[-2:] != self._checked_size:
            for n in x.shape[-2:]:
                check_image_size(self.space, self._layers, n)
            self._checked_size = x.shape[-2:]
        weights = self.cell_weights()
        if self.space.stem == "imagenet":
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        else:
            s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, *weights[cell.reduction])
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        """The training loss of logits [B, num_classes] against target [B]: mean cross-entropy."""
        return F.cross_entropy(logits, target)

    def loss(self, x: Tensor, target: Tensor) -> Tensor:
        """The criterion of the logits for x against target [B]."""
        return self.criterion(self(x), target)
