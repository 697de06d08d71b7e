"""The ``cpp`` backend: fused C++ kernels for CPU tensors (csrc/cpu/: OpenMP over row tiles, or over whole groups
where they divide among the threads; register-blocked SIMD tile GEMMs and elementwise passes).

Implements the kernel contract of :mod:`rmi_fast.ops.spec` for every family and option. Score tiles of a block of
rows × all columns live in a per-thread buffer; nothing B×B is ever allocated (extra memory O(threads·(R + D)·B)).
Results are bitwise repeatable for a fixed ``torch.get_num_threads()`` (fixed partitions and reduction order), so
``deterministic=True`` costs nothing here.

Inputs may have any strides and be fp32, bf16 or fp16: they are copied once to contiguous fp32 (O(B·D)), and the
gradients are cast back to the input dtype. fp64 runs on the ``torch`` backend.
"""
from __future__ import annotations

import importlib

import torch

from .backends import Backend
from .ops.spec import PairSpec

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CppBackend(Backend):
    name = "cpp"
    fused = True
    #: No crossover: measured fwd+bwd against the torch backend (fp32; infonce, dv, jsd; B = 2 … 8192, D = 32–128,
    #: 2-core AVX2 box), the fused kernels were faster at every size, so "auto" always prefers them on the CPU.
    min_pairs_auto = 0

    def __init__(self):
        # The compiled module is imported when the backend is first asked about (not when rmi_fast is imported), and
        # only here, so that why_not() is plain attribute checks that torch.compile traces through.
        self._C = None
        self._reason: str | None = None
        try:
            module = importlib.import_module("rmi_fast._C")
        except ImportError as exc:
            self._reason = (f"the compiled module rmi_fast._C is missing ({exc}); reinstall with "
                            "`pip install --no-build-isolation .` where cmake and a C++ compiler are available")
        else:
            if hasattr(module, "cpu_pair_reduce"):
                self._C = module
            else:
                self._reason = "the compiled module rmi_fast._C was built without the C++ CPU kernels; rebuild it"

    def unavailable(self) -> str | None:
        return self._reason

    def rejects(self, x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> str | None:
        if x.device.type != "cpu" or y.device.type != "cpu":
            return f"the C++ kernels take CPU tensors, got {x.device} and {y.device}"
        if x.dtype == torch.float64 or y.dtype == torch.float64:
            return "fp64 runs on the torch backend (the C++ kernels compute in fp32)"
        if x.dtype not in _DTYPES or y.dtype not in _DTYPES:
            return f"the C++ kernels take float32, bfloat16 or float16, got {x.dtype} and {y.dtype}"
        return None

    # ------------------------------------------------------------------------------------------------ the contract

    def _call(self, x, y, scale, spec: PairSpec, stats, weights, want):
        f32 = [t.detach().to(torch.float32).contiguous() for t in (x, y)]
        out_stats, dx, dy, dscale = self._C.cpu_pair_reduce(
            f32[0], f32[1], float(scale), spec.family, spec.transform, float(spec.clip), spec.diagonal,
            int(spec.diag_offset), bool(spec.columns), [s.detach() for s in stats], [w.detach() for w in weights],
            *map(bool, want))
        dx = None if dx is None else dx.to(x.dtype)
        dy = None if dy is None else dy.to(y.dtype)
        if dscale is not None:
            dscale = torch.tensor(dscale, dtype=scale.dtype, device=scale.device)
        return out_stats, dx, dy, dscale

    def stats(self, x, y, scale, spec: PairSpec) -> list[torch.Tensor]:
        return self._call(x, y, scale, spec, [], [], (False, False, False))[0]

    def grads(self, x, y, scale, spec: PairSpec, stats, weights, want):
        if not any(want):
            return None, None, None
        return self._call(x, y, scale, spec, stats, weights, want)[1:]

    def stats_and_grads(self, x, y, scale, spec: PairSpec, want):
        if not any(want):
            return self.stats(x, y, scale, spec), None, None, None
        return self._call(x, y, scale, spec, [], [], want)
