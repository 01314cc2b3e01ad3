"""fastdarts.compat.darts and .pcdarts (its PC-DARTS descendant) against plain oracles of quark0/darts and
yuhuixu1993/PC-DARTS (tests/compat/originals.py): the same names, shapes and initial weights, state_dicts
loading both ways, the same outputs and gradients, the same architecture step and genotype."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fastdarts
from fastdarts.compat import darts, pcdarts, pcdarts_imagenet
from tests.compat import originals
from tests.compat.helpers import assert_same_training_pass, assert_state_dict_loads_both_ways
from tests.helpers import batch

ARGS = SimpleNamespace(momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)


PAIRS = {
    "darts": (darts, originals.DartsNetwork),
    "pcdarts": (pcdarts, originals.PcNetwork),
    "pcdarts_imagenet": (pcdarts_imagenet, originals.PcImagenetNetwork),
}
ARCH = ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]


@pytest.fixture(params=list(PAIRS))
def base(request):
    """The code base under test: "darts", "pcdarts" or "pcdarts_imagenet"."""
    return request.param


def inputs(base="darts", **kwargs):
    """A batch for the code base: 8x8 images, 32x32 for the ImageNet stem (which brings them to 4x4)."""
    return batch(size=32 if base == "pcdarts_imagenet" else 8, **kwargs)


def build(base="darts", seed=0, dtype=torch.float32):
    """The compat network and the oracle from the same seed (3 cells, C=4), arch tensors spread out."""
    compat, oracle = PAIRS[base]
    models = []
    for cls in (compat.Network, oracle):
        torch.manual_seed(seed)
        models.append(cls(4, 5, 3, nn.CrossEntropyLoss()).to(dtype))
    orig = models[1]  # the original's arch tensors are plain tensors that .to() does not move
    for name, a in zip(ARCH, orig.arch_parameters()):
        setattr(orig, name, a.detach().to(dtype).requires_grad_())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a, b in zip(models[0].arch_parameters(), orig.arch_parameters(), strict=True):
            a.copy_(0.5 * torch.randn(a.shape, generator=g, dtype=dtype))
            b.copy_(a)
    return models


def test_names_shapes_and_initial_weights_are_the_originals(base):
    ours, orig = build(base)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in orig.state_dict().items()
    ]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in orig.named_parameters()]
    for (k, a), b in zip(ours.state_dict().items(), orig.state_dict().values()):
        assert torch.equal(a, b), k
    alphas = {id(a) for a in ours.arch_parameters()}
    assert not alphas & {id(p) for p in ours.parameters()}
    assert not set(ARCH) & set(ours.state_dict())


def test_state_dict_loads_both_ways(base):
    ours, orig = build(base)
    x, y = inputs(base)
    assert_state_dict_loads_both_ways(ours, orig, build(base, seed=5)[1], lambda: orig._loss(x, y))


@pytest.mark.parametrize("train", [True, False])
def test_outputs_and_gradients_match_the_original_in_fp32(base, train):
    ours, orig = build(base)
    ours.train(train), orig.train(train)
    x, y = inputs(base)
    assert_same_training_pass(ours, orig, lambda: ours._loss(x, y), lambda: orig._loss(x, y))
    for a, b in zip(ours.arch_parameters(), orig.arch_parameters(), strict=True):  # not parameters here
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_batched_cells_match_the_original_in_fp32(base):
    # the cells' path on a GPU (fastdarts.nn.batched), running statistics included
    ours, orig = build(base)
    for cell in ours.cells:
        cell.batched_edges = True
    x, y = inputs(base)
    assert_same_training_pass(ours, orig, lambda: ours._loss(x, y), lambda: orig._loss(x, y))


def test_a_weighted_criterion_leads_the_state_dict_as_in_the_original(base):
    compat, oracle = PAIRS[base]
    keys = [
        list(cls(4, 5, 3, nn.CrossEntropyLoss(weight=torch.ones(5))).state_dict())
        for cls in (compat.Network, oracle)
    ]
    assert keys[0] == keys[1] and keys[0][0] == "_criterion.weight"


def _sgd_with_momentum(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=ARGS.momentum, weight_decay=ARGS.weight_decay)
    model._loss(x, y).backward()
    opt.step()
    opt.zero_grad()
    return opt


@pytest.mark.parametrize("unrolled", [False, True])
def test_architect_step_matches_the_original_in_fp64(base, unrolled):
    ours, orig = build(base, dtype=torch.float64)
    x, y = inputs(base, dtype=torch.float64)
    xv, yv = inputs(base, dtype=torch.float64, seed=3)
    opt_ours, opt_orig = _sgd_with_momentum(ours, x, y), _sgd_with_momentum(orig, x, y)
    PAIRS[base][0].Architect(ours, ARGS).step(x, y, xv, yv, 0.1, opt_ours, unrolled)
    grads = originals.darts_arch_grads(
        orig, x, y, xv, yv, 0.1, opt_orig, unrolled, ARGS.momentum, ARGS.weight_decay
    )
    adam = torch.optim.Adam(orig.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    for a, g in zip(orig.arch_parameters(), grads):
        a.grad = g
    adam.step()
    for a, b, before in zip(
        ours.arch_parameters(), orig.arch_parameters(), build(base, dtype=torch.float64)[0].arch_parameters()
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        assert not torch.equal(a, before)  # it did step
    for (n, p), q in zip(ours.named_parameters(), orig.parameters()):  # the weights are left where they were
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=n)


def test_patching_only_the_mixed_op_of_the_original(monkeypatch, base):
    compat, oracle = PAIRS[base]
    _, plain = build(base)
    if base == "darts":  # model_search.MixedOp = fastdarts.compat.darts.MixedOp
        monkeypatch.setattr(originals, "MixedOp", darts.MixedOp)
    else:  # the same for PC-DARTS (its cells name their edge class)
        monkeypatch.setattr(oracle.cell, "edge", compat.MixedOp)
    _, patched = build(base)
    assert any(isinstance(m, compat.MixedOp) for m in patched.modules())
    assert list(patched.state_dict()) == list(plain.state_dict())
    patched.load_state_dict(plain.state_dict())
    x, y = inputs(base)
    # the running statistics too (PC-DARTS' ImageNet cell calls each patched edge twice, as it did its own)
    assert_same_training_pass(patched, plain, lambda: patched._loss(x, y), lambda: plain._loss(x, y))
    for a, b in zip(patched.arch_parameters(), plain.arch_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_genotype_is_the_originals(base):
    for seed in range(5):
        ours, orig = build(base, seed)
        assert tuple(ours.genotype()) == orig.genotype()
    assert ours.genotype().normal_concat == range(2, 6)


def test_new_copies_the_alphas_into_fresh_weights(base):
    ours, _ = build(base)
    new = ours.new()
    for a, b in zip(new.arch_parameters(), ours.arch_parameters()):
        assert torch.equal(a, b) and a is not b and a.requires_grad
    assert type(new) is type(ours)
    assert not torch.equal(new.classifier.weight, ours.classifier.weight)  # fresh weights


def test_moving_the_network_moves_the_alphas_in_place(base):
    ours, _ = build(base)
    architect = PAIRS[base][0].Architect(ours, ARGS)
    alphas = list(ours.arch_parameters())
    ours.double()
    assert len(alphas) == len(architect.optimizer.param_groups[0]["params"])
    assert all(a.dtype == torch.float64 and a.is_leaf and a.requires_grad for a in ours.arch_parameters())
    assert [id(a) for a in ours.arch_parameters()] == [id(a) for a in alphas]
    assert architect.optimizer.param_groups[0]["params"][0] is ours.alphas_normal
    x, y = inputs(base, dtype=torch.float64)
    architect.step(x, y, x, y, 0.1, torch.optim.SGD(ours.parameters(), lr=0.1), unrolled=False)
    assert ours.alphas_normal.dtype == torch.float64


def test_the_fused_kernels_run_under_the_compat_modules(base):
    if not fastdarts.backend.extension_loaded():
        pytest.skip("the compiled extension is not built")
    ours, _ = build(base)
    x, _ = inputs(base)
    with torch.profiler.profile() as prof:
        ours(x)
    names = {e.name for e in prof.events()}
    # the whole edge as one node (fastdarts.nn.edge) over the kernels; PC-DARTS' on its C/K channels, shuffled by
    # the partial-channel kernel
    expected = {"_MixedEdge", "fastdarts_C::dil_conv", "fastdarts_C::pool_bn", "fastdarts_C::mixed_op"}
    if base != "darts":
        expected.add("_PartialChannel")
    assert expected <= names, sorted(names)
