"""pool_bn: DARTS' pooling candidates, a 3x3 max or average pool followed by a BatchNorm without affine.

``y = BN(pool(x))`` with padding 1, stride 1 or 2, the average over the pixels inside the image
(``count_include_pad=False``), as the ``max_pool_3x3`` / ``avg_pool_3x3`` candidates of a DARTS mixed op.
``pool_bn_ref`` is the eager chain (``F.max_pool2d`` or ``F.avg_pool2d``, then ``F.batch_norm``): the oracle and
the fallback. ``pool_bn`` runs ``fastdarts_C::pool_bn`` (csrc/ops/pool_bn.cpp) on CPU when the kernel is live; its
autograd is the ``torch.autograd.Function`` ``_PoolBN`` (see fastdarts.ops.dil_conv for why not ``custom_op``), and
the C++ operators have fake kernels (FakeTensor tracing, ``opcheck``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.ops._batch_norm import check_stats, copy_running

__all__ = ["POOLS", "pool_bn", "pool_bn_ref"]

POOLS = ("max", "avg")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(
    op: str,
    x: Tensor,
    kind: str,
    stride: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
) -> None:
    """Raises UsageError naming the bad value (mirrors csrc/ops/pool_bn.cpp)."""
    if x.dim() != 4:
        raise UsageError(f"{op}: x has shape {tuple(x.shape)}, expected 4 dims [B, C, H, W]")
    if x.dtype not in _DTYPES:
        raise UsageError(f"{op}: x has dtype {x.dtype}, expected one of float32, float64, float16, bfloat16")
    if kind not in POOLS:
        raise UsageError(f"{op}: kind is {kind!r}, expected 'max' or 'avg'")
    if stride not in (1, 2):
        raise UsageError(f"{op}: stride is {stride}, expected 1 or 2")
    check_stats(op, running_mean, running_var, x.shape[1], training)


def pool_bn_ref(
    x: Tensor,
    kind: str,
    stride: int = 1,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """The eager candidate, ``F.batch_norm(F.max_pool2d(x, 3, stride, 1), ...)`` (or ``F.avg_pool2d`` with
    ``count_include_pad=False``): the oracle of :func:`pool_bn` and its fallback. Arguments as :func:`pool_bn`."""
    _check("pool_bn_ref", x, kind, stride, running_mean, running_var, training)
    if kind == "max":
        p = F.max_pool2d(x, 3, stride, 1)
    else:
        p = F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)
    return F.batch_norm(p, running_mean, running_var, None, None, training, momentum, eps)


def pool_bn(
    x: Tensor,
    kind: str,
    stride: int = 1,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """3x3 max or average pool (padding 1), then BatchNorm without affine: a DARTS pooling candidate.

    ``p = pool(x)``; ``y = (p - mean) / sqrt(var + eps)`` per channel with the batch mean and (biased) variance of
    ``p`` when ``training``, else ``running_mean`` and ``running_var``. Runs csrc/ops/pool_bn.cpp on CPU when the
    kernel is live (fp32 accumulation, fp64 for fp64), :func:`pool_bn_ref` otherwise. Differentiable any number of
    times (the double backward differentiates the reference). The max pool's gradient goes to the first maximum
    of each window in row-major order, as ATen's.

    Args:
        x: ``[B, C, H, W]``, float32, float64, float16 or bfloat16.
        kind: "max" or "avg" (the average over the pixels inside the image, ``count_include_pad=False``).
        stride: 1 or 2.
        running_mean, running_var: ``[C]`` or both None; updated in place when ``training``:
            ``running = (1 - momentum) * running + momentum * batch`` (the variance unbiased).
        training: normalise with the batch statistics (True) or the running ones (False).
        momentum, eps: as in ``F.batch_norm``.

    Returns:
        ``[B, C, Ho, Wo]`` in the dtype of ``x``, ``Ho = (H - 1) // stride + 1`` (and Wo alike).

    Raises:
        UsageError: a bad shape, dtype, kind or stride, e.g. "pool_bn: stride is 3, expected 1 or 2".
    """
    if not backend.kernel_live("pool_bn", x.device):
        return pool_bn_ref(x, kind, stride, running_mean, running_var, training, momentum, eps)
    _check("pool_bn", x, kind, stride, running_mean, running_var, training)
    y, new_mean, new_var = _PoolBN.apply(
        x, running_mean, running_var, kind == "max", stride, training, momentum, eps
    )
    copy_running((running_mean, running_var), (new_mean, new_var), training)
    return y


class _PoolBN(torch.autograd.Function):
    """Autograd of ``fastdarts_C::pool_bn`` (forward with ctx: no per-call argument binding). Returns y and the new
    running statistics; the pool's output, its winning taps and the batch statistics are kept for the backward
    without being outputs (fewer outputs for autograd to wrap: the op's wrapper is most of its time on tiny planes)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, is_max, stride, training, momentum, eps):
        y, p, taps, mean, invstd, new_mean, new_var = torch.ops.fastdarts_C.pool_bn(
            x, running_mean, running_var, is_max, stride, training, momentum, eps
        )
        ctx.mark_non_differentiable(new_mean, new_var)
        ctx.set_materialize_grads(False)
        # the running statistics change in place after this: kept only where the backward reads them (eval)
        stats = (None, None) if training else (running_mean, running_var)
        ctx.save_for_backward(x, *stats, p, taps, mean, invstd)
        ctx.is_max, ctx.stride, ctx.training, ctx.eps = is_max, stride, training, eps
        return y, new_mean, new_var

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_):
        x, running_mean, running_var, p, taps, mean, invstd = ctx.saved_tensors
        nothing = (None,) * 7
        if grad is None or not ctx.needs_input_grad[0]:
            return (None, *nothing)
        if torch.is_grad_enabled():
            # create_graph: differentiate the reference (same statistics, no running update) so that the gradient
            # is differentiable again.
            kind = "max" if ctx.is_max else "avg"
            y = pool_bn_ref(x, kind, ctx.stride, running_mean, running_var, ctx.training, 0.0, ctx.eps)
            return (torch.autograd.grad(y, x, grad, create_graph=True)[0], *nothing)
        grad_x = torch.ops.fastdarts_C.pool_bn_backward(
            grad, x, p, taps, mean, invstd, ctx.is_max, ctx.stride, ctx.training
        )
        return (grad_x, *nothing)


def _register() -> None:
    def fake(x, running_mean, running_var, is_max, stride, training, momentum, eps):
        B, C, H, W = x.shape
        Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        update = training and running_mean is not None
        return (
            x.new_empty(B, C, Ho, Wo),
            x.new_empty(B, C, Ho, Wo, dtype=acc),
            x.new_empty(B if is_max else 0, C, Ho, Wo, dtype=torch.int32),
            x.new_empty(C, dtype=acc),
            x.new_empty(C, dtype=acc),
            running_mean.new_empty(C) if update else x.new_empty(0, dtype=acc),
            running_var.new_empty(C) if update else x.new_empty(0, dtype=acc),
        )

    def fake_backward(grad, x, p, taps, mean, invstd, is_max, stride, training):
        return x.new_empty(x.shape)

    torch.library.register_fake("fastdarts_C::pool_bn", fake)
    torch.library.register_fake("fastdarts_C::pool_bn_backward", fake_backward)


if backend.extension_loaded():
    _register()
