"""A search cell's edges computed together: the edges that read the same states as one batch per candidate.

Module by module, a DARTS cell runs each of its 14 edges on its own: a separable convolution alone is ReLU,
depthwise, pointwise and BatchNorm twice, and the 8-cell CIFAR supernet makes 6,453 ATen calls in a forward,
each a kernel launch on a GPU, which at CIFAR shapes spends its time launching them. Here the edges out of the
cell inputs s0 and s1 (8 of the 14) form one group, then the edges out of each intermediate node (3, 2, 1),
and within a group each candidate is one call for all its edges:

- the group's input repeated once per edge, ``[B, E * C, H, W]`` (one copy), and its ReLU once;
- a depthwise convolution of E * C channels per convolution candidate and unit, the pointwise convolutions of
  all of them as one grouped convolution, and one BatchNorm over every channel the group normalises at once
  (the convolutions' first units, the pools, FactorizedReduce), one more for the separable convolutions'
  second units;
- each pool once over the repeated input, FactorizedReduce's two 1x1 convolutions as grouped ones;
- the weighted sum as one multiply-and-sum per normalised block, and the edges' sums added into their nodes in
  one add per group (999 calls for that forward);
- each BatchNorm call and the weighted sum after it as one autograd node (:class:`_NormWeighted`) that keeps for
  the backward the convolutions' outputs and the pools' input, not the pools' outputs, the max pool's indices or
  the normalised candidates: those are computed again in the backward (0.57 of the edge-by-edge activation
  memory instead of 0.95, for about 18% more calls in a backward).

The weights stay where they are, in each edge's own modules, so state dicts, optimisers and the compat layers
see no difference: a group gathers every parameter it reads with one concatenation (whose backward only splits
the gradient), and a cell the running statistics of all its BatchNorm calls with one, copied back with one
multi-tensor copy. The arithmetic is the modules' (a grouped convolution computes each group as its own convolution);
summation orders differ. PC-DARTS' edges batch the same way on their first C / K channels, and one
:func:`fastdarts.ops.partial_channel` call adds the bypass and shuffles for all of a group's edges. With
``recompute_edges`` a group keeps only its inputs for the backward, which runs its forward again (activation
checkpointing).

It runs on cells whose edges are all MixedOps or all PartialMixedOps (:func:`plan` says
which); elsewhere edge by edge. A candidate of a kind it does not know runs as its own module and is weighted
like the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdarts import backend
from fastdarts.nn.operations import FactorizedReduce, Identity, dil_conv_units, pool_bn_kind
from fastdarts.ops import partial_channel

__all__ = ["batched_cell", "batched_plan", "plan"]


@dataclass(frozen=True)
class Group:
    """The edges out of some states: each source state's edges into the nodes it feeds (all later nodes).

    Attributes:
        sources: the states read (0, 1: the cell inputs; 2 + i: node i).
        edges: the edge indices (rows of the alphas), source-major.
        stride: of every edge of the group.
    """

    sources: tuple[int, ...]
    edges: tuple[int, ...]
    stride: int


@dataclass
class Blocks:
    """A group's candidates by kind, in column order: ``units`` (column, (dw, pw, bn) units per edge), two-unit
    (sep_conv) blocks first; ``pools`` (column, (kind, stride), BatchNorms); ``factorized`` (column,
    FactorizedReduce modules); ``identity`` columns; ``modules`` (column, modules): any other kind, run as is."""

    units: list[tuple] = field(default_factory=list)
    pools: list[tuple] = field(default_factory=list)
    factorized: list[tuple] = field(default_factory=list)
    identity: list[int] = field(default_factory=list)
    modules: list[tuple] = field(default_factory=list)

    def second(self) -> list[tuple]:
        return [b for b in self.units if len(b[1][0]) == 2]

    def batch_norms(self, unit: int) -> list[nn.BatchNorm2d]:
        """The BatchNorms of the group's call ``unit`` (0: first units, pools, FactorizedReduce; 1: second units)
        in channel order."""
        if unit == 1:
            return [u[1][2] for _, units in self.second() for u in units]
        bns = [u[0][2] for _, units in self.units for u in units]
        bns += [bn for _, _, bns_ in self.pools for bn in bns_]
        return bns + [m.bn for _, mods in self.factorized for m in mods]

    # Read every forward, so kept once the blocks are built (the modules stay while the plan does): the buffer
    # dicts of each BatchNorm call, and where each parameter of :func:`_chunks` lives. Read through their modules'
    # dicts, not attribute lookups (~1 us each through nn.Module.__getattr__, thousands a forward), and as they
    # are at each call, which torch.func.functional_call may have swapped.

    @cached_property
    def first_batch_norms(self) -> tuple[nn.BatchNorm2d | None, nn.BatchNorm2d | None]:
        return tuple(next(iter(self.batch_norms(unit)), None) for unit in (0, 1))

    @cached_property
    def buffers(self) -> tuple[list[dict], list[dict]]:
        return tuple([bn._buffers for bn in self.batch_norms(unit)] for unit in (0, 1))

    @cached_property
    def stat_sizes(self) -> tuple[int, int]:
        return tuple(sum(bn.num_features for bn in self.batch_norms(unit)) for unit in (0, 1))

    @cached_property
    def refs(self) -> list[list[tuple[dict, str, nn.Module]]]:
        return _chunks(self)


@dataclass
class Plan:
    """A cell's groups, their blocks, and per group the alpha columns of its weighted parts (:func:`_columns`),
    then with partial channels its edge weights ("edge")."""

    groups: list[Group]
    blocks: list[Blocks]
    partial: int = 1  # PC-DARTS' K: the candidates see 1 / K of the channels
    parts: list[list[list]] = field(init=False)
    index: dict = field(default_factory=dict)  # device -> the positions of the weights (see _index)

    def __post_init__(self) -> None:
        edge = [["edge"]] if self.partial > 1 else []
        self.parts = [_columns(blocks) + edge for blocks in self.blocks]


def _groups(steps: int, reduction: bool) -> list[Group]:
    offsets = [sum(2 + t for t in range(i)) for i in range(steps)]
    out = []
    for sources in [(0, 1)] + [(j,) for j in range(2, steps + 1)]:
        first = max(0, sources[0] - 1)
        edges = tuple(offsets[i] + j for j in sources for i in range(first, steps))
        out.append(Group(sources, edges, 2 if reduction and sources[0] < 2 else 1))
    return out


def _bn_ok(bn: nn.Module) -> bool:
    return (
        type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.momentum is not None
        and bn.running_mean is not None and bn.num_batches_tracked is not None
    )  # fmt: skip


def _same(values) -> bool:
    return len(set(values)) <= 1


def _conv_ok(dw: nn.Conv2d, pw: nn.Conv2d) -> bool:
    return pw.kernel_size == (1, 1) and pw.stride == (1, 1) and pw.groups == 1 and pw.bias is None and (
        dw.bias is None and dw.groups == dw.in_channels == dw.out_channels
    )  # fmt: skip


def _add(blocks: Blocks, column: int, mods: Sequence[nn.Module]) -> None:
    """Files the candidate column ``column`` of a group (its module on each edge) under its kind."""
    if all(type(m) is Identity for m in mods):
        blocks.identity.append(column)
        return
    units = [dil_conv_units(m) for m in mods]
    if all(u is not None for u in units):
        shape = {tuple((dw.kernel_size, dw.stride, dw.padding, dw.dilation, bn.affine) for dw, _, bn in u)
                 for u in units}  # fmt: skip
        ok = all(_conv_ok(dw, pw) and _bn_ok(bn) for u in units for dw, pw, bn in u)
        if ok and len(shape) == 1 and len(units[0]) in (1, 2):
            blocks.units.append((column, units))
            return
    pool_parts = [getattr(type(m), "pool_parts", None) for m in mods]
    if all(p is not None for p in pool_parts):
        parts = [p(m) for p, m in zip(pool_parts, mods)]
        kinds = {pool_bn_kind(*p) for p in parts}
        if len(kinds) == 1 and None not in kinds and all(_bn_ok(bn) for _, bn in parts):
            blocks.pools.append((column, kinds.pop(), [bn for _, bn in parts]))
            return
    if all(type(m) is FactorizedReduce and m._as_built() and _bn_ok(m.bn) for m in mods):
        blocks.factorized.append((column, list(mods)))
        return
    blocks.modules.append((column, list(mods)))


def plan(cell: nn.Module) -> Plan | None:
    """The batched plan of a :class:`~fastdarts.nn.cell.Cell`, or None when it cannot run batched: edges that are
    not all MixedOps or all PartialMixedOps of one K (or have another forward), or BatchNorms of different settings
    in one call. Either answer is kept while the cell's modules stay the same ones (their BatchNorms are taken to
    train and evaluate with the cell)."""
    key = getattr(cell, "_batched_key", None)
    if key is not None and _signature(key[0]) == key[1]:
        return cell._batched_plan
    containers = [m._modules for m in cell.modules() if m._modules]
    cell._batched_key = (containers, _signature(containers))
    cell._batched_plan = _build(cell)
    return cell._batched_plan


def _build(cell: nn.Module) -> Plan | None:
    from fastdarts.nn.cell import MixedOp, PartialMixedOp  # (cell imports this module)

    edges = list(cell._ops)
    plain = all(isinstance(e, MixedOp) and type(e).forward is MixedOp.forward for e in edges)
    partial = all(isinstance(e, PartialMixedOp) and type(e).forward is PartialMixedOp.forward for e in edges)
    if not (plain or partial) or not _same(tuple(e._live) for e in edges):
        return None
    if partial and not _same(e.groups for e in edges):
        return None
    groups = _groups(cell._steps, cell.reduction)
    all_blocks = []
    for g in groups:
        blocks = Blocks()
        for k in edges[0]._live:
            _add(blocks, k, [edges[i]._ops[k] for i in g.edges])
        blocks.units.sort(key=lambda b: -len(b[1][0]))  # stable: sep_conv blocks first, columns in order
        for unit in (0, 1):
            if not _same((bn.momentum, bn.eps, bn.affine) for bn in blocks.batch_norms(unit)):
                return None
        all_blocks.append(blocks)
    return Plan(groups, all_blocks, edges[0].groups if partial else 1)


def _signature(containers: list[dict]) -> list:
    """Every submodule, read from the module dicts that hold them: a module swapped anywhere in the cell changes
    it, and two signatures compare by identity (~40 us for a DARTS cell, where walking ``cell.modules()`` takes
    ~550 us)."""
    return list(chain.from_iterable(map(dict.values, containers)))


def batched_plan(cell: nn.Module, x: Tensor) -> Plan | None:
    """The plan with which :func:`batched_cell` runs the cell for input x, or None where it does not:
    ``cell.batched_edges`` is True, or None (auto) with x on a GPU and the "auto" backend; torch.compile is not
    tracing; and the cell has a :func:`plan`."""
    mode = getattr(cell, "batched_edges", None)
    if mode is None:
        mode = x.device.type == "cuda" and backend.get_backend() == "auto"
    return plan(cell) if mode and not torch.compiler.is_compiling() else None


def _flatten(chunks: Sequence[Sequence[Tensor]]) -> Tensor | None:
    """Every chunk's tensors flattened and concatenated, in order (one copy), for :func:`_split`; None for none."""
    return torch.cat(list(map(torch.flatten, chain.from_iterable(chunks)))) if chunks else None


