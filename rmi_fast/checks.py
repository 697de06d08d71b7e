"""Value checks on tensors that never stall an accelerator.

Reading a tensor's value on a GPU (``bool(t)``, ``t.item()``) waits until the device has run everything queued before
it: a host sync in the middle of a training step, and a hard error inside CUDA-graph capture. Shape, dtype and device
checks are free everywhere; a check on values is only free on the CPU. So on the CPU a failed check raises the usual
``ValueError``; elsewhere, and under ``torch.compile``, it is a device-side assertion (``torch._assert_async``) that
fails the next synchronising call with the same message, so a bad value is never silently used.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def check_values(ok: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(message + detail())`` unless the 0-d bool tensor ``ok`` is true, with no host sync off the CPU.

    ``detail`` (e.g. the offending range) is only evaluated, on the CPU, when the check fails.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message + (detail() if detail is not None else ""))
    else:
        torch._assert_async(ok, message)
