"""Triton kernels of partial_channel (see fastdarts/ops/partial_channel.py for the formula).

One program per (output plane, block of BLOCK pixels; BLOCK from the plane's size): output channel
``o = i * groups + g`` of batch b is the weighted sum of the candidates' channel i (g == 0) or the bypass of x
channel ``g * c + i`` (identity, or the 2x2 max pool: the first maximum of the window in row-major order, NaN
winning, as ATen's). The backward program of an output block writes every gradient that block owns: the
candidates' gradients and a partial dot product per candidate (g == 0; summed on the host in a fixed order), and
the input pixels under the block in grad_x (zero for the channels the candidates read, the bypass's gradient for
the others). Accumulation in fp32 (fp64 for fp64).
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _window(plane, top_left, W, mask, ACC: tl.constexpr):
    """The maximum of each 2x2 window (compared in ACC, which holds every input value exactly) and the offset of its
    winner from the window's top left pixel."""
    best = tl.load(plane + top_left, mask=mask).to(ACC)
    arg = tl.zeros_like(top_left)
    for t in tl.static_range(1, 4):
        d = (t // 2) * W + (t % 2)
        v = tl.load(plane + top_left + d, mask=mask).to(ACC)
        take = (v > best) | (v != v)  # noqa: PLR0124 - v != v: v is NaN (NaN wins, as in ATen)
        best = tl.where(take, v, best)
        arg = tl.where(take, d, arg)
    return best, arg


@triton.jit
def _forward_kernel(out, x, w, xs, C, c, P, Wo, W, GROUPS: tl.constexpr, STRIDE: tl.constexpr,
                    K: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    bo = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    b, o = bo // C, bo % C
    g, i = o % GROUPS, o // GROUPS
    dst = out + bo.to(tl.int64) * P + offs
    if g == 0:
        src = (b * c + i).to(tl.int64) * P + offs
        acc = tl.zeros([BLOCK], ACC)
        for k in tl.static_range(K):
            acc += tl.load(w + k).to(ACC) * tl.load(xs[k] + src, mask=mask).to(ACC)
        tl.store(dst, acc.to(out.dtype.element_ty), mask=mask)
    else:
        plane = x + (b * C + g * c + i).to(tl.int64) * (P * STRIDE * STRIDE)
        if STRIDE == 1:
            tl.store(dst, tl.load(plane + offs, mask=mask), mask=mask)
        else:
            best, _ = _window(plane, 2 * (offs // Wo) * W + 2 * (offs % Wo), W, mask, ACC)
            tl.store(dst, best.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad, x, w, grad_x, partial, xs, grad_xs, C, c, P, Wo, W, GROUPS: tl.constexpr,
                     STRIDE: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    bo = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    b, o = bo // C, bo % C
    g, i = o % GROUPS, o // GROUPS
    gout = tl.load(grad + bo.to(tl.int64) * P + offs, mask=mask, other=0.0)
    top_left = 2 * (offs // Wo) * W + 2 * (offs % Wo)  # STRIDE 2: the window of each output pixel
    Pin = P * STRIDE * STRIDE
    if g == 0:
        plane = (b * c + i).to(tl.int64)
        src = plane * P + offs
        for k in tl.static_range(K):
            xk = tl.load(xs[k] + src, mask=mask, other=0.0).to(ACC)
            wk = tl.load(w + k).to(ACC)
            tl.store(grad_xs[k] + src, (wk * gout.to(ACC)).to(grad_xs[k].dtype.element_ty), mask=mask)
            tl.store(partial + (plane * tl.num_programs(1) + blk) * K + k, tl.sum(gout.to(ACC) * xk, axis=0))
        zeros = tl.zeros([BLOCK], grad_x.dtype.element_ty)
        gx = grad_x + (b * C + i).to(tl.int64) * Pin
        if STRIDE == 1:
            tl.store(gx + offs, zeros, mask=mask)
        else:
            for t in tl.static_range(4):
                tl.store(gx + top_left + (t // 2) * W + (t % 2), zeros, mask=mask)
    else:
        src_plane = (b * C + g * c + i).to(tl.int64) * Pin
        gx = grad_x + src_plane
        if STRIDE == 1:
            tl.store(gx + offs, gout, mask=mask)
        else:
            _, arg = _window(x + src_plane, top_left, W, mask, ACC)
            for t in tl.static_range(4):
                d = (t // 2) * W + (t % 2)
                tl.store(gx + top_left + d, tl.where(arg == d, gout, 0.0).to(gout.dtype), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(P: int) -> tuple[int, int, int]:
    """(BLOCK, blocks per plane, warps) for planes of P pixels: the plane rounded up to a power of two in [64, 1024],
    128 pixels a warp (16-byte accesses in fp32), so that small planes (8x8 in the last DARTS cells) leave few lanes
    masked and a large one is a few programs."""
    block = min(1024, max(64, triton.next_power_of_2(P)))
    return block, triton.cdiv(P, block), max(1, block // 128)


def forward(xs: Sequence[Tensor], weights: Tensor, x: Tensor, groups: int, stride: int) -> Tensor:
    """The output [B, C, H / stride, W / stride] (inputs checked by the caller)."""
    xs = tuple(t.contiguous() for t in xs)
    x = x.contiguous()
    B, C, H, W = x.shape
    Ho, Wo = H // stride, W // stride
    out = x.new_empty((B, C, Ho, Wo))
    if out.numel():
        block, blocks, warps = _blocks(Ho * Wo)
        _forward_kernel[(B * C, blocks)](out, x, weights.contiguous(), xs, C, C // groups, Ho * Wo, Wo, W,
                                         GROUPS=groups, STRIDE=stride, K=len(xs), ACC=_acc(x.dtype), BLOCK=block,
                                         num_warps=warps)  # fmt: skip
    return out


def backward(
    grad: Tensor, xs: Sequence[Tensor], weights: Tensor, x: Tensor, groups: int, stride: int
) -> tuple[list[Tensor], Tensor, Tensor]:
    """(grad_xs, grad_weights, grad_x), as fastdarts_C::partial_channel_backward."""
    xs = tuple(t.contiguous() for t in xs)
    x, grad = x.contiguous(), grad.contiguous()
    B, C, H, W = x.shape
    c, Ho, Wo = C // groups, H // stride, W // stride
    grad_xs = tuple(torch.empty_like(t) for t in xs)
    grad_x = torch.empty_like(x)
    block, blocks, warps = _blocks(Ho * Wo)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.zeros((B * c, blocks, len(xs)), dtype=acc, device=x.device)
    if grad.numel():
        _backward_kernel[(B * C, blocks)](grad, x, weights.contiguous(), grad_x, partial, xs, grad_xs, C, c, Ho * Wo,
                                          Wo, W, GROUPS=groups, STRIDE=stride, K=len(xs), ACC=_acc(x.dtype),
                                          BLOCK=block, num_warps=warps)  # fmt: skip
    else:
        grad_x.zero_()
    return list(grad_xs), partial.sum((0, 1)).to(weights.dtype), grad_x
