"""depthwise_conv: the per-channel k x k convolution inside DARTS' sep_conv and dil_conv candidates.

``out[b, c] = x[b, c] (*) weight[c, 0]`` with stride ``s``, zero padding ``p`` and dilation ``d``: the same as
``F.conv2d(x, weight, stride=s, padding=p, dilation=d, groups=C)``. ``depthwise_conv_ref`` is that call, the oracle
and the fallback. ``depthwise_conv`` runs ``fastdarts_C::depthwise_conv`` and its backward (csrc/ops/
depthwise_conv.cpp) on CPU, where oneDNN's per-call cost dominates at DARTS' sizes, and the reference elsewhere
(cuDNN on CUDA). Its autograd is the ``torch.autograd.Function`` ``_DepthwiseConv`` (a ``custom_op`` wrapper cost
~150 us per forward+backward on a 2-core CPU, twice the kernels' time on a 4x4 plane); its double backward
differentiates the reference, and the C++ operators have fake kernels (FakeTensor tracing, ``opcheck``).
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


def depthwise_conv(x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1) -> Tensor:
    """Depthwise convolution, ``F.conv2d(x, weight, stride=s, padding=p, dilation=d, groups=C)``.

    Runs csrc/ops/depthwise_conv.cpp on CPU when :func:`fastdarts.backend.kernel_live` says so (fp32
    accumulation, fp64 for fp64), and :func:`depthwise_conv_ref` otherwise (another device, the "reference"
    backend, autocast, ``torch.func`` transforms, torch.compile). Differentiable any number of times.

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
    if not backend.kernel_live("depthwise_conv", x.device):
        return depthwise_conv_ref(x, weight, stride, padding, dilation)
    return _DepthwiseConv.apply(x, weight, stride, padding, dilation)


class _DepthwiseConv(torch.autograd.Function):
    """Autograd of ``fastdarts_C::depthwise_conv`` (forward with ctx: no per-call argument binding)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        return torch.ops.fastdarts_C.depthwise_conv(x, weight, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:2])
        if not any(mask):
            return None, None, None, None, None
        if torch.is_grad_enabled():
            # create_graph: differentiate the reference, so that the gradient is differentiable again
            wanted = [t for t, m in zip((x, weight), mask) if m]
            found = iter(torch.autograd.grad(depthwise_conv_ref(x, weight, *ctx.geometry), wanted, grad,
                                             create_graph=True))  # fmt: skip
            grad_x, grad_weight = (next(found) if m else None for m in mask)
        else:
            grad_x, grad_weight = torch.ops.fastdarts_C.depthwise_conv_backward(
                grad.contiguous(), x, weight, *ctx.geometry, mask
            )
        return (grad_x if mask[0] else None), (grad_weight if mask[1] else None), None, None, None


def _register() -> None:
    def fake(x, weight, stride, padding, dilation):
        return x.new_empty(_output_shape("depthwise_conv", x, weight, stride, padding, dilation))

    def fake_backward(grad, x, weight, stride, padding, dilation, output_mask):
        empty = x.new_empty(0)
        return (
            x.new_empty(x.shape) if output_mask[0] else empty,
            weight.new_empty(weight.shape) if output_mask[1] else empty,
        )

    torch.library.register_fake("fastdarts_C::depthwise_conv", fake)
    torch.library.register_fake("fastdarts_C::depthwise_conv_backward", fake_backward)


if backend.extension_loaded():
    _register()
