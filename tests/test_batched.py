"""fastdarts.nn.batched: a cell with its edges batched by the states they read equals the cell run edge by edge
(output, every gradient, running statistics; DARTS and PC-DARTS edges), in a fraction of the ATen calls.

Tolerances: float64 1e-10 relative (summation orders differ); float32 1e-4 relative to each gradient's largest
entry; bf16 autocast: the loss within 1% and the alpha gradients at cosine > 0.99 of the edge-by-edge path's under
the same autocast.
"""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.run import aten_calls
from fastdarts.nn import SearchNetwork, batched
from fastdarts.search import Architect, ArchitectConfig
from fastdarts.spaces import DARTS
from tests.conftest import DEVICES
from tests.helpers import batch, tiny_network

PCDARTS_NORM = {"edge_normalization": True}  # DARTS edges with PC-DARTS' edge weights
PCDARTS = {"partial_channels": 2, "edge_normalization": True}


def _pair(dtype=torch.float64, device="cpu", **variant):
    """The same supernet twice: edge by edge, and batched."""
    model = tiny_network(dtype=dtype, **variant).to(device)
    other = copy.deepcopy(model)
    for cell in model.cells:
        cell.batched_edges = False
    for cell in other.cells:
        cell.batched_edges = True
    return model, other


def _run(model, x, y):
    loss = model.loss(x, y)
    names, params = zip(*model.named_parameters())
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, params)))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "variant",
    [{}, PCDARTS_NORM, {"layers": 4}, {"affine": True}, PCDARTS, {"partial_channels": 4, "C": 8},
     {"recompute": True}, {"recompute": True, **PCDARTS}],
    ids=["darts", "edge-norm", "4-cells", "affine", "pcdarts", "partial-no-edge-norm", "recompute",
         "pcdarts-recompute"],
)  # fmt: skip
def test_equals_the_cell_run_edge_by_edge(variant, dtype, device):
    variant = dict(variant)
    affine, recompute = variant.pop("affine", False), variant.pop("recompute", False)
    model, other = _pair(dtype, device, **variant)
    for cell in other.cells:
        cell.recompute_edges = recompute
    if affine:  # BatchNorm affine in every candidate (RF-DARTS' setting), not at their initial 1 and 0
        for net in (model, other):
            for i, bn in enumerate(m for m in net.cells.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.affine = True
                g = torch.Generator().manual_seed(i)
                bn.weight = nn.Parameter(
                    torch.rand(bn.num_features, generator=g, dtype=dtype).to(device) + 0.5
                )
                bn.bias = nn.Parameter(torch.randn(bn.num_features, generator=g, dtype=dtype).to(device))
    x, y = batch(dtype=dtype)
    x, y = x.to(device), y.to(device)
    loss, grads = _run(model, x, y)
    loss_b, grads_b = _run(other, x, y)
    assert all(cell._batched_plan is not None for cell in other.cells)
    assert not any(hasattr(cell, "_batched_plan") for cell in model.cells)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert _rel(loss_b, loss) < tol
    worst = max((_rel(grads_b[n], g), n) for n, g in grads.items() if g.abs().max() > 0)
    assert worst[0] < tol, worst
    state, state_b = model.state_dict(), other.state_dict()
    for name, t in state.items():  # running statistics moved alike, num_batches_tracked advanced once
        if t.is_floating_point():
            torch.testing.assert_close(state_b[name], t, rtol=tol, atol=tol)
        else:
            assert torch.equal(state_b[name], t), name


def test_a_candidate_of_another_kind_runs_as_itself_inside_the_batch():
    model, other = _pair()
    for net in (
        model,
        other,
    ):  # one edge's sep_conv gets another activation: its column runs module by module
        net.cells[0]._ops[3]._ops[4].op[0] = nn.Softplus()
    x, y = batch(dtype=torch.float64)
    loss, grads = _run(model, x, y)
    loss_b, grads_b = _run(other, x, y)
    assert _rel(loss_b, loss) < 1e-10
    assert max(_rel(grads_b[n], g) for n, g in grads.items() if g.abs().max() > 0) < 1e-10
    blocks = other.cells[0]._batched_plan.blocks[0]  # the group of s0 and s1 holds edge 3
    assert [k for k, _ in blocks.modules] == [4]


def test_the_plan_follows_replaced_modules():
    _, other = _pair()
    x, y = batch(dtype=torch.float64)
    other.loss(x, y)
    first = other.cells[0]._batched_plan
    other.loss(x, y)
    assert other.cells[0]._batched_plan is first  # kept while the modules are the same
    other.cells[0]._ops[0]._ops[7] = copy.deepcopy(other.cells[0]._ops[0]._ops[7])
    other.loss(x, y)
    second = other.cells[0]._batched_plan
    assert second is not first
    other.cells[0]._ops[3]._ops[4].op[0] = nn.Softplus()  # deep inside a candidate
    other.loss(x, y)
    assert other.cells[0]._batched_plan is not second
    assert [k for k, _ in other.cells[0]._batched_plan.blocks[0].modules] == [4]


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_weight_parametrized_after_the_plan_is_computed_by_its_module():
    # register_parametrization turns the weight into a computed one, which the batched candidates read
    model, other = _pair()
    x, y = batch(dtype=torch.float64)
    other.loss(x, y)  # (the plans made)
    for net in (model, other):
        torch.nn.utils.parametrize.register_parametrization(
            net.cells[0]._ops[3]._ops[4].op[1], "weight", _Doubled()
        )
    loss, grads = _run(model, x, y)
    loss_b, grads_b = _run(other, x, y)
    assert _rel(loss_b, loss) < 1e-10
    assert max(_rel(grads_b[n], g) for n, g in grads.items() if g.abs().max() > 0) < 1e-10
    assert other.cells[0]._batched_plan.blocks[0].modules == []  # (still batched)


def test_eval_mode_uses_the_running_statistics_like_the_edges():
    model, other = _pair()
    x, y = batch(dtype=torch.float64)
    for net in (model, other):
        net.loss(x, y)  # running statistics away from their initial 0 and 1
        net.eval()
    with torch.no_grad():
        logits, logits_b = model(x), other(x)
    assert batched.batched_plan(other.cells[0], x) is not None
    assert _rel(logits_b, logits) < 1e-10
    assert not torch.equal(logits, model.train()(x))  # (the running statistics were used)


def test_runs_edge_by_edge_where_it_does_not_apply():
    _, other = _pair()
    x, _ = batch(dtype=torch.float64)
    mixed = tiny_network(
        dtype=torch.float64, partial_channels=2
    )  # partial-channel and plain edges in one cell
    mixed.cells[0]._ops[0] = other.cells[0]._ops[0]
    assert batched.plan(mixed.cells[0]) is None
    other.cells[0].batched_edges = None  # auto: on a GPU only
    assert (
        batched.batched_plan(other.cells[0], x.cuda() if torch.cuda.is_available() else x) is not None
    ) == (torch.cuda.is_available())


@pytest.mark.parametrize("variant", [{}, PCDARTS], ids=["darts", "pcdarts"])
def test_on_a_gpu_the_forward_runs_batched(monkeypatch, variant):
    # a supernet built and run on a CUDA device, traced with fake tensors (shapes and dispatch, no GPU needed):
    # the auto rule picks the batched cells in training and evaluation, and their CUDA path traces
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastdarts.nn.cell as cell_module

    calls = []
    monkeypatch.setattr(cell_module, "batched_cell", lambda *a: calls.append(1) or batched.batched_cell(*a))
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model = SearchNetwork(4, 5, 3, **variant)
        x, y = torch.empty(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
        loss = model.loss(x, y)
        logits = model.eval()(x)
    assert loss.device.type == "cuda" and loss.shape == () and logits.shape == (2, 5)
    assert len(calls) == 2 * len(model.cells)


def _calls(model, x, y) -> tuple[int, int]:
    """The ATen calls of a forward and of its backward (the suite's dispatch-mode count)."""
    model.loss(x, y).backward()  # warm
    model.zero_grad(set_to_none=True)  # (as the search steps do: gradients handed over, not added)
    losses = []
    forward = aten_calls(lambda: losses.append(model.loss(x, y)))
    return forward, aten_calls(losses[0].backward)


@pytest.mark.parametrize("variant", [{}, PCDARTS], ids=["darts", "pcdarts"])
def test_a_fraction_of_the_aten_calls(variant):
    # the launches a GPU would see: a 4-cell supernet, each call counted (the same count at any batch)
    from fastdarts import set_backend

    set_backend("reference")  # edge by edge on plain ATen calls, as on a GPU
    model, other = _pair(torch.float32, layers=4, **variant)
    x, y = batch()
    forward, backward = _calls(model, x, y)
    forward_b, backward_b = _calls(other, x, y)
    assert forward_b < forward / 3 and backward_b < backward / 2, (forward, forward_b, backward, backward_b)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("hvp", ["fd", "fd-batched", "exact"])
def test_second_order_through_batched_cells(hvp, recompute):
    # the finite difference in place, under vmap (no running statistics), and the double backward
    model, other = _pair()
    for cell in other.cells:
        cell.recompute_edges = recompute
    xt, yt = batch(dtype=torch.float64, seed=1)
    xv, yv = batch(dtype=torch.float64, seed=2)
    grads = [
        Architect(net, ArchitectConfig(order="second", hvp=hvp)).arch_grads(xt, yt, xv, yv, 0.1)[0]
        for net in (model, other)
    ]
    assert max(_rel(b, a) for a, b in zip(*grads)) < 1e-8


@pytest.mark.parametrize("case", ["no-pools", "frozen-weights"])
def test_double_backward_without_pools_or_trained_weights(case):
    # the alphas' Hessian-vector product through batched cells whose groups keep no pool input (a space without
    # pools, as RobustDARTS S3) or whose only trained tensors are the alphas (frozen weights, no affine)
    space = (
        DARTS
        if case == "frozen-weights"
        else replace(DARTS, primitives=("none", "skip_connect", "sep_conv_3x3"))
    )
    model, other = _pair(space=space)
    x, y = batch(dtype=torch.float64)
    products = []
    for net in (model, other):
        if case == "frozen-weights":
            for w in net.weight_parameters():
                w.requires_grad_(False)
        alphas = net.arch_parameters()
        grads = torch.autograd.grad(net.loss(x, y), alphas, create_graph=True)
        gen = torch.Generator().manual_seed(0)  # (not ones: the softmax is flat along them)
        v = [torch.randn(a.shape, generator=gen, dtype=a.dtype) for a in alphas]
        products.append(torch.autograd.grad(grads, alphas, v))
    assert max(_rel(b, a) for a, b in zip(*products)) < 1e-8


def test_bf16_autocast_within_tolerance():
    model, other = _pair(torch.float32)
    x, y = batch()
    out = []
    for net in (model, other):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net.loss(x, y)
        out.append((loss.float(), torch.autograd.grad(loss, net.arch_parameters())))
    (loss, grads), (loss_b, grads_b) = out
    assert abs(loss_b.item() - loss.item()) < 0.01 * abs(loss.item())
    for g, gb in zip(grads, grads_b):
        assert F.cosine_similarity(g.flatten().float(), gb.flatten().float(), dim=0) > 0.99


def test_channels_last_equals_contiguous():
    model, other = _pair()
    other.to(memory_format=torch.channels_last)
    x, y = batch(dtype=torch.float64)
    loss, grads = _run(model, x, y)
    loss_b, grads_b = _run(other, x.contiguous(memory_format=torch.channels_last), y)
    assert _rel(loss_b, loss) < 1e-10
    assert max(_rel(grads_b[n], g) for n, g in grads.items() if g.abs().max() > 0) < 1e-10


def _saved_mib(model, x, y) -> float:
    """The memory of the tensors a forward keeps for its backward (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(x, y)
    return sum(storages.values()) / 2**20


def test_recompute_keeps_a_fraction_of_the_activations():
    from fastdarts import set_backend

    set_backend("reference")
    model, other = _pair(torch.float32, layers=4)
    x, y = batch(n=16, size=16)
    batched_mib = _saved_mib(other, x, y)
    for cell in other.cells:
        cell.recompute_edges = True
    recompute_mib = _saved_mib(other, x, y)
    edge_mib = _saved_mib(model, x, y)
    assert recompute_mib < batched_mib / 3 and recompute_mib < edge_mib / 3, (
        edge_mib,
        batched_mib,
        recompute_mib,
    )


@pytest.mark.parametrize("variant", [{}, PCDARTS], ids=["darts", "pcdarts"])
def test_batched_cells_keep_less_than_edge_by_edge(variant):
    # the pools and the normalised outputs are computed again in the backward instead of kept (about 0.95 of the
    # edge-by-edge memory when autograd kept them; 0.56 and 0.64 now)
    from fastdarts import set_backend

    set_backend("reference")
    model, other = _pair(torch.float32, layers=4, **variant)
    x, y = batch(n=16, size=16)
    edge_mib, batched_mib = _saved_mib(model, x, y), _saved_mib(other, x, y)
    assert batched_mib < 0.7 * edge_mib, (edge_mib, batched_mib)


@pytest.mark.parametrize("base", ["darts", "pcdarts"])
def test_compat_networks_run_batched(base):
    # quark0/darts' and PC-DARTS' Network through fastdarts.compat: the same cells, batched (the default on a GPU)
    import importlib

    compat = importlib.import_module(f"fastdarts.compat.{base}")
    net = compat.Network(8, 5, 3, nn.CrossEntropyLoss()).double()
    other = copy.deepcopy(net)
    for cell in other.cells:
        cell.batched_edges = True
    x, y = batch(dtype=torch.float64)
    losses, grads = [], []
    for model in (net, other):
        loss = model._loss(x, y)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert all(batched.plan(cell) is not None for cell in other.cells)
    assert _rel(losses[1], losses[0]) < 1e-10
    assert max(_rel(b, a) for a, b in zip(*grads) if a.abs().max() > 0) < 1e-10


def test_frozen_weights_get_no_gradient_computed():
    # RF-DARTS: convolutions frozen at their random initialisation, BatchNorm affine trained; the batched cells
    # gather the frozen weights apart, so no convolution computes a weight gradient (as edge by edge)
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdarts.search.algorithms import freeze_random_features

    class WeightGradients(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.computed = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "convolution_backward":
                self.computed += bool(args[-1][1])  # output_mask: (input, weight, bias)
            return func(*args, **(kwargs or {}))

    model, other = _pair(torch.float32)
    for net in (model, other):
        for bn in (m for m in net.cells.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.affine = True
            bn.weight = nn.Parameter(torch.ones(bn.num_features))
            bn.bias = nn.Parameter(torch.zeros(bn.num_features))
    x, y = batch()
    grads = []
    for net in (model, other):
        trained = freeze_random_features(net)
        loss = net.loss(x, y)
        with WeightGradients() as counted:
            grads.append(torch.autograd.grad(loss, trained))
        assert counted.computed == 0
    assert max(_rel(b, a) for a, b in zip(*grads) if a.abs().max() > 0) < 1e-4
