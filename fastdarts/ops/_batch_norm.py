"""Input checks shared by the ops that end in a BatchNorm (dil_conv, pool_bn); mirrors csrc/ops/batch_norm.h."""

import torch
from torch import Tensor

from fastdarts.errors import UsageError


def check_pair(op: str, names: tuple[str, str], pair: tuple[Tensor | None, Tensor | None], C: int) -> None:
    """Raises UsageError unless both of ``pair`` are None or both are ``[C]`` (BatchNorm's per-channel tensors)."""
    if (pair[0] is None) != (pair[1] is None):
        raise UsageError(f"{op}: {names[0]} and {names[1]} must be given together or both be None")
    for name, t in zip(names, pair):
        if t is not None and tuple(t.shape) != (C,):
            raise UsageError(
                f"{op}: {name} has shape {tuple(t.shape)}, expected ({C},) for {C} output channels"
            )


def check_stats(
    op: str, running_mean: Tensor | None, running_var: Tensor | None, C: int, training: bool
) -> None:
    """Raises UsageError for running statistics that are not both None or both ``[C]``, or missing in eval mode."""
    check_pair(op, ("running_mean", "running_var"), (running_mean, running_var), C)
    if not training and running_mean is None:
        raise UsageError(
            f"{op}: training is False but running_mean and running_var are None: eval mode normalises with them"
        )


def copy_running(
    running: tuple[Tensor | None, Tensor | None], new: tuple[Tensor, Tensor], training: bool
) -> None:
    """Copies a kernel's new running statistics into the module's buffers (when training with them)."""
    if training and running[0] is not None:
        with torch.no_grad():
            torch._foreach_copy_(list(running), list(new))
