"""Curvature of the validation loss in the architecture parameters, and R-DARTS' early stopping on it.

Zela et al. (2020, "Understanding and robustifying differentiable architecture search", R-DARTS) found that
DARTS' search degenerates when the largest eigenvalue of the Hessian of L_val with respect to alpha grows: the
alphas settle in a sharp minimum, and discretising them then costs a lot of accuracy. Their DARTS-ES stops the
search when that eigenvalue has grown too fast and returns the architecture of k epochs earlier:

    stop at epoch i when  mean(lambda[i - k - w + 1 .. i - k]) / mean(lambda[i - w + 1 .. i]) < 0.75,

with lambda averaged over a window of w epochs (here k = 5, w = 5, so the rule can first fire at epoch 10).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from fastdarts.nn import SearchNetwork

#: R-DARTS' DARTS-ES: stop when the windowed eigenvalue k epochs ago is below this fraction of today's
EARLY_STOP_RATIO = 0.75
EARLY_STOP_LAG = 5  # k
EARLY_STOP_WINDOW = 5  # w


def hessian_eigenvalue(
    model: SearchNetwork,
    x: Tensor,
    y: Tensor,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """The largest eigenvalue of the Hessian of the loss on (x, y) with respect to the architecture parameters
    (R-DARTS tracks ``max(eigvals(H))``).

    Power iteration on exact Hessian-vector products (double backprop through the supernet), from a random start
    drawn from ``generator`` (the global RNG is not touched). It finds the eigenvalue of largest magnitude; when
    that is negative, a second power iteration on H - lambda I (whose eigenvalues are all >= 0) finds the largest.
    The loss is the training-mode loss the architect optimises (batch statistics); the model's BatchNorm running
    statistics are left as they are.

    Args:
        model: the supernet.
        x, y: a batch ([B, C, H, W], [B]), normally validation data.
        iters: at most this many Hessian-vector products per power iteration.
        tol: stop once the estimate changes by less than tol relative to itself.
        generator: the random start's generator (for reproducible, resumable runs).

    Returns:
        The largest eigenvalue (a Rayleigh quotient), as a float.
    """
    alphas = model.arch_parameters()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = dict(model.named_parameters())
    loss = model.criterion(functional_call(model, (params, buffers), (x,)), y)
    grads = torch.autograd.grad(loss, alphas, create_graph=True, allow_unused=True, materialize_grads=True)
    live = [
        i for i, g in enumerate(grads) if g.requires_grad
    ]  # not e.g. alphas_normal in a net of reductions

    def hvp(v: list[Tensor]) -> list[Tensor]:
        hv = torch.autograd.grad(
            [grads[i] for i in live], alphas, [v[i] for i in live], retain_graph=True, allow_unused=True,
            materialize_grads=True,
        )  # fmt: skip
        return [h.detach() for h in hv]

    start = _normalised(
        [torch.randn(a.shape, generator=generator, dtype=a.dtype).to(a.device) for a in alphas]
    )
    dominant = _power_iteration(hvp, start, iters, tol)
    if dominant >= 0:
        return dominant
    shifted = _power_iteration(lambda v: [h - dominant * u for h, u in zip(hvp(v), v)], start, iters, tol)
    return shifted + dominant


def _power_iteration(matvec, v: list[Tensor], iters: int, tol: float) -> float:
    """The eigenvalue of largest magnitude of the symmetric operator matvec, from the unit vector v."""
    estimate = 0.0
    for _ in range(iters):
        mv = matvec(v)
        previous, estimate = estimate, sum((m * u).sum() for m, u in zip(mv, v)).item()
        v = _normalised(mv)
        if abs(estimate - previous) <= tol * abs(estimate):
            break
    return estimate


def _normalised(v: Sequence[Tensor]) -> list[Tensor]:
    norm = torch.sqrt(sum((t * t).sum() for t in v))
    return [t / norm for t in v]


def early_stop_epoch(eigenvalues: Sequence[float]) -> int | None:
    """The epoch whose architecture DARTS-ES keeps, given the eigenvalue after each epoch so far; None to go on.

    Stops at the first epoch i where the mean eigenvalue over epochs [i - k - w + 1, i - k] is less than 0.75 of
    the mean over [i - w + 1, i] (k = EARLY_STOP_LAG, w = EARLY_STOP_WINDOW), and returns i - k.
    """
    k, w = EARLY_STOP_LAG, EARLY_STOP_WINDOW
    for i in range(k + w - 1, len(eigenvalues)):
        before = sum(eigenvalues[i - k - w + 1 : i - k + 1]) / w
        now = sum(eigenvalues[i - w + 1 : i + 1]) / w
        if now > 0 and before / now < EARLY_STOP_RATIO:
            return i - k
    return None
