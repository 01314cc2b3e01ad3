"""Differentiable DARTS ops: each a ``torch.library`` custom op backed by compiled kernels where they are live
(see :func:`fastdarts.backend.info`) and by its pure-PyTorch ``<op>_ref`` everywhere else."""

from fastdarts.ops.mixed_op import mixed_op, mixed_op_ref

__all__ = ["mixed_op", "mixed_op_ref"]
