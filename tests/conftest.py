"""Shared fixtures: the devices to test on (cuda only when a GPU is present), fixed seeds, and a clean
fastdarts backend selection around every test."""

import random

import numpy as np
import pytest
import torch

from fastdarts import backend

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
