"""The Hessian eigenvalue of L_val in alpha (power iteration) and R-DARTS' early stopping on it."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastdarts.search import SearchConfig, loop, run_search
from fastdarts.search.checkpoint import load_checkpoint
from fastdarts.search.curvature import early_stop_epoch, hessian_eigenvalue
from tests.helpers import SMOOTH, batch, tiny_network


def _full_alpha_hessian(model, x, y):
    """The Hessian of the loss in all architecture parameters, one exact Hessian-vector product per column."""
    alphas = model.arch_parameters()
    g = torch.cat([t.flatten() for t in torch.autograd.grad(model.loss(x, y), alphas, create_graph=True)])
    cols = [torch.cat([t.flatten() for t in torch.autograd.grad(g[j], alphas, retain_graph=True)])
            for j in range(g.numel())]  # fmt: skip
    return torch.stack(cols, 1)


def test_power_iteration_finds_the_largest_eigenvalue():
    # a 2-step smooth space on 2 channels: 40 alphas, so that the full Hessian takes 40 products; of the loss and
    # the negated loss, one has a Hessian whose eigenvalue of largest magnitude is negative (found by a shift)
    model = tiny_network(replace(SMOOTH, steps=2, multiplier=2), torch.float64, C=2, smooth=True)
    x, y = batch(n=4, size=4, dtype=torch.float64)
    dominant_signs = set()
    for sign in (1, -1):
        model.criterion = lambda logits, y, sign=sign: sign * F.cross_entropy(logits, y)
        eigs = torch.linalg.eigvalsh(_full_alpha_hessian(model, x, y))
        dominant_signs.add(bool(eigs[eigs.abs().argmax()] > 0))
        found = hessian_eigenvalue(
            model, x, y, iters=1000, tol=1e-12, generator=torch.Generator().manual_seed(0)
        )
        assert found == pytest.approx(eigs.max().item(), rel=1e-6), sign
    assert dominant_signs == {True, False}


def test_eigenvalue_leaves_running_statistics_and_global_rng_alone():
    model = tiny_network()
    x, y = batch()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    hessian_eigenvalue(model, x, y, iters=3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    "eigenvalues, expected",
    [
        ([1.0] * 20, None),  # flat: never
        ([1.0] * 9, None),  # too short for a lag of 5 and a window of 5
        ([1.0] * 5 + [1.4] * 5, 4),  # mean 1.0 five epochs ago vs 1.4 now: 0.71 < 0.75 at epoch 9
        ([1.0] * 5 + [1.3] * 5, None),  # 0.77: not yet
        (
            [1.0] * 5 + [1.3] * 5 + [2.0],
            5,
        ),  # epoch 10: (4 * 1.0 + 1.3) / 5 = 1.06 vs (4 * 1.3 + 2) / 5 = 1.44
    ],
)
def test_early_stop_rule(eigenvalues, expected):
    assert early_stop_epoch(eigenvalues) == expected


@pytest.mark.slow
def test_early_stop_keeps_the_genotype_of_k_epochs_before_and_resumes_to_the_same_end(tmp_path, monkeypatch):
    # the eigenvalue doubles every epoch (a stand-in, so the rule fires at epoch 9 on a 1-step-per-epoch search)
    monkeypatch.setattr(loop.Search, "eigenvalue", lambda self: float(2**self.epoch))
    cfg = SearchConfig(
        epochs=30, early_stop="eigenvalue", layers=1, init_channels=4, batch_size=900, device="cpu"
    )
    full = run_search(cfg, tmp_path / "full")
    assert full.stopped_at == 4 and len(full.history) == 10
    assert full.genotype == full.history[4].genotype
    assert [r.eigenvalue for r in full.history] == [float(2**e) for e in range(10)]

    cut_cfg = SearchConfig(**{**cfg.__dict__, "epochs": 7})  # a run cut after 7 epochs, then resumed to 30
    run_search(cut_cfg, tmp_path / "cut")
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    ckpt["config"]["epochs"] = 30
    torch.save(ckpt, tmp_path / "cut" / "checkpoint.pt")
    resumed = run_search(cfg, tmp_path / "cut", resume=True)
    assert resumed.stopped_at == 4 and resumed.genotype == full.genotype
    assert torch.equal(resumed.alphas_normal, full.alphas_normal)


def test_tracking_records_a_real_eigenvalue_each_epoch():
    result = run_search(SearchConfig(epochs=1, track_eigenvalue=True, layers=1, init_channels=4, batch_size=900,
                                     device="cpu"))  # fmt: skip
    (record,) = result.history
    assert record.eigenvalue is not None and torch.isfinite(torch.tensor(record.eigenvalue))
    assert record.eigenvalue != 0.0 and result.stopped_at is None
