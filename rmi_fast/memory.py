"""Allocation of the large CPU tensors the kernels and their autograd glue produce.

A fresh allocation of megabytes is new memory from the operating system, and its first touch costs a page fault per
4 KiB page: for a (64, 128, 2048) fp32 gradient (the paper's critic shape) about 16 ms on a 2-core VM, more than the
arithmetic that fills it. Transparent huge pages (2 MiB, granted on request under Linux's usual "madvise" setting)
take 1/512 of those faults. PyTorch's allocator requests them only with THP_MEM_ALLOC_ENABLE=1 set before its first
allocation, so rmi_fast allocates its own large fp32 outputs through the compiled module (csrc/cpu/sweep.h,
``empty_f32``) instead.
"""
from __future__ import annotations

import functools
import importlib
import re

import torch

_HUGE_PAGE = 2 << 20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def compiled_cpu():
    """The compiled module where it has the C++ CPU entry points (csrc/cpu/bind.cpp), else None."""
    try:
        module = importlib.import_module("rmi_fast._C")
    except ImportError:
        return None
    return module if hasattr(module, "cpu_pair_reduce") else None


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(t), contiguous; an fp32 CPU tensor of 2 MiB or more on transparent huge pages."""
    if (t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() * 4 >= _HUGE_PAGE
            and not torch.compiler.is_compiling() and compiled_cpu() is not None):
        return compiled_cpu().cpu_empty(list(t.shape))
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def huge_pages() -> str:
    """This machine's transparent-huge-page mode ("always", "madvise" — both honour the request — or "never"), or
    why it is unknown."""
    try:
        with open(_THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return "unknown (no " + _THP_SETTING + ")"
    chosen = re.search(r"\[(\w+)\]", setting)
    return chosen.group(1) if chosen else setting.strip()
