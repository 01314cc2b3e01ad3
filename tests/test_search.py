"""The search loop on the embedded digits data: results, checkpoints, resumption."""

import json
import math
import os
import shutil

import pytest
import torch
from torch import nn

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.nn import SearchNetwork
from fastdarts.nn.cell import PartialMixedOp
from fastdarts.nn.network import check_image_size
from fastdarts.nn.operations import PoolBN
from fastdarts.search import Architect, ArchitectConfig, Search, SearchConfig, run_search
from fastdarts.search.algorithms import freeze_random_features
from fastdarts.search.checkpoint import load_checkpoint, save_atomic
from fastdarts.select import Genotype, derive_genotype
from fastdarts.spaces import DARTS
from tests.helpers import write_image_folder

# 3 cells of 4 channels; batches of 450 digits, so an epoch is 2 weight steps (CPU steps cost ~1 s each).
TINY = {"layers": 3, "init_channels": 4, "batch_size": 450, "seed": 0, "device": "cpu"}


class Killed(Exception):
    pass


class Unpicklable:
    """Fails inside torch.save, after the temporary file has been opened and partly written."""

    def __reduce__(self):
        raise Killed


def _kill_at(epoch: int, step: int):
    def on_batch(e, s, steps, loss, acc):
        if (e, s) == (epoch, step):
            raise Killed

    return on_batch


@pytest.mark.parametrize(
    "order, algo",
    [("first", "darts"), ("first", "pcdarts"), ("first", "rf-pcdarts"),
     pytest.param("second", "darts", marks=pytest.mark.slow)],
)  # fmt: skip
def test_killed_and_resumed_search_ends_like_an_uninterrupted_one(tmp_path, order, algo):
    cfg = SearchConfig(epochs=2, order=order, algo=algo, **TINY)
    full = run_search(cfg, tmp_path / "full")
    with pytest.raises(Killed):  # dies in the middle of the second epoch
        run_search(cfg, tmp_path / "cut", on_batch=_kill_at(1, 1))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    resumed = run_search(cfg, tmp_path / "cut", resume=True)
    history, full_history = resumed.arch_history(), full.arch_history()
    assert history.keys() == full_history.keys()
    assert all(torch.equal(history[name], full_history[name]) for name in history)
    assert resumed.genotype == full.genotype
    assert [r.val_acc for r in resumed.history] == [r.val_acc for r in full.history]


@pytest.mark.parametrize("algo", ["darts", "pcdarts"])
def test_search_writes_genotype_and_alphas_history(tmp_path, algo):
    result = run_search(SearchConfig(epochs=2, algo=algo, **TINY), tmp_path)
    g = Genotype.from_json((tmp_path / "genotype.json").read_text())
    assert g == result.genotype and len(g.normal) == 8
    alphas = torch.load(tmp_path / "alphas.pt", weights_only=True)
    assert alphas["alphas_normal"].shape == (2, 14, 8)
    assert alphas["primitives"][0] == "none"
    assert not torch.equal(alphas["alphas_normal"][0], alphas["alphas_normal"][1])  # the alphas moved
    if algo == "pcdarts":  # edge normalisation: the betas' history too
        assert alphas["betas_normal"].shape == alphas["betas_reduce"].shape == (2, 14)
        assert not torch.equal(alphas["betas_reduce"][0], alphas["betas_reduce"][1])
        assert torch.equal(result.betas_normal, alphas["betas_normal"])
    else:
        assert "betas_normal" not in alphas and result.betas_normal is None
    assert all(0.0 <= r.val_acc <= 1.0 for r in result.history)


def test_weights_learn_on_digits(tmp_path):
    result = run_search(SearchConfig(epochs=2, **{**TINY, "layers": 2, "batch_size": 64}))
    assert result.history[-1].train_acc > 0.5  # chance is 0.1


