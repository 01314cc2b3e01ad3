"""Whole-step execution on CUDA: a search iteration recorded once as a CUDA graph and replayed for every batch.

A DARTS iteration at CIFAR shapes is thousands of small kernels, and on a GPU the time goes to launching them
from Python (about 1 s for a few GFLOP of work on an H100). A CUDA graph records the kernels of one whole
iteration (the architecture step, the weight step, both optimisers' updates) and replays them without Python.

What the recorded step needs, and how the search gives it: static shapes (a batch of another shape, such as an
epoch's shorter last batch, runs eagerly); no host synchronisation inside the step (the loss is read after the
replay); optimisers whose state lives on the GPU (Adam with ``capturable=True`` for the alphas; SGD's momentum is
created by the eager warm-up steps); constants that change between replays re-recorded (the learning rate is
a constant of the recorded kernels, and the cosine schedule changes it once per epoch, so each epoch records anew).

Opt-in (``SearchConfig.cuda_graphs``, ``--cuda-graphs``). On an H200 a first-order CIFAR iteration at batch 64 took
225 ms replayed against 465 ms eager (README, Measured). ``tests/test_graphs.py`` checks replays against eager steps
where a GPU is present; its replay tests have not run on one yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Step = Callable[..., Sequence[Tensor]]


class GraphedStep:
    """``step(*inputs) -> outputs`` run eagerly for its first ``warmup`` calls (on a side stream, as CUDA graphs
    ask: lazy state such as optimiser moments and library workspaces is created there), recorded as a CUDA graph
    on the next call and replayed from then on.

    Each call is one real step: the call that records also replays (recording runs nothing). Inputs of another
    shape or dtype than the recorded ones run eagerly. If recording fails (a host synchronisation inside the step,
    say), the step is logged and runs eagerly from then on.

    Args:
        step: the iteration; takes CUDA tensors and returns the tensors to read after it (loss, logits).
        warmup: eager calls before recording (3, as the PyTorch documentation advises).
    """

    def __init__(self, step: Step, warmup: int = 3):
        self.step = step
        self.warmup = warmup
        self.calls = 0
        self.replays = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._inputs: list[Tensor] = []
        self._outputs: Sequence[Tensor] = ()

    def _fits(self, inputs: Sequence[Tensor]) -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(inputs, self._inputs))

    def _eager(self, inputs: Sequence[Tensor]) -> Sequence[Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def __call__(self, *inputs: Tensor) -> Sequence[Tensor]:
        self.calls += 1
        if self.graph is not None and self._fits(inputs):
            for static, given in zip(self._inputs, inputs):
                static.copy_(given, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            return self._outputs
        if self.graph is not None or self.failed or self.calls <= self.warmup:
            return self._eager(inputs)
        return self._record(inputs)

    def _record(self, inputs: Sequence[Tensor]) -> Sequence[Tensor]:
        self._inputs = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            # thread_local: a data loader's pinning thread may call CUDA meanwhile, which is not part of the step
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._outputs = self.step(*self._inputs)
        except RuntimeError as exc:  # nothing ran while recording: the step is run eagerly instead
            log.warning("recording the search step as a CUDA graph failed (%s); running it eagerly", exc)
            self.failed, self._inputs, self._outputs = True, [], ()
            torch.cuda.synchronize()
            return self._eager(inputs)
        self.graph = graph
        graph.replay()
        self.replays += 1
        return self._outputs
