"""depthwise_conv: the per-channel k x k convolution inside DARTS' sep_conv and dil_conv candidates.

``out[b, c] = x[b, c] (*) weight[c, 0]`` with stride ``s``, zero padding ``p`` and dilation ``d``: the same as
``F.conv2d(x, weight, stride=s, padding=p, dilation=d, groups=C)``. ``depthwise_conv_ref`` is that call, the oracle
and the fallback. ``depthwise_conv`` is a ``torch.library`` custom op running csrc/ops/depthwise_conv.cpp on CPU
(where oneDNN's per-call cost dominates at DARTS' sizes) and the reference elsewhere (cuDNN on CUDA). Its backward
is the custom op ``fastdarts::depthwise_conv_backward``, itself differentiable (double backward for the exact
Hessian-vector product).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts import backend
from fastdarts.errors import UsageError

__all__ = ["depthwise_conv", "depthwise_conv_ref"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _output_shape(
    op: str, x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, weight_name: str = "weight"
) -> tuple:
    """The output shape [B, C, Ho, Wo]; raises UsageError naming the bad value (mirrors csrc check_inputs)."""
    if x.dim() != 4:
        raise UsageError(f"{op}: x has shape {tuple(x.shape)}, expected 4 dims [B, C, H, W]")
    if x.dtype not in _DTYPES:
        raise UsageError(f"{op}: x has dtype {x.dtype}, expected one of float32, float64, float16, bfloat16")
    B, C, H, W = x.shape
    if (
        weight.dim() != 4
        or weight.shape[0] != C
        or weight.shape[1] != 1
        or weight.shape[2] != weight.shape[3]
    ):
        raise UsageError(
            f"{op}: {weight_name} has shape {tuple(weight.shape)}, expected ({C}, 1, k, k) for x with {C} channels"
        )
    if weight.dtype != x.dtype and not backend.autocast_enabled(x.device):  # autocast casts them itself
        raise UsageError(f"{op}: {weight_name} has dtype {weight.dtype}, expected {x.dtype} like x")
    if weight.device != x.device:
        raise UsageError(f"{op}: {weight_name} is on {weight.device}, expected {x.device} like x")
    for name, value, least in (("stride", stride, 1), ("dilation", dilation, 1), ("padding", padding, 0)):
        if value < least:
            raise UsageError(f"{op}: {name} is {value}, expected >= {least}")
    span = dilation * (weight.shape[2] - 1) + 1
    if H + 2 * padding < span or W + 2 * padding < span:
        raise UsageError(
            f"{op}: x has shape {tuple(x.shape)}, too small for a {weight.shape[2]}x{weight.shape[2]} kernel "
            f"with dilation {dilation} and padding {padding}"
        )
    return B, C, (H + 2 * padding - span) // stride + 1, (W + 2 * padding - span) // stride + 1


def depthwise_conv_ref(
    x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1
) -> Tensor:
    """Pure-PyTorch depthwise convolution: the oracle of :func:`depthwise_conv` and its fallback.

    Args:
        x: ``[B, C, H, W]``, float32, float64, float16 or bfloat16.
        weight: ``[C, 1, k, k]``, the dtype and device of ``x``.
        stride, padding, dilation: as in ``F.conv2d`` (one value for both spatial dims).

    Returns:
        ``[B, C, Ho, Wo]`` with ``Ho = (H + 2p - d(k - 1) - 1) // s + 1`` (and Wo alike), contiguous.
    """
    _output_shape("depthwise_conv_ref", x, weight, stride, padding, dilation)
    out = F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])
    return out.contiguous()


def _depthwise_conv(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """Depthwise convolution, ``F.conv2d(x, weight, stride=s, padding=p, dilation=d, groups=C)``.

    Runs csrc/ops/depthwise_conv.cpp on CPU when :func:`fastdarts.backend.kernel_live` says so (fp32
    accumulation, fp64 for fp64), and :func:`depthwise_conv_ref` otherwise. Differentiable any number of times.

    Args:
        x: ``[B, C, H, W]``, float32, float64, float16 or bfloat16.
        weight: ``[C, 1, k, k]``, the dtype and device of ``x``.
        stride, padding, dilation: as in ``F.conv2d``.

    Returns:
        ``[B, C, Ho, Wo]``, contiguous.

    Raises:
        UsageError: a bad shape, dtype, device or geometry, e.g.
            "depthwise_conv: weight has shape (8, 1, 3, 3), expected (16, 1, k, k) for x with 16 channels".
    """
    _output_shape("depthwise_conv", x, weight, stride, padding, dilation)
    if backend.kernel_live("depthwise_conv", x.device):
        return torch.ops.fastdarts_C.depthwise_conv(x, weight, stride, padding, dilation)
    return depthwise_conv_ref(x, weight, stride, padding, dilation)


depthwise_conv = torch.library.custom_op("fastdarts::depthwise_conv", _depthwise_conv, mutates_args=())
depthwise_conv.__doc__ = _depthwise_conv.__doc__


@depthwise_conv.register_fake
def _depthwise_conv_fake(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    return x.new_empty(_output_shape("depthwise_conv", x, weight, stride, padding, dilation))


def _depthwise_conv_backward(
    grad: Tensor, x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, output_mask: list[bool]
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_weight)`` of :func:`depthwise_conv`; an entry whose ``output_mask`` is False is returned
    as an empty tensor and not computed."""
    shape = _output_shape("depthwise_conv_backward", x, weight, stride, padding, dilation)
    if grad.shape != shape:
        raise UsageError(f"depthwise_conv_backward: grad has shape {tuple(grad.shape)}, expected {shape}")
    if backend.kernel_live("depthwise_conv_backward", x.device):
        grad_x, grad_weight = torch.ops.fastdarts_C.depthwise_conv_backward(
            grad, x, weight, stride, padding, dilation, output_mask
        )
    else:
        grad_x, grad_weight = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], x.shape[1],
            [*output_mask, False],
        )[:2]  # fmt: skip
    empty = x.new_empty(0)
    return (grad_x.contiguous() if output_mask[0] else empty, grad_weight if output_mask[1] else empty)


