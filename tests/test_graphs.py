"""Whole-step CUDA graphs (fastdarts.search.graphs, --cuda-graphs): the replayed steps equal eager ones. The GPU
tests run where a GPU is present (`bash benchmarks/gpu.sh test`); on the CPU only the refusal is checked."""

import contextlib

import pytest
import torch

from fastdarts.errors import UsageError
from fastdarts.search import SearchConfig, run_search
from fastdarts.search.graphs import GraphedStep

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_cuda_graphs_on_a_cpu_device_is_refused():
    with pytest.raises(UsageError, match="cuda_graphs needs a CUDA device, but device 'cpu' is cpu"):
        SearchConfig(cuda_graphs=True, device="cpu").resolve_device()
    if not torch.cuda.is_available():  # the default device, auto, is the CPU here
        with pytest.raises(UsageError, match="cuda_graphs needs a CUDA device, but device 'auto' is cpu"):
            SearchConfig(cuda_graphs=True).resolve_device()


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
@pytest.mark.parametrize(("order", "recompute"), [("first", False), ("second", False), ("first", True)])
def test_search_with_cuda_graphs_ends_where_an_eager_one_does(order, recompute):
    # (the cells batched, as on any GPU; with recompute, their groups recomputed inside the recorded backward)
    tiny = {"data": "digits", "layers": 3, "init_channels": 4, "batch_size": 32, "train_portion": 0.3, "epochs": 2,
            "device": "cuda", "order": order, "recompute_edges": recompute}  # fmt: skip
    eager = run_search(SearchConfig(**tiny))
    graphed = run_search(SearchConfig(**tiny, cuda_graphs=True))
    for name, a in eager.arch_history().items():
        # fp32 searches drift apart at ~1e-4 whenever the rounding differs (Adam's first steps are sign-like)
        torch.testing.assert_close(graphed.arch_history()[name], a, rtol=0, atol=1e-3)
    assert graphed.history[-1].val_loss == pytest.approx(eager.history[-1].val_loss, rel=1e-2)


class _FakeCuda:
    """CUDA's graph API on the CPU, for GraphedStep's control flow: a 'recording' remembers the step and its static
    inputs, a replay runs it again on them (what a real replay computes)."""

    def __init__(self, monkeypatch, fail=False):
        self.fail, self.recorded = fail, None
        fake = self

        class Graph:
            def replay(self):
                fake.recorded()

        class Recording:
            def __init__(self, graph, **kwargs):
                self.kwargs = kwargs

            def __enter__(self):
                fake.recording = True

            def __exit__(self, *exc):
                fake.recording = False

        class Stream:
            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Recording)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        self.recording = False


def _cpu_toy(fake):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    static = {}

    def step(x):
        if fake is not None and fake.recording:  # a recording runs nothing: remember what a replay would run
            if fake.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            out = torch.zeros(())
            static["out"] = out

            def replay():
                out.copy_(step.__wrapped__(x)[0])

            fake.recorded = replay
            return (out,)
        return step.__wrapped__(x)

    def run(x):
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        return (loss.detach(),)

    step.__wrapped__ = run
    return model, step


@pytest.mark.parametrize("fail", [False, True], ids=["recorded", "recording-fails"])
def test_graphed_step_warms_up_records_once_and_replays(monkeypatch, fail):
    fake = _FakeCuda(monkeypatch, fail)
    batches = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(7)] + [
        torch.randn(2, 4)
    ]
    eager_model, eager_step = _cpu_toy(None)
    model, step = _cpu_toy(fake)
    graphed = GraphedStep(step)
    for x in batches:
        assert graphed(x)[0].item() == pytest.approx(eager_step(x)[0].item(), rel=1e-6)
    if fail:  # every step eager after the failed recording, none lost
        assert graphed.failed and graphed.graph is None and graphed.replays == 0
    else:  # 3 eager, the 4th recorded and replayed, then replays; the shorter batch eager
        assert not graphed.failed and graphed.replays == len(batches) - 1 - graphed.warmup
    torch.testing.assert_close(model.weight, eager_model.weight)
