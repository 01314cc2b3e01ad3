"""partial_channel: PC-DARTS' partial-channel edge (Xu et al., 2020) after its candidates, in one pass.

PC-DARTS runs an edge's candidates on the first c = C / groups channels of its input x, passes the other channels
through (2x2 max-pooled on a stride-2 edge) and shuffles the channels in ``groups`` groups::

    out = channel_shuffle(cat([sum_k weights[k] * xs[k], bypass(x[:, c:])]), groups)

``partial_channel_ref`` is that formula in pure PyTorch: the oracle and the fallback. ``partial_channel`` runs
the compiled operators ``fastdarts_C::partial_channel`` / ``partial_channel_backward`` (csrc/ops/
partial_channel.cpp) on CPU when :func:`fastdarts.backend.kernel_live` says so, and the Triton kernels of
fastdarts/ops/_triton/partial_channel.py on CUDA when :func:`fastdarts.backend.triton_live` does: each output
plane is written once, straight to its shuffled place, and the backward reads each gradient plane once. Output channel
``o = i * groups + g`` is the mixed channel i when g == 0 and the bypass of x channel ``g * c + i`` otherwise.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts import backend
from fastdarts.errors import UsageError
from fastdarts.ops.mixed_op import _check_inputs as _check_mixed
from fastdarts.ops.mixed_op import mixed_op_ref

__all__ = ["channel_shuffle", "partial_channel", "partial_channel_backward", "partial_channel_ref"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[B, C, H, W] -> [B, C, H, W] with channel ``g * (C / groups) + i`` moved to ``i * groups + g``."""
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


