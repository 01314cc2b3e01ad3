"""fd_hvp: the central finite-difference Hessian-vector product of DARTS' second-order step, on the weights in place.

    H v ~ (g(w + eps v) - g(w - eps v)) / (2 eps),   eps = r / ||v||,   g(w) = grad_alpha L(w, alpha)

(r = 0.01 in DARTS). The weights w are the model's own tensors: they take w + eps v and w - eps v in place and hold
w again, bit-exactly, when it returns (also when a pass raises). No copy of the model is made.

:func:`fd_hvp` moves all the weights with multi-tensor (``torch._foreach_*``) ops: on CUDA a few kernel launches
for the 1,399 weight tensors of the CIFAR supernet (8 cells, C=16), where one op per tensor costs a launch per
tensor and per op, thousands per side. :func:`fd_hvp_ref` takes the same steps one tensor at a time, the plain
formula and the oracle: on the CPU both compute the same numbers, bit for bit, in every dtype. (On a 2-core CPU
the multi-tensor ops still loop over the tensors, and the weights' moves take 23 ms against 45 ms for that
supernet, benchmarks/bench_fd_hvp.py.)

:func:`fd_hvp_batched` evaluates both sides in one pass instead: the loss under ``torch.func.vmap`` over the pair
(w + eps v, w - eps v), stacked per weight as ``[2, *w.shape]``, then one backward of L(w+) - L(w-). Each op of the
network runs once for both sides (a convolution as one grouped convolution, a BatchNorm over twice the channels),
which halves the kernel launches of a launch-bound GPU pass; the ops run their references under vmap (their
kernels have no batching rules), and the pass holds both sides' activations at once. It leaves the weights alone.

These are not ``torch.library`` ops: they take callables (the gradient at the current weights, the loss at given
weights), and :func:`fd_hvp` changes its arguments in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastdarts.errors import UsageError

__all__ = ["fd_hvp", "fd_hvp_batched", "fd_hvp_ref"]

GradAt = Callable[[], Sequence[Tensor]]
LossAt = Callable[[Sequence[Tensor]], Tensor]


def _check(weights: Sequence[Tensor], v: Sequence[Tensor], r: float, center: Sequence[Tensor] | None) -> None:
    if len(v) != len(weights):
        raise UsageError(f"fd_hvp: v has {len(v)} tensors, expected {len(weights)}, one per weight")
    for name, other in (("v", v), ("center", center)):
        for i, (w, t) in enumerate(zip(weights, other or ())):
            if t.shape != w.shape:
                raise UsageError(
                    f"fd_hvp: {name}[{i}] has shape {tuple(t.shape)}, expected {tuple(w.shape)} like weights[{i}]"
                )
    if center is not None and len(center) != len(weights):
        raise UsageError(f"fd_hvp: center has {len(center)} tensors, expected {len(weights)}, one per weight")
    if not r > 0:
        raise UsageError(f"fd_hvp: r must be > 0, got {r}")


def radius(v: Sequence[Tensor], r: float) -> Tensor:
    """eps = r / ||v|| (a 0-dim tensor on v's device), the norm over all tensors of v accumulated in fp32 (fp64 for
    fp64): one multi-tensor norm, no concatenated copy of v. A zero v gives a finite eps (the norm is clamped to
    the smallest normal number, without a host sync that a CUDA graph would refuse), so H v = 0 comes out as 0, not
    0 / 0."""
    acc = torch.float64 if v[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm(v, 2, dtype=acc)
    return r / torch.linalg.vector_norm(torch.stack(norms)).clamp_min(torch.finfo(acc).tiny)


def fd_hvp(
    grad_at: GradAt,
    weights: Sequence[Tensor],
    v: Sequence[Tensor],
    r: float = 0.01,
    center: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """The central finite difference of ``grad_at`` along ``v``, the weights moved in place by multi-tensor ops.

    Args:
        grad_at: returns g at the weights' current values, e.g. ``torch.autograd.grad(loss(), alphas)``.
        weights: the tensors the loss reads (a model's parameters), changed in place while this runs.
        v: one tensor per weight, of its shape: the direction.
        r: the radius; the step is eps = r / ||v||, ||v|| over all of v.
        center: the point w around which to differentiate (default: the weights' values on entry).

    Returns:
        ``(g(w + eps v) - g(w - eps v)) / (2 eps)``, one tensor per tensor that ``grad_at`` returns. On return
        (and when ``grad_at`` raises) the weights hold the center bit-exactly.

    Raises:
        UsageError: ``v`` or ``center`` do not match the weights one for one in shape, or r <= 0.
    """
    _check(weights, v, r, center)
    weights = list(weights)
    with torch.no_grad():  # (a copy recorded by autograd costs 20x the copy)
        if center is None:
            center = [torch.empty_like(w) for w in weights]
            torch._foreach_copy_(center, weights)
        eps = radius(v, r)
        step = torch._foreach_mul(list(v), eps)
    sides = []
    try:
        for add in (torch._foreach_add_, torch._foreach_sub_):
            with torch.no_grad():
                torch._foreach_copy_(weights, center)
                add(weights, step)
            sides.append(grad_at())
    finally:
        with torch.no_grad():
            torch._foreach_copy_(weights, center)
    return [(gp - gm) / (2 * eps) for gp, gm in zip(*sides)]


def fd_hvp_batched(
    loss_at: LossAt,
    inputs: Sequence[Tensor],
    weights: Sequence[Tensor],
    v: Sequence[Tensor],
    r: float = 0.01,
    center: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """:func:`fd_hvp` with both sides in one batched pass: ``(grad L(w + eps v) - grad L(w - eps v)) / (2 eps)``
    as the gradient of L(w+) - L(w-), the two evaluated by ``torch.func.vmap(loss_at)`` over the stacked pair.

    Args:
        loss_at: the scalar loss at the given weights (one tensor per weight, in order), e.g. through
            ``torch.func.functional_call``; it must run under vmap (no in-place update of unbatched state: pass
            BatchNorm running statistics as None, or stacked).
        inputs: what to differentiate with respect to (the alphas).
        weights: the weights' values (read only); w = center if given, else these.
        v, r, center: as in :func:`fd_hvp`.

    Returns:
        One tensor per input: the central difference of d L / d input along ``v``, zeros for an input that the
        loss does not use. w+ and w- are bit for bit :func:`fd_hvp`'s.

    Raises:
        UsageError: ``v`` or ``center`` do not match the weights one for one in shape, or r <= 0.
    """
    _check(weights, v, r, center)
    center = list(weights if center is None else center)
    with torch.no_grad():
        eps = radius(v, r)
        step = torch._foreach_mul(list(v), eps)
        pair = [torch.empty((2, *w.shape), dtype=w.dtype, device=w.device) for w in center]
        for side, move in ((0, torch._foreach_add_), (1, torch._foreach_sub_)):
            views = [p[side] for p in pair]
            torch._foreach_copy_(views, center)
            move(views, step)
    losses = torch.func.vmap(loss_at)(pair)
    grads = torch.autograd.grad(losses[0] - losses[1], inputs, allow_unused=True, materialize_grads=True)
    return [g / (2 * eps) for g in grads]


def fd_hvp_ref(
    grad_at: GradAt,
    weights: Sequence[Tensor],
    v: Sequence[Tensor],
    r: float = 0.01,
    center: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """:func:`fd_hvp` one tensor at a time: the plain formula, the oracle. Same arguments and result."""
    _check(weights, v, r, center)
    with torch.no_grad():
        center = [w.detach().clone() for w in weights] if center is None else center
        eps = radius(v, r)
    sides = []
    try:
        for sign in (1, -1):
            with torch.no_grad():
                for w, c, t in zip(weights, center, v):
                    w.copy_(c + sign * (t * eps))
            sides.append(grad_at())
    finally:
        with torch.no_grad():
            for w, c in zip(weights, center):
                w.copy_(c)
    return [(gp - gm) / (2 * eps) for gp, gm in zip(*sides)]
