"""A whole DARTS edge as one autograd node: MixedOp's fast path where the compiled CPU kernels are live.

An edge of the DARTS CNN space runs seven candidates on one input: two pools (``pool_bn`` each), skip, and the
separable and dilated convolutions (six ``dil_conv`` units), then the weighted sum (``mixed_op``). Run module by
module, each of those nine ops is its own autograd node with its own Python wrapper, BatchNorm bookkeeping and
gradient accumulation; on a 2-core CPU at DARTS' sizes that costs as much as the kernels themselves (about 100 us
per unit, measured). :func:`mixed_edge` runs the same kernels from one ``autograd.Function``: one node per edge, the
running statistics copied in one call, the input gradient accumulated in place. The results are the kernels' own,
unit by unit, so they equal the module-by-module path exactly.

Candidates it does not know (FactorizedReduce on a reduction edge, a swapped-in module) run as themselves and
enter the weighted sum as inputs of the node; their gradients flow through their own graph. The double backward
(``create_graph``, the exact Hessian-vector product) differentiates the reference chain, as each op does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdarts import backend
from fastdarts.nn.operations import Identity, bn_call, dil_conv_units, pool_bn_kind
from fastdarts.ops import dil_conv_ref, mixed_op_ref, pool_bn_ref

__all__ = ["mixed_edge", "mixed_edge_applies"]


def mixed_edge_applies(x: Tensor) -> bool:
    """Whether :func:`mixed_edge` runs for input ``x``: the CPU kernels are live (not under torch.compile, which
    compiles the references; see :func:`fastdarts.backend.kernel_live`)."""
    return (
        x.device.type == "cpu"
        and backend.kernel_live("dil_conv", x.device)
        and backend.kernel_live("pool_bn", x.device)
        and backend.kernel_live("mixed_op", x.device)
    )


def mixed_edge(candidates: Sequence[nn.Module], x: Tensor, weights: Tensor) -> Tensor:
    """``sum_k weights[k] * candidates[k](x)`` as one autograd node (module semantics kept: BatchNorm running
    statistics and num_batches_tracked move as the modules would move them).

    Args:
        candidates: the K candidate modules that run (not `none`).
        x: ``[B, C, H, W]``, the edge's input.
        weights: ``[K]``, their architecture weights.

    Returns:
        ``[B, C, H / stride, W / stride]``, as :func:`fastdarts.ops.mixed_op` of the candidates' outputs.
    """
    plan: list[tuple] = []
    params: list[Tensor | None] = []
    externals: list[Tensor] = []
    counters: list[Tensor] = []  # the BatchNorms' num_batches_tracked, advanced together below
    for op in candidates:
        if type(op) is Identity:
            plan.append(("identity",))
            continue
        units = dil_conv_units(op)
        if units is not None:
            steps = []
            for dw, pw, bn in units:
                params += [dw.weight, pw.weight, bn.weight, bn.bias]
                steps.append((dw.stride[0], dw.padding[0], dw.dilation[0], *bn_call(bn, counters), bn.eps))
            plan.append(("units", tuple(steps)))
            continue
        pool_parts = getattr(type(op), "pool_parts", None)
        parts = pool_parts(op) if pool_parts is not None else None
        pool = pool_bn_kind(*parts) if parts is not None else None
        if pool is not None:
            plan.append(("pool", pool[0] == "max", pool[1], *bn_call(parts[1], counters), parts[1].eps))
            continue
        plan.append(("external",))
        externals.append(op(x))
    if counters:
        torch._foreach_add_(counters, 1)
    return _MixedEdge.apply(plan, len(params), x, weights, *params, *externals)


def _edge_ref(plan, x: Tensor, weights: Tensor, params, externals) -> Tensor:
    """The edge from the reference ops with the forward's statistics and no running update (the double backward)."""
    ys, params, externals = [], iter(params), iter(externals)
    for step in plan:
        if step[0] == "identity":
            ys.append(x)
        elif step[0] == "external":
            ys.append(next(externals))
        elif step[0] == "pool":
            _, is_max, stride, mean, var, training, _, eps = step
            stats = (None, None) if training else (mean, var)
            ys.append(pool_bn_ref(x, "max" if is_max else "avg", stride, *stats, training, 0.0, eps))
        else:
            h = x
            for stride, padding, dilation, mean, var, training, _, eps in step[1]:
                stats = (None, None) if training else (mean, var)
                dw, pw, bw, bb = (next(params) for _ in range(4))
                h = dil_conv_ref(h, dw, pw, bw, bb, *stats, stride, padding, dilation, training, 0.0, eps)
            ys.append(h)
    return mixed_op_ref(ys, weights)