def test_a_checkpoint_of_a_cuda_graphs_run_resumes_without_them(tmp_path):
    # cuda_graphs may change on resume: Adam's capturable follows the resuming run (a GPU run's checkpoint,
    # written with capturable Adam, emulated here, resumes on the CPU)
    cfg = SearchConfig(epochs=2, **TINY)
    with pytest.raises(Killed):
        run_search(cfg, tmp_path, on_batch=_kill_at(1, 0))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["config"]["cuda_graphs"] = True
    for group in ckpt["arch_optimizer"]["param_groups"]:
        group["capturable"] = True
    save_atomic(ckpt, tmp_path / "checkpoint.pt")
    search = Search(cfg, tmp_path)
    search.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert [g["capturable"] for g in search.architect.optimizer.param_groups] == [False]
    search.run()
    assert search.epoch == 2


def test_fresh_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    cfg = SearchConfig(epochs=1, **TINY)
    run_search(cfg, tmp_path)
    with pytest.raises(UsageError, match="--resume"):
        run_search(cfg, tmp_path)


def test_resume_with_other_settings_names_the_setting(tmp_path):
    run_search(SearchConfig(epochs=1, **TINY), tmp_path)
    with pytest.raises(UsageError, match="seed=0.*seed=1"):
        run_search(SearchConfig(epochs=1, **{**TINY, "seed": 1}), tmp_path, resume=True)


def test_a_resumed_run_may_read_its_data_from_another_folder(tmp_path):
    # the same ImageNet tree copied elsewhere (another machine's disk): the path is not part of the search
    first = write_image_folder(tmp_path / "a")
    cfg = {**TINY, "data": "imagenet", "image_size": 8, "batch_size": 4}
    with pytest.raises(Killed):
        run_search(
            SearchConfig(epochs=2, data_dir=str(first), **cfg), tmp_path / "run", on_batch=_kill_at(1, 0)
        )
    moved = shutil.copytree(first, tmp_path / "b")
    resumed = run_search(SearchConfig(epochs=2, data_dir=str(moved), **cfg), tmp_path / "run", resume=True)
    assert len(resumed.history) == 2


def test_corrupt_or_missing_checkpoint_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        run_search(SearchConfig(epochs=1, **TINY), tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="corrupt"):
        run_search(SearchConfig(epochs=1, **TINY), tmp_path, resume=True)


