"""Capability-checked dispatch.

A backend implements the kernel contract of :mod:`rmi_fast.ops.spec` and says, for given inputs, whether it can
serve them or why not. ``backend="auto"`` takes the backend measured fastest for the shape on this device (its tuned
table, :mod:`rmi_fast.tuning`) when it can serve, else the first capable backend in the device's preference order
that is worth using at this size; an explicit backend that cannot serve raises with its reason; when nothing fits, every
backend's reason is reported.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import tuning
from .ops.spec import PairSpec
from .tracing import constant_result


#: The grid's y and z extents of one CUDA launch (the GPU backends put the groups on one of them).
CUDA_MAX_GRID_YZ = 65535


class BackendUnavailable(ValueError):
    """Raised when the requested backend (or every backend, for "auto") cannot serve the inputs."""


class Backend:
    """Base class. Subclasses implement :meth:`stats` and :meth:`grads`; optionally :meth:`stats_and_grads`.

    x: (Gx, Bx, D), y: (Gy, By, D), Gx, Gy ∈ {1, G}, any strides; scale: 0-d tensor on the inputs' device.
    """

    name = "?"
    #: True when :meth:`stats_and_grads` computes the statistics and the unit-weight gradients in one sweep.
    fused = False
    #: Without a tuned table for the device, "auto" uses this backend only when Bx·By is at least this.
    min_pairs_auto = 0

    def unavailable(self) -> str | None:
        """Why this backend cannot be used at all on this machine (None when it can)."""
        return None

    def why_not(self, x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> str | None:
        """Why this backend cannot serve these inputs (None when it can)."""
        return self.unavailable() or self.rejects(x, y, spec)

    def rejects(self, x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> str | None:
        """Why these inputs lie outside what the backend serves where it is available (None when they do not)."""
        return None

    def stats(self, x, y, scale, spec: PairSpec) -> list[torch.Tensor]:
        raise NotImplementedError

    def grads(self, x, y, scale, spec: PairSpec, stats, weights, want):
        """(dx, dy, dscale) given the upstream gradient ``weights`` of each statistic; None where not wanted."""
        raise NotImplementedError

    def stats_and_grads(self, x, y, scale, spec: PairSpec, want):
        """(stats, dx, dy, dscale) with every upstream weight equal to 1 (only when ``fused``)."""
        stats = self.stats(x, y, scale, spec)
        return (stats, *self.grads(x, y, scale, spec, stats, [torch.ones_like(s) for s in stats], want))


class TorchBackend(Backend):
    """Eager PyTorch on a materialised score matrix: always available, any device and dtype."""

    name = "torch"
    #: the statistics and their unit-weight gradients from one score matrix (rmi_fast.reference)
    fused = True

    def stats(self, x, y, scale, spec):
        from . import reference

        return reference.pair_stats(x, y, scale, spec)

    def grads(self, x, y, scale, spec, stats, weights, want):
        from . import reference

        return reference.pair_grads(x, y, scale, spec, stats, weights, want)

    def stats_and_grads(self, x, y, scale, spec, want):
        from . import reference

        if not any(want):
            return self.stats(x, y, scale, spec), None, None, None
        return reference.pair_stats_and_grads(x, y, scale, spec, want)


# name -> "module:Class"; modules are imported only when the backend is first asked about.
_REGISTRY = {
    "cpp": "rmi_fast.cpu:CppBackend",
    "triton": "rmi_fast.triton:TritonBackend",
    "cuda": "rmi_fast.cuda:CudaBackend",
    "torch": "rmi_fast.backends:TorchBackend",
}
#: "auto"'s order of preference per device type. On GPUs the Triton kernels come first (above their crossover): their
#: logic is checked on every CI run under Triton's interpreter. The CUDA kernels are compiled there but only checked
#: on a GPU, so "auto" takes them only where the device's measured table (whose tuner checks every backend's values
#: first) has them fastest; without one, the torch backend serves below Triton's crossover.
_PREFERENCE = {"cuda": ("triton", "torch", "cuda"), "cpu": ("cpp", "torch")}
_instances: dict[str, Backend] = {}


class _Broken(Backend):
    def __init__(self, name: str, reason: str):
        self.name, self._reason = name, reason

    def unavailable(self):
        return self._reason


@constant_result
def _load(names: str) -> str:
    """Instantiate the comma-separated backends not loaded yet. Its result (the argument) is a constant, so
    torch.compile runs it eagerly while tracing: a model compiled with fullgraph=True can dispatch on its first call."""
    for name in names.split(","):
        if name not in _instances:
            module, cls = _REGISTRY[name].split(":")
            try:
                _instances[name] = getattr(importlib.import_module(module), cls)()
            except Exception as exc:  # a missing optional dependency or compiled module
                _instances[name] = _Broken(name, f"cannot be loaded: {type(exc).__name__}: {exc}")
    return names


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    _load(name)
    return _instances[name]


def names() -> list[str]:
    return list(_REGISTRY)


def preference(device: torch.device | str) -> tuple[str, ...]:
    """The backends "auto" tries for tensors on ``device``, best first."""
    return _PREFERENCE["cuda" if torch.device(device).type == "cuda" else "cpu"]


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ["cpp", "torch"] on a CPU box."""
    return [n for n in _REGISTRY if get(n).unavailable() is None]


def status() -> dict[str, str | None]:
    """name -> None when usable, else the reason it is not."""
    return {n: get(n).unavailable() for n in _REGISTRY}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select(name: str, x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> Backend:
    """The backend that will run these inputs: the named one, or the best capable one for "auto"."""
    if name != "auto":
        backend = get(name)
        reason = backend.why_not(x, y, spec)
        if reason is not None:
            raise BackendUnavailable(f"backend={name!r} cannot serve these inputs: {reason}")
        return backend
    reasons = {}
    pairs = x.shape[1] * y.shape[1]
    candidates = preference(x.device)
    _load(",".join(candidates))
    # The device's tuned table (rmi_fast.tuning) names the backend measured fastest at the nearest shape: it goes
    # first, and the measurement replaces the default crossovers. Without a table: preference order and crossovers.
    measured = tuning.fastest_backend(x, y, spec)
    if measured not in candidates:  # no table, or a backend "auto" never uses on this device type
        measured = None
    else:
        candidates = (measured,) + tuple(c for c in candidates if c != measured)
    for candidate in candidates:
        backend = get(candidate)
        reason = backend.why_not(x, y, spec)
        if reason is None and measured is None and pairs < backend.min_pairs_auto:
            reason = f"below its default crossover ({pairs} < {backend.min_pairs_auto} score pairs)"
        if reason is None:
            return backend
        reasons[candidate] = reason
    raise BackendUnavailable("no backend can serve these inputs: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
