"""Checkpoints of plain dicts and tensors: loadable with ``torch.load(weights_only=True)``, carrying their config."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def save_checkpoint(path: str | os.PathLike, payload: dict, kind: str) -> None:
    """Write ``payload`` (plain Python values and tensors only) atomically: a crash mid-write never leaves a torn
    file where a resumable checkpoint used to be."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"kind": kind, **payload}, tmp)
    except RuntimeError as exc:  # torch.save's own writer reports a failed write (e.g. a full disk) this way
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write the checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU) and check its kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load's errors for a torn or foreign file (UnpicklingError, RuntimeError, ...)
        raise ValueError(f"{path} is not a readable {kind!r} checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a {kind!r} checkpoint (found {found!r})")
    return payload


@contextlib.contextmanager
def restoring(path: str | os.PathLike, kind: str) -> Iterator[None]:
    """Around rebuilding objects from a loaded payload: what goes wrong there (a missing entry, a config field of the
    wrong type, a state dict of other shapes) means the file is malformed, so it is raised as a ValueError naming
    the file rather than as the KeyError or RuntimeError of wherever it surfaced."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise ValueError(f"{path} is a malformed {kind!r} checkpoint ({type(exc).__name__}: {detail})") from exc
