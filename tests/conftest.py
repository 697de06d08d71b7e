"""Shared fixtures: the backends under test and an fp64 oracle comparison."""
from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

if not torch.cuda.is_available():
    # Without a GPU the triton backend runs its kernels under Triton's CPU interpreter (tests/test_triton.py); triton
    # reads the variable when kernels are defined, so it is set before any test module can load them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rmi_fast import backends  # noqa: E402

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


def check_non_finite_like_torch(backend, x, y, scale, spec, tol: dict) -> None:
    """A backend's statistics and (dx, dy, dscale) for unit weights, on inputs holding a non-finite entry, against the
    torch backend on the same values in fp64: the statistics equal (+∞ for +∞, NaN for NaN); each gradient is finite
    and close wherever torch's is, and not finite throughout where torch's is not. (Past the entries a non-finite
    input must reach, backends differ: a product ∞·0 or NaN·0 with an excluded diagonal entry is NaN in a dense
    matmul, 0 where a tile skips it.)"""
    G = max(x.shape[0], y.shape[0])
    weights = [torch.ones(shape, device=x.device) for shape in spec.stat_shapes(G, x.shape[1], y.shape[1])]
    results = []
    for b, (xb, yb) in ((backend, (x, y)), (backends.get("torch"), (x.double(), y.double()))):
        sb = scale.to(xb.dtype if xb.dtype == torch.float64 else torch.float32)
        stats = b.stats(xb, yb, sb, spec)
        results.append([*stats, *b.grads(xb, yb, sb, spec, stats, weights, (True, True, True))])
    clamped = spec.transform == "clip" and not (x.isnan().any() or y.isnan().any())  # ±∞ clamped to ±clip
    assert clamped == all(torch.isfinite(t).all() for t in results[1][:spec.n_stats])  # the case reaches one
    for k, (got, want) in enumerate(zip(*results)):
        got, want = got.double().cpu(), want.double().cpu()
        if k < spec.n_stats:
            torch.testing.assert_close(got, want, **tol, equal_nan=True)
        else:
            finite = torch.isfinite(want)
            assert torch.isfinite(got[finite]).all(), f"gradient {k - spec.n_stats}: not finite where torch's is"
            torch.testing.assert_close(got[finite], want[finite], **tol)
            assert finite.all() or not torch.isfinite(got).all(), f"gradient {k - spec.n_stats}: finite throughout"


@pytest.fixture
def torch_threads():
    """torch.set_num_threads for one test; the previous thread count comes back afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _free_port() -> int:
    """A free TCP port on loopback, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, nprocs: int, args_for_port) -> None:
    """torch.multiprocessing.spawn(worker, args_for_port(port), nprocs) with a free loopback port for the rendezvous.

    gloo now and then kills a rank with a signal in mid-run (SIGABRT from a C++ thread, "terminate called without an
    active exception"): about one run in 15 of tests/test_distributed.py on a 2-core box, whose fp64 workers run only
    torch's own ops. Such a run is retried once, on a fresh port; a rank that raises (a failed check) fails the test
    at once."""
    for attempt in range(2):
        try:
            mp.spawn(worker, args=args_for_port(_free_port()), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as exc:
            if attempt or exc.signal_name is None:
                raise
            warnings.warn(f"rank {exc.error_index} was killed by {exc.signal_name}: running the ranks once more")
