"""khanrc/pt.darts (``models/search_cnn.py``, ``search_cells.py``, ``ops.py``, ``architect.py``) on fastdarts.

Change the imports of pt.darts' ``search.py``::

    from fastdarts.compat.ptdarts import Architect, SearchCNNController

Module, parameter and buffer names and shapes are pt.darts' (``alpha_normal.0``, ``net.cells.0.dag.0.0._ops.3.net.
0.net.1.weight``, ...), so checkpoints load both ways; the candidates run fastdarts's fused kernels.

Differences, on purpose:
- ``Architect.unrolled_backward`` divides the finite difference by 2 eps. pt.darts computes
  ``(p - n) / 2. * eps``, which multiplies by eps / 2 where it should divide by 2 eps, so its Hessian term is
  eps^2 times the right one.
- No deep copy of the network: the network's own weights take the unrolled and perturbed values in place and are
  put back bit-exactly, and the BatchNorm running statistics those extra passes move are put back too.
- One device: ``device_ids`` with more than one GPU is refused (pt.darts scatters the batch over them).
- ``conv_7x1_1x7`` (not a search primitive) is left out of ``OPS``.
"""

from __future__ import annotations

import logging
from collections import namedtuple
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdarts.nn import cell as _cell
from fastdarts.nn.operations import Identity, Zero, dil_conv_block, dil_conv_units, pool_bn_block, relu_units
from fastdarts.search import architect as _architect
from fastdarts.spaces import DARTS

PRIMITIVES = [*DARTS.primitives[1:], "none"]  # DARTS' primitives with `none` moved last

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

__all__ = [
    "OPS", "PRIMITIVES", "Architect", "Genotype", "MixedOp", "SearchCNN", "SearchCNNController", "SearchCell",
]  # fmt: skip


class PoolBN(nn.Module):
    """AvgPool or MaxPool -> BatchNorm, as ``pool`` and ``bn``; one fused kernel in DARTS' shape."""

    def __init__(
        self, pool_type: str, C: int, kernel_size: int, stride: int, padding: int, affine: bool = True
    ):
        super().__init__()
        if pool_type.lower() == "max":
            self.pool: nn.Module = nn.MaxPool2d(kernel_size, stride, padding)
        elif pool_type.lower() == "avg":
            self.pool = nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=False)
        else:
            raise ValueError(f"pool_type must be 'max' or 'avg', got {pool_type!r}")
        self.bn = nn.BatchNorm2d(C, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        return pool_bn_block(self.pool, self.bn, x)

    def pool_parts(self) -> tuple[nn.Module, nn.BatchNorm2d]:
        """(pool, BatchNorm), for fastdarts' fused edge."""
        return self.pool, self.bn


class StdConv(nn.Module):
    """ReLU -> Conv -> BatchNorm as ``net``."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_out, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DilConv(nn.Module):
    """ReLU -> (dilated) depthwise conv -> pointwise conv -> BatchNorm as ``net``; one fused dil_conv call."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
        affine: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return dil_conv_block(self.net, x)

    def fused_units(self) -> tuple | None:
        """Its one fused unit, for fastdarts' fused edge (None when its activation was swapped)."""
        return relu_units(tuple(self.net))


class SepConv(nn.Module):
    """Two DilConv with dilation 1 as ``net``; only the first strides."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True
    ):
        super().__init__()
        self.net = nn.Sequential(
            DilConv(C_in, C_in, kernel_size, stride, padding, dilation=1, affine=affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, dilation=1, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def fused_units(self) -> tuple | None:
        """Its two DilConv's fused units, for fastdarts' fused edge (None when one of them has none)."""
        units = [dil_conv_units(m) for m in self.net]
        return None if any(u is None for u in units) else tuple(u for part in units for u in part)


class FactorizedReduce(nn.Module):
    """Halve H and W with two 1x1 stride-2 convs (``conv1``, ``conv2``) on offset grids, concatenated."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv1(x), self.conv2(x[:, :, 1:, 1:])], dim=1))


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: PoolBN("avg", C, 3, stride, 1, affine=affine),
    "max_pool_3x3": lambda C, stride, affine: PoolBN("max", C, 3, stride, 1, affine=affine),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}


