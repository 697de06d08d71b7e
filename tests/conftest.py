"""Shared fixtures: the backends under test and an fp64 oracle comparison."""
from __future__ import annotations

import pytest
import torch

from rmi_fast import backends

#: backends that serve CPU tensors in the generic oracle tests (triton's interpreter has its own, smaller suite).
CPU_BACKENDS = [name for name in ("torch", "cpp") if backends.get(name).unavailable() is None]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


def tolerance(dtype: torch.dtype) -> dict:
    """Absolute/relative tolerance of a backend result in ``dtype`` against the fp64 oracle."""
    return {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-4, rtol=2e-4)}.get(
        dtype, dict(atol=3e-2, rtol=3e-2))
