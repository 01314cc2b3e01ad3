"""mixed_op: the DARTS softmax-weighted sum of candidate outputs, ``out = sum_k weights[k] * xs[k]``.

``mixed_op_ref`` is the pure-PyTorch oracle and fallback. ``mixed_op`` runs the compiled operators
``fastdarts_C::mixed_op`` / ``mixed_op_backward`` (csrc/ops/mixed_op.cpp on CPU, csrc/ops/cuda/mixed_op.cu on
CUDA) when :func:`fastdarts.backend.kernel_live` says so, and the reference otherwise. The operators have fake
kernels registered here (FakeTensor tracing, ``opcheck``); the autograd is the ``torch.autograd.Function``
``_MixedOp`` (a ``custom_op`` wrapper cost ~300 us per edge forward+backward on a 2-core CPU, as much as the
kernels), whose double backward differentiates the reference formulas.
"""

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from fastdarts import backend
from fastdarts.errors import UsageError

__all__ = ["mixed_op", "mixed_op_backward", "mixed_op_ref"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_MAX_K = 16  # the CUDA kernel takes at most this many inputs; more go to the reference


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(op: str, xs: Sequence[Tensor], weights: Tensor, grad: Tensor | None = None) -> None:
    """Raises UsageError naming the bad value and what was expected (mirrors csrc/ops/mixed_op.h)."""
    if len(xs) == 0:
        raise UsageError(f"{op}: xs is empty, expected at least one tensor")
    x0 = xs[0]
    autocast = backend.autocast_enabled(x0.device)  # the candidates' outputs may then differ in dtype
    if x0.dtype not in _DTYPES:
        raise UsageError(
            f"{op}: xs[0] has dtype {x0.dtype}, expected one of float32, float64, float16, bfloat16"
        )
    for k, x in enumerate(xs[1:], start=1):
        if x.shape != x0.shape:
            raise UsageError(
                f"{op}: xs[{k}] has shape {tuple(x.shape)}, expected {tuple(x0.shape)} like xs[0]"
            )
        if x.dtype != x0.dtype and not autocast:
            raise UsageError(f"{op}: xs[{k}] has dtype {x.dtype}, expected {x0.dtype} like xs[0]")
        if x.device != x0.device:
            raise UsageError(f"{op}: xs[{k}] is on {x.device}, expected {x0.device} like xs[0]")
    K = len(xs)
    if weights.dim() != 1 or weights.shape[0] != K:
        raise UsageError(f"{op}: weights has shape {tuple(weights.shape)}, expected ({K},) for {K} inputs")
    if weights.dtype not in (torch.float32, x0.dtype) and not autocast:
        allowed = "torch.float32" if x0.dtype == torch.float32 else f"torch.float32 or {x0.dtype}"
        raise UsageError(f"{op}: weights has dtype {weights.dtype}, expected {allowed} like xs")
    if weights.device != x0.device:
        raise UsageError(f"{op}: weights is on {weights.device}, expected {x0.device} like xs")
    if grad is not None:
        if grad.shape != x0.shape:
            raise UsageError(
                f"{op}: grad has shape {tuple(grad.shape)}, expected {tuple(x0.shape)} like xs[0]"
            )
        if grad.dtype != x0.dtype and not autocast:
            raise UsageError(f"{op}: grad has dtype {grad.dtype}, expected {x0.dtype} like xs")
        if grad.device != x0.device:
            raise UsageError(f"{op}: grad is on {grad.device}, expected {x0.device} like xs")


def mixed_op_ref(xs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Pure-PyTorch mixed op: the oracle of :func:`mixed_op` and its fallback.

    ``out = sum_k weights[k] * xs[k]``, accumulated in fp32 (fp64 for fp64 inputs) and returned in the dtype
    of ``xs``. Works on any layout (non-contiguous inputs included) and is differentiable by autograd. Under
    ``torch.autocast`` the inputs may differ in dtype (a skip of an fp32 state beside bf16 convolutions); the
    result then has their promoted dtype, as their sum in PyTorch would.

    Args:
        xs: K >= 1 tensors of one shape (normally ``[B, C, H, W]``), dtype (float32, float64, float16 or
            bfloat16) and device: the outputs of the candidate operations.
        weights: ``[K]``, float32 or the dtype of ``xs``, on the device of ``xs``: the (already softmaxed)
            architecture weights.

    Returns:
        ``[B, C, H, W]`` (the shape of ``xs[0]``), in the dtype of ``xs``.

    Raises:
        UsageError: the inputs disagree in count, shape, dtype or device.
    """
    _check_inputs("mixed_op_ref", xs, weights)
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    acc = _acc_dtype(dtype)
    w = weights.to(acc)
    out = w[0] * xs[0].to(acc)
    for k in range(1, len(xs)):
        out = out + w[k] * xs[k].to(acc)
    return out.to(dtype)


def _grad_xs_ref(grad: Tensor, weights: Tensor) -> list[Tensor]:
    """grad_xs[k] = weights[k] * grad, computed in the accumulation dtype."""
    g = grad.to(_acc_dtype(grad.dtype))
    w = weights.to(g.dtype)
    return [(w[k] * g).to(grad.dtype) for k in range(weights.shape[0])]


def _grad_weights_ref(grad: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """grad_weights[k] = <grad, xs[k]>, in the accumulation dtype."""
    g = grad.to(_acc_dtype(grad.dtype))
    return torch.stack([(g * x.to(g.dtype)).sum() for x in xs])


# ---- memory layout of the outputs (mirrors FlatTensors in csrc/ops/mixed_op.h: keep them in sync) ----------


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a dense block of memory without overlap (c10's is_non_overlapping_and_dense)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s >= 2), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _output_strides(tensors: Sequence[Tensor]) -> tuple[int, ...] | None:
    """Strides of the kernels' outputs: those of ``tensors[0]`` when every tensor has exactly those strides
    over dense memory (all contiguous, all channels-last...), else None, meaning contiguous."""
    first = tensors[0]
    if _non_overlapping_and_dense(first) and all(t.stride() == first.stride() for t in tensors[1:]):
        return first.stride()
    return None


def _new_output(tensors: Sequence[Tensor]) -> Tensor:
    first = tensors[0]
    strides = _output_strides(tensors)
    return first.new_empty(first.shape) if strides is None else first.new_empty_strided(first.shape, strides)


def _in_output_layout(t: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``t`` in the layout the kernels would give it (so that every path matches the fake kernels)."""
    strides = _output_strides(tensors)
    if strides is None:
        return t.contiguous()
    if t.stride() == strides:
        return t
    return t.new_empty_strided(t.shape, strides).copy_(t)


def _use_kernel(op: str, xs: Sequence[Tensor]) -> bool:
    device = xs[0].device
    return backend.kernel_live(op, device) and (device.type != "cuda" or len(xs) <= _CUDA_MAX_K)


# ---- the op --------------------------------------------------------------------------------------------


def mixed_op(xs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Mixed op of DARTS: the weighted sum of the candidate outputs, ``out = sum_k weights[k] * xs[k]``.

    Runs the fused kernel of ``fastdarts._C`` (one pass over memory, fp32 accumulation) on CPU and CUDA when
    :func:`fastdarts.backend.kernel_live` says it is live, and :func:`mixed_op_ref` otherwise (no compiled
    extension, backend "reference", another device, or more than 16 inputs on CUDA). Differentiable any number of
    times: the gradients are ``grad_xs[k] = weights[k] * grad_out`` and ``grad_weights[k] = <grad_out, xs[k]>``
    (accumulated in fp32, fp64 for fp64, returned in the dtype of ``weights``). Works with
    ``torch.compile(fullgraph=True)``, which compiles the reference.

    Args:
        xs: K >= 1 tensors of one shape (normally ``[B, C, H, W]``), dtype (float32, float64, float16 or
            bfloat16) and device: the outputs of the candidate operations ('none' is left out by callers).
        weights: ``[K]``, float32 or the dtype of ``xs``, on the device of ``xs``: the architecture weights,
            already softmaxed.

    Returns:
        ``[B, C, H, W]`` (the shape of ``xs[0]``) in the dtype of ``xs``; it has the strides of the inputs when
        they all share one dense layout (e.g. channels-last), else it is contiguous.

    Raises:
        UsageError: the inputs disagree in count, shape, dtype or device, e.g.
            "mixed_op: weights has shape (7,), expected (8,) for 8 inputs".
    """
    _check_inputs("mixed_op", xs, weights)
    if _use_kernel("mixed_op", xs):
        return _MixedOp.apply(weights, *xs)
    return _in_output_layout(mixed_op_ref(xs, weights), xs)


def mixed_op_backward(grad: Tensor, xs: Sequence[Tensor], weights: Tensor) -> tuple[list[Tensor], Tensor]:
    """Both gradients of :func:`mixed_op` in one pass over ``grad`` and ``xs`` (not differentiable).

    Args:
        grad: ``[B, C, H, W]``, the gradient of the output, in the dtype of ``xs``.
        xs: K tensors ``[B, C, H, W]``, the inputs of the forward.
        weights: ``[K]``, the weights of the forward.

    Returns:
        ``(grad_xs, grad_weights)``: K tensors ``grad_xs[k] = weights[k] * grad`` (dtype of ``xs``) and
        ``grad_weights[k] = <grad, xs[k]>``, ``[K]`` in the dtype of ``weights`` (accumulated in fp32, fp64
        for fp64).
    """
    _check_inputs("mixed_op_backward", xs, weights, grad)
    if _use_kernel("mixed_op_backward", xs):
        grad_xs, grad_weights = torch.ops.fastdarts_C.mixed_op_backward(grad, list(xs), weights)
        return list(grad_xs), grad_weights
    tensors = [*xs, grad]
    grad_xs = [_in_output_layout(gx, tensors) for gx in _grad_xs_ref(grad, weights)]
    return grad_xs, _grad_weights_ref(grad, xs).to(weights.dtype)


class _MixedOp(torch.autograd.Function):
    """Autograd of ``fastdarts_C::mixed_op`` (inputs: weights, then the K tensors)."""

    @staticmethod
    def forward(ctx, weights: Tensor, *xs: Tensor) -> Tensor:
        ctx.save_for_backward(weights, *xs)
        return torch.ops.fastdarts_C.mixed_op(list(xs), weights)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, *xs = ctx.saved_tensors
        weights_need, *xs_need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph: the reference formulas, differentiable in grad, xs and weights (double backward)
            grad_xs = _grad_xs_ref(grad, weights) if any(xs_need) else [None] * len(xs)
            grad_weights = _grad_weights_ref(grad, xs).to(weights.dtype) if weights_need else None
        elif any(xs_need) and weights_need:
            grad_xs, grad_weights = torch.ops.fastdarts_C.mixed_op_backward(grad, xs, weights)
        elif any(xs_need):  # frozen weights: the dot products are not needed
            grad_xs, grad_weights = _grad_xs_ref(grad, weights), None
        elif weights_need:  # constant candidates: grad_xs is not needed
            grad_xs, grad_weights = [None] * len(xs), _grad_weights_ref(grad, xs).to(weights.dtype)
        else:
            return (None,) * (1 + len(xs))
        return grad_weights, *(gx if need else None for gx, need in zip(grad_xs, xs_need))


def _register() -> None:
    def fake(xs, weights):
        _check_inputs("mixed_op", xs, weights)
        return _new_output(xs)

    def fake_backward(grad, xs, weights):
        _check_inputs("mixed_op_backward", xs, weights, grad)
        tensors = [*xs, grad]
        return [_new_output(tensors) for _ in xs], weights.new_empty(weights.shape)

    torch.library.register_fake("fastdarts_C::mixed_op", fake)
    torch.library.register_fake("fastdarts_C::mixed_op_backward", fake_backward)


if backend.extension_loaded():
    _register()
