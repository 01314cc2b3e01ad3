import pytest
import torch

import fastdarts
from fastdarts.nn import Cell, MixedOp, SearchNetwork
from fastdarts.spaces import DARTS
from tests.helpers import batch, tiny_network


def test_network_shapes_and_reduction_layout():
    model = tiny_network(layers=5)
    x, _ = batch()
    assert model(x).shape == (6, 5)
    assert [c.reduction for c in model.cells] == [False, True, False, True, False]
    assert model.alphas_normal.shape == (14, 8)
    assert len(model.cells[0]._ops) == 14


def test_parameter_names_follow_quark0_darts():
    # The names of quark0/darts cnn/model_search.py, so that its state_dicts map onto ours.
    names = set(dict(tiny_network().named_parameters())) | set(dict(tiny_network().named_buffers()))
    expected = {
        "stem.0.weight", "stem.1.weight", "stem.1.running_mean",
        "cells.0.preprocess0.op.1.weight", "cells.0.preprocess1.op.2.running_var",
        "cells.0._ops.0._ops.1.1.running_mean",  # max_pool_3x3 followed by BatchNorm(affine=False)
        "cells.0._ops.0._ops.4.op.1.weight", "cells.0._ops.0._ops.4.op.6.weight",  # sep_conv_3x3
        "cells.0._ops.13._ops.7.op.2.weight",  # dil_conv_5x5
        "cells.1._ops.0._ops.3.conv_1.weight",  # skip_connect on a reduction edge: FactorizedReduce
        "cells.2.preprocess0.conv_2.weight",  # after a reduction: FactorizedReduce preprocessing
        "classifier.weight", "classifier.bias", "alphas_normal", "alphas_reduce",
    }  # fmt: skip
    assert expected <= names


def test_search_phase_batchnorm_has_no_affine():
    model = tiny_network()
    for name, m in model.cells.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert not m.affine, name


def test_weight_and_arch_parameters_partition_the_parameters():
    model = tiny_network()
    arch = {id(p) for p in model.arch_parameters()}
    weights = {id(p) for p in model.weight_parameters()}
    assert not arch & weights
    assert arch | weights == {id(p) for p in model.parameters()}


def _sum_with_zero(op: MixedOp, x, weights):
    # DARTS' own formula, `none` included: sum_k w_k * op_k(x).
    return sum(w * m(x) for w, m in zip(weights, op._ops))


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_skipping_none_is_the_darts_sum(stride):
    torch.manual_seed(0)
    op = MixedOp(4, stride, DARTS.primitives).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    alphas = torch.randn(8, dtype=torch.float64, requires_grad=True)
    out = op(x, torch.softmax(alphas, 0))
    ref = _sum_with_zero(op, x, torch.softmax(alphas, 0))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.square().sum(), alphas)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), alphas)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert g[0].abs() > 0  # the `none` alpha still learns through the softmax


def test_reference_and_default_backend_agree_on_the_supernet():
    model = tiny_network()
    x, y = batch()
    outs = {}
    for backend in ("reference", "auto"):
        fastdarts.set_backend(backend)
        try:
            model.zero_grad()
            loss = model.loss(x, y)
            loss.backward()
            outs[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        finally:
            fastdarts.set_backend("auto")
    torch.testing.assert_close(outs["auto"][0], outs["reference"][0], rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(outs["auto"][1], outs["reference"][1]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_cell_output_concatenates_last_nodes():
    cell = Cell(4, 4, 6, 6, 3, reduction=False, reduction_prev=False, primitives=DARTS.primitives)
    s = torch.randn(2, 6, 5, 5)
    assert cell(s, s, torch.softmax(torch.randn(14, 8), -1)).shape == (2, 12, 5, 5)


def test_bad_network_sizes_are_rejected():
    with pytest.raises(ValueError, match="layers=0"):
        SearchNetwork(4, 10, 0)