def _check_inputs(
    op: str,
    xs: Sequence[Tensor],
    weights: Tensor,
    x: Tensor,
    groups: int,
    stride: int,
    grad: Tensor | None = None,
) -> None:
    """Raises UsageError naming the bad value and what was expected (mirrors csrc/ops/partial_channel.cpp)."""
    _check_mixed(op, xs, weights)
    if x.dim() != 4:
        raise UsageError(f"{op}: x has shape {tuple(x.shape)}, expected 4 dims [B, C, H, W]")
    if x.dtype != xs[0].dtype and not backend.autocast_enabled(x.device):  # autocast: promoted by cat
        raise UsageError(f"{op}: x has dtype {x.dtype}, expected {xs[0].dtype} like xs")
    if x.device != xs[0].device:
        raise UsageError(f"{op}: x is on {x.device}, expected {xs[0].device} like xs")
    if stride not in (1, 2):
        raise UsageError(f"{op}: stride is {stride}, expected 1 or 2")
    B, C, H, W = x.shape
    if not (isinstance(groups, int) and groups >= 1 and C % groups == 0):
        raise UsageError(f"{op}: groups is {groups}, expected a divisor of the {C} channels of x")
    if stride == 2 and (H % 2 or W % 2):
        raise UsageError(
            f"{op}: x has shape {tuple(x.shape)}, expected even H and W for stride 2 (the bypass is a 2x2 max pool)"
        )
    expected = (B, C // groups, H // stride, W // stride)
    if tuple(xs[0].shape) != expected:
        raise UsageError(
            f"{op}: xs[0] has shape {tuple(xs[0].shape)}, expected {expected} "
            f"(the first C / groups = {C // groups} channels of x at stride {stride})"
        )
    if grad is not None:
        out = (B, C, H // stride, W // stride)
        if tuple(grad.shape) != out:
            raise UsageError(f"{op}: grad has shape {tuple(grad.shape)}, expected {out} like the output")
        if grad.dtype != x.dtype:
            raise UsageError(f"{op}: grad has dtype {grad.dtype}, expected {x.dtype} like x")


def partial_channel_ref(xs: Sequence[Tensor], weights: Tensor, x: Tensor, groups: int, stride: int) -> Tensor:
    """Pure-PyTorch partial-channel edge: the oracle of :func:`partial_channel` and its fallback.

    Args:
        xs: K >= 1 tensors ``[B, C / groups, H / stride, W / stride]``: the candidates' outputs on ``x[:, :c]``.
        weights: ``[K]``, the candidates' (softmaxed) weights, float32 or the dtype of ``xs``.
        x: ``[B, C, H, W]``, the edge's input, in the dtype of ``xs`` (H and W even for stride 2).
        groups: the PC-DARTS K: 1 / groups of the channels go through the candidates.
        stride: 1, or 2 on a reduction edge (the bypass is then a 2x2 max pool with stride 2).

    Returns:
        ``[B, C, H / stride, W / stride]`` in the dtype of ``xs``, contiguous.
    """
    _check_inputs("partial_channel_ref", xs, weights, x, groups, stride)
    mixed = mixed_op_ref(xs, weights)
    if groups == 1:  # no bypass: the whole mixed op
        return mixed.contiguous()
    rest = x[:, x.shape[1] // groups :]
    if stride == 2:
        rest = F.max_pool2d(rest, 2, 2)
    return channel_shuffle(torch.cat([mixed, rest], dim=1), groups).contiguous()


def _grads_ref(
    grad, xs, weights, x, groups, stride, create_graph: bool
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The three gradients by autograd through the reference; with create_graph, differentiable once more in
    grad and in the inputs as given (the double backward), else of detached copies of the inputs."""
    inputs = [*xs, weights, x]
    if create_graph:
        # Views: each gradient counts only the paths through this call, not those by which the inputs depend on one
        # another (PC-DARTS' xs are computed from x's first channels), while staying differentiable back into them.
        inputs = [t.view_as(t) for t in inputs]
    else:
        inputs = [t.detach().requires_grad_() for t in inputs]
    wanted = [t for t in inputs if t.requires_grad]
    with torch.enable_grad():
        out = partial_channel_ref(inputs[:-2], inputs[-2], inputs[-1], groups, stride)
        got = iter(
            torch.autograd.grad(
                out, wanted, grad, create_graph=create_graph, allow_unused=True, materialize_grads=True
            )
        )
    grads = [next(got) if t.requires_grad else torch.zeros_like(t) for t in inputs]
    return grads[:-2], grads[-2], grads[-1]


def partial_channel(xs: Sequence[Tensor], weights: Tensor, x: Tensor, groups: int, stride: int) -> Tensor:
    """PC-DARTS' partial-channel edge: weighted candidates, bypass and channel shuffle, written in one pass.

    ``out = channel_shuffle(cat([sum_k weights[k] * xs[k], bypass(x[:, c:])]), groups)`` with ``c = C / groups``
    and bypass the identity (stride 1) or a 2x2 max pool (stride 2). Runs the fused kernel of ``fastdarts._C``
    on CPU and the Triton kernel on CUDA where they are live (:func:`fastdarts.backend.info`),
    :func:`partial_channel_ref` otherwise.
    Differentiable any number of times; ``x`` gets the bypass's gradient only (its first c channels reach the
    output through ``xs``). Works with ``torch.compile(fullgraph=True)``, which compiles the reference.

    Args:
        xs: K >= 1 tensors ``[B, C / groups, H / stride, W / stride]`` (float32, float64, float16 or bfloat16):
            the outputs of the candidates ('none' left out) on ``x[:, :C / groups]``.
        weights: ``[K]``, float32 or the dtype of ``xs``: the candidates' softmaxed architecture weights.
        x: ``[B, C, H, W]``, the edge's input, in the dtype of ``xs``.
        groups: 1 / groups of the channels go through the candidates (PC-DARTS' K: 4 on CIFAR, 2 on ImageNet).
        stride: 1, or 2 on the stride-2 edges of a reduction cell (H and W must then be even).

    Returns:
        ``[B, C, H / stride, W / stride]``, contiguous, in the dtype of ``xs``.

    Raises:
        UsageError: a shape, dtype, device, ``groups`` or ``stride`` that does not fit, e.g.
            "partial_channel: groups is 3, expected a divisor of the 16 channels of x".
    """
    _check_inputs("partial_channel", xs, weights, x, groups, stride)
    kernels = _kernels(x.device)
    if kernels is None:
        return partial_channel_ref(xs, weights, x, groups, stride)
    return _PartialChannel.apply(kernels, groups, stride, weights, x, *xs)


def _kernels(device: torch.device) -> tuple[Callable, Callable] | None:
    """(forward, backward) of the live kernel for tensors on ``device``: the compiled C++ (CPU) operators, else the
    Triton kernels (CUDA), else None (the reference)."""
    if backend.kernel_live("partial_channel", device):
        return torch.ops.fastdarts_C.partial_channel, torch.ops.fastdarts_C.partial_channel_backward
    if backend.triton_live(device):
        from fastdarts.ops._triton import partial_channel as triton_kernels

        return triton_kernels.forward, triton_kernels.backward
    return None


def partial_channel_backward(
    grad: Tensor, xs: Sequence[Tensor], weights: Tensor, x: Tensor, groups: int, stride: int
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The gradients of :func:`partial_channel` in one pass (not differentiable).

    Args:
        grad: ``[B, C, H / stride, W / stride]``, the gradient of the output; the other arguments as in the
            forward.

    Returns:
        ``(grad_xs, grad_weights, grad_x)``: ``grad_xs[k] = weights[k] * grad[:, ::groups]``,
        ``grad_weights[k] = <grad[:, ::groups], xs[k]>`` (in the dtype of ``weights``, accumulated in fp32, fp64
        for fp64) and ``grad_x`` ``[B, C, H, W]``, zero in the first C / groups channels.
    """
    _check_inputs("partial_channel_backward", xs, weights, x, groups, stride, grad)
    kernels = _kernels(x.device)
    if kernels is not None:
        grad_xs, grad_weights, grad_x = kernels[1](grad, list(xs), weights, x, groups, stride)
        return list(grad_xs), grad_weights, grad_x
    return _grads_ref(grad, xs, weights, x, groups, stride, create_graph=False)


class _PartialChannel(torch.autograd.Function):
    """Autograd of a partial_channel kernel (inputs: its (forward, backward), groups, stride, weights, x, then the K
    tensors)."""

    @staticmethod
    def forward(ctx, kernels, groups: int, stride: int, weights: Tensor, x: Tensor, *xs: Tensor) -> Tensor:
        ctx.kernels, ctx.groups, ctx.stride = kernels, groups, stride
        ctx.save_for_backward(weights, x, *xs)
        return kernels[0](list(xs), weights, x, groups, stride)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, x, *xs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the reference's gradients, differentiable once more
            grad_xs, grad_weights, grad_x = _grads_ref(grad, xs, weights, x, ctx.groups, ctx.stride, True)
        else:
            grad_xs, grad_weights, grad_x = ctx.kernels[1](grad, xs, weights, x, ctx.groups, ctx.stride)
        _, _, _, w_need, x_need, *xs_need = ctx.needs_input_grad
        return (
            None,
            None,
            None,
            grad_weights if w_need else None,
            grad_x if x_need else None,
            *(g if need else None for g, need in zip(grad_xs, xs_need)),
        )


def _register() -> None:
    def fake(xs, weights, x, groups, stride):
        _check_inputs("partial_channel", xs, weights, x, groups, stride)
        B, C, H, W = x.shape
        return x.new_empty((B, C, H // stride, W // stride))

    def fake_backward(grad, xs, weights, x, groups, stride):
        _check_inputs("partial_channel_backward", xs, weights, x, groups, stride, grad)
        return (
            [xs[0].new_empty(xs[0].shape) for _ in xs],
            weights.new_empty(weights.shape),
            x.new_empty(x.shape),
        )

    torch.library.register_fake("fastdarts_C::partial_channel", fake)
    torch.library.register_fake("fastdarts_C::partial_channel_backward", fake_backward)


if backend.extension_loaded():
    _register()
