"""yuhuixu1993/PC-DARTS (``model_search.py``, ``architect.py``) on fastdarts.

Change the imports of PC-DARTS' ``train_search.py``::

    from fastdarts.compat.pcdarts import Architect, Network

Each edge runs its candidates on the first C / 4 channels, passes the rest through (2x2 max-pooled on a
reduction edge) and shuffles the channels in 4 groups; each node weights its incoming edges by a softmax over
their betas (edge normalisation), and the genotype ranks edges by beta weight x op weight. Names and shapes are
PC-DARTS', so checkpoints load both ways; the alphas and betas are plain tensors, as there. The candidates run
fastdarts's fused kernels, and the weighted sum, bypass and shuffle are one fused op
(:func:`fastdarts.ops.partial_channel`): no split, cat or shuffle copies. The modules are fastdarts's PC-DARTS
(``SearchNetwork(partial_channels=4, edge_normalization=True)``) under PC-DARTS' names; ``MixedOp`` has no
``mp`` attribute (the 2x2 max pool is inside the fused op).
The architect is :class:`fastdarts.compat.darts.Architect` (PC-DARTS' is DARTS' over the four arch tensors).
"""

from __future__ import annotations

from typing import ClassVar

from fastdarts.compat import darts
from fastdarts.compat.darts import OPS, PRIMITIVES, Architect
from fastdarts.nn import cell as _cell
from fastdarts.ops import channel_shuffle
from fastdarts.select.genotype import Genotype

__all__ = ["OPS", "PRIMITIVES", "Architect", "Cell", "Genotype", "MixedOp", "Network", "channel_shuffle"]


class MixedOp(_cell.PartialMixedOp):
    """``MixedOp(C, stride)`` of PC-DARTS: the DARTS mixed op on the first C // k channels (k = 4), the rest
    passed through (2x2 max-pooled on a reduction edge), then channel_shuffle(., k)."""

    k = 4

    def __init__(self, C: int, stride: int):
        super().__init__(C, stride, PRIMITIVES, affine=False, groups=self.k)


class Cell(darts.Cell):
    """``Cell(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev)`` of PC-DARTS;
    ``forward(s0, s1, weights, weights2)`` scales edge e by ``weights2[e]``."""

    edge: ClassVar[type[MixedOp]] = MixedOp  # the mixed op class (pcdarts_imagenet's has k = 2)

    @classmethod
    def make_edge(cls, C, stride, primitives, affine, partial_channels=MixedOp.k) -> MixedOp:
        return cls.edge(C, stride)


class Network(darts.Network):
    """``Network(C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3)`` of PC-DARTS:
    DARTS' network with partial-channel edges and ``betas_normal`` / ``betas_reduce`` ([num_edges] each).
    ``arch_parameters()`` is [alphas_normal, alphas_reduce, betas_normal, betas_reduce]; ``genotype()`` ranks
    edges by edge weight x op weight."""

    _variant: ClassVar[dict] = {"partial_channels": MixedOp.k, "edge_normalization": True}
    cell: ClassVar[type[Cell]] = Cell  # the cell class (pcdarts_imagenet's has k = 2 edges)

    def make_cell(self, C_prev_prev, C_prev, C, reduction, reduction_prev) -> Cell:
        return self.cell(
            self.space.steps, self.space.multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev
        )
