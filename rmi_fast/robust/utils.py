"""Small shared helpers: devices, seeding, deterministic minibatches, progress bars."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" → cuda when available, else cpu; "cuda" without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be one of {list(DEVICES)} (or 'cuda:N'), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but no CUDA device is available")
    return torch.device(device)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (e.g. module construction) under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_schedule(config) -> None:
    """Validate the optimisation schedule shared by every training config: positive integer epochs and batch_size,
    and a positive lr."""
    for name in ("epochs", "batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr!r}")


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so a resumed run that
    restarts in the middle of an epoch sees the same batches as an uninterrupted one."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    return torch.randperm(n, generator=g)


def minibatches(n: int, batch_size: int, *, order: torch.Tensor | None = None,
                drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors of consecutive batches of ``order`` (default 0..n−1). ``drop_last`` drops a short final batch,
    keeping the batch size — on which an MI bound depends — fixed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = torch.arange(n) if order is None else order
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of full batches (``drop_last``), at least one when n ≥ 1."""
    return max(1, n // batch_size)


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True, leave: bool = False):
    """A tqdm bar (or the bare iterable when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=leave, dynamic_ncols=True)

