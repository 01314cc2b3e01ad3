"""dil_conv: DARTS' ReLU -> depthwise conv -> pointwise conv -> BatchNorm unit, in one call each way.

``y = BN(pw_weight (*) depthwise(relu(x), dw_weight))``: a ``dil_conv_kxk`` candidate is one unit (dilation 2), a
``sep_conv_kxk`` candidate two (dilation 1, the second one with stride 1). ``dil_conv_ref`` is the eager chain
(``F.relu``, two ``F.conv2d``, ``F.batch_norm``): the oracle and the fallback. ``dil_conv`` runs
``fastdarts_C::dil_conv`` (csrc/ops/dil_conv.cpp) on CPU when the kernel is live: at DARTS' sizes the eager chain's
time goes to the set-up of its ~5 kernels each way, which the fused passes do not pay. The C++ operator has a fake
kernel registered here (``torch.library.register_fake``) and its autograd is the ``torch.autograd.Function``
``_DilConv``: at these sizes a Python op wrapper (``custom_op``) or ``register_autograd`` costs more per call than
the whole unit.

BatchNorm follows ``F.batch_norm``: batch statistics when ``training`` (then the running statistics, when given,
are updated in place with ``momentum`` and the unbiased batch variance), the running ones otherwise.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.ops._batch_norm import check_pair, check_stats, copy_running
from fastdarts.ops.depthwise_conv import _output_shape, depthwise_conv_ref

__all__ = ["dil_conv", "dil_conv_ref"]


def _check(
    op: str,
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stride: int,
    padding: int,
    dilation: int,
    training: bool,
) -> None:
    """Raises UsageError naming the bad value (mirrors csrc/ops/dil_conv.cpp)."""
    _output_shape(op, x, dw_weight, stride, padding, dilation, weight_name="dw_weight")
    C = x.shape[1]
    if pw_weight.dim() != 4 or pw_weight.shape[1] != C or pw_weight.shape[2:] != (1, 1):
        raise UsageError(
            f"{op}: pw_weight has shape {tuple(pw_weight.shape)}, expected (C_out, {C}, 1, 1) for x with {C} channels"
        )
    if pw_weight.dtype != x.dtype and not backend.autocast_enabled(x.device):
        raise UsageError(f"{op}: pw_weight has dtype {pw_weight.dtype}, expected {x.dtype} like x")
    C_out = pw_weight.shape[0]
    check_pair(op, ("bn_weight", "bn_bias"), (bn_weight, bn_bias), C_out)
    check_stats(op, running_mean, running_var, C_out, training)


def dil_conv_ref(
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """The eager unit, ``F.batch_norm(F.conv2d(depthwise_conv_ref(F.relu(x), dw_weight), pw_weight), ...)``: the
    oracle of :func:`dil_conv` and its fallback. Arguments and result as :func:`dil_conv`."""
    _check(
        "dil_conv_ref", x, dw_weight, pw_weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
        dilation, training,
    )  # fmt: skip
    d = depthwise_conv_ref(F.relu(x), dw_weight, stride, padding, dilation)
    p = F.conv2d(d, pw_weight)
    return F.batch_norm(p, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)


def dil_conv(
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """ReLU -> depthwise conv -> pointwise conv -> BatchNorm, the unit of DARTS' sep_conv and dil_conv.

    ``d = depthwise(relu(x), dw_weight)``, ``p = pw_weight (*) d``, ``y = (p - mean) / sqrt(var + eps) * bn_weight
    + bn_bias`` per output channel, with the batch mean and (biased) variance of ``p`` when ``training``, else
    ``running_mean`` and ``running_var``. Runs csrc/ops/dil_conv.cpp on CPU when the kernel is live (fp32
    accumulation, fp64 for fp64), :func:`dil_conv_ref` otherwise. Differentiable any number of times (the double
    backward differentiates the reference).

    Args:
        x: ``[B, C, H, W]``, float32, float64, float16 or bfloat16.
        dw_weight: ``[C, 1, k, k]``, the depthwise kernel.
        pw_weight: ``[C_out, C, 1, 1]``, the pointwise kernel.
        bn_weight, bn_bias: ``[C_out]`` or both None (BatchNorm without affine, as in DARTS' search).
        running_mean, running_var: ``[C_out]`` or both None; updated in place when ``training``:
            ``running = (1 - momentum) * running + momentum * batch`` (the variance unbiased).
        stride, padding, dilation: of the depthwise convolution, as in ``F.conv2d``.
        training: normalise with the batch statistics (True) or the running ones (False).
        momentum, eps: as in ``F.batch_norm``.

    Returns:
        ``[B, C_out, Ho, Wo]`` in the dtype of ``x``, ``Ho = (H + 2p - d(k - 1) - 1) // s + 1`` (and Wo alike).

    Raises:
        UsageError: a bad shape, dtype or geometry, e.g.
            "dil_conv: pw_weight has shape (8, 4, 1, 1), expected (C_out, 16, 1, 1) for x with 16 channels".
    """
    if not backend.kernel_live("dil_conv", x.device):
        return dil_conv_ref(
            x, dw_weight, pw_weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
            training, momentum, eps,
        )  # fmt: skip
    y, _, _, _, _, new_mean, new_var = _DilConv.apply(
        x, dw_weight, pw_weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
        training, momentum, eps,
    )  # fmt: skip
    copy_running((running_mean, running_var), (new_mean, new_var), training)
    return y


class _DilConv(torch.autograd.Function):
    """Autograd of ``fastdarts_C::dil_conv``. A plain autograd.Function: ``torch.library.register_autograd`` on an op
    with this many arguments costs ~200 us a call in Python (re-reading the schema per argument), more than the
    whole unit at DARTS' sizes. Under ``torch.compile`` the op is its reference (see :func:`fastdarts.backend.kernel_live`)."""

    @staticmethod
    def forward(ctx, x, dw_weight, pw_weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                dilation, training, momentum, eps):  # fmt: skip
        # (forward with ctx, not a separate setup_context: that one binds the arguments with inspect per call)
        output = torch.ops.fastdarts_C.dil_conv(
            x, dw_weight, pw_weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
            training, momentum, eps,
        )  # fmt: skip
        _, d, p, mean, invstd, new_mean, new_var = output
        ctx.mark_non_differentiable(d, p, mean, invstd, new_mean, new_var)
        ctx.set_materialize_grads(False)
        # The running statistics are updated in place after this, so they are kept only where the backward reads
        # them (eval mode).
        stats = (None, None) if training else (running_mean, running_var)
        ctx.save_for_backward(x, dw_weight, pw_weight, bn_weight, bn_bias, *stats, d, p, mean, invstd)
        ctx.geometry, ctx.training, ctx.eps = (stride, padding, dilation), training, eps
        return output

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_):
        saved = ctx.saved_tensors
        x, dw_weight, pw_weight, bn_weight, bn_bias, running_mean, running_var, d, p, mean, invstd = saved
        needs = ctx.needs_input_grad[:5]
        nothing = (None,) * (13 - 5)
        if grad is None or not any(needs):
            return (None,) * 5 + nothing
        if torch.is_grad_enabled():
            # create_graph: differentiate the reference (same statistics, no running update) so that the gradient
            # is differentiable again.
            params = (x, dw_weight, pw_weight, bn_weight, bn_bias)
            wanted = [t for t, need in zip(params, needs) if need]
            y = dil_conv_ref(*params, running_mean, running_var, *ctx.geometry, ctx.training, 0.0, ctx.eps)
            found = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
            return tuple(next(found) if need else None for need in needs) + nothing
        grads = torch.ops.fastdarts_C.dil_conv_backward(
            grad, x, dw_weight, pw_weight, bn_weight, d, p, mean, invstd, *ctx.geometry, ctx.training,
            [bool(n) for n in needs],
        )  # fmt: skip
        return tuple(g if need else None for g, need in zip(grads, needs)) + nothing


