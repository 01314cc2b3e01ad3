"""The architecture gradient in float64: finite difference against exact, fast path against a plain one."""

import copy

import pytest
import torch

from fastdarts.search import Architect, ArchitectConfig
from tests.helpers import SMOOTH, batch, tiny_network

ETA = 0.1  # a large unrolled step, so that the Hessian term is a sizeable part of the gradient


def _optimizer_with_momentum(model, x, y):
    """An SGD optimiser that has taken one step, so the unrolled step sees a momentum buffer."""
    opt = torch.optim.SGD(model.weight_parameters(), lr=ETA, momentum=0.9, weight_decay=3e-4)
    model.loss(x, y).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return opt


def _exact_hvp(model, x, y, v):
    """grad_alpha <grad_w L_train(w, alpha), v> by double backprop: the Hessian-vector product itself."""
    w = model.weight_parameters()
    g = torch.autograd.grad(model.loss(x, y), w, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
    return torch.autograd.grad(dot, model.arch_parameters())


def _rel(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("hvp", ["fd", "fd-batched"])
def test_finite_difference_converges_to_exact_hvp_on_a_smooth_network(hvp):
    model = tiny_network(SMOOTH, torch.float64, smooth=True)
    x, y = batch(dtype=torch.float64)
    torch.manual_seed(3)
    v = [torch.randn_like(p) for p in model.weight_parameters()]
    exact = _exact_hvp(model, x, y, v)
    errors = {}
    for r in (1e-2, 1e-3, 1e-4):
        arch = Architect(model, ArchitectConfig(order="second", hvp=hvp, fd_r=r))
        errors[r] = _rel(arch.fd_hvp(v, x, y), exact)
    assert errors[1e-4] < 1e-6, errors
    assert errors[1e-4] < errors[1e-2], errors  # central difference: error shrinks with eps


def test_second_order_fd_matches_exact_unrolled_gradient_on_a_smooth_network():
    model = tiny_network(SMOOTH, torch.float64, smooth=True)
    xt, yt = batch(dtype=torch.float64, seed=1)
    xv, yv = batch(dtype=torch.float64, seed=2)
    opt = _optimizer_with_momentum(model, xt, yt)
    exact, _ = Architect(model, ArchitectConfig(order="second", hvp="exact")).arch_grads(
        xt, yt, xv, yv, ETA, opt
    )
    fd, _ = Architect(model, ArchitectConfig(order="second", fd_r=1e-4)).arch_grads(xt, yt, xv, yv, ETA, opt)
    first, _ = Architect(model, ArchitectConfig(order="first")).arch_grads(xt, yt, xv, yv, ETA, opt)
    assert _rel(fd, exact) < 1e-6
    assert _rel(first, exact) > 1e-3  # the second-order term is really there


def _plain_second_order(model, xt, yt, xv, yv, eta, opt, r=0.01, buggy=False):
    """DARTS second order written the obvious way: deep copies of the model, one formula per line."""
    mu, wd = 0.9, 3e-4
    w = model.weight_parameters()
    g = torch.autograd.grad(model.loss(xt, yt), w)
    unrolled = copy.deepcopy(model)
    with torch.no_grad():
        for pu, p, gi in zip(unrolled.weight_parameters(), w, g):
            pu.copy_(p - eta * (mu * opt.state[p]["momentum_buffer"] + gi + wd * p))
    arch = unrolled.arch_parameters()
    grads = torch.autograd.grad(unrolled.loss(xv, yv), arch + unrolled.weight_parameters())
    d_alpha, v = grads[: len(arch)], grads[len(arch) :]
    eps = r / torch.cat([t.flatten() for t in v]).norm()
    plus, minus = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for pp, pm, t in zip(plus.weight_parameters(), minus.weight_parameters(), v):
            pp.add_(eps * t)
            pm.sub_(eps * t)
    gp = torch.autograd.grad(plus.loss(xt, yt), plus.arch_parameters())
    gm = torch.autograd.grad(minus.loss(xt, yt), minus.arch_parameters())
    if buggy:  # the finite difference of several re-implementations: multiplies by eps
        hvp = [(a - b) / 2.0 * eps for a, b in zip(gp, gm)]
    else:
        hvp = [(a - b) / (2 * eps) for a, b in zip(gp, gm)]
    return [d - eta * h for d, h in zip(d_alpha, hvp)]


PCDARTS = {"partial_channels": 2, "edge_normalization": True}


@pytest.mark.parametrize("variant", [{}, PCDARTS], ids=["darts", "pcdarts"])
@pytest.mark.parametrize("hvp", ["fd", "fd-batched"])
def test_second_order_matches_a_plain_implementation_on_the_real_supernet(hvp, variant):
    model = tiny_network(dtype=torch.float64, **variant)
    xt, yt = batch(dtype=torch.float64, seed=1)
    xv, yv = batch(dtype=torch.float64, seed=2)
    opt = _optimizer_with_momentum(model, xt, yt)
    arch = Architect(model, ArchitectConfig(order="second", hvp=hvp))
    ours, _ = arch.arch_grads(xt, yt, xv, yv, ETA, opt)
    plain = _plain_second_order(model, xt, yt, xv, yv, ETA, opt)
    assert _rel(ours, plain) < 1e-10
    buggy = _plain_second_order(model, xt, yt, xv, yv, ETA, opt, buggy=True)
    assert _rel(buggy, plain) > 1e-3  # the eps bug is caught by the comparison above


def test_first_order_is_the_validation_gradient():
    model = tiny_network(dtype=torch.float64)
    xv, yv = batch(dtype=torch.float64, seed=2)
    ours, loss = Architect(model).arch_grads(xv, yv, xv, yv, ETA)
    expected = torch.autograd.grad(model.loss(xv, yv), model.arch_parameters())
    assert _rel(ours, expected) < 1e-12
    assert loss.item() == pytest.approx(model.loss(xv, yv).item())


@pytest.mark.parametrize("hvp", ["fd", "fd-batched", "exact"])
def test_architecture_step_moves_only_alphas_and_keeps_running_stats(hvp):
    model = tiny_network()
    xt, yt = batch(seed=1)
    xv, yv = batch(seed=2)
    opt = _optimizer_with_momentum(model, xt, yt)
    before = copy.deepcopy(model.state_dict())
    arch = Architect(model, ArchitectConfig(order="second", hvp=hvp))
    arch.step(xt, yt, xv, yv, ETA, opt)
    after = model.state_dict()
    for name, t in before.items():
        if name.startswith("alphas"):
            assert not torch.equal(t, after[name]), name
        else:
            assert torch.equal(t, after[name]), name
    assert all(p.grad is None for p in model.weight_parameters())


def test_weights_and_running_stats_are_put_back_when_a_pass_fails():
    # the validation batch has the wrong number of channels: the step fails after the weights took w' in place
    model = tiny_network()
    xt, yt = batch(seed=1)
    opt = _optimizer_with_momentum(model, xt, yt)
    before = copy.deepcopy(model.state_dict())
    arch = Architect(model, ArchitectConfig(order="second"))
    with pytest.raises(RuntimeError):
        arch.step(xt, yt, xt[:, :1], yt, ETA, opt)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_bad_architect_settings_name_the_value():
    from fastdarts.errors import UsageError

    with pytest.raises(UsageError, match="'third'"):
        ArchitectConfig(order="third")
    with pytest.raises(UsageError, match="'approx'"):
        ArchitectConfig(hvp="approx")
    with pytest.raises(UsageError, match="'exact' is for order second"):
        ArchitectConfig(order="first", hvp="exact")


@pytest.mark.parametrize("order", ["first", "second"])
def test_network_of_only_reduction_cells_gets_zero_normal_alpha_gradient(order):
    model = tiny_network(layers=2)  # reductions at 2 // 3 = 0 and 2 * 2 // 3 = 1: no normal cell
    xt, yt = batch(seed=1)
    grads, _ = Architect(model, ArchitectConfig(order=order)).arch_grads(xt, yt, xt, yt, ETA)
    assert torch.count_nonzero(grads[0]) == 0 and torch.count_nonzero(grads[1]) > 0


def test_hvp_pair_agrees_on_a_smooth_network_and_not_on_the_kinked_one():
    x, y = batch(dtype=torch.float64)
    xv, yv = batch(dtype=torch.float64, seed=3)
    model = tiny_network(SMOOTH, torch.float64, smooth=True)
    fd, exact = Architect(model, ArchitectConfig(order="second", fd_r=1e-4)).hvp_pair(x, y, xv, yv, ETA)
    assert _rel(fd, exact) < 1e-6
    model = tiny_network(dtype=torch.float64)  # ReLU and max pooling: the default radius straddles kinks
    fd, exact = Architect(model, ArchitectConfig(order="second")).hvp_pair(x, y, xv, yv, ETA)
    assert all(torch.isfinite(t).all() for t in (*fd, *exact)) and _rel(fd, exact) > 1e-6
