"""The architecture step of DARTS: first order, and second order through the unrolled weight step.

Second order (Liu et al., 2019, eq. 7-8). With xi the weight learning rate and the weight step that SGD with
momentum mu and weight decay lambda would take,

    w' = w - xi * (mu * m + grad_w L_train(w, alpha) + lambda * w)

(m: the optimiser's momentum buffer; with mu = lambda = 0 this is w' = w - xi * grad_w L_train), the
architecture gradient is

    grad_alpha L_val(w', alpha) - xi * grad^2_{alpha, w} L_train(w, alpha) . v,   v = grad_w' L_val(w', alpha).

``hvp="fd"`` takes the Hessian-vector product by a central finite difference,

    (grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps),  w+- = w +- eps * v,
    eps = fd_r / ||v||  (fd_r = 0.01 in DARTS),

and ``hvp="exact"`` differentiates through w' by double backprop instead. On a network with ReLU and max
pooling the finite difference can differ from the exact product by more than its own norm (kinks inside the
eps ball); on a smooth network it converges to it as eps shrinks.

The model is never copied. With ``hvp="fd"`` the model's own weights take w', w+ and w- in place, one after
the other, and are put back bit-exactly afterwards (from one saved copy of the weights, not of the model); the
BatchNorm running statistics that those extra passes move are put back too. Evaluating the same weights through
``torch.func.functional_call`` instead cost about 25 ms per pass on a 2-core CPU at the digits shapes (5 cells,
C=8; 105 ms against 78 ms for a forward), the swapping of its 2,650 named tensors in and out. ``hvp="exact"``
needs w' as a function of alpha and evaluates it functionally, and ``hvp="fd-batched"`` evaluates w+ and w- in one
functional pass under vmap (fastdarts.ops.fd_hvp_batched; the weights hold w' meanwhile).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from fastdarts.errors import UsageError
from fastdarts.nn import SearchNetwork
from fastdarts.ops import fd_hvp, fd_hvp_batched

ORDERS = ("first", "second")
HVP_MODES = ("fd", "fd-batched", "exact")


@dataclass
class ArchitectConfig:
    """Settings of the architecture optimiser (defaults: the DARTS paper's).

    Attributes:
        order: "first" (grad_alpha L_val at the current w) or "second" (through the unrolled step).
        hvp: "fd" (finite difference, w+ and w- one after the other), "fd-batched" (the same, both in one pass
            under vmap: fastdarts.ops.fd_hvp_batched) or "exact" (double backprop); second order only.
        lr, betas, weight_decay: Adam on the alphas.
        fd_r: the finite-difference radius, eps = fd_r / ||v||.
        capturable: Adam's ``capturable`` (its state on the GPU), so that the step can be recorded as a CUDA graph.
    """

    order: str = "first"
    hvp: str = "fd"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-3
    fd_r: float = 0.01
    capturable: bool = False

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise UsageError(f"unknown order {self.order!r}, expected one of: {', '.join(ORDERS)}")
        if self.hvp not in HVP_MODES:
            raise UsageError(f"unknown hvp mode {self.hvp!r}, expected one of: {', '.join(HVP_MODES)}")
        check_hvp_order(self.hvp, self.order)
        if not self.fd_r > 0:
            raise UsageError(f"fd_r must be > 0, got {self.fd_r}")


def check_hvp_order(hvp: str, order: str) -> None:
    """Refuses a Hessian-vector product mode other than the default with first order, which takes none (it
    would be ignored without a word)."""
    if order == "first" and hvp != "fd":
        raise UsageError(f"hvp {hvp!r} is for order second; first order takes no Hessian-vector product")


def _grad(loss: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """d loss / d inputs, zeros for an input the loss does not use (alphas_normal in a net of only reductions)."""
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


@contextmanager
def _restored(weights: Sequence[Tensor], buffers: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Runs the block, which may change ``weights`` and ``buffers`` in place (the unrolled and perturbed weights,
    the BatchNorm running statistics of the extra passes), and puts both back bit-exactly after. Yields copies of
    the weights as they were."""
    targets = [*weights, *buffers]
    saved = [torch.empty_like(t) for t in targets]
    if targets:
        with torch.no_grad():
            torch._foreach_copy_(saved, targets)  # one multi-tensor copy, not one launch per tensor
    try:
        yield saved[: len(weights)]
    finally:
        if targets:
            with torch.no_grad():
                torch._foreach_copy_(targets, saved)


@contextmanager
def _frozen(params: Iterable[Tensor]) -> Iterator[None]:
    """Runs the block with ``params`` not requiring grad (restored after), so that the graph it records never
    computes their gradients: autograd.grad w.r.t. other inputs would otherwise still run every custom op's
    backward for them (its needs_input_grad is fixed at forward time)."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class Architect:
    """Updates a SearchNetwork's alphas with Adam on the validation loss.

    Like a torch optimiser, it holds the model's parameters as they are when it is built (walking the module tree
    for them costs ~6 ms on the 5-cell digits supernet, 9 ms on the 8-cell CIFAR one, each time, on a 2-core
    CPU): build it after replacing modules, not before.

    Args:
        model: the supernet.
        config: the architecture optimiser's settings.
        network_momentum, network_weight_decay: the weight optimiser's, used to build the unrolled step.
    """

    def __init__(
        self,
        model: SearchNetwork,
        config: ArchitectConfig | None = None,
        network_momentum: float = 0.9,
        network_weight_decay: float = 3e-4,
    ):
        self.model = model
        self.config = config or ArchitectConfig()
        self._named_weights = list(model.named_weight_parameters())
        self._buffer_names = [n for n, _ in model.named_buffers()]  # (names only: .to() replaces the tensors)
        self.network_momentum = network_momentum
        self.network_weight_decay = network_weight_decay
        self.optimizer = torch.optim.Adam(
            model.arch_parameters(), lr=self.config.lr, betas=self.config.betas,
            weight_decay=self.config.weight_decay, capturable=self.config.capturable,
        )  # fmt: skip

    def step(
        self,
        x_train: Tensor,
        y_train: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        eta: float,
        network_optimizer: torch.optim.Optimizer | None = None,
    ) -> Tensor:
        """One Adam step on the alphas. eta: the weight learning rate (xi of the unrolled step).

        Returns the validation loss at the point where the architecture gradient was taken (detached).
        """
        grads, loss = self.arch_grads(x_train, y_train, x_val, y_val, eta, network_optimizer)
        for a, g in zip(self.model.arch_parameters(), grads):
            a.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def arch_grads(
        self,
        x_train: Tensor,
        y_train: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        eta: float,
        network_optimizer: torch.optim.Optimizer | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """The architecture gradient of the configured order, one tensor per arch parameter, and L_val."""
        alphas = self.model.arch_parameters()
        if self.config.order == "first":
            with _frozen(p for _, p in self._named_weights):  # no weight gradients computed along the way
                loss = self.model.loss(x_val, y_val)
            return list(_grad(loss, alphas)), loss.detach()
        return self._unrolled_grads(x_train, y_train, x_val, y_val, eta, network_optimizer)

    def _weights(self) -> tuple[list[str], list[Tensor]]:
        named = [(n, p) for n, p in self._named_weights if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def _loss_at(self, names: Sequence[str], weights: Sequence[Tensor], buffers: dict, x: Tensor, y: Tensor):
        logits = functional_call(self.model, (dict(zip(names, weights)), buffers), (x,))
        return self.model.criterion(logits, y)

    def _step_of(
        self, w: Sequence[Tensor], g: Sequence[Tensor], eta: float, network_optimizer
    ) -> list[Tensor]:
        """The unrolled weight step w' = w - eta * (g + lambda * w + mu * m), one tensor per weight, in
        multi-tensor ops (differentiable: the exact mode differentiates it)."""
        d = list(torch._foreach_add(list(g), list(w), alpha=self.network_weight_decay))
        state = network_optimizer.state if network_optimizer is not None else {}
        moving = [(i, state[p]["momentum_buffer"]) for i, p in enumerate(w)
                  if state.get(p, {}).get("momentum_buffer") is not None]  # fmt: skip
        if moving:
            index, buffers = zip(*moving)
            for i, di in zip(
                index, torch._foreach_add([d[i] for i in index], buffers, alpha=self.network_momentum)
            ):
                d[i] = di
        return torch._foreach_add(list(w), d, alpha=-eta)

    def _unrolled_grads(self, x_train, y_train, x_val, y_val, eta, network_optimizer):
        if self.config.hvp == "exact":
            return self._exact_unrolled_grads(x_train, y_train, x_val, y_val, eta, network_optimizer)
        _, w = self._weights()
        with _restored(w, list(self.model.buffers())) as center:
            v, d_alpha, loss_val = self._unrolled_v(w, x_train, y_train, x_val, y_val, eta, network_optimizer)
            hvp = self._fd_hvp(w, center, v, x_train, y_train)
        return [d - eta * h for d, h in zip(d_alpha, hvp)], loss_val

    def _unrolled_v(self, w, x_train, y_train, x_val, y_val, eta, network_optimizer):
        """Moves the weights w to the unrolled point w' in place (the caller puts them back: _restored); returns
        v = grad_w' L_val(w', alpha), grad_alpha L_val(w', alpha) and L_val (detached)."""
        alphas = self.model.arch_parameters()
        with _frozen(alphas):  # the weight gradient only
            g_train = torch.autograd.grad(self.model.loss(x_train, y_train), w)
        with torch.no_grad():
            torch._foreach_copy_(w, self._step_of(w, g_train, eta, network_optimizer))
        loss_val = self.model.loss(x_val, y_val)
        grads = _grad(loss_val, [*alphas, *w])
        return grads[len(alphas) :], list(grads[: len(alphas)]), loss_val.detach()

    def _exact_unrolled_grads(self, x_train, y_train, x_val, y_val, eta, network_optimizer):
        """Second order through w' by double backprop (w' a function of alpha, evaluated functionally)."""
        alphas = self.model.arch_parameters()
        names, w = self._weights()
        # The extra evaluations must not move the BatchNorm running statistics of the real model.
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        loss_train = self._loss_at(names, w, buffers, x_train, y_train)
        g_train = torch.autograd.grad(loss_train, w, create_graph=True)
        w_prime = self._step_of(w, g_train, eta, network_optimizer)
        loss_val = self._loss_at(names, w_prime, buffers, x_val, y_val)
        return list(_grad(loss_val, alphas)), loss_val.detach()

    def hvp_pair(
        self,
        x_train: Tensor,
        y_train: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        eta: float,
        network_optimizer: torch.optim.Optimizer | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The Hessian-vector product of the second-order step, grad^2_{alpha, w} L_train(w, alpha) . v with
        v = grad_w' L_val(w', alpha), computed both ways: (finite difference with this config's fd_r, exact by
        double backprop). For measuring how far the finite difference is off; nothing is updated."""
        _, w = self._weights()
        with _restored(w, list(self.model.buffers())) as center:
            v = self._unrolled_v(w, x_train, y_train, x_val, y_val, eta, network_optimizer)[0]
            fd = self._fd_hvp(w, center, v, x_train, y_train)
            with torch.no_grad():
                torch._foreach_copy_(w, center)
            g = torch.autograd.grad(self.model.loss(x_train, y_train), w, create_graph=True)
            exact = _grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), self.model.arch_parameters())
        return fd, list(exact)

    def fd_hvp(self, v: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
        """grad^2_{alpha, w} L(w, alpha) . v at the model's weights w, by the central finite difference
        (grad_alpha L(w + eps v) - grad_alpha L(w - eps v)) / (2 eps), eps = fd_r / ||v||, L the loss on (x, y).

        v: one tensor per trainable weight (in named_weight_parameters order). The weights take w + eps v and
        w - eps v in place (no copy of the model) and are put back bit-exactly, the running statistics too."""
        _, w = self._weights()
        with _restored(w, list(self.model.buffers())) as center:
            return self._fd_hvp(w, center, v, x, y)

    def _fd_hvp(self, w, center, v, x, y) -> list[Tensor]:
        """fd_hvp around center, the weights w taking center +- eps v in place (fastdarts.ops.fd_hvp), or with
        "fd-batched" fd_hvp_batched, w+ and w- evaluated functionally in one pass (w left alone). Always in the
        weights' precision: under autocast, eps v (about 1e-2 / sqrt(#weights) per weight) is below bfloat16's
        resolution, and w+ and w- would mostly round to the same bfloat16 weights."""
        with torch.autocast(x.device.type, enabled=False):
            return self._fd_hvp_full_precision(w, center, v, x, y)

    def _fd_hvp_full_precision(self, w, center, v, x, y) -> list[Tensor]:
        alphas = self.model.arch_parameters()
        if self.config.hvp == "fd-batched":
            names = self._weights()[0]
            # No running statistics: under vmap they would be one state for two passes (the sequential passes
            # move them, and the caller puts them back: the same end state).
            stats = dict.fromkeys(self._buffer_names)

            def loss_at(ws):
                logits = functional_call(self.model, (dict(zip(names, ws)), stats), (x,))
                return self.model.criterion(logits, y)

            return fd_hvp_batched(loss_at, alphas, w, v, self.config.fd_r, center)

        def grad_at():
            with _frozen(w):  # no weight gradients computed along the way
                return _grad(self.model.loss(x, y), alphas)

        return fd_hvp(grad_at, w, v, self.config.fd_r, center)
