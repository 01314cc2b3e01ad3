import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdarts
from fastdarts.nn import Cell, MixedOp, PartialMixedOp, SearchNetwork
from fastdarts.nn.operations import FactorizedReduce
from fastdarts.ops import channel_shuffle
from fastdarts.select import derive_genotype
from fastdarts.spaces import DARTS, DARTS_IMAGENET
from tests.compat import originals
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


def test_an_input_halved_at_an_odd_size_is_refused_naming_it():
    model = tiny_network()  # reductions at cells 1 and 2
    assert model(torch.randn(2, 3, 12, 8)).shape == (2, 5)
    for shape, size in [((2, 3, 6, 8), 6), ((2, 3, 8, 10), 10), ((2, 3, 3, 3), 3)]:
        with pytest.raises(fastdarts.UsageError, match=f"image size {size} is halved at an odd size"):
            model(torch.randn(*shape))


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_mixed_op_is_the_pcdarts_formula(stride):
    # PC-DARTS by hand: candidates on the first C/K channels, the rest passed by (max-pooled at stride 2), shuffled
    torch.manual_seed(0)
    op = PartialMixedOp(8, stride, DARTS.primitives, groups=4).double()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    alphas = torch.randn(8, dtype=torch.float64, requires_grad=True)
    out = op(x, torch.softmax(alphas, 0))
    rest = x[:, 2:] if stride == 1 else F.max_pool2d(x[:, 2:], 2, 2)
    mixed = _sum_with_zero(op, x[:, :2], torch.softmax(alphas, 0))
    ref = channel_shuffle(torch.cat([mixed, rest], 1), 4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.square().sum(), alphas)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), alphas)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_pcdarts_network_is_the_pcdarts_original():
    # the core network with PC-DARTS' switches computes what PC-DARTS' model_search.py does, weights loaded across
    ours = tiny_network(partial_channels=4, edge_normalization=True)
    torch.manual_seed(1)
    orig = originals.PcNetwork(4, 5, 3, torch.nn.CrossEntropyLoss())
    orig.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith(("alphas", "betas"))}
    )
    for a, b in zip(ours.arch_parameters(), orig.arch_parameters(), strict=True):
        b.data.copy_(a.detach())
    x, _ = batch()
    for train in (True, False):
        ours.train(train), orig.train(train)
        torch.testing.assert_close(ours(x), orig(x), rtol=1e-5, atol=1e-5)
    assert [n for n, _ in ours.named_parameters() if n.startswith(("alphas", "betas"))] == [
        "alphas_normal",
        "alphas_reduce",
        "betas_normal",
        "betas_reduce",
    ]


def test_edge_weights_are_a_softmax_over_each_nodes_incoming_edges():
    model = tiny_network(partial_channels=2, edge_normalization=True)
    w = model.edge_weights(model.betas_normal)
    sums = torch.stack([part.sum() for part in w.split([2, 3, 4, 5])])
    torch.testing.assert_close(sums, torch.ones(4))
    weights = model.cell_weights()
    assert len(weights[False]) == 2 and torch.equal(weights[True][1], model.edge_weights(model.betas_reduce))
    assert len(tiny_network().cell_weights()[False]) == 1  # DARTS: no edge weights


def test_edge_strengths_decide_the_genotype():
    # equal op weights everywhere: the betas alone pick each node's two edges
    model = tiny_network(partial_channels=4, edge_normalization=True)
    with torch.no_grad():
        model.alphas_normal.zero_()
        model.betas_normal.copy_(torch.arange(14.0))  # later edges stronger
    genotype = derive_genotype(model.alphas_normal, model.alphas_reduce, model.space, model.edge_strengths())
    inputs = [j for _, j in genotype.normal]
    assert inputs == [1, 0, 2, 1, 3, 2, 4, 3]
    assert tiny_network().edge_strengths() is None


def test_imagenet_stem_brings_the_input_to_an_eighth():
    model = tiny_network(space=DARTS_IMAGENET, partial_channels=2, edge_normalization=True)
    x, _ = batch(n=2, size=32)
    assert model(x).shape == (2, 5)
    assert model.stem0(x).shape[-1] == 8 and model.stem1(model.stem0(x)).shape[-1] == 4
    assert isinstance(
        model.cells[0].preprocess0, FactorizedReduce
    )  # the first cell reads stem0 at twice the size
    names = set(dict(model.named_parameters()))
    assert {"stem0.0.weight", "stem0.1.weight", "stem0.3.weight", "stem1.1.weight", "stem1.2.bias"} <= names


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5, 6, 8, 8), (3, 4, 2, 6)], ids=["8x8", "2x6"])
def test_factorized_reduce_fast_path_matches_its_modules(shape, training):
    # on the CPU (backend auto) the two 1x1 stride-2 convolutions run as matrix products; the reference backend
    # runs the modules
    results = []
    for backend_name in ("auto", "reference"):
        fastdarts.set_backend(backend_name)
        torch.manual_seed(0)
        m = FactorizedReduce(shape[1], 10).double().train(training)
        nn.init.uniform_(m.bn.weight, 0.5, 1.5)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = m(x)
        grad = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        params = [x, m.conv_1.weight, m.conv_2.weight, m.bn.weight, m.bn.bias]
        results.append([y, *torch.autograd.grad(y, params, grad), m.bn.running_mean, m.bn.running_var])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_factorized_reduce_with_swapped_parts_runs_them():
    m = FactorizedReduce(4, 6)
    m.relu = nn.ELU()
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(
        m(x), m.bn(torch.cat([m.conv_1(F.elu(x)), m.conv_2(F.elu(x)[:, :, 1:, 1:])], 1))
    )


@pytest.mark.parametrize(
    "variant", [{}, {"partial_channels": 2, "edge_normalization": True}], ids=["darts", "pcdarts"]
)
def test_forward_on_meta_tensors_infers_the_shape(variant):
    # shape inference without memory: every op takes its reference on the meta device (autocast does not know it)
    model = SearchNetwork(4, 5, 3, **variant).to("meta")
    assert model(torch.empty(2, 3, 8, 8, device="meta")).shape == (2, 5)
