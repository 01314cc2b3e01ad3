"""The mixed operation on an edge and the search cell (a DAG of mixed ops)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdarts.nn.batched import batched_cell, batched_plan
from fastdarts.nn.edge import mixed_edge, mixed_edge_applies
from fastdarts.nn.operations import OPS, FactorizedReduce, PoolBN, ReLUConvBN
from fastdarts.ops import mixed_op, partial_channel


class MixedOp(nn.Module):
    """All candidate operations on one edge, mixed by architecture weights.

    ``out = sum_k weights[k] * op_k(x)`` over the candidates, where ``weights`` is the softmax of the edge's
    alphas. The `none` candidate contributes exactly zero (its output is zeros, and so is the gradient of its
    weight), so it is never run; its alpha still gets a gradient through the softmax.
    Pooling candidates are followed by a BatchNorm without affine, as in DARTS.

    Args:
        C: channels in and out.
        stride: 2 on the edges of a reduction cell that read the cell inputs, else 1.
        primitives: candidate names, in alpha column order.
        affine: BatchNorm affine inside the candidates.
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str], affine: bool = False):
        super().__init__()
        self._ops = nn.ModuleList(self.make_op(name, C, stride, affine) for name in primitives)
        self._live = [k for k, name in enumerate(primitives) if name != "none"]
        # the live weights as a slice (a view) when they are a run, as in DARTS where `none` comes first
        runs = self._live == list(range(self._live[0], self._live[-1] + 1)) if self._live else False
        self._live_slice = slice(self._live[0], self._live[-1] + 1) if runs else None

    @staticmethod
    def make_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
        """The candidate `name` (a code base with other module names overrides this)."""
        op = OPS[name](C, stride, affine)
        return PoolBN(op, nn.BatchNorm2d(C, affine=False)) if "pool" in name else op

    def live_weights(self, weights: Tensor) -> Tensor:
        """The weights [K] of the candidates that run (all but `none`), a view when they are a run."""
        return weights[self._live_slice] if self._live_slice is not None else weights[self._live]

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """Mix the candidates. x: [B, C, H, W]; weights: [K] for K primitives. Returns [B, C, H/s, W/s]."""
        if mixed_edge_applies(x):
            return mixed_edge([self._ops[k] for k in self._live], x, self.live_weights(weights))
        return mixed_op([self._ops[k](x) for k in self._live], self.live_weights(weights))


class PartialMixedOp(MixedOp):
    """PC-DARTS' partial-channel mixed op (Xu et al., 2020): the candidates see 1 / groups of the channels.

    ``out = channel_shuffle(cat([sum_k weights[k] * op_k(x[:, :c]), bypass(x[:, c:])]), groups)`` with
    ``c = C / groups`` and bypass the identity, or a 2x2 max pool on a stride-2 edge; one fused op after the
    candidates (:func:`fastdarts.ops.partial_channel`). Where MixedOp runs its fused edge, so does this on its
    c channels, and the partial channel op takes the one mixed output (weight 1: an exact copy).

    Args:
        C: channels in and out (a multiple of groups); the candidates have C / groups.
        stride, primitives, affine: as :class:`MixedOp`.
        groups: PC-DARTS' K (4 on CIFAR-sized inputs, 2 on ImageNet-sized ones).
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str], affine: bool = False, groups: int = 4):
        if groups < 1 or C % groups:
            raise ValueError(f"partial channels {groups} must divide the edge's {C} channels")
        super().__init__(C // groups, stride, primitives, affine)
        self.groups, self.stride = groups, stride

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """x: [B, C, H, W]; weights: [K]. Returns [B, C, H / stride, W / stride]."""
        part = x[:, : x.shape[1] // self.groups]
        live = self.live_weights(weights)
        if mixed_edge_applies(x):
            # the candidates and their weighted sum as one node (the fused edge), then bypass and shuffle around it
            mixed = mixed_edge([self._ops[k] for k in self._live], part, live)
            return partial_channel([mixed], live.new_ones(1), x, self.groups, self.stride)
        return partial_channel([self._ops[k](part) for k in self._live], live, x, self.groups, self.stride)


class Cell(nn.Module):
    """A DARTS search cell: two input nodes, `steps` intermediate nodes, output = concat of the last ones.

    Intermediate node i sums a MixedOp over each earlier node (2 + i edges); edges are numbered node by node,
    so the 14 edges of a 4-step cell match the 14 rows of the alphas.

    Args:
        steps: intermediate nodes.
        multiplier: nodes concatenated into the output ([B, multiplier * C, H, W]).
        C_prev_prev, C_prev: channels of the two cell inputs; C: channels of every node.
        reduction: this cell halves H and W (stride 2 on the edges from the inputs).
        reduction_prev: the previous cell was a reduction, so input 0 is twice as large as input 1.
        primitives: candidate names on every edge.
        affine: BatchNorm affine in preprocessing and candidates.
        partial_channels: 1 for DARTS' edges, K > 1 for PC-DARTS' (:class:`PartialMixedOp` with groups K).

    Attributes:
        batched_edges: run the edges batched by the states they read (:mod:`fastdarts.nn.batched`): None (the
            default) on a GPU with the "auto" backend, True wherever it can, False never.
        recompute_edges: with batched edges, keep only each group's input for the backward and run the group's
            forward again there (activation checkpointing: far less memory, one more forward of the candidates).
    """

    batched_edges: bool | None = None
    recompute_edges: bool = False

    def __init__(
        self,
        steps: int,
        multiplier: int,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        primitives: Sequence[str],
        affine: bool = False,
        partial_channels: int = 1,
    ):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=affine)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=affine)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=affine)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(self.make_edge(C, stride, primitives, affine, partial_channels))

    @staticmethod
    def make_edge(
        C: int, stride: int, primitives: Sequence[str], affine: bool, partial_channels: int = 1
    ) -> nn.Module:
        """The mixed op of one edge (a code base with other module names overrides this)."""
        if partial_channels == 1:
            return MixedOp(C, stride, primitives, affine)
        return PartialMixedOp(C, stride, primitives, affine, partial_channels)

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor, edge_weights: Tensor | None = None) -> Tensor:
        """s0, s1: the two previous cells' outputs; weights: [num_edges, K] softmaxed alphas; edge_weights:
        optional [num_edges] multipliers of the edges (PC-DARTS' edge normalisation)."""
        plan = batched_plan(self, s1)
        if plan is not None:
            return batched_cell(self, plan, s0, s1, weights, edge_weights)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            edges = (self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            if edge_weights is not None:
                edges = (edge_weights[offset + j] * e for j, e in enumerate(edges))
            node = sum(edges)
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self._multiplier :], dim=1)
