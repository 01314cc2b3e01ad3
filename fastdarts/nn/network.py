"""The DARTS search network: a stem, a stack of normal and reduction cells, and a classifier."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdarts.nn.cell import Cell
from fastdarts.spaces import DARTS, SearchSpace


class SearchNetwork(nn.Module):
    """The supernet searched by DARTS: every candidate on every edge, mixed by softmax(alphas).

    All normal cells share ``alphas_normal`` and all reduction cells ``alphas_reduce``, each
    [num_edges, len(primitives)], initialised to 1e-3 * N(0, 1) as in DARTS. They are registered parameters
    (so they are saved with the model) but are kept apart from the weights: the architecture optimiser
    trains :meth:`arch_parameters`, the weight optimiser :meth:`weight_parameters`.

    Args:
        C: channels of the first cells (16 in DARTS); doubled at each reduction.
        num_classes: classifier outputs.
        layers: number of cells (8 in the DARTS search); reductions at layers // 3 and 2 * layers // 3.
        space: the search space (primitives, steps, multiplier, stem multiplier, affine).
        in_channels: image channels (3 for CIFAR-10 and ImageNet, 1 for digits).
    """

    def __init__(
        self, C: int, num_classes: int, layers: int, space: SearchSpace = DARTS, in_channels: int = 3
    ):
        super().__init__()
        if layers < 1 or C < 1 or num_classes < 1:
            raise ValueError(
                f"need layers, C and num_classes >= 1, got layers={layers}, C={C}, {num_classes=}"
            )
        self.space = space
        self._layers = layers
        C_curr = space.stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        reductions = space.reduction_layers(layers)
        self.cells = nn.ModuleList()
        reduction_prev = False
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

    def make_cell(self, C_prev_prev: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool) -> Cell:
        """One cell of the space (a variant such as PC-DARTS overrides this)."""
        s = self.space
        return Cell(
            s.steps, s.multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, s.primitives, s.affine
        )

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters [alphas_normal, alphas_reduce]."""
        return [self.alphas_normal, self.alphas_reduce]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter but the architecture parameters, with its name."""
        arch = {id(p) for p in self.arch_parameters()}
        return ((n, p) for n, p in self.named_parameters() if id(p) not in arch)

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the architecture parameters: what the weight optimiser trains."""
        return [p for _, p in self.named_weight_parameters()]

    def cell_weights(self) -> dict[bool, tuple[Tensor, ...]]:
        """What a cell gets after its two inputs, for normal (False) and reduction (True) cells: the softmax of
        their alphas (a variant such as PC-DARTS adds edge weights)."""
        return {
            False: (F.softmax(self.alphas_normal, dim=-1),),
            True: (F.softmax(self.alphas_reduce, dim=-1),),
        }

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        weights = self.cell_weights()
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
