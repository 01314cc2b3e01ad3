"""Differentiable DARTS ops: each kernel op runs its compiled kernels (``torch.ops.fastdarts_C``, with fake
kernels for FakeTensor tracing) where they are live (see :func:`fastdarts.backend.kernel_live`) and its pure-PyTorch
``<op>_ref`` everywhere else (``fd_hvp`` is plain PyTorch multi-tensor ops)."""

from fastdarts.ops.depthwise_conv import depthwise_conv, depthwise_conv_ref
from fastdarts.ops.dil_conv import dil_conv, dil_conv_ref
from fastdarts.ops.fd_hvp import fd_hvp, fd_hvp_batched, fd_hvp_ref
from fastdarts.ops.mixed_op import mixed_op, mixed_op_ref
from fastdarts.ops.partial_channel import channel_shuffle, partial_channel, partial_channel_ref
from fastdarts.ops.pool_bn import pool_bn, pool_bn_ref

__all__ = [
    "channel_shuffle",
    "depthwise_conv",
    "depthwise_conv_ref",
    "dil_conv",
    "dil_conv_ref",
    "fd_hvp",
    "fd_hvp_batched",
    "fd_hvp_ref",
    "mixed_op",
    "mixed_op_ref",
    "partial_channel",
    "partial_channel_ref",
    "pool_bn",
    "pool_bn_ref",
]
