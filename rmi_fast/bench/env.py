"""Provenance of a benchmark run: the device and the versions of everything timed (every JSON row's context)."""
from __future__ import annotations

import os
import platform

import torch

from ..tuning import cpu_simd_flags, device_name
from . import impls


def device_info(device: str) -> dict:
    """{"type", "name", ...}: SM count, memory and capability on a GPU; cores, threads and SIMD flags on a CPU."""
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        return {"type": "cuda", "name": props.name, "sm_count": props.multi_processor_count,
                "memory_gb": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return {"type": "cpu", "name": device_name("cpu"), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "simd": cpu_simd_flags()}


def versions() -> dict:
    import numpy

    import rmi_fast
    from rmi_fast import backends

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__, "rmi_fast": rmi_fast.__version__,
           "triton": impls.dist_version("triton"), "pytest-benchmark": impls.dist_version("pytest-benchmark"),
           "platform": platform.platform()}
    try:
        from rmi_fast import _C

        out["rmi_fast._C"] = f"built (CUDA kernels: {bool(getattr(_C, 'with_cuda', False))})"
    except ImportError as exc:
        out["rmi_fast._C"] = f"not available ({exc})"
    out["backends"] = {name: ("available" if reason is None else reason) for name, reason in backends.status().items()}
    out["peers"] = impls.peer_versions()
    return out