depthwise_conv_backward = torch.library.custom_op(
    "fastdarts::depthwise_conv_backward", _depthwise_conv_backward, mutates_args=()
)


@depthwise_conv_backward.register_fake
def _depthwise_conv_backward_fake(grad, x, weight, stride, padding, dilation, output_mask):
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if output_mask[0] else empty,
        weight.new_empty(weight.shape) if output_mask[1] else empty,
    )


# ---- autograd ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation)


def _grad(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:2]]
    if not any(mask):
        return None, None, None, None, None
    grad_x, grad_weight = depthwise_conv_backward(grad.contiguous(), x, weight, *ctx.geometry, mask)
    return (grad_x if mask[0] else None), (grad_weight if mask[1] else None), None, None, None


def _backward_setup_context(ctx, inputs, output) -> None:
    grad, x, weight, stride, padding, dilation, output_mask = inputs
    ctx.save_for_backward(grad, x, weight)
    ctx.geometry = (stride, padding, dilation)
    ctx.output_mask = output_mask


def _backward_grad(ctx, gg_x: Tensor, gg_weight: Tensor):
    # grad_x = conv_T(grad, weight) and grad_weight = corr(grad, x) are bilinear, so with gg_x, gg_weight the
    # gradients arriving at them: d/dgrad = conv(gg_x, weight) + conv(x, gg_weight),
    # d/dx = conv_T(grad, gg_weight), d/dweight = corr(grad, gg_x) -- the same two ops again.
    grad, x, weight = ctx.saved_tensors
    need_grad, need_x, need_weight = ctx.needs_input_grad[:3]
    use_x, use_weight = (
        m and t is not None and t.numel() > 0 for m, t in zip(ctx.output_mask, (gg_x, gg_weight))
    )
    geometry = ctx.geometry
    d_grad = d_x = d_weight = None
    if need_grad:
        d_grad = torch.zeros_like(grad)
        if use_x:
            d_grad = d_grad + depthwise_conv(gg_x, weight, *geometry)
        if use_weight:
            d_grad = d_grad + depthwise_conv(x, gg_weight, *geometry)
    if need_x and use_weight:
        d_x = depthwise_conv_backward(grad, x, gg_weight, *geometry, [True, False])[0]
    if need_weight and use_x:
        d_weight = depthwise_conv_backward(grad, gg_x, weight, *geometry, [False, True])[1]
    return d_grad, d_x, d_weight, None, None, None, None


def _vmap(info, in_dims, x, weight, stride, padding, dilation):
    """vmap over N: the N depthwise convolutions are one, of N * C channels ([B, N * C, H, W] by [N * C, 1, k, k]);
    an unbatched x or weight is repeated N times."""
    n = info.batch_size
    x_dim, w_dim = in_dims[:2]
    x = x.movedim(x_dim, 1) if x_dim is not None else x.unsqueeze(1).expand(-1, n, -1, -1, -1)
    weight = weight.movedim(w_dim, 0) if w_dim is not None else weight.expand(n, *weight.shape)
    B, _, C, H, W = x.shape
    out = depthwise_conv(x.reshape(B, n * C, H, W), weight.reshape(n * C, *weight.shape[2:]), stride, padding,
                         dilation)  # fmt: skip
    return out.view(B, n, C, *out.shape[2:]), 1


depthwise_conv.register_autograd(_grad, setup_context=_setup_context)
depthwise_conv.register_vmap(_vmap)
depthwise_conv_backward.register_autograd(_backward_grad, setup_context=_backward_setup_context)