class _MixedEdge(torch.autograd.Function):
    """Inputs: the plan, the parameter count, x, weights, the units' parameters (dw, pw, bn weight, bn bias per
    unit; None without affine) and the external candidates' outputs."""

    @staticmethod
    def forward(ctx, plan, n_params, x, weights, *rest):
        params, externals = iter(rest[:n_params]), iter(rest[n_params:])
        ops = torch.ops.fastdarts_C
        ys, saved, running, new = [], [], [], []

        def keep(mean, var, training, new_mean, new_var):
            """Queues a kernel's new running statistics for the one copy below (as ops' copy_running would)."""
            if training and mean is not None:
                running.extend((mean, var))
                new.extend((new_mean, new_var))

        for step in plan:
            if step[0] == "identity":
                ys.append(x)
                saved.append(None)
            elif step[0] == "external":
                ys.append(next(externals))
                saved.append(None)
            elif step[0] == "pool":
                _, is_max, stride, mean, var, training, momentum, eps = step
                y, p, taps, m, invstd, new_mean, new_var = ops.pool_bn(
                    x, mean, var, is_max, stride, training, momentum, eps
                )
                keep(mean, var, training, new_mean, new_var)
                ys.append(y)
                saved.append((p, taps, m, invstd))
            else:
                h, units = x, []
                for stride, padding, dilation, mean, var, training, momentum, eps in step[1]:
                    dw, pw, bw, bb = (next(params) for _ in range(4))
                    y, d, p, m, invstd, new_mean, new_var = ops.dil_conv(
                        h, dw, pw, bw, bb, mean, var, stride, padding, dilation, training, momentum, eps
                    )
                    keep(mean, var, training, new_mean, new_var)
                    units.append((h, d, p, m, invstd))
                    h = y
                ys.append(h)
                saved.append(tuple(units))
        if running:
            torch._foreach_copy_(running, new)
        ctx.save_for_backward(x, weights, *rest)
        ctx.plan, ctx.n_params, ctx.saved = plan, n_params, saved
        ctx.fused_ys = [y if step[0] in ("pool", "units") else None for y, step in zip(ys, plan)]
        return ops.mixed_op(ys, weights)

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        x, weights, *rest = ctx.saved_tensors
        n_params, plan = ctx.n_params, ctx.plan
        params, externals = rest[:n_params], rest[n_params:]
        needs = ctx.needs_input_grad[2:]  # x, weights, params..., externals...
        if grad is None or not any(needs):
            return (None,) * len(ctx.needs_input_grad)
        inputs = [x, weights, *params, *externals]
        if torch.is_grad_enabled():  # create_graph: differentiate the reference chain
            # on its own handle of x: the external candidates' outputs hang off x itself, and their paths back to
            # x are theirs to differentiate (through the gradients returned for them), not this node's
            x_local = x.view_as(x)
            inputs[0] = x_local
            wanted = [t for t, need in zip(inputs, needs) if need]
            y = _edge_ref(plan, x_local, weights, params, externals)
            found = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
            return (None, None, *(next(found) if need else None for need in needs))

        ops = torch.ops.fastdarts_C
        grads: list[Tensor | None] = [None] * len(inputs)
        ext, ext_ys = iter(range(2 + n_params, len(inputs))), iter(externals)
        ys = [
            x if step[0] == "identity" else next(ext_ys) if step[0] == "external" else fused
            for step, fused in zip(plan, ctx.fused_ys)
        ]
        grad_ys, grad_weights = ops.mixed_op_backward(grad, ys, weights)
        grads[1] = grad_weights if needs[1] else None
        grad_x = None
        param = 2
        for step, g, saved in zip(plan, grad_ys, ctx.saved):
            if step[0] == "external":
                grads[next(ext)] = g
                continue
            if step[0] == "pool":
                if not needs[0]:
                    continue
                _, is_max, stride, _, _, training, _, _ = step
                g = ops.pool_bn_backward(g, x, *saved, is_max, stride, training)
            elif step[0] == "units":
                first = param
                param += 4 * len(step[1])
                for j in reversed(range(len(step[1]))):
                    stride, padding, dilation, _, _, training, _, _ = step[1][j]
                    h, d, p, m, invstd = saved[j]
                    at = first + 4 * j
                    dw, pw, bw, _ = inputs[at : at + 4]
                    mask = [j > 0 or bool(needs[0]), *(bool(n) for n in needs[at : at + 4])]
                    unit_grads = ops.dil_conv_backward(
                        g, h, dw, pw, bw, d, p, m, invstd, stride, padding, dilation, training, mask
                    )
                    for i in range(4):
                        if mask[1 + i]:
                            grads[at + i] = unit_grads[1 + i]
                    g = unit_grads[0]
            if needs[0]:
                grad_x = g if grad_x is None else grad_x.add_(g)
        grads[0] = grad_x if needs[0] else None
        return (None, None, *grads)
