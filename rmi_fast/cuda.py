"""The ``cuda`` backend: the hand-written CUDA kernels of csrc/cuda/ behind ``rmi_fast._C``.

Implements the kernel contract of :mod:`rmi_fast.ops.spec` for CUDA tensors in float32, bfloat16 and float16
(fp32 statistics, fp32 accumulation; bf16/fp16 products on tensor cores, fp32 as 3xTF32, or one TF32 product when
``torch.backends.cuda.matmul.allow_tf32`` is set). Every kernel sees the score matrix from one side ("own" rows
against "other" rows): rows come from (x, y, diag_offset), columns from (y, x, −diag_offset). Results are bitwise
repeatable (no atomics), so ``deterministic`` costs nothing here.

Outputs are allocated here with torch on the inputs' device; kernels run on torch's current stream and read the
scale from device memory, so nothing synchronises with the host. Importing this module touches no GPU: the
compiled module and the device are only looked at when the backend is asked.
"""
from __future__ import annotations

import torch

from .backends import CUDA_MAX_GRID_YZ, Backend
from .ops.spec import PairSpec

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compiled():
    """(rmi_fast._C, None) when it has the CUDA kernels, else (None, why not)."""
    try:
        from . import _C
    except ImportError as exc:
        return None, f"the compiled module rmi_fast._C is not available ({exc})"
    if not getattr(_C, "with_cuda", False):
        return None, "rmi_fast._C was built without CUDA kernels (no nvcc at build time, or RMI_FAST_NO_CUDA=1)"
    return _C, None


def _mode(spec: PairSpec) -> str:
    """The kernels' per-entry transform: lse | lse_clip | exp_m1 | softplus."""
    if spec.family == "row_sum":
        return spec.transform
    return "lse_clip" if spec.transform == "clip" else "lse"


def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with unit stride along D; any other group/row strides (broadcasts too) are fine."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class CudaBackend(Backend):
    name = "cuda"
    fused = False
    #: Not measured yet (no GPU where this was written); "auto" takes this backend for any size until it is.
    min_pairs_auto = 0

    def unavailable(self) -> str | None:
        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        _, reason = _compiled()
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None

    def rejects(self, x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> str | None:
        if x.device.type != "cuda" or y.device.type != "cuda":
            return f"it serves CUDA tensors, got {x.device} and {y.device}"
        if x.device != y.device:
            return f"x and y are on different devices ({x.device}, {y.device})"
        if x.dtype not in _DTYPES or y.dtype != x.dtype:
            return f"it takes float32, bfloat16 or float16 inputs of one dtype, got {x.dtype} and {y.dtype}"
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 8:
            return f"its kernels need compute capability 8.0 or newer, {x.device} has {major}.{minor}"
        if max(x.shape[0], y.shape[0]) > CUDA_MAX_GRID_YZ:
            return f"more than {CUDA_MAX_GRID_YZ} groups"
        return None

    # ------------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _setup(x, y, scale):
        C, reason = _compiled()
        if reason is not None:
            raise RuntimeError(reason)
        x, y = _unit_stride_d(x), _unit_stride_d(y)
        s = scale.detach().to(device=x.device, dtype=torch.float32).reshape(1).contiguous()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        precise = x.dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32
        return C, x, y, s, stream, precise

    # ------------------------------------------------------------------------------------------------ contract

    def stats(self, x, y, scale, spec: PairSpec) -> list[torch.Tensor]:
        C, x, y, s, stream, precise = self._setup(x, y, scale)
        G = max(x.shape[0], y.shape[0])
        mode = _mode(spec)

        def rows(own, other, offset):
            out = torch.empty((G, own.shape[1]), device=own.device, dtype=torch.float32)
            C.cuda_row_stats(own, other, s, mode, float(spec.clip), spec.diagonal, int(offset), precise, out, stream)
            return out

        with torch.cuda.device(x.device):
            r = rows(x, y, spec.diag_offset)
            if spec.family == "global_lse":
                total = torch.empty((G,), device=x.device, dtype=torch.float32)
                C.cuda_lse_merge(r, total, stream)
                return [total]
            if spec.columns:
                return [r, rows(y, x, -spec.diag_offset)]
            return [r]

    def grads(self, x, y, scale, spec: PairSpec, stats, weights, want):
        want_dx, want_dy, want_ds = (bool(w) for w in want)
        if not (want_dx or want_dy or want_ds):
            return None, None, None
        C, x, y, s, stream, precise = self._setup(x, y, scale)
        mode = _mode(spec)
        stats = [t.to(device=x.device, dtype=torch.float32) for t in stats]
        weights = [t.to(device=x.device, dtype=torch.float32) for t in weights]
        # Upstream terms (statistic, weight): "row" is indexed by x rows (or per group for global_lse), "col" by y
        # rows. The row-sum gradient needs no statistic.
        row = (None if spec.family == "row_sum" else stats[0], weights[0])
        col = (stats[1], weights[1]) if spec.columns else (None, None)

        dx = dy = partial = None

        def launch(own, other, offset, own_term, other_term, d_own, with_dscale):
            nonlocal partial
            if with_dscale:
                partial = torch.empty((C.cuda_dscale_partial_count(own, other),), device=x.device,
                                      dtype=torch.float32)
            C.cuda_row_grads(own, other, s, mode, float(spec.clip), spec.diagonal, int(offset), precise,
                             *own_term, *other_term, d_own, partial if with_dscale else None, stream)

        with torch.cuda.device(x.device):
            if want_dx or (want_ds and not want_dy):
                dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if want_dx else None
                launch(x, y, spec.diag_offset, row, col, dx, want_ds)
            if want_dy:
                dy = torch.empty(y.shape, device=y.device, dtype=y.dtype)
                launch(y, x, -spec.diag_offset, col, row, dy, want_ds and partial is None)
            dscale = partial.sum().to(scale.dtype).reshape(scale.shape) if want_ds else None
        return dx, dy, dscale
