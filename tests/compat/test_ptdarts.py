"""fastdarts.compat.ptdarts against a plain oracle of khanrc/pt.darts (tests/compat/originals.py): the same names,
shapes and initial weights, state_dicts loading both ways, the same outputs and gradients, and the second-order
gradient with the finite difference divided by 2 eps (pt.darts multiplies by eps / 2)."""

import io
import logging

import pytest
import torch
from torch import nn

import fastdarts
from fastdarts.compat import ptdarts
from tests.compat import originals
from tests.compat.helpers import assert_same_training_pass, assert_state_dict_loads_both_ways
from tests.helpers import batch


def build(seed=0, dtype=torch.float32):
    """The compat controller and the oracle from the same seed (3 cells, C=4), alphas spread out."""
    models = []
    for cls in (ptdarts.SearchCNNController, originals.PtController):
        torch.manual_seed(seed)
        models.append(cls(3, 4, 5, 3, nn.CrossEntropyLoss()).to(dtype))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a, b in zip(models[0].alphas(), models[1].arch_parameters()):
            a.copy_(0.5 * torch.randn(a.shape, generator=g, dtype=dtype))
            b.copy_(a)
    return models


def test_names_shapes_and_initial_weights_are_the_originals():
    ours, orig = build()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in orig.state_dict().items()
    ]
    for (k, a), b in zip(ours.state_dict().items(), orig.state_dict().values()):
        assert torch.equal(a, b), k
    assert [n for n, _ in ours.named_alphas()] == [
        f"alpha_{t}.{i}" for t in ("normal", "reduce") for i in range(4)
    ]
    assert [n for n, _ in ours.named_weights()] == [n for n, _ in orig.net.named_parameters()]


def test_state_dict_loads_both_ways():
    ours, orig = build()
    x, y = batch()
    assert_state_dict_loads_both_ways(ours, orig, build(seed=5)[1], lambda: orig.loss(x, y))


@pytest.mark.parametrize("train", [True, False])
def test_outputs_and_gradients_match_the_original_in_fp32(train):
    ours, orig = build()
    ours.train(train), orig.train(train)
    x, y = batch()
    assert_same_training_pass(ours, orig, lambda: ours.loss(x, y), lambda: orig.loss(x, y))  # alphas included


def test_edges_run_the_fused_edge_with_every_candidate_of_ptdarts():
    if not fastdarts.backend.extension_loaded():
        pytest.skip("the compiled extension is not built")
    ours, _ = build()
    x, _ = batch()
    with torch.profiler.profile() as prof:
        ours(x)
    names = [e.name for e in prof.events()]
    # pt.darts' PoolBN, SepConv and DilConv enter the edge's node as its kernels (none of them run as modules)
    assert {"_MixedEdge", "fastdarts_C::dil_conv", "fastdarts_C::pool_bn"} <= set(names)
    assert "_DilConv" not in names and "_PoolBN" not in names


def _sgd_with_momentum(model, x, y, weights):
    opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=3e-4)
    model.loss(x, y).backward()
    opt.step()
    model.zero_grad()
    return opt


def test_unrolled_backward_is_the_second_order_gradient_done_right():
    ours, orig = build(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    xv, yv = batch(dtype=torch.float64, seed=3)
    opt_ours = _sgd_with_momentum(ours, x, y, ours.weights())
    opt_orig = _sgd_with_momentum(orig, x, y, orig.net.parameters())
    architect = ptdarts.Architect(ours, 0.9, 3e-4)
    assert (architect.net, architect.w_momentum, architect.w_weight_decay) == (ours, 0.9, 3e-4)
    architect.unrolled_backward(x, y, xv, yv, 0.1, opt_ours)
    right = originals.pt_arch_grads(orig, x, y, xv, yv, 0.1, opt_orig, 0.9, 3e-4)
    buggy = originals.pt_arch_grads(orig, x, y, xv, yv, 0.1, opt_orig, 0.9, 3e-4, buggy=True)
    ours_g = torch.cat([a.grad.flatten() for a in ours.alphas()])
    right, buggy = torch.cat([g.flatten() for g in right]), torch.cat([g.flatten() for g in buggy])
    torch.testing.assert_close(ours_g, right, rtol=0, atol=1e-10)
    assert (
        ours_g - buggy
    ).norm() > 1e-2 * right.norm()  # the Hessian term matters here, and the bug loses it
    for p, q in zip(ours.weights(), orig.net.parameters()):  # w restored after the perturbations
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_patching_only_the_mixed_op_of_the_original(monkeypatch):
    _, plain = build()
    monkeypatch.setattr(originals, "PtMixedOp", ptdarts.MixedOp)  # models.search_cells.MixedOp = ...
    _, patched = build()
    assert any(isinstance(m, ptdarts.MixedOp) for m in patched.modules())
    assert list(patched.state_dict()) == list(plain.state_dict())
    patched.load_state_dict(plain.state_dict())
    x, y = batch()
    assert_same_training_pass(patched, plain, lambda: patched.loss(x, y), lambda: plain.loss(x, y))


def test_genotype_is_the_originals_rule():
    for seed in range(5):
        ours, _ = build(seed)
        gene = ours.genotype()
        assert gene.normal_concat == gene.reduce_concat == range(2, 6)
        for alphas, cell in ((ours.alpha_normal, gene.normal), (ours.alpha_reduce, gene.reduce)):
            for alpha, node in zip(alphas, cell):
                # the two edges with the largest raw alpha over the non-`none` ops, each with its best op
                best = alpha.detach()[:, :-1].max(dim=1)
                order = sorted(range(len(alpha)), key=lambda j: -best.values[j].item())
                assert [j for _, j in node] == order[:2]
                assert [op for op, _ in node] == [ptdarts.PRIMITIVES[best.indices[j]] for j in order[:2]]


def test_more_than_one_device_is_refused_by_name():
    with pytest.raises(ValueError, match=r"device_ids=\[0, 1\].*at most one"):
        ptdarts.SearchCNNController(3, 4, 5, 3, nn.CrossEntropyLoss(), device_ids=[0, 1])


def test_bad_pool_type_is_refused_by_name():
    with pytest.raises(ValueError, match="'sum'"):
        ptdarts.PoolBN("sum", 4, 3, 1, 1)


def test_print_alphas_logs_bare_messages_and_restores_the_formatters():
    ours, _ = build()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    formatter = logging.Formatter("TIME %(message)s")
    handler.setFormatter(formatter)
    logger = logging.getLogger("test_print_alphas")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ours.print_alphas(logger)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["####### ALPHA #######", "# Alpha - normal"] and lines[-1] == "#" * 21
    assert "TIME" not in stream.getvalue() and handler.formatter is formatter
