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
  one add per group (1,123 calls for that forward).

The weights stay where they are, in each edge's own modules, so state dicts, optimisers and the compat layers
see no difference: a group gathers every parameter it reads with one concatenation (whose backward only splits
the gradient), and the running statistics of each BatchNorm call with one, copied back with one multi-tensor
copy. The arithmetic is the modules' (a grouped convolution computes each group as its own convolution);
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


def _batch_norm(
    z: Tensor,
    bn: nn.BatchNorm2d,
    buffers: Sequence[dict],
    affine: Sequence[Tensor],
    counters: list,
    stats: str,
) -> Tensor:
    """BatchNorm of z [B, N, H, W], channel blocks by their own BatchNorms (their ``buffers`` dicts; ``bn`` the
    first, for the settings they share), their running statistics gathered into one tensor. stats: "train" (batch
    statistics; the running ones updated in the gathered tensor and copied back with one multi-tensor copy, except
    when a backward recomputes the forward), "eval" (the running statistics) or "batch" (batch statistics, the
    running ones None, as inside ``torch.func.functional_call`` with them left out); decided at the forward, since
    a recomputation runs outside a functional_call's swap. affine: the gathered (weight, bias), or empty."""
    weight, bias = affine if affine else (None, None)
    if stats == "batch":
        return F.batch_norm(z, None, None, weight, bias, True, bn.momentum, bn.eps)
    running = [d["running_mean"] for d in buffers] + [d["running_var"] for d in buffers]
    both = torch.cat(running)
    mean, var = both.split(both.numel() // 2)
    training = stats == "train"
    y = F.batch_norm(z, mean, var, weight, bias, training, bn.momentum, bn.eps)
    if training and torch._C._current_graph_task_id() == -1:  # (not a backward's recomputation: kept)
        with torch.no_grad():
            torch._foreach_copy_(running, list(both.split([s.numel() for s in running])))
        counters.extend(d["num_batches_tracked"] for d in buffers if d["num_batches_tracked"] is not None)
    return y


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
    x: Tensor, params, E: int, stride: int, blocks: Blocks, counters: list, stats: str
) -> list[Tensor]:
    """The normalised candidates of a group on its input repeated per edge, x [B, E * C, H, W], with its
    parameters ``params`` (an iterator over :func:`_split`'s tensors) and BatchNorm statistics ``stats`` (see
    :func:`_batch_norm`): the candidates' outputs from its BatchNorm calls, [B, n * E * C, Ho, Wo] each, their
    blocks in the order of :func:`_columns`."""
    B, EC = x.shape[:2]
    C = EC // E
    second = blocks.second()
    (bn0, bn1), (buffers0, buffers1) = blocks.first_batch_norms, blocks.buffers
    r = torch.relu(x) if blocks.units or blocks.factorized else None
    normalised = [_convs(r, blocks.units, 0, EC, params)] if blocks.units else []
    for _, (kind, _), _ in blocks.pools:
        normalised.append((_max_pool if kind == "max" else _avg_pool)(x, stride))
    for _ in blocks.factorized:
        c1 = F.conv2d(r, next(params), None, 2, 0, 1, E)
        c2 = F.conv2d(r[:, :, 1:, 1:], next(params), None, 2, 0, 1, E)
        Ho, Wo = c1.shape[2:]
        halves = torch.stack([c1.view(B, E, C // 2, Ho, Wo), c2.view(B, E, C // 2, Ho, Wo)], 2)
        normalised.append(halves.view(B, EC, Ho, Wo))
    if not normalised:
        return []
    z = normalised[0] if len(normalised) == 1 else torch.cat(normalised, 1)
    z = _batch_norm(z, bn0, buffers0, (next(params), next(params)) if bn0.affine else (), counters, stats)
    if not second:
        return [z]
    # the separable convolutions' second units, on their first units' normalised outputs, which lead z: split
    # off (its backward is one concatenation) and not weighted
    first, rest = z.split([len(second) * EC, z.shape[1] - len(second) * EC], 1)
    p = _convs(torch.relu(first), second, 1, EC, params)
    z2 = _batch_norm(p, bn1, buffers1, (next(params), next(params)) if bn1.affine else (), counters, stats)
    return ([rest] if rest.shape[1] else []) + [z2]


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
    counters: list[Tensor] = []
    pending = None  # the sums of the nodes not yet complete, [B, n, C, H, W]
    for group, blocks, part_columns in zip(p.groups, p.blocks, p.parts):
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
        out, Ho, Wo = None, None, None
        if own:
            # (a weight that is not a parameter, as a parametrization's, is computed by its module)
            chunks = [[d[n] if n in d else getattr(m, n) for d, n, m in refs] for refs in blocks.refs]
            # trained and frozen parameters (RF-DARTS' convolutions) in two concatenations, so that no frozen
            # weight's gradient is computed
            trained = [any(t.requires_grad for t in chunk) for chunk in chunks]
            params = [_flatten([c for c, g in zip(chunks, trained) if g == side]) for side in (True, False)]
            bn = blocks.first_batch_norms[0] or blocks.first_batch_norms[1]
            stats = (
                "batch" if bn is None or bn._buffers["running_mean"] is None
                else "train" if cell.training else "eval"
            )  # fmt: skip

            def run_blocks(x, params, frozen, *ws, blocks=blocks, chunks=chunks, trained=trained, E=E,
                           stride=group.stride, stats=stats):  # fmt: skip
                """The group's batched blocks, weighted: a function of its arguments alone (recompute_edges)."""
                sides = {g: iter(_split(cat, [c for c, t in zip(chunks, trained) if t == g]))
                         for g, cat in ((True, params), (False, frozen))}  # fmt: skip
                views = iter([next(sides[g]) for g in trained])
                parts = _group(x, views, E, stride, blocks, counters, stats) + (
                    [x] if blocks.identity else []
                )
                return _weighted(parts, ws, E), *parts[0].shape[2:]

            if recompute:  # keep only the arguments for the backward, which runs the group's forward again
                # (no random numbers in a group: no RNG state to save, which a CUDA graph capture would refuse)
                out, Ho, Wo = checkpoint(
                    run_blocks, x, *params, *ws[:own], use_reentrant=False, preserve_rng_state=False
                )
            else:
                out, Ho, Wo = run_blocks(x, *params, *ws[:own])
        for (_, mods), wk in zip(blocks.modules, ws[own:]):  # candidates of other kinds, each on its own edge
            t = torch.cat([m(xs[e // per]) for e, m in enumerate(mods)], 1)
            Ho, Wo = t.shape[2:]
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
    if counters:
        torch._foreach_add_(counters, 1)
    return torch.cat(states[-cell._multiplier :], dim=1)
