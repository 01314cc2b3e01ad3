"""Shared by the op tests: inputs in every memory layout, and the comparison against reference and oracle."""

import pytest
import torch

from fastdarts import backend

LOW_PRECISION = (torch.float16, torch.bfloat16)
BUILT = backend.info()["cpp"]["live"]
needs_ext = pytest.mark.skipif(not BUILT, reason=f"fastdarts._C is not live: {backend.info()['cpp']['why']}")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (torch.cuda.is_available())"
)


def make_tensor(shape, dtype, layout, device, k=0):
    """Random values (from float64) in the given memory layout."""
    if layout == "mixed":
        layout = ["contiguous", "channels_last", "strided"][k % 3]
    if layout == "contiguous":
        return torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    if layout == "channels_last":
        if len(shape) == 4:
            x = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
            return x.contiguous(memory_format=torch.channels_last)
        return torch.randn(shape[::-1], dtype=torch.float64, device=device).to(dtype).t()
    assert layout == "strided"
    *lead, h, w = shape
    base = torch.randn(*lead, w, 2 * h, dtype=torch.float64, device=device).to(dtype)
    x = base.transpose(-1, -2)[..., ::2, :]
    assert x.shape == shape and (x.numel() <= 1 or not x.is_contiguous())
    return x


def assert_low_precision_close(actual, ref, oracle, what):
    err = (actual.double() - oracle).abs().max().item()
    ref_err = (ref.double() - oracle).abs().max().item()
    floor = 1e-6 * oracle.abs().max().item()
    assert err <= 2 * ref_err + floor, (
        f"{what}: error {err:.3g} > 2 x reference error {ref_err:.3g} + {floor:.3g}"
    )


def assert_matches(actual, ref, oracle, what, reduction_scale=None):
    assert actual.dtype == ref.dtype and actual.shape == ref.shape, what
    if actual.dtype in LOW_PRECISION:
        assert_low_precision_close(actual, ref, oracle, what)
    elif actual.dtype == torch.float32:
        atol = 1e-6 if reduction_scale is None else 1e-6 * reduction_scale
        torch.testing.assert_close(actual, ref, rtol=1e-5, atol=atol, msg=what)
    else:
        torch.testing.assert_close(actual, ref, msg=what)
