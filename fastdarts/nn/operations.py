"""The candidate operations of the DARTS CNN space.

Module and parameter names follow quark0/darts `cnn/operations.py` (`op.0`, `op.1`, ... inside an
`nn.Sequential`), so that state_dicts of the original code base map onto ours one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastdarts import backend, ops


class ReLUConvBN(nn.Module):
    """ReLU -> Conv(k x k) -> BatchNorm. [B, C_in, H, W] -> [B, C_out, H / stride, W / stride]."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class DepthwiseConv2d(nn.Conv2d):
    """The depthwise convolution of sep_conv and dil_conv: an ``nn.Conv2d`` with ``groups == C`` and no bias
    (so its ``weight`` [C, 1, k, k] keeps DARTS' name and shape) computed by :func:`fastdarts.ops.depthwise_conv`."""

    def __init__(self, C: int, kernel_size: int, stride: int, padding: int, dilation: int = 1):
        super().__init__(C, C, kernel_size, stride, padding, dilation=dilation, groups=C, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return ops.depthwise_conv(x, self.weight, self.stride[0], self.padding[0], self.dilation[0])


def _dil_conv_unit(x: Tensor, dw: DepthwiseConv2d, pw: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """ReLU -> dw -> pw -> bn as one :func:`fastdarts.ops.dil_conv` call, with ``bn``'s module semantics."""
    running_mean, running_var, training, momentum = bn_call(bn)
    return ops.dil_conv(
        x, dw.weight, pw.weight, bn.weight, bn.bias, running_mean, running_var, dw.stride[0], dw.padding[0],
        dw.dilation[0], training, momentum, bn.eps,
    )  # fmt: skip


class DilConv(nn.Module):
    """ReLU -> depthwise dilated conv -> pointwise conv -> BatchNorm, one :func:`fastdarts.ops.dil_conv`."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool = True,
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, stride, padding, dilation),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _units_forward(self, x)

    def fused_units(self) -> tuple[Unit, ...] | None:
        """Its fused units (see :func:`dil_conv_units`)."""
        return relu_units(tuple(self.op))


def dil_conv_block(block: nn.Sequential, x: Tensor) -> Tensor:
    """Run ``block`` = (ReLU, depthwise conv, pointwise conv, BatchNorm) as one fused unit, or as the modules
    themselves when its activation was swapped for another."""
    relu, dw, pw, bn = block
    if type(relu) is not nn.ReLU:
        return block(x)
    return _dil_conv_unit(x, dw, pw, bn)


class SepConv(nn.Module):
    """Two stacked (ReLU -> depthwise conv -> pointwise conv -> BatchNorm), two :func:`fastdarts.ops.dil_conv`;
    only the first one strides."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, stride, padding),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            DepthwiseConv2d(C_in, kernel_size, 1, padding),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _units_forward(self, x)

    def fused_units(self) -> tuple[Unit, ...] | None:
        """Its fused units (see :func:`dil_conv_units`)."""
        return relu_units(tuple(self.op))


Unit = tuple[nn.Conv2d, nn.Conv2d, nn.BatchNorm2d]
"""(depthwise conv, pointwise conv, BatchNorm) after a ReLU: what one :func:`fastdarts.ops.dil_conv` computes."""


def relu_units(mods: Sequence[nn.Module]) -> tuple[Unit, ...] | None:
    """(ReLU, depthwise conv, pointwise conv, BatchNorm) repeated, as its units; None when an activation was
    swapped for another."""
    if any(type(m) is not nn.ReLU for m in mods[::4]):
        return None
    return tuple((mods[i + 1], mods[i + 2], mods[i + 3]) for i in range(0, len(mods), 4))


def dil_conv_units(module: nn.Module) -> tuple[Unit, ...] | None:
    """The fused units of a candidate that has them, in order: a :class:`DilConv` (one), a :class:`SepConv` (two) or
    a compat layer's own such class (its ``fused_units()``); None for any other module, or when an activation was
    swapped for another (the module then runs as its own modules)."""
    fused_units = getattr(type(module), "fused_units", None)
    return fused_units(module) if fused_units is not None else None


def _units_forward(module: nn.Module, x: Tensor) -> Tensor:
    """A DilConv or SepConv as its fused units in order, or as its own modules when an activation was swapped."""
    units = dil_conv_units(module)
    if units is None:
        return module.op(x)
    for unit in units:
        x = _dil_conv_unit(x, *unit)
    return x


def bn_call(bn: nn.BatchNorm2d, counters: list[Tensor] | None = None) -> tuple:
    """(running_mean, running_var, training, momentum) for a functional BatchNorm call on behalf of ``bn``, with
    the semantics of ``nn.BatchNorm2d.forward`` (num_batches_tracked, momentum None as a cumulative average).
    counters: where given, ``num_batches_tracked`` is appended to it for the caller to advance with the others in
    one multi-tensor add, instead of advanced here."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if counters is None:
            bn.num_batches_tracked.add_(1)
            batches = bn.num_batches_tracked
        else:
            counters.append(bn.num_batches_tracked)
            batches = bn.num_batches_tracked + 1
        if bn.momentum is None:
            momentum = 1.0 / float(batches)
    track = not bn.training or bn.track_running_stats
    batch_stats = bn.training or bn.running_mean is None
    return (bn.running_mean if track else None, bn.running_var if track else None, batch_stats, momentum)


class PoolBN(nn.Sequential):
    """A DARTS pooling candidate: ``nn.Sequential(pool, nn.BatchNorm2d(C, affine=False))`` (so its state_dict keys are
    ``0.*`` / ``1.*`` as in DARTS' MixedOp), computed by :func:`pool_bn_block`."""

    def __init__(self, pool: nn.Module, bn: nn.BatchNorm2d):
        super().__init__(pool, bn)

    def forward(self, x: Tensor) -> Tensor:
        return pool_bn_block(self[0], self[1], x)

    def pool_parts(self) -> tuple[nn.Module, nn.BatchNorm2d]:
        """(pool, BatchNorm), for the fused edge (a compat layer's pooling class has the same method)."""
        return self[0], self[1]


def pool_bn_kind(pool: nn.Module, bn: nn.BatchNorm2d) -> tuple[str, int] | None:
    """("max" or "avg", stride) when pool -> bn has the shape :func:`fastdarts.ops.pool_bn` computes (3x3, padding 1,
    stride 1 or 2, average without the padding, BatchNorm without affine), else None."""
    if type(pool) not in (nn.MaxPool2d, nn.AvgPool2d):
        return None
    if bn.affine or pool.kernel_size not in (3, (3, 3)) or pool.padding not in (1, (1, 1)):
        return None
    s = pool.stride
    pair = (s, s) if isinstance(s, int) else tuple(s)
    if pair not in ((1, 1), (2, 2)):  # the kernel takes square strides 1 and 2
        return None
    if type(pool) is nn.MaxPool2d and pool.dilation in (1, (1, 1)) and not pool.ceil_mode:
        return "max", pair[0]
    if type(pool) is nn.AvgPool2d and not pool.count_include_pad and not pool.ceil_mode:
        return ("avg", pair[0]) if pool.divisor_override is None else None
    return None


def pool_bn_block(pool: nn.Module, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(pool(x))`` as one :func:`fastdarts.ops.pool_bn` call when it has DARTS' shape, else the modules."""
    kind = pool_bn_kind(pool, bn)
    if kind is None:
        return bn(pool(x))
    running_mean, running_var, training, momentum = bn_call(bn)
    return ops.pool_bn(x, kind[0], kind[1], running_mean, running_var, training, momentum, bn.eps)


class Identity(nn.Module):
    """skip_connect at stride 1."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Zero(nn.Module):
    """The `none` operation: zeros of the output shape. MixedOp never runs it (its output adds nothing)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve H and W with two 1x1 stride-2 convs on offset grids, concatenated: C_out must be even.

    On the CPU (backend "auto") the two convolutions run as matrix products over the even and the odd pixel grids
    (the same arithmetic; at DARTS' sizes oneDNN's 1x1 strided convolution spends most of its time per call: the
    module's forward and backward take half as long on this project's 2-core CPU). Modules whose parts were
    swapped run as they are."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and backend.get_backend() == "auto" and self._as_built():
            return self.bn(_factorized_halves(x, self.conv_1.weight, self.conv_2.weight))
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))

    def _as_built(self) -> bool:
        """Whether the parts are still the ReLU and the two 1x1, stride-2, bias-free convolutions built here."""
        convs = (self.conv_1, self.conv_2)
        return type(self.relu) is nn.ReLU and all(
            type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.stride == (2, 2) and c.padding == (0, 0)
            and c.dilation == (1, 1) and c.groups == 1 and c.bias is None for c in convs
        )  # fmt: skip


def _factorized_halves(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``cat([conv1x1(r[:, :, ::2, ::2], w1), conv1x1(r[:, :, 1::2, 1::2], w2)], 1)``, r = relu(x), as matrix
    products: [B, C_in, H, W] -> [B, 2 * C_half, ceil(H / 2), ceil(W / 2)] (H and W even, as FactorizedReduce
    needs)."""
    r = torch.relu(x)
    B, C_in = r.shape[:2]
    halves = []
    for w, grid in ((w1, r[:, :, ::2, ::2]), (w2, r[:, :, 1::2, 1::2])):
        Ho, Wo = grid.shape[2:]
        halves.append(
            torch.matmul(w.view(w.shape[0], C_in), grid.reshape(B, C_in, Ho * Wo)).view(B, -1, Ho, Wo)
        )
    return torch.cat(halves, dim=1)


OpFactory = Callable[[int, int, bool], nn.Module]

OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(
        3, stride=stride, padding=1, count_include_pad=False
    ),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
    "conv_7x1_1x7": lambda C, stride, affine: nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(C, affine=affine),
    ),
}