def test_checkpoint_of_another_shape_is_a_usage_error(tmp_path):
    save_atomic({"epoch": 0, "model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(UsageError, match="the checkpoint has no alphas, arch_optimizer, config, history"):
        run_search(SearchConfig(epochs=1, **TINY), tmp_path, resume=True)


def test_checkpoint_files_get_the_umask_s_mode(tmp_path):
    old = os.umask(0o027)
    try:
        save_atomic({"epoch": 1}, tmp_path / "checkpoint.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o640  # not tempfile's 0o600


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"epoch": 1, "model": {}}, path)
    before = path.read_bytes()
    with pytest.raises(Killed):
        save_atomic({"epoch": 2, "model": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


@pytest.mark.parametrize(
    "field, value, message",
    [("algo", "enas", "unknown algo 'enas'"), ("batch_size", 0, "batch_size must be a whole number >= 1, got 0"),
     ("space", "nb201", "unknown space 'nb201'"), ("data", "mnist", "unknown data 'mnist'"),
     ("partial_channels", 2, "partial_channels is for algo pcdarts or rf-pcdarts, got algo 'darts'"),
     ("momentum", float("nan"), "momentum must be a finite number, got nan"),
     ("lr", float("inf"), "lr must be a finite number, got inf"), ("lr", "0.1", "lr must be a finite number"),
     ("momentum", -1.0, "momentum must be >= 0, got -1.0"), ("weight_decay", -1e-4, "weight_decay must be >= 0"),
     ("arch_weight_decay", -1.0, "arch_weight_decay must be >= 0"),
     ("lr_min", 0.1, r"lr_min 0.1 is above lr 0.025; the cosine schedule goes from lr down to lr_min")],
)  # fmt: skip
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(UsageError, match=message):
        SearchConfig(**{field: value})


def test_architecture_steps_wait_for_the_warmup_epochs(caplog):
    with caplog.at_level("WARNING", logger="fastdarts"):
        result = run_search(SearchConfig(epochs=2, arch_warmup_epochs=1, algo="pcdarts", **TINY))
        assert "no architecture step runs" not in caplog.text
        Search(SearchConfig(epochs=2, arch_warmup_epochs=2, **TINY)).run(on_epoch=lambda record: None)
        assert "arch_warmup_epochs 2 >= epochs 2: no architecture step runs" in caplog.text
    initial = Search(SearchConfig(epochs=2, algo="pcdarts", **TINY)).model.alphas_normal.detach()
    assert torch.equal(result.alphas_normal[0], initial)  # epoch 0: weight steps only
    assert not torch.equal(result.alphas_normal[1], initial)
    with pytest.raises(UsageError, match="arch_warmup_epochs must be a whole number >= 0, got -1"):
        SearchConfig(arch_warmup_epochs=-1)


def test_partial_channels_must_divide_the_channels():
    with pytest.raises(UsageError, match="init_channels 16 is not a multiple of partial_channels 3"):
        SearchConfig(algo="pcdarts", partial_channels=3)
    assert SearchConfig(algo="pcdarts").resolve_partial_channels() == 4
    assert SearchConfig(algo="pcdarts", space="darts-imagenet").resolve_partial_channels() == 2
    assert SearchConfig(algo="rf-darts").resolve_partial_channels() == 1


def test_an_image_size_that_halves_to_an_odd_size_is_refused():
    # digits are 8x8: the ImageNet stem brings them to 1x1 before the reductions
    with pytest.raises(UsageError, match="image size 8 is halved at an odd size in space 'darts-imagenet'"):
        Search(SearchConfig(space="darts-imagenet", **TINY))


def test_a_bad_image_size_is_refused_before_the_data_is_read(tmp_path):
    # (an ImageNet tree's scan takes minutes: the folder here does not even exist)
    cfg = SearchConfig(**TINY, data="imagenet", data_dir=str(tmp_path / "missing"), image_size=10)
    with pytest.raises(UsageError, match="image size 10 is halved at an odd size"):
        Search(cfg)


def test_a_batch_of_one_image_on_1x1_feature_maps_is_refused(tmp_path):
    # 4x4 images reach the last cells at 1x1, where BatchNorm cannot train on one image
    assert check_image_size(DARTS, 3, 4) == 1 and check_image_size(DARTS, 3, 8) == 2
    root = write_image_folder(tmp_path)  # 12 images: halves of 6
    cfg = {**TINY, "data": "imagenet", "data_dir": str(root), "image_size": 4}
    with pytest.raises(
        UsageError, match="the weight half .6 images in batches of 5. has a batch of one image"
    ):
        Search(SearchConfig(**{**cfg, "batch_size": 5}))
    Search(SearchConfig(**{**cfg, "batch_size": 4}))  # batches of 4 and 2


def test_a_diverged_search_stops_with_a_floating_point_error():
    with pytest.raises(FloatingPointError, match="loss became nan"):
        run_search(SearchConfig(epochs=1, lr=1e30, **TINY))


def test_pcdarts_search_learns_betas_and_ranks_edges_by_them(tmp_path):
    search = Search(SearchConfig(algo="pcdarts", epochs=1, **TINY))
    betas = search.model.betas_normal.detach().clone()
    search.run()
    assert {id(p) for p in search.architect.optimizer.param_groups[0]["params"]} == {
        id(p) for p in search.model.arch_parameters()
    } and len(search.model.arch_parameters()) == 4
    assert not torch.equal(search.model.betas_normal.detach(), betas)  # the betas train
    assert search.genotype() == derive_genotype(
        search.model.alphas_normal, search.model.alphas_reduce, search.space, search.model.edge_strengths()
    )


@pytest.mark.parametrize(
    "algo, order", [("rf-darts", "first"), ("rf-pcdarts", "first"), ("rf-darts", "second")]
)
def test_random_features_train_only_batchnorm_affine_weights_and_arch_parameters(algo, order):
    search = Search(SearchConfig(algo=algo, order=order, epochs=1, **TINY))
    model = search.model
    after_pool = {id(m[1]) for m in model.modules() if isinstance(m, PoolBN)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # BatchNorm affine is on everywhere but after the pooling candidates (DARTS' parameter-free pools)
    assert all(m.affine != (id(m) in after_pool) for m in bns.values())
    trained = {f"{n}.{k}" for n, m in bns.items() if m.affine for k in ("weight", "bias")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    search.run()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    arch = {n for n, p in model.named_parameters() if any(p is a for a in model.arch_parameters())}
    assert len(arch) == (4 if algo == "rf-pcdarts" else 2) and arch <= moved
    # the weight optimiser holds the BatchNorm affine weights alone, and nothing else moved (a trained weight may
    # stay put where its gradient and weight decay cancel below float32's resolution)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in search.weights} == trained and moved - arch <= trained
    assert len(moved - arch) > 0.9 * len(trained)


def test_random_features_refuse_a_supernet_without_affine_batchnorm():
    # the cells' BatchNorms are what random features train: without affine only the stem's would
    with pytest.raises(UsageError, match="affine"):
        freeze_random_features(SearchNetwork(4, 5, 3))


def test_the_search_builds_its_supernet_with_the_resolved_partial_channels(tmp_path):
    # PC-DARTS' ImageNet search: K = 2 by default, the ImageNet stem; a whole epoch on 32x32 images
    root = write_image_folder(tmp_path)
    cfg = {**TINY, "data": "imagenet", "data_dir": str(root), "image_size": 32, "batch_size": 4}
    search = Search(SearchConfig(space="darts-imagenet", algo="pcdarts", epochs=1, **cfg))
    assert {e.groups for e in search.model.modules() if isinstance(e, PartialMixedOp)} == {2}
    assert hasattr(search.model, "stem0") and search.model.alphas_normal.shape == (14, 8)
    search.run()
    assert search.epoch == 1 and math.isfinite(search.history[0].val_loss)
    darts_k2 = Search(SearchConfig(algo="pcdarts", partial_channels=2, **TINY)).model
    assert {e.groups for e in darts_k2.modules() if isinstance(e, PartialMixedOp)} == {2}


def test_history_round_trips_through_the_checkpoint(tmp_path):
    run_search(SearchConfig(epochs=1, **TINY), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert json.loads(ckpt["history"][0]["genotype"])["normal_concat"] == [2, 3, 4, 5]


def test_batch_hook_reports_the_epochs_running_means(tmp_path):
    calls = []
    result = run_search(SearchConfig(epochs=1, **TINY), tmp_path, on_batch=lambda *a: calls.append(a))
    assert [c[:3] for c in calls] == [(0, 0, 2), (0, 1, 2)]
    record = result.history[0]
    assert calls[-1][3:] == pytest.approx((record.train_loss, record.train_acc))


def _search_steps(backend_name, steps, dtype, threads):
    """Alphas after `steps` first-order search iterations (architecture step + weight step) of a 3-cell, C=4
    supernet on fixed random batches of 32 8x8 images."""
    backend.set_backend(backend_name)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        net = SearchNetwork(4, 10, 3, in_channels=1).to(dtype)
        opt = torch.optim.SGD(net.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        architect = Architect(net, ArchitectConfig(order="first"))
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, xv = (torch.randn(32, 1, 8, 8, generator=g, dtype=dtype) for _ in range(2))
            y, yv = (torch.randint(0, 10, (32,), generator=g) for _ in range(2))
            architect.step(x, y, xv, yv, 0.025, opt)
            opt.zero_grad(set_to_none=True)
            net.loss(x, y).backward()
            opt.step()
        return torch.cat([a.detach().flatten() for a in net.arch_parameters()])
    finally:
        torch.set_num_threads(saved_threads)


@pytest.mark.slow
def test_default_backend_follows_the_reference_path_for_20_steps():
    # In float64 the compiled kernels and the pure-PyTorch path compute the same search: after 20 iterations the
    # alphas agree to 1e-10. (In float32, on the 5-cell C=8 `make search` network, both paths end ~5e-4 apart
    # after 20 steps, but so does the reference path run with 1 thread against 2: Adam's sign-like first steps
    # amplify rounding, so 20-step float32 alphas are reproducible only to that floor, whatever the kernels.)
    start = _search_steps("reference", 0, torch.float64, 2)
    fast = _search_steps("auto", 20, torch.float64, 2)
    ref = _search_steps("reference", 20, torch.float64, 2)
    assert (ref - start).abs().max() > 1e-3  # the alphas moved
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