def _split(flat: Tensor | None, chunks: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """:func:`_flatten`'s concatenation of the chunks back as one tensor per chunk, its tensors
    concatenated along dim 0 (views: the concatenation is the one copy, and its backward hands each tensor its slice
    of the gradient)."""
    if not chunks:
        return []
    sizes = [sum(t.numel() for t in chunk) for chunk in chunks]
    return [piece.view(-1, *chunk[0].shape[1:]) for piece, chunk in zip(flat.split(sizes), chunks)]


def _norm_weighted(
    x: Tensor | None,
    convs: Tensor | None,
    post: Tensor | None,
    pools: tuple[str, ...],
    stride: int,
    lead: int,
    w: Tensor | None,
    E: int,
    bn: nn.BatchNorm2d,
    running: tuple[Tensor | None, Tensor | None],
    affine: Sequence[Tensor],
    training: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """One BatchNorm call of a group and the weighted sum of the candidates it normalises (:class:`_NormWeighted`).

    The call normalises ``z = cat([convs, *pools(x), post])`` [B, N, Ho, Wo], channel blocks by their own
    BatchNorms (``bn`` the first, for the settings they share) with their running statistics ``running`` gathered
    (:func:`_gather_running`; None, None: none), with the batch statistics when ``training`` (the gathered running
    ones then updated in place), else with the running ones. Its first ``lead`` channels (the separable
    convolutions' first units) are returned as they are; the rest, n blocks of E * C channels, are summed weighted
    per edge by ``w`` [n * E]: [B, E, C * Ho * Wo]. affine: the gathered (weight, bias), or empty. Returns (the
    lead channels or None, the weighted sum or None)."""
    weight, bias = affine if affine else (None, None)
    spec = _Spec(pools, stride, lead, E, training, bn.momentum, bn.eps)
    if torch._C._functorch.peek_interpreter_stack() is None:
        return _NormWeighted.apply(spec, x, convs, post, weight, bias, *running, w)
    # inside vmap or grad (--hvp fd-batched): autograd.Function has no batching rule here
    return _norm_weighted_ref(spec, x, convs, post, weight, bias, *running, w, bn.momentum)


def _stats(blocks: Blocks, training: bool) -> str:
    """Which statistics a group's BatchNorms use: "train" (batch statistics, the running ones updated), "eval" (the
    running ones) or "batch" (batch statistics, the running ones None, as inside ``torch.func.functional_call``
    with them left out); decided at the forward, since a recomputation runs outside a functional_call's swap."""
    bn = blocks.first_batch_norms[0] or blocks.first_batch_norms[1]
    if bn is None or bn._buffers["running_mean"] is None:
        return "batch"
    return "train" if training else "eval"


def _gather_running(
    all_blocks: Sequence[Blocks], modes: Sequence[str]
) -> tuple[list[Tensor], list[Tensor], Tensor | None, list]:
    """The running statistics of every BatchNorm call of a cell (its groups' whose mode is not "batch") in one
    concatenation, so that a forward reads them with one call and copies them back with one: the buffers in order,
    their num_batches_tracked, their concatenation (None for none), and per group and call the (mean, var) views
    of it ((None, None) for none)."""
    buffers, counters, sizes = [], [], []
    for blocks, mode in zip(all_blocks, modes):
        if mode != "batch":
            for dicts, size in zip(blocks.buffers, blocks.stat_sizes):
                buffers += [d["running_mean"] for d in dicts] + [d["running_var"] for d in dicts]
                counters += [d["num_batches_tracked"] for d in dicts if d["num_batches_tracked"] is not None]
                sizes += [size, size] if dicts else []
    both = torch.cat(buffers) if buffers else None
    pieces = iter(both.split(sizes) if buffers else ())
    views = [
        [
            (next(pieces), next(pieces)) if mode != "batch" and dicts else (None, None)
            for dicts in blocks.buffers
        ]
        for blocks, mode in zip(all_blocks, modes)
    ]
    return buffers, counters, both, views


@dataclass(frozen=True)
class _Spec:
    """What :class:`_NormWeighted` computes besides its tensors: the pool kinds on x, their stride, the lead
    channels, the edges, batch statistics (True) or running ones, and BatchNorm's momentum and eps."""

    pools: tuple[str, ...]
    stride: int
    lead: int
    E: int
    training: bool
    momentum: float
    eps: float


def _pooled(spec: _Spec, x: Tensor | None) -> list[Tensor]:
    """The pools of x."""
    return [(_max_pool if kind == "max" else _avg_pool)(x, spec.stride) for kind in spec.pools]


def _pooled_with_indices(spec: _Spec, x: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
    """The pools of x, each with its indices for the backward (the max pool's; None for the average)."""
    return [
        torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [spec.stride] * 2, [1, 1])
        if kind == "max" else (_avg_pool(x, spec.stride), None)
        for kind in spec.pools
    ]  # fmt: skip


def _cat(pieces: Sequence[Tensor | None]) -> Tensor:
    pieces = [t for t in pieces if t is not None]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _lead_and_weighted(spec: _Spec, y: Tensor, w: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    lead, rest = y.split([spec.lead, y.shape[1] - spec.lead], 1)
    return (lead if spec.lead else None), (_weighted([rest], [w], spec.E) if rest.shape[1] else None)


def _norm_weighted_ref(spec: _Spec, x, convs, post, weight, bias, mean, var, w, momentum):
    """:class:`_NormWeighted` as plain autograd ops (the running statistics moved by ``momentum``)."""
    z = _cat([convs, *_pooled(spec, x), post])
    y = F.batch_norm(z, mean, var, weight, bias, spec.training, momentum, spec.eps)
    return _lead_and_weighted(spec, y, w)


class _NormWeighted(torch.autograd.Function):
    """BatchNorm and weighted sum (:func:`_norm_weighted`) keeping for the backward only what cannot be recomputed
    cheaply: the convolutions' outputs before the BatchNorm, the pools' input x, the statistics and the weights.
    The pools (parameter-free candidates) and the normalised outputs, which plain autograd keeps (BatchNorm its
    input, the weighted sum each normalised candidate, the max pool its int64 indices), are computed again in the
    backward from those: about 40% less activation memory for a batched cell, for one pass over them more in
    the backward. Inputs: the spec, x, convs, post, BatchNorm's weight and bias, the gathered running mean and
    variance (None for "batch"), w; any of them may be None."""

    @staticmethod
    def forward(ctx, spec, x, convs, post, weight, bias, mean, var, w):
        z = _cat([convs, *_pooled(spec, x), post])
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            z, weight, bias, mean, var, spec.training, spec.momentum, spec.eps
        )
        running = (None, None) if spec.training else (mean, var)  # (the training ones change after this)
        ctx.save_for_backward(x if spec.pools else None, convs, post, weight, bias, *running, save_mean,
                              save_invstd, w)  # fmt: skip
        ctx.spec, ctx.dtype = spec, z.dtype
        return _lead_and_weighted(spec, y, w)

    @staticmethod
    def backward(ctx, grad_lead, grad_out):
        x, convs, post, weight, bias, mean, var, save_mean, save_invstd, w = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: the plain ops again, on their own handles of the inputs
            inputs = [None if t is None else t.view_as(t) for t in (x, convs, post, weight, bias, w)]
            outputs = _norm_weighted_ref(spec, *inputs[:5], mean, var, inputs[5], 0.0)
            # (x is not kept without pools; an output of only constants, as with frozen weights, has no graph)
            pairs = [(o, g) for o, g in zip(outputs, (grad_lead, grad_out)) if g is not None and o is not None
                     and o.requires_grad]  # fmt: skip
            asked = [
                need and t is not None and t.requires_grad for t, need in zip(inputs, needs[1:6] + needs[8:])
            ]
            wanted = [t for t, a in zip(inputs, asked) if a]
            found = iter(())
            if pairs and wanted:
                ys, grads = zip(*pairs)
                found = iter(torch.autograd.grad(ys, wanted, grads, create_graph=True, allow_unused=True))
            grads = [next(found) if a and pairs else None for a in asked]
            return None, *grads[:5], None, None, grads[5]
        pooled = _pooled_with_indices(spec, x)
        z = _cat([convs, *(p for p, _ in pooled), post])
        B, N, Ho, Wo = z.shape
        grad_y, grad_w = grad_lead, None  # (None: that output is None, no lead channels or no rest)
        if grad_out is not None:
            # the normalised rest again, from the saved statistics (running ones in evaluation)
            mu, invstd = (save_mean, save_invstd) if spec.training else (mean, (var + spec.eps).rsqrt())
            lead = spec.lead
            shape = (1, N - lead, 1, 1)
            y = (z[:, lead:] - mu[lead:].view(shape)) * invstd[lead:].view(shape)
            if weight is not None:
                y = y * weight[lead:].view(shape) + bias[lead:].view(shape)
            n = w.numel() // spec.E
            g = grad_out.unsqueeze(1)
            if needs[8]:
                grad_w = (y.reshape(B, n, spec.E, -1) * g).sum((0, 3)).view(-1).to(w.dtype)
            grad_rest = (g * w.view(1, n, spec.E, 1)).reshape(B, N - lead, Ho, Wo).to(ctx.dtype)
            grad_y = grad_rest if not lead else torch.cat([grad_lead, grad_rest], 1)
        grad_z, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, z, weight, mean, var, save_mean, save_invstd, spec.training, spec.eps,
            [any(needs[1:4]), needs[4], needs[5]],
        )  # fmt: skip
        sizes = [t.shape[1] if t is not None else 0 for t in (convs, *(x for _ in spec.pools), post)]
        grad_convs, *grad_pools, grad_post = (
            grad_z.split(sizes, 1) if any(needs[1:4]) else (None,) * len(sizes)
        )
        grad_x = None
        if needs[1]:
            for kind, g_pool, (_, indices) in zip(spec.pools, grad_pools, pooled):
                if kind == "max":
                    g_x = torch.ops.aten.max_pool2d_with_indices_backward(
                        g_pool, x, [3, 3], [spec.stride] * 2, [1, 1], [1, 1], False, indices
                    )
                else:
                    g_x = torch.ops.aten.avg_pool2d_backward(
                        g_pool, x, [3, 3], [spec.stride] * 2, [1, 1], False, False, None
                    )
                grad_x = g_x if grad_x is None else grad_x + g_x
        return (None, grad_x, grad_convs if needs[2] else None, grad_post if needs[3] else None, grad_weight,
                grad_bias, None, None, grad_w)  # fmt: skip


def _avg_pool(x: Tensor, stride: int) -> Tensor:
    return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)


