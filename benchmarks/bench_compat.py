"""One iteration of each original code base's own search loop (architecture step, then a weight step with
gradient clipping at 5) on fastdarts.compat against the plain oracle of that code base (tests/compat/originals.py:
the original's module layout, ``sum(w * op(x))`` mixed ops, a deep-copied unrolled model), in the same run.

- quark0/darts ``train_search.py``: first order (its default), batch 64.
- khanrc/pt.darts ``search.py``: second order (its only mode), batch 64.
- yuhuixu1993/PC-DARTS ``train_search.py``: first order, batch 256.
- yuhuixu1993/PC-DARTS ``train_search_imagenet.py`` (``model_search_imagenet.py``): first order, 224x224 images of
  1000 classes, batch 128 (its 1024 over 8 GPUs is 128 a GPU).
All: 8 cells, C=16; 32x32 CIFAR-10 shapes but the last. On a CPU the batch is 16 (the originals' batches take
minutes there).

    pytest benchmarks/bench_compat.py         # add --benchmark-json benchmarks/results/<name>.json to keep
"""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastdarts.compat import darts, pcdarts, pcdarts_imagenet, ptdarts
from tests.compat import originals

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# code base -> (batch on the GPU, order, image size, classes)
CASES = {
    "darts": (64, "first", 32, 10),
    "ptdarts": (64, "second", 32, 10),
    "pcdarts": (256, "first", 32, 10),
    "pcdarts-imagenet": (128, "first", 224, 1000),
}
ARGS = SimpleNamespace(momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)
LR = 0.025


def _darts_like(base, impl, device, C, layers, classes):
    compat, oracle = {
        "darts": (darts, originals.DartsNetwork),
        "pcdarts": (pcdarts, originals.PcNetwork),
        "pcdarts-imagenet": (pcdarts_imagenet, originals.PcImagenetNetwork),
    }[base]
    network = compat.Network if impl == "fastdarts" else oracle
    model = network(C, classes, layers, nn.CrossEntropyLoss()).to(device)
    if impl != "fastdarts":  # the original's arch tensors are created on the GPU; .to() does not move them
        names = ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
        for name, a in zip(names, model.arch_parameters()):
            setattr(model, name, a.detach().to(device).requires_grad_())
    optimizer = torch.optim.SGD(
        model.parameters(), LR, momentum=ARGS.momentum, weight_decay=ARGS.weight_decay
    )
    if impl == "fastdarts":
        architect = compat.Architect(model, ARGS)

        def arch_step(x, y, xv, yv):
            architect.step(x, y, xv, yv, LR, optimizer, unrolled=False)

    else:
        adam = torch.optim.Adam(
            model.arch_parameters(), ARGS.arch_learning_rate, (0.5, 0.999), weight_decay=1e-3
        )

        def arch_step(x, y, xv, yv):
            grads = originals.darts_arch_grads(model, x, y, xv, yv, LR, optimizer, False, 0.9, 3e-4)
            for a, g in zip(model.arch_parameters(), grads):
                a.grad = g
            adam.step()

    return model.parameters, model._loss, optimizer, arch_step


def _ptdarts(impl, device, C, layers, classes):
    cls = ptdarts.SearchCNNController if impl == "fastdarts" else originals.PtController
    model = cls(3, C, classes, layers, nn.CrossEntropyLoss()).to(device)
    optimizer = torch.optim.SGD(model.net.parameters(), LR, momentum=0.9, weight_decay=3e-4)
    alpha_optim = torch.optim.Adam(model.arch_parameters(), 3e-4, (0.5, 0.999), weight_decay=1e-3)
    architect = ptdarts.Architect(model, 0.9, 3e-4) if impl == "fastdarts" else None

    def arch_step(x, y, xv, yv):
        alpha_optim.zero_grad()
        if architect is not None:
            architect.unrolled_backward(x, y, xv, yv, LR, optimizer)
        else:  # pt.darts' own finite difference, bug included: the cost is the same
            grads = originals.pt_arch_grads(model, x, y, xv, yv, LR, optimizer, 0.9, 3e-4, buggy=True)
            for a, g in zip(model.arch_parameters(), grads):
                a.grad = g
        alpha_optim.step()

    return model.net.parameters, model.loss, optimizer, arch_step


def compat_loop(base, impl, device, batch, C=16, layers=8, image_size=None):
    """One iteration of ``base``'s own search loop (a key of CASES) on fastdarts.compat (impl "fastdarts") or on
    the plain oracle of that code base (impl "original"), as a closure; image_size: CASES' unless given."""
    torch.manual_seed(0)
    _, _, size, classes = CASES[base]
    size = image_size or size
    build = _ptdarts if base == "ptdarts" else partial(_darts_like, base)
    weights, loss_fn, optimizer, arch_step = build(impl, device, C, layers, classes)

    def data():
        return torch.randn(batch, 3, size, size, device=device), torch.randint(
            0, classes, (batch,), device=device
        )

    (x, y), (xv, yv) = data(), data()

    def step():
        arch_step(x, y, xv, yv)
        optimizer.zero_grad()
        loss_fn(x, y).backward()
        nn.utils.clip_grad_norm_(weights(), 5.0)
        optimizer.step()

    return step


@pytest.mark.parametrize("impl", ["fastdarts", "original"])
@pytest.mark.parametrize("base", list(CASES))
def test_compat_search_loop(benchmark, base, impl):
    gpu_batch, order, _, _ = CASES[base]
    batch = gpu_batch if DEVICE == "cuda" else 16
    step = compat_loop(base, impl, DEVICE, batch)

    def synced_step():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{base} search loop, {order} order, batch {batch}, {DEVICE}"
    benchmark.extra_info.update(device=DEVICE, batch=batch, order=order, torch=torch.__version__)
    benchmark.pedantic(synced_step, rounds=3, warmup_rounds=1)