class MixedOp(_cell.MixedOp):
    """``MixedOp(C, stride)`` of pt.darts: every primitive of PRIMITIVES (`none` last), BatchNorm without affine."""

    def __init__(self, C: int, stride: int):
        super().__init__(C, stride, PRIMITIVES, affine=False)

    @staticmethod
    def make_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
        return OPS[name](C, stride, affine)


class SearchCell(nn.Module):
    """``SearchCell(n_nodes, C_pp, C_p, C, reduction_p, reduction)``: ``dag[i][j]`` is the edge from node j into
    intermediate node i; the output concatenates every intermediate node."""

    def __init__(self, n_nodes: int, C_pp: int, C_p: int, C: int, reduction_p: bool, reduction: bool):
        super().__init__()
        self.reduction = reduction
        self.n_nodes = n_nodes
        if reduction_p:
            self.preproc0: nn.Module = FactorizedReduce(C_pp, C, affine=False)
        else:
            self.preproc0 = StdConv(C_pp, C, 1, 1, 0, affine=False)
        self.preproc1 = StdConv(C_p, C, 1, 1, 0, affine=False)
        self.dag = nn.ModuleList(
            nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1) for j in range(2 + i))
            for i in range(n_nodes)
        )

    def forward(self, s0: Tensor, s1: Tensor, w_dag: list[Tensor]) -> Tensor:
        """w_dag: per intermediate node i, its edges' op weights [2 + i, len(PRIMITIVES)]."""
        states = [self.preproc0(s0), self.preproc1(s1)]
        for edges, w_list in zip(self.dag, w_dag):
            states.append(sum(edges[j](s, w) for j, (s, w) in enumerate(zip(states, w_list))))
        return torch.cat(states[2:], dim=1)


