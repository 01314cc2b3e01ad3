"""MixedOp's fused edge (fastdarts.nn.edge): one autograd node over the CPU kernels, against the same kernels run
module by module (the path every other device and the `reference` backend take).

The forward runs the very same kernel calls, so its output and the BatchNorm running statistics are equal bit for
bit; the gradients add the candidates' input gradients in another order: float64 to 1e-12, float32 to 1e-6.
"""

import copy

import pytest
import torch
from torch import nn

import fastdarts.nn.cell as cell_module
from fastdarts.nn import MixedOp, PartialMixedOp
from fastdarts.spaces import DARTS
from tests.helpers import batch, tiny_network
from tests.ops.helpers import needs_ext

pytestmark = needs_ext


def _run(module: nn.Module, fused: bool, monkeypatch, fn):
    """fn(copy of module) with the fused edge on or off."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(cell_module, "mixed_edge_applies", lambda x: False)
        return fn(copy.deepcopy(module))


def _nodes(grad_fn) -> set[str]:
    """The names of the autograd nodes a graph holds."""
    seen, todo = set(), [grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def _edge_case(stride, affine, dtype, groups=1):
    torch.manual_seed(0)
    C = 6 * groups
    edge = (
        MixedOp(C, stride, DARTS.primitives, affine)
        if groups == 1
        else PartialMixedOp(C, stride, DARTS.primitives, affine, groups)
    )
    edge = edge.to(dtype)
    x = torch.randn(5, C, 8, 8, dtype=dtype, requires_grad=True)
    alphas = torch.randn(len(DARTS.primitives), dtype=dtype, requires_grad=True)
    grad = torch.randn(5, C, 8 // stride, 8 // stride, dtype=dtype)
    return edge, x, alphas, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 4], ids=["darts", "pcdarts"])
def test_fused_edge_matches_the_module_path(monkeypatch, groups, stride, affine, training, dtype):
    edge, x, alphas, grad = _edge_case(stride, affine, dtype, groups)

    def step(module):
        module.train(training)
        y = module(x, torch.softmax(alphas, 0))
        nodes = _nodes(y.grad_fn)  # (before the backward frees the graph: torch 2.11 then refuses the walk)
        params = [p for p in module.parameters()]
        grads = torch.autograd.grad(y, [x, alphas, *params], grad)
        return y.detach(), grads, [b.clone() for b in module.buffers()], nodes

    fused = _run(edge, True, monkeypatch, step)
    plain = _run(edge, False, monkeypatch, step)
    assert "_MixedEdgeBackward" in fused[3] and "_MixedEdgeBackward" not in plain[3]
    if groups == 1:  # the same kernel calls
        assert torch.equal(fused[0], plain[0])
    else:  # the weighted sum in mixed_op's kernel instead of partial_channel's: another rounding
        torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert all(
        torch.equal(a, b) for a, b in zip(fused[2], plain[2])
    )  # running statistics, num_batches_tracked
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_swapped_candidates_run_as_themselves(monkeypatch):
    # a SepConv whose activation was swapped, and a pool without DARTS' shape, enter the node as computed outputs
    edge, x, alphas, grad = _edge_case(1, False, torch.float64)
    edge._ops[DARTS.primitives.index("sep_conv_3x3")].op[4] = nn.Softplus()
    edge._ops[DARTS.primitives.index("max_pool_3x3")][0].ceil_mode = True

    def step(module):
        y = module(x, torch.softmax(alphas, 0))
        return y.detach(), torch.autograd.grad(y, [x, alphas, *module.parameters()], grad)

    fused, plain = _run(edge, True, monkeypatch, step), _run(edge, False, monkeypatch, step)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_double_backward_matches_on_the_supernet(monkeypatch):
    # create_graph differentiates the reference chain; the reduction edges' FactorizedReduce skip hangs off the
    # edge's input outside the node, and its path must be counted once
    model = tiny_network(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)

    def curvature(module):
        grads = torch.autograd.grad(module.loss(x, y), module.arch_parameters(), create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), module.arch_parameters())
        return [g.detach() for g in grads], second

    fused, plain = _run(model, True, monkeypatch, curvature), _run(model, False, monkeypatch, curvature)
    for a, b in zip([*fused[0], *fused[1]], [*plain[0], *plain[1]]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
