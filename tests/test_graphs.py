"""Whole-step CUDA graphs (fastdarts.search.graphs, --cuda-graphs): the replayed steps equal eager ones. The GPU
tests run where a GPU is present (`bash benchmarks/gpu.sh test`); on the CPU only the refusal is checked."""

import pytest
import torch

from fastdarts.errors import UsageError
from fastdarts.search import SearchConfig, run_search
from fastdarts.search.graphs import GraphedStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_cuda_graphs_on_a_cpu_device_is_refused():
    with pytest.raises(UsageError, match="cuda_graphs needs a CUDA device, but device 'cpu' is cpu"):
        SearchConfig(cuda_graphs=True, device="cpu").resolve_device()


def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    model = model.cuda()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return (loss.detach(),)

    return model, step


@needs_cuda
def test_replayed_steps_equal_eager_ones():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=gen).cuda(), torch.randint(0, 3, (16,), generator=gen).cuda())
               for _ in range(8)]  # fmt: skip
    batches.append((batches[0][0][:5], batches[0][1][:5]))  # a shorter last batch runs eagerly
    eager_model, eager_step = _toy()
    graphed_model, step = _toy()
    graphed = GraphedStep(step)
    for x, y in batches:
        expected = eager_step(x, y)[0].item()
        assert graphed(x, y)[0].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (
        graphed.graph is not None
        and not graphed.failed
        and graphed.replays == len(batches) - 1 - graphed.warmup
    )
    for a, b in zip(graphed_model.state_dict().values(), eager_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("order", ["first", "second"])
def test_search_with_cuda_graphs_ends_where_an_eager_one_does(order):
    tiny = {"data": "digits", "layers": 3, "init_channels": 4, "batch_size": 32, "train_portion": 0.3, "epochs": 2,
            "device": "cuda", "order": order}  # fmt: skip
    eager = run_search(SearchConfig(**tiny))
    graphed = run_search(SearchConfig(**tiny, cuda_graphs=True))
    for name, a in eager.arch_history().items():
        # fp32 searches drift apart at ~1e-4 whenever the rounding differs (Adam's first steps are sign-like)
        torch.testing.assert_close(graphed.arch_history()[name], a, rtol=0, atol=1e-3)
    assert graphed.history[-1].val_loss == pytest.approx(eager.history[-1].val_loss, rel=1e-2)
