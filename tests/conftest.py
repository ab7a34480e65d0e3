"""Shared pytest fixtures: devices, seeded generators and small random state dicts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(params=_DEVICES)
def device(request) -> torch.device:
    """Each test runs on the CPU and, where a GPU is visible, on CUDA."""
    return torch.device(request.param)


@pytest.fixture
def cuda_device() -> torch.device:
    """A CUDA device; the test is skipped where none is visible."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so that failures reproduce."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def make_state_dict(gen) -> Callable[..., dict[str, torch.Tensor]]:
    """Factory for a small random state dict: float weights plus an integer buffer.

    ``make_state_dict(dtype=torch.float32, device="cpu")`` returns keys ``linear.weight`` [4, 3],
    ``linear.bias`` [4], ``norm.weight`` [4] and ``norm.num_batches_tracked`` (int64, 0-d).
    """

    def make(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        shapes = {"linear.weight": (4, 3), "linear.bias": (4,), "norm.weight": (4,)}
        sd = {k: torch.randn(s, generator=gen).to(dtype=dtype, device=device) for k, s in shapes.items()}
        sd["norm.num_batches_tracked"] = torch.tensor(7, device=device)
        return sd

    return make
