"""Genotype derivation as in DARTS: per node, the two strongest incoming edges by their best non-`none` op."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastdarts.spaces import SearchSpace


class Genotype(NamedTuple):
    """A discrete cell pair, laid out as in quark0/darts `genotypes.py`.

    normal / reduce: for each intermediate node two (op name, input node) pairs, node by node;
    input 0 and 1 are the cell inputs, input 2 + i is intermediate node i.
    normal_concat / reduce_concat: the nodes concatenated into the cell output.
    """

    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]

    def to_json(self) -> str:
        """The genotype as JSON (pairs as 2-element lists, the concat ranges as lists)."""
        return json.dumps({k: list(v) for k, v in self._asdict().items()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        return cls(
            normal=[(op, int(j)) for op, j in d["normal"]],
            normal_concat=[int(i) for i in d["normal_concat"]],
            reduce=[(op, int(j)) for op, j in d["reduce"]],
            reduce_concat=[int(i) for i in d["reduce_concat"]],
        )


def parse_cell(weights: Tensor, primitives: Sequence[str], steps: int, edge_strength: Tensor | None = None):
    """Pick two (op, input) pairs per intermediate node from one cell's op weights.

    Args:
        weights: [num_edges, K] op weights (softmax of the alphas); edges numbered node by node.
        primitives: the K op names.
        steps: intermediate nodes.
        edge_strength: optional [num_edges] multiplier of each edge's weights (PC-DARTS edge normalisation).

    Returns:
        A list of 2 * steps (op name, input node) pairs. An edge's strength is its largest non-`none` weight;
        ties keep the lower input index, and an edge's best op on a tie is the first in primitive order.
    """
    w = weights.detach().cpu()
    if edge_strength is not None:
        # multiplied in the weights' dtype, as PC-DARTS does (float32 ties included)
        w = w * edge_strength.detach().to(w.dtype).cpu()[:, None]
    w = w.double()
    live = [k for k, name in enumerate(primitives) if name != "none"]
    gene: list[tuple[str, int]] = []
    start = 0
    for i in range(steps):
        n = 2 + i
        rows = w[start : start + n].tolist()
        best = [max(live, key=lambda k, r=r: (r[k], -k)) for r in rows]
        edges = sorted(range(n), key=lambda j: -rows[j][best[j]])[:2]
        gene.extend((primitives[best[j]], j) for j in edges)
        start += n
    return gene


def derive_genotype(
    alphas_normal: Tensor,
    alphas_reduce: Tensor,
    space: SearchSpace,
    edge_strengths: tuple[Tensor, Tensor] | None = None,
) -> Genotype:
    """The DARTS genotype of a searched network from its alphas ([num_edges, K] each, before softmax).

    edge_strengths: optional ([num_edges], [num_edges]) edge weights of the normal and reduction cells that
    scale each edge's op weights before ranking (PC-DARTS edge normalisation)."""
    expected = (space.num_edges, len(space.primitives))
    for name, a in (("alphas_normal", alphas_normal), ("alphas_reduce", alphas_reduce)):
        if tuple(a.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(a.shape)}, expected {expected} "
                f"for {space.steps} steps and {len(space.primitives)} primitives"
            )
    concat = list(range(2 + space.steps - space.multiplier, space.steps + 2))
    normal, reduce = (
        parse_cell(torch.softmax(a.detach(), -1), space.primitives, space.steps, strength)
        for a, strength in zip((alphas_normal, alphas_reduce), edge_strengths or (None, None))
    )
    return Genotype(normal=normal, normal_concat=concat, reduce=reduce, reduce_concat=concat)
