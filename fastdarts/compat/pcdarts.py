"""yuhuixu1993/PC-DARTS (``model_search.py``, ``architect.py``) on fastdarts.

Change the imports of PC-DARTS' ``train_search.py``::

    from fastdarts.compat.pcdarts import Architect, Network

Each edge runs its candidates on the first C / 4 channels, passes the rest through (2x2 max-pooled on a
reduction edge) and shuffles the channels in 4 groups; each node weights its incoming edges by a softmax over
their betas (edge normalisation), and the genotype ranks edges by beta weight x op weight. Names and shapes are
PC-DARTS', so checkpoints load both ways; the alphas and betas are plain tensors, as there. The candidates run
fastdarts's fused kernels; the channel split, bypass and shuffle are plain PyTorch here.
The architect is :class:`fastdarts.compat.darts.Architect` (PC-DARTS' is DARTS' over the four arch tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdarts.compat import darts
from fastdarts.compat.darts import OPS, PRIMITIVES, Architect
from fastdarts.nn import cell as _cell
from fastdarts.select.genotype import Genotype, derive_genotype

__all__ = ["OPS", "PRIMITIVES", "Architect", "Cell", "Genotype", "MixedOp", "Network", "channel_shuffle"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[B, C, H, W] -> [B, C, H, W] with channel g * (C / groups) + i moved to i * groups + g."""
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


class MixedOp(_cell.MixedOp):
    """``MixedOp(C, stride)`` of PC-DARTS: the DARTS mixed op on the first C // k channels (k = 4), the rest
    passed through (``mp``: 2x2 max pool on a reduction edge), then channel_shuffle(., k)."""

    k = 4

    def __init__(self, C: int, stride: int):
        super().__init__(C // self.k, stride, PRIMITIVES, affine=False)
        self.mp = nn.MaxPool2d(2, 2)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """x: [B, C, H, W]; weights: [len(PRIMITIVES)]. Returns [B, C, H / stride, W / stride]."""
        c = x.shape[1] // self.k
        mixed = super().forward(x[:, :c], weights)
        rest = x[:, c:]
        if mixed.shape[2] != x.shape[2]:
            rest = self.mp(rest)
        return channel_shuffle(torch.cat([mixed, rest], dim=1), self.k)


class Cell(darts.Cell):
    """``Cell(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev)`` of PC-DARTS;
    ``forward(s0, s1, weights, weights2)`` scales edge e by ``weights2[e]``."""

    @staticmethod
    def make_edge(C, stride, primitives, affine) -> MixedOp:
        return MixedOp(C, stride)

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor, weights2: Tensor) -> Tensor:
        """weights: [num_edges, len(PRIMITIVES)] op weights; weights2: [num_edges] edge weights."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            node = sum(
                weights2[offset + j] * self._ops[offset + j](h, weights[offset + j])
                for j, h in enumerate(states)
            )
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self._multiplier :], dim=1)


class Network(darts.Network):
    """``Network(C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3)`` of PC-DARTS:
    DARTS' network with partial-channel edges and ``betas_normal`` / ``betas_reduce`` ([num_edges] each).
    ``arch_parameters()`` is [alphas_normal, alphas_reduce, betas_normal, betas_reduce]."""

    def __init__(self, C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3):
        super().__init__(C, num_classes, layers, criterion, steps, multiplier, stem_multiplier)
        k = self.space.num_edges
        self.betas_normal = (1e-3 * torch.randn(k)).requires_grad_()
        self.betas_reduce = (1e-3 * torch.randn(k)).requires_grad_()
        self._arch_parameters += [self.betas_normal, self.betas_reduce]

    def make_cell(self, C_prev_prev, C_prev, C, reduction, reduction_prev) -> Cell:
        return Cell(
            self.space.steps, self.space.multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev
        )

    def edge_weights(self, betas: Tensor) -> Tensor:
        """[num_edges] betas -> their softmax over each node's incoming edges, node by node."""
        sizes = [2 + i for i in range(self.space.steps)]
        return torch.cat([F.softmax(b, dim=-1) for b in betas.split(sizes)])

    def cell_weights(self) -> dict[bool, tuple[Tensor, Tensor]]:
        """(op weights, edge weights) of normal (False) and reduction (True) cells."""
        weights = super().cell_weights()
        betas = {False: self.betas_normal, True: self.betas_reduce}
        return {r: (*weights[r], self.edge_weights(betas[r])) for r in (False, True)}

    def genotype(self) -> Genotype:
        """Per node the two edges with the largest edge weight x best non-`none` op weight, each with that op."""
        edges = (self.edge_weights(self.betas_normal.detach()), self.edge_weights(self.betas_reduce.detach()))
        return self._range_concat(derive_genotype(self.alphas_normal, self.alphas_reduce, self.space, edges))