class SearchCNN(nn.Module):
    """``SearchCNN(C_in, C, n_classes, n_layers, n_nodes=4, stem_multiplier=3)``: stem, cells, gap, linear."""

    def __init__(
        self, C_in: int, C: int, n_classes: int, n_layers: int, n_nodes: int = 4, stem_multiplier: int = 3
    ):
        super().__init__()
        self.C_in, self.C, self.n_classes, self.n_layers = C_in, C, n_classes, n_layers
        C_cur = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(C_in, C_cur, 3, 1, 1, bias=False), nn.BatchNorm2d(C_cur))
        C_pp, C_p, C_cur = C_cur, C_cur, C
        self.cells = nn.ModuleList()
        reduction_p = False
        for i in range(n_layers):
            reduction = i in (n_layers // 3, 2 * n_layers // 3)
            if reduction:
                C_cur *= 2
            self.cells.append(SearchCell(n_nodes, C_pp, C_p, C_cur, reduction_p, reduction))
            reduction_p = reduction
            C_pp, C_p = C_p, C_cur * n_nodes
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(C_p, n_classes)

    def forward(self, x: Tensor, weights_normal: list[Tensor], weights_reduce: list[Tensor]) -> Tensor:
        """x: [B, C_in, H, W]; weights_*: per node [2 + i, len(PRIMITIVES)] op weights. Returns logits."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights_reduce if cell.reduction else weights_normal)
        return self.linear(self.gap(s1).flatten(1))


def parse(alpha: nn.ParameterList, k: int) -> list[list[tuple[str, int]]]:
    """pt.darts' genotype rule: per node, the k edges with the largest raw alpha of a non-`none` op (the last
    primitive), each with that op."""
    gene = []
    for edges in alpha:
        edge_max, primitive_indices = torch.topk(edges.detach()[:, :-1], 1)
        _, top_edges = torch.topk(edge_max.view(-1), k)
        gene.append([(PRIMITIVES[int(primitive_indices[e])], int(e)) for e in top_edges])
    return gene


class SearchCNNController(nn.Module):
    """``SearchCNNController(C_in, C, n_classes, n_layers, criterion, n_nodes=4, stem_multiplier=3,
    device_ids=None)``: the alphas (``alpha_normal``, ``alpha_reduce``: ParameterLists, node i's is
    [2 + i, len(PRIMITIVES)]) and the network ``net``."""

    def __init__(
        self, C_in: int, C: int, n_classes: int, n_layers: int, criterion: Callable[[Tensor, Tensor], Tensor],
        n_nodes: int = 4, stem_multiplier: int = 3, device_ids: list[int] | None = None,
    ):  # fmt: skip
        super().__init__()
        if device_ids is not None and len(device_ids) > 1:
            raise ValueError(
                f"device_ids={device_ids}: fastdarts.compat.ptdarts runs on one device, expected at most one id"
            )
        self.n_nodes = n_nodes
        self.criterion = criterion
        self.device_ids = device_ids
        n_ops = len(PRIMITIVES)
        self.alpha_normal = nn.ParameterList()
        self.alpha_reduce = nn.ParameterList()
        for i in range(n_nodes):
            self.alpha_normal.append(nn.Parameter(1e-3 * torch.randn(i + 2, n_ops)))
            self.alpha_reduce.append(nn.Parameter(1e-3 * torch.randn(i + 2, n_ops)))
        self._alphas = [(n, p) for n, p in self.named_parameters() if "alpha" in n]
        self.net = SearchCNN(C_in, C, n_classes, n_layers, n_nodes, stem_multiplier)

    def forward(self, x: Tensor) -> Tensor:
        weights_normal = [F.softmax(alpha, dim=-1) for alpha in self.alpha_normal]
        weights_reduce = [F.softmax(alpha, dim=-1) for alpha in self.alpha_reduce]
        return self.net(x, weights_normal, weights_reduce)

    def loss(self, X: Tensor, y: Tensor) -> Tensor:
        return self.criterion(self(X), y)

    def print_alphas(self, logger: logging.Logger) -> None:
        """Log the softmaxed alphas of every node, normal then reduce, as bare messages (the logger's handlers
        format only the message meanwhile, as in pt.darts)."""
        formatters = [(h, h.formatter) for h in logger.handlers]
        for handler, _ in formatters:
            handler.setFormatter(logging.Formatter("%(message)s"))
        try:
            logger.info("####### ALPHA #######")
            logger.info("# Alpha - normal")
            for alpha in self.alpha_normal:
                logger.info(F.softmax(alpha, dim=-1))
            logger.info("\n# Alpha - reduce")
            for alpha in self.alpha_reduce:
                logger.info(F.softmax(alpha, dim=-1))
            logger.info("#####################")
        finally:
            for handler, formatter in formatters:
                handler.setFormatter(formatter)

    def genotype(self) -> Genotype:
        concat = range(2, 2 + self.n_nodes)
        return Genotype(
            normal=parse(self.alpha_normal, k=2), normal_concat=concat,
            reduce=parse(self.alpha_reduce, k=2), reduce_concat=concat,
        )  # fmt: skip

    def weights(self) -> Iterator[nn.Parameter]:
        return self.net.parameters()

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.net.named_parameters()

    def alphas(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self._alphas)

    def named_alphas(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self._alphas)

    # what fastdarts.search.Architect reads
    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas())

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((f"net.{n}", p) for n, p in self.net.named_parameters())


class Architect(_architect.Architect):
    """``Architect(net, w_momentum, w_weight_decay)`` of pt.darts: ``unrolled_backward`` sets each alpha's grad to
    the second-order DARTS gradient, with the finite-difference Hessian-vector product divided by 2 eps."""

    def __init__(self, net: SearchCNNController, w_momentum: float, w_weight_decay: float):
        super().__init__(net, _architect.ArchitectConfig(order="second"), w_momentum, w_weight_decay)

    # pt.darts' attribute names (no v_net: the model is never copied)
    @property
    def net(self) -> SearchCNNController:
        return self.model

    @property
    def w_momentum(self) -> float:
        return self.network_momentum

    @property
    def w_weight_decay(self) -> float:
        return self.network_weight_decay

    def unrolled_backward(
        self,
        trn_X: Tensor,
        trn_y: Tensor,
        val_X: Tensor,
        val_y: Tensor,
        xi: float,
        w_optim: torch.optim.Optimizer,
    ) -> None:
        """alpha.grad = grad_alpha L_val(w') - xi * (Hessian-vector product), w' = one virtual SGD step of w."""
        grads, _ = self.arch_grads(trn_X, trn_y, val_X, val_y, xi, w_optim)
        for alpha, g in zip(self.model.arch_parameters(), grads):
            alpha.grad = g