def _register() -> None:
    def fake(x, dw_weight, pw_weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
             training, momentum, eps):  # fmt: skip
        B, C, Ho, Wo = _output_shape(
            "dil_conv", x, dw_weight, stride, padding, dilation, weight_name="dw_weight"
        )
        C_out = pw_weight.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        update = training and running_mean is not None
        return (
            x.new_empty(B, C_out, Ho, Wo),
            x.new_empty(B, C, Ho, Wo, dtype=acc),
            x.new_empty(B, C_out, Ho, Wo, dtype=acc),
            x.new_empty(C_out, dtype=acc),
            x.new_empty(C_out, dtype=acc),
            running_mean.new_empty(C_out) if update else x.new_empty(0, dtype=acc),
            running_var.new_empty(C_out) if update else x.new_empty(0, dtype=acc),
        )

    def fake_backward(grad, x, dw_weight, pw_weight, bn_weight, d, p, mean, invstd, stride, padding, dilation,
                      training, output_mask):  # fmt: skip
        bn_like = x if bn_weight is None else bn_weight
        shapes = (x, dw_weight, pw_weight, bn_like, bn_like)
        has_bn = bn_weight is not None
        return tuple(
            t.new_empty(t.shape) if m and (i < 3 or has_bn) else t.new_empty(0)
            for i, (t, m) in enumerate(zip(shapes, output_mask))
        )

    torch.library.register_fake("fastdarts_C::dil_conv", fake)
    torch.library.register_fake("fastdarts_C::dil_conv_backward", fake_backward)


if backend.extension_loaded():
    _register()
