"""Whole-step CUDA graphs (fastdarts.search.graphs, --cuda-graphs): the replayed steps equal eager ones. The GPU
tests run where a GPU is present (`bash benchmarks/gpu.sh test`); on the CPU, the refusal and GraphedStep's control
flow (on a stand-in for CUDA's graph API) are checked."""

import contextlib
import itertools
import math

import pytest
import torch

from fastdarts.errors import UsageError
from fastdarts.search import SearchConfig, loop, run_search
from fastdarts.search.graphs import GraphedStep
from fastdarts.search.loop import Search

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


_TINY = {"data": "digits", "layers": 3, "init_channels": 4, "batch_size": 32, "train_portion": 0.3, "device": "cuda"}


@needs_cuda
@pytest.mark.parametrize(("order", "recompute"), [("first", False), ("second", False), ("first", True)])
def test_replayed_search_iterations_equal_eager_ones(order, recompute):
    # The search's own iteration (architecture step of `order`, weight step, both optimisers; the cells batched, as
    # on any GPU; with recompute, their groups recomputed inside the recorded backward) from the same state on the
    # same batches: both runs have capturable optimisers, so only the replay differs. Each replayed step's loss, and
    # every weight, alpha and BatchNorm statistic after 7 steps, equal the eager ones up to float32 rounding; a
    # replay that read a stale input or lost an update is off by a whole step.
    config = SearchConfig(**_TINY, epochs=1, order=order, recompute_edges=recompute, cuda_graphs=True)
    eager, graphed = Search(config), Search(config)  # one seed: the same supernet
    lr = eager.scheduler.get_last_lr()[0]
    eager_step, graphed_step = eager.step_fn(lr, True), GraphedStep(graphed.step_fn(lr, True))
    for step, ((x, y), (x_val, y_val)) in enumerate(itertools.islice(zip(eager.data.train, eager.data.val), 7)):
        inputs = [t.cuda() for t in (x, y, x_val, y_val)]
        expected = eager_step(*inputs)[0].item()
        assert graphed_step(*inputs)[0].item() == pytest.approx(expected, rel=1e-4), f"step {step}"
    assert not graphed_step.failed and graphed_step.replays == 7 - graphed_step.warmup
    for (name, a), b in zip(graphed.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


@needs_cuda
def test_a_search_with_cuda_graphs_ends_its_first_epoch_near_an_eager_one(monkeypatch):
    # The whole loop: each epoch's recording and replays, its shorter last batch run eagerly, the evaluation, the
    # second epoch's recording at its own learning rate. Only the first epoch is compared, loosely: float32
    # searches from one seed drift apart whenever the rounding differs. On the CPU, fastdarts' kernels and the
    # reference backend (both right) end this search's first epoch 3e-5 to 2.7e-3 apart in validation loss and
    # 4e-5 to 3.2e-4 in alpha (2 and 1 threads), and its second epoch 1% to 6% apart in loss.
    graphed_steps = []

    class Recorded(GraphedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            graphed_steps.append(self)

    monkeypatch.setattr(loop, "GraphedStep", Recorded)
    eager = run_search(SearchConfig(**_TINY, epochs=2))
    assert not graphed_steps
    graphed = run_search(SearchConfig(**_TINY, epochs=2, cuda_graphs=True))
    assert len(graphed_steps) == 2 and all(s.replays > 0 and not s.failed for s in graphed_steps)
    assert graphed.history[0].val_loss == pytest.approx(eager.history[0].val_loss, rel=2e-2)
    torch.testing.assert_close(graphed.alphas_normal[0], eager.alphas_normal[0], rtol=0, atol=2e-3)
    assert len(graphed.history) == 2 and math.isfinite(graphed.history[1].val_loss)


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