def _max_pool(x: Tensor, stride: int) -> Tensor:
    return F.max_pool2d(x, 3, stride, 1)


def _convs(h: Tensor, convs: list[tuple], unit: int, EC: int, params) -> Tensor:
    """Unit ``unit`` of the convolution blocks ``convs`` up to its BatchNorm: each block's depthwise convolution
    (of all of h in unit 0; of its own EC channels of h in unit 1), then every pointwise convolution as one
    grouped convolution: [B, len(convs) * EC, Ho, Wo]."""
    inputs = [h] * len(convs) if unit == 0 else h.split(EC, 1)  # (split: its backward is one concatenation)
    depthwise = []
    for inp, (_, units) in zip(inputs, convs):
        dw = units[0][unit][0]
        depthwise.append(F.conv2d(inp, next(params), None, dw.stride, dw.padding, dw.dilation, EC))
    d = depthwise[0] if len(depthwise) == 1 else torch.cat(depthwise, 1)
    E = len(convs[0][1])
    return F.conv2d(d, next(params), None, 1, 0, 1, len(convs) * E)


def _weights(mods: Sequence[nn.Module], name: str = "weight") -> list[tuple[dict, str, nn.Module]]:
    return [(m._parameters, name, m) for m in mods]


def _conv_chunks(convs: list[tuple], unit: int) -> list[list[tuple[dict, str, nn.Module]]]:
    """The parameters of unit ``unit`` of the blocks ``convs`` as :func:`_convs` reads them."""
    chunks = [_weights([u[unit][0] for u in units]) for _, units in convs]
    return chunks + [_weights([u[unit][1] for _, units in convs for u in units])]


