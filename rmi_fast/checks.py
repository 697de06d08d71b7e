"""Argument checks: Python scalars by type and range, and values of tensors without stalling an accelerator.

Reading a tensor's value on a GPU (``bool(t)``, ``t.item()``) waits until the device has run everything queued before
it: a host sync in the middle of a training step, and a hard error inside CUDA-graph capture. Shape, dtype and device
checks are free everywhere; a check on values is only free on the CPU. So on the CPU a failed check raises the usual
``ValueError``; elsewhere, and under ``torch.compile``, it is a device-side assertion (``torch._assert_async``) that
fails the next synchronising call with the same message, so a bad value is never silently used.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch


def check_real(name: str, value, *, positive: bool = False, allow_negative: bool = False) -> float:
    """A finite real number (not a bool): non-negative by default, > 0 with ``positive``, any sign with
    ``allow_negative``. TypeError for another type, ValueError out of range; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (not allow_negative and value < 0):
        kind = "a positive finite" if positive else "a finite" if allow_negative else "a non-negative finite"
        raise ValueError(f"{name} must be {kind} number, got {value!r}")
    return value


def check_int(name: str, value, minimum: int) -> int:
    """An integer (not a bool) ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """True or False: a truthy stand-in such as the string "no" must not silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_instance(name: str, value, cls: type | tuple[type, ...]):
    """An instance of ``cls`` (a class or a tuple of them; ``type(None)`` among them allows None)."""
    if not isinstance(value, cls):
        classes = cls if isinstance(cls, tuple) else (cls,)
        wanted = " or ".join("None" if c is type(None) else c.__name__ for c in classes)
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__}")
    return value


def check_values(ok: torch.Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(message + detail())`` unless the 0-d bool tensor ``ok`` is true, with no host sync off the CPU.

    ``detail`` (e.g. the offending range) is only evaluated, on the CPU, when the check fails.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message + (detail() if detail is not None else ""))
    else:
        torch._assert_async(ok, message)
