"""Small shared helpers: devices, seeding, deterministic minibatches, progress bars."""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch

from rmi_fast.checks import check_int, check_real, check_values

from .models import check_batch

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
    a positive finite lr and a seed that torch.manual_seed takes."""
    check_int("epochs", config.epochs, 1)
    check_int("batch_size", config.batch_size, 1)
    check_real("lr", config.lr, positive=True)
    check_seed(config.seed)


def check_seed(seed) -> int:
    """A seed in [0, 2⁶³): what a torch.Generator takes, with room for the per-epoch seeds derived from it."""
    seed = check_int("seed", seed, 0)
    if seed >= 2**63:
        raise ValueError(f"seed must be below 2**63, got {seed}")
    return seed


def derived_seed(seed: int, k: int) -> int:
    """The k-th seed derived from ``seed`` for another stage of a run, in [0, 2⁶³) like every seed."""
    return (seed + k) % 2**63


def check_radius(eps) -> float:
    """An ℓ∞ radius of an attack on images in [0, 1]: in (0, 1]."""
    eps = check_real("eps", eps)
    if not 0 < eps <= 1:
        raise ValueError(f"eps must lie in (0, 1] (images are in [0, 1]), got {eps!r}")
    return eps


def check_threads(threads) -> int:
    """A number of CPU threads: at least 1, at most the machine's logical CPUs (more only oversubscribe the cores,
    and torch fails to start tens of thousands of threads)."""
    threads = check_int("threads", threads, 1)
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise ValueError(f"threads must be at most this machine's {cpus} logical CPUs, got {threads}")
    return threads


def check_images(images, spec, *, name: str = "images", at_least: int = 1) -> None:
    """``images`` must be a float32 (N, C, H, W) tensor of ``spec``'s channels and side (an EncoderConfig or
    CriticConfig), N ≥ ``at_least``, every value in [0, 1]: what the datasets load and the box the attacks keep to.
    The value check does not stall a GPU (see :func:`rmi_fast.checks.check_values`)."""
    check_batch(images, spec, name)
    if images.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (the models' dtype), got {images.dtype}")
    if images.shape[0] < at_least:
        need = " (the bounds need negatives)" if at_least > 1 else ""
        raise ValueError(f"{name}: need at least {at_least} images{need}, got {images.shape[0]}")
    check_unit_range(images, name)


def check_unit_range(images: torch.Tensor, name: str = "images") -> None:
    """Every value in [0, 1] (no NaN): the box the datasets load and the attacks keep to."""
    check_values(((images >= 0) & (images <= 1)).all(), f"{name} must lie in [0, 1] (and hold no NaN)",
                 lambda: f"; they span [{images.min().item():.4g}, {images.max().item():.4g}]")


def check_labels(labels, n: int, num_classes: int | None) -> None:
    """``labels`` must be an integer (n,) tensor of class indices in [0, num_classes) (≥ 0 when num_classes is None,
    for a model whose number of classes shows only in its output)."""
    if num_classes is not None:
        check_int("num_classes", num_classes, 2)
    if not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool or labels.is_floating_point() \
            or labels.is_complex():
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of class indices, got {got}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},): one per image, got {tuple(labels.shape)}")
    if labels.numel():
        top = labels.max() < num_classes if num_classes is not None else True
        check_values((labels.min() >= 0) & top, f"labels must lie in [0, {num_classes or 'the number of classes'})",
                     lambda: f"; they span [{labels.min().item()}, {labels.max().item()}]")


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def data_fingerprint(images: torch.Tensor) -> str:
    """The images' shape and a digest of their values, e.g. "1797x1x8x8 blake2b:…": a resumed run must go on over
    the same data (about a second for CIFAR-10's 600 MB of float32)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(images.detach().cpu().contiguous().view(torch.uint8).numpy())
    return "x".join(map(str, images.shape)) + " blake2b:" + digest.hexdigest()


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