def _affine_chunks(bns: list[nn.BatchNorm2d]) -> list[list[tuple[dict, str, nn.Module]]]:
    return [_weights(bns), _weights(bns, "bias")] if bns and bns[0].affine else []


def _chunks(blocks: Blocks) -> list[list[tuple[dict, str, nn.Module]]]:
    """Where every parameter a group reads lives (its module's parameter dict, its name, the module), in the order
    :func:`_group` takes them, as the chunks of :func:`_split`."""
    second = blocks.second()
    chunks = _conv_chunks(blocks.units, 0) if blocks.units else []
    for _, mods in blocks.factorized:
        chunks += [_weights([m.conv_1 for m in mods]), _weights([m.conv_2 for m in mods])]
    chunks += _affine_chunks(blocks.batch_norms(0))
    return chunks + (_conv_chunks(second, 1) if second else []) + _affine_chunks(blocks.batch_norms(1))


def _group(
    x: Tensor, params, ws, E: int, stride: int, blocks: Blocks, running: list[tuple], training: bool
) -> Tensor | None:
    """The weighted sum of the normalised candidates of a group on its input repeated per edge, x [B, E * C, H, W],
    with its parameters ``params`` (an iterator over :func:`_split`'s tensors), the weights of its parts ``ws`` (an
    iterator, in the order of :func:`_columns`) and its two BatchNorm calls' running statistics and mode (see
    :func:`_norm_weighted`): [B, E, C * Ho * Wo], or None for a group without such candidates."""
    B, EC = x.shape[:2]
    C = EC // E
    second = blocks.second()
    bn0, bn1 = blocks.first_batch_norms
    r = torch.relu(x) if blocks.units or blocks.factorized else None
    convs = _convs(r, blocks.units, 0, EC, params) if blocks.units else None
    factorized = []
    for _ in blocks.factorized:
        c1 = F.conv2d(r, next(params), None, 2, 0, 1, E)
        c2 = F.conv2d(r[:, :, 1:, 1:], next(params), None, 2, 0, 1, E)
        Ho, Wo = c1.shape[2:]
        halves = torch.stack([c1.view(B, E, C // 2, Ho, Wo), c2.view(B, E, C // 2, Ho, Wo)], 2)
        factorized.append(halves.view(B, EC, Ho, Wo))
    post = _cat(factorized) if factorized else None
    pools = tuple(kind for _, (kind, _), _ in blocks.pools)
    if convs is None and post is None and not pools:
        return None
    # the separable convolutions' first units lead the first call's outputs, not weighted: their second units
    # run on them
    lead = len(second) * EC
    weighted = len(blocks.units) - len(second) + len(pools) + len(factorized)
    affine = (next(params), next(params)) if bn0.affine else ()
    first, out = _norm_weighted(
        x,
        convs,
        post,
        pools,
        stride,
        lead,
        next(ws) if weighted else None,
        E,
        bn0,
        running[0],
        affine,
        training,
    )
    if not second:
        return out
    p = _convs(torch.relu(first), second, 1, EC, params)
    affine = (next(params), next(params)) if bn1.affine else ()
    _, out2 = _norm_weighted(None, p, None, (), 1, 0, next(ws), E, bn1, running[1], affine, training)
    return out2 if out is None else out + out2


def _columns(blocks: Blocks) -> list[list]:
    """The alpha columns of the parts that :func:`batched_cell` weights, in its order: the first BatchNorm call's
    outputs (without the separable convolutions' first units), the second call's, the identity, each module."""
    first = [k for k, units in blocks.units if len(units[0]) == 1]
    first += [k for k, _, _ in blocks.pools] + [k for k, _ in blocks.factorized]
    parts = [first] if first else []
    parts += [[k for k, _ in blocks.second()]] if blocks.second() else []
    parts += [blocks.identity] if blocks.identity else []
    return parts + [[k] for k, _ in blocks.modules]


def _index(p: Plan, K: int, device: torch.device) -> Tensor:
    """The positions in the flattened [num_edges, K + 1] weights (column K: the edge weight) of every weight that
    :func:`batched_cell` multiplies, group by group and part by part ([n, E] each, flattened): one gather per cell
    call. Made once per device."""
    if device not in p.index:
        rows = [e * (K + 1) + (K if c == "edge" else c)
                for group, parts in zip(p.groups, p.parts) for columns in parts
                for c in columns for e in group.edges]  # fmt: skip
        p.index[device] = torch.tensor(rows, device=device)
    return p.index[device]


def _weighted(parts: Sequence[Tensor], weights: Sequence[Tensor], E: int) -> Tensor:
    """sum over the parts [B, n * E * C, Ho, Wo] of their blocks weighted per edge by weights [n * E]: [B, E, C * Ho
    * Wo]."""
    out = None
    for t, w in zip(parts, weights):
        n = w.numel() // E
        term = t.reshape(t.shape[0], n, E, -1) * w.view(1, n, E, 1)
        term = term.sum(1) if n > 1 else term[:, 0]
        out = term if out is None else out + term
    return out


def _repeat(xs: Sequence[Tensor], per: int) -> Tensor:
    """[B, C, H, W] states -> [B, len(xs) * per * C, H, W]: each state once per edge that reads it."""
    B, C, H, W = xs[0].shape
    return torch.cat([s.unsqueeze(1).expand(B, per, C, H, W) for s in xs], 1).reshape(
        B, len(xs) * per * C, H, W
    )


def batched_cell(
    cell: nn.Module, p: Plan, s0: Tensor, s1: Tensor, weights: Tensor, edge_weights: Tensor | None = None
) -> Tensor:
    """The forward of a :class:`~fastdarts.nn.cell.Cell` (same arguments, same result) with its edges batched by
    the states they read, by its plan ``p`` (:func:`batched_plan`).

    With partial channels (PC-DARTS' K) each group's candidates run on the first C / K channels of its states, and
    the group's mixed outputs join the rest of the channels (2x2 max-pooled at stride 2) and are shuffled as
    :func:`fastdarts.ops.partial_channel` does, for all its edges at once; the edge weights multiply after that.
    """
    recompute = (
        getattr(cell, "recompute_edges", False) and torch._C._functorch.peek_interpreter_stack() is None
    )
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    K = weights.shape[1]
    w = weights
    if edge_weights is not None and p.partial == 1:  # the edge weight of every candidate's weight
        w = weights * edge_weights[:, None]
    last = edge_weights[:, None] if edge_weights is not None and p.partial > 1 else w.new_ones(w.shape[0], 1)
    flat = torch.cat([w, last], 1).view(-1)
    gathered = iter(flat[_index(p, K, w.device)].split(
        [len(c) * len(g.edges) for g, parts in zip(p.groups, p.parts) for c in parts]
    ))  # fmt: skip
    modes = [_stats(blocks, cell.training) for blocks in p.blocks]
    buffers, counters, both, running = _gather_running(p.blocks, modes)
    pending = None  # the sums of the nodes not yet complete, [B, n, C, H, W]
    for group, blocks, part_columns, mode, group_running in zip(p.groups, p.blocks, p.parts, modes, running):
        E, sources = len(group.edges), group.sources
        per = E // len(sources)
        xs = [states[j] for j in sources]
        B, C = xs[0].shape[:2]
        c = C // p.partial
        if p.partial > 1:
            xs = [s[:, :c] for s in xs]
        x = _repeat(xs, per)
        ws = [
            next(gathered) for columns in part_columns if columns != ["edge"]
        ]  # (edge weights: further down)
        own = len(ws) - len(blocks.modules)  # the weights of the batched blocks, then of each module column
        out = None
        Ho, Wo = ((size - 1) // group.stride + 1 for size in x.shape[2:])
        if own:
            # (a weight that is not a parameter, as a parametrization's, is computed by its module)
            chunks = [[d[n] if n in d else getattr(m, n) for d, n, m in refs] for refs in blocks.refs]
            # trained and frozen parameters (RF-DARTS' convolutions) in two concatenations, so that no frozen
            # weight's gradient is computed
            trained = [any(t.requires_grad for t in chunk) for chunk in chunks]
            params = [_flatten([c for c, g in zip(chunks, trained) if g == side]) for side in (True, False)]

            def run_blocks(x, params, frozen, *ws, blocks=blocks, chunks=chunks, trained=trained, E=E,
                           stride=group.stride, running=group_running, training=mode != "eval"):  # fmt: skip
                """The group's batched blocks, weighted: a function of its arguments alone (recompute_edges)."""
                sides = {g: iter(_split(cat, [c for c, t in zip(chunks, trained) if t == g]))
                         for g, cat in ((True, params), (False, frozen))}  # fmt: skip
                views = iter([next(sides[g]) for g in trained])
                ws = iter(ws)
                out = _group(x, views, ws, E, stride, blocks, running, training)
                if blocks.identity:
                    term = _weighted([x], [next(ws)], E)
                    out = term if out is None else out + term
                return out

            if recompute:  # keep only the arguments for the backward, which runs the group's forward again
                # (no random numbers in a group: no RNG state to save, which a CUDA graph capture would refuse)
                out = checkpoint(
                    run_blocks, x, *params, *ws[:own], use_reentrant=False, preserve_rng_state=False
                )
            else:
                out = run_blocks(x, *params, *ws[:own])
        for (_, mods), wk in zip(blocks.modules, ws[own:]):  # candidates of other kinds, each on its own edge
            t = torch.cat([m(xs[e // per]) for e, m in enumerate(mods)], 1)
            out = _weighted([t], [wk], E) if out is None else out + _weighted([t], [wk], E)
        if p.partial > 1:  # the bypassed channels and the shuffle, every edge of the group in one call; then
            # the edge weights (the group's edges as a batch of B * E edge inputs)
            full = _repeat([states[j] for j in sources], per).view(B * E, C, *x.shape[2:])
            mixed = out.view(B * E, c, Ho, Wo)
            shuffled = partial_channel([mixed], mixed.new_ones(1), full, p.partial, group.stride)
            out = shuffled.view(B, E, C * Ho * Wo) * next(gathered).view(1, E, 1)
        if len(sources) == 1:
            contribution = out.view(B, per, C, Ho, Wo)
        else:
            contribution = out.view(B, len(sources), per, C, Ho, Wo).sum(1)
        pending = contribution if pending is None else pending + contribution
        # the first node is complete (split, not indexed: the backward is one concatenation, not zeros and copies)
        node, pending = pending.split([1, pending.shape[1] - 1], 1)
        states.append(node.squeeze(1))
    # (a cell trains or evaluates as a whole: with one group in "train", every gathered one is)
    if "train" in modes and torch._C._current_graph_task_id() == -1:  # (not a backward's recomputation)
        with torch.no_grad():
            torch._foreach_copy_(buffers, list(both.split([t.numel() for t in buffers])))
        if counters:
            torch._foreach_add_(counters, 1)
    return torch.cat(states[-cell._multiplier :], dim=1)
