"""The ``triton`` backend: fused Triton kernels for the whole kernel contract of :mod:`rmi_fast.ops.spec`.

No B×B array is ever stored: statistics are O(B) fp32, gradients O(B·D). One file per family (``row_lse``,
``global_lse``, ``row_sum``), the gradient sweep they share and its variants in ``backward``, tile primitives in
``common``. Importing this package does not import triton; the kernels load on first use. On a machine without a
GPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported
(slow: for tests).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch

from ..backends import CUDA_MAX_GRID_YZ, Backend, triton_interpreted
from ..ops.spec import PairSpec

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _family(name: str):
    return importlib.import_module(f"{__name__}.{name}")


class TritonBackend(Backend):
    """Fused Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

    backward: "auto" (the device's tuned table, else :func:`rmi_fast.triton.backward.choose_plan`) or one of "two_pass",
    "atomic", "split", "whole" to force a variant; split: the number of chunks of the "split" and "whole" variants
    (None: 2 for split; whole takes as many as its tiles need).
    """

    name = "triton"
    #: row_sum computes statistic and gradient in one sweep, row_lse (no columns, two-pass plan) its statistic and dx;
    #: otherwise stats then grads.
    fused = True
    #: On a GPU without a tuned table, "auto" prefers cuBLAS + eager below this many score pairs (a first-principles
    #: guess, ≈ 2048²; `rmi-fast tune` measures the real crossover).
    min_pairs_auto = 2048 * 2048

    def __init__(self, backward: str = "auto", split: int | None = None):
        self.backward = backward
        self.split = split

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "the 'triton' package is not installed (pip install triton)"
        if not torch.cuda.is_available() and not triton_interpreted():
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)"
        return None

    def rejects(self, x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> str | None:
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not supported (float32, bfloat16, float16; float64 runs on the 'torch' backend)"
        if max(x.shape[0], y.shape[0]) > CUDA_MAX_GRID_YZ:
            return f"more than {CUDA_MAX_GRID_YZ} groups (one grid axis holds them)"
        if x.device.type == "cuda":
            return None
        if x.device.type == "cpu" and triton_interpreted():
            return None
        if x.device.type == "cpu":
            return "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
        return f"device {x.device} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"

    def _plan(self):
        if self.backward == "auto":
            return None
        from .backward import Plan

        return Plan(self.backward, self.split or (2 if self.backward == "split" else 1))

    def stats(self, x, y, scale, spec):
        with _on_device(x):
            return _family(spec.family).stats(x, y, scale, spec)

    def grads(self, x, y, scale, spec, stats, weights, want):
        with _on_device(x):
            return _family(spec.family).grads(x, y, scale, spec, stats, weights, want, self._plan())

    def stats_and_grads(self, x, y, scale, spec, want):
        if spec.family != "global_lse":
            with _on_device(x):
                fused = _family(spec.family).stats_and_grads(x, y, scale, spec, want, self._plan())
            if fused is not None:
                return fused
        return super().stats_and_grads(x, y, scale, spec, want)


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the inputs' one (a no-op for CPU tensors)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
