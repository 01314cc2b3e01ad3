"""Shared fixtures: the devices to test on (cuda only when a GPU is present), fixed seeds, and a clean
fastdarts backend selection around every test; without a GPU, Triton's interpreter."""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter; Triton reads this when a kernel
    # is decorated, its own library functions included, so it must be set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastdarts import backend  # after the Triton switch above

# The float32 tests compare float32 arithmetic: on a GPU, cuDNN would otherwise run float32 convolutions in TF32
# (inputs rounded to 10 mantissa bits), on both sides of a comparison but not alike.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

#: Devices the suite runs on: always the CPU, plus the GPU when there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def devices() -> list[str]:
    """All devices available here: ["cpu"] or ["cpu", "cuda"]."""
    return list(DEVICES)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Runs the test once per available device."""
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_backend():
    # A test that calls set_backend must not leak its choice into the next test.
    saved = backend.get_backend()
    yield
    backend.set_backend(saved)
