"""pytest-benchmark suite setup: collects the ``bench_*.py`` files of this folder and records every benchmark's
provenance. Run with ``pytest benchmarks/`` (``pytest tests`` never collects these)."""
from __future__ import annotations

import functools

import pytest
import torch

from rmi_fast.bench import env


def pytest_collect_file(file_path, parent):
    # Explicitly named files are collected by pytest itself; this picks up bench_*.py when a folder is given.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@functools.lru_cache(maxsize=None)
def _provenance(device: str) -> dict:
    return {"device": env.device_info(device), "versions": env.versions()}


@pytest.fixture
def rounds(request) -> int:
    """Timed rounds per benchmark: pytest-benchmark's --benchmark-min-rounds (default 5)."""
    return max(1, int(request.config.getoption("benchmark_min_rounds")))


@pytest.fixture(autouse=True)
def provenance(request):
    """Adds the device (name, SM count or cores) and the versions of everything timed to ``benchmark.extra_info``."""
    if "benchmark" not in request.fixturenames:
        return
    benchmark = request.getfixturevalue("benchmark")
    callspec = getattr(request.node, "callspec", None)
    device = next((p.device for p in (callspec.params.values() if callspec else []) if hasattr(p, "device")),
                  "cuda" if torch.cuda.is_available() else "cpu")
    benchmark.extra_info.update(_provenance(device))
