"""yuhuixu1993/PC-DARTS ``model_search_imagenet.py`` on fastdarts.

Change the imports of PC-DARTS' ``train_search_imagenet.py``::

    from fastdarts.compat.pcdarts_imagenet import Architect, Network

PC-DARTS' CIFAR network (:mod:`fastdarts.compat.pcdarts`) with two changes: the stem is three 3x3 stride-2
convolutions (``stem0``: two, with a ReLU between; ``stem1``: ReLU and one more), so 224x224 images reach the cells
at 28x28 and the first cell reads ``stem0``'s output through a FactorizedReduce; and each edge sends half its
channels (k = 2) through the candidates. Names and shapes are the original's, so checkpoints load both ways. The
modules are fastdarts's ``SearchNetwork(space=DARTS_IMAGENET, partial_channels=2, edge_normalization=True)``.

The original's cell calls every edge twice per forward (once only to read the output's device), so in training
each BatchNorm inside an edge updates its running statistics twice on the same batch: with momentum m, as one
update with momentum ``1 - (1 - m) ** 2``, and ``num_batches_tracked`` grows by 2. :class:`Cell` runs each edge
once and reproduces that: its edges' BatchNorms get the doubled momentum and one more count per training forward
(a ``MixedOp`` patched alone into the original is called twice there and keeps momentum m).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from fastdarts.compat import pcdarts
from fastdarts.compat.darts import OPS, PRIMITIVES, Architect
from fastdarts.ops import channel_shuffle
from fastdarts.select.genotype import Genotype
from fastdarts.spaces import DARTS_IMAGENET, SearchSpace

__all__ = ["OPS", "PRIMITIVES", "Architect", "Cell", "Genotype", "MixedOp", "Network", "channel_shuffle"]


class MixedOp(pcdarts.MixedOp):
    """``MixedOp(C, stride)`` of PC-DARTS' ImageNet search: the candidates on the first C // 2 channels."""

    k = 2


class Cell(pcdarts.Cell):
    """``Cell(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev)`` with k = 2 edges, whose
    BatchNorms update their running statistics as the original's two calls per edge do."""

    edge: ClassVar[type[MixedOp]] = MixedOp

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a plain list (not registered: they are the edges' own modules); their counters are read at each call,
        # as .to() replaces buffers
        self._edge_batch_norms = [
            m for m in self._ops.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats
        ]
        for bn in self._edge_batch_norms:
            bn.momentum = 1 - (1 - bn.momentum) ** 2

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor, weights2: Tensor) -> Tensor:
        out = super().forward(s0, s1, weights, weights2)
        if self.training:  # the original's second count (the running statistics had both updates in one)
            torch._foreach_add_([bn.num_batches_tracked for bn in self._edge_batch_norms], 1)
        return out


class Network(pcdarts.Network):
    """``Network(C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3)`` of PC-DARTS'
    ImageNet search: ``stem0``, ``stem1``, cells with k = 2 partial channels and betas."""

    _space: ClassVar[SearchSpace] = DARTS_IMAGENET
    _variant: ClassVar[dict] = {"partial_channels": MixedOp.k, "edge_normalization": True}
    cell: ClassVar[type[Cell]] = Cell
