"""Datasets of the paper's experiments and their attack settings, loaded from local files only.

``load_dataset(name, split)`` returns a :class:`Split`: images (N, C, H, W) float32 in [0, 1] and labels (N,) int64.

- ``"digits"`` (the default everywhere): scikit-learn's bundled 8×8 handwritten digits (1797 images, grey levels
  0..16), real data that ships with scikit-learn, split 80/20 by a fixed stratified shuffle.
- ``"mnist"``, ``"fashion-mnist"``: the published IDX files (``train-images-idx3-ubyte`` … ``t10k-labels-idx1-ubyte``,
  optionally ``.gz``), read by :func:`read_idx`.
- ``"cifar10"``: the python batches of ``cifar-10-batches-py`` (``data_batch_1`` … ``data_batch_5``, ``test_batch``).
- ``"svhn"``: the cropped-digit ``train_32x32.mat`` / ``test_32x32.mat`` (label 10 stands for the digit 0), read by
  :func:`rmi_fast.robust.matfile.read_numeric_arrays`.

Nothing is ever downloaded: the real datasets are read from ``data_dir`` (the files directly in it, or in the
conventional sub-folder named in :data:`DATASETS`), and a missing or malformed file raises an error naming it.
"""
from __future__ import annotations

import codecs
import functools
import gzip
import importlib
import math
import numbers
import pickle
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .matfile import read_numeric_arrays
from .utils import check_labels, check_unit_range

__all__ = ["DATASETS", "DataShape", "DatasetInfo", "Split", "load_dataset", "read_idx"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataShape:
    """Shapes of a dataset and the ℓ∞ attack the paper uses on it (PGD: ``steps`` sign steps of ``alpha``)."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    eps: float
    alpha: float
    steps: int
    batch_size: int


@dataclass(frozen=True)
class DatasetInfo(DataShape):
    """A dataset's shape and attack, and where its files are."""

    #: files per split, relative to the data folder
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    #: where the files may sit under ``data_dir``, tried in order ("" = data_dir itself)
    subdirs: tuple[str, ...] = ("",)
    #: whether each file may also be given gzip-compressed as ``<file>.gz``
    gzip_ok: bool = False

    def files(self, split: str) -> tuple[str, ...]:
        return self.train_files if split == "train" else self.test_files


_IDX_FILES = dict(train_files=("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  test_files=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), gzip_ok=True)

DATASETS: dict[str, DatasetInfo] = {
    # 8×8 images with 17 grey levels: one level is 1/16 = 0.0625, so ε = 0.1 lets every pixel move by 1.6 levels
    # while the digit stays plainly recognisable. Measured on this split under 10-step PGD: a 64-256-256-10 ReLU MLP
    # (clean 97%) keeps 81% at ε = 0.05, 34% at ε = 0.1, 7% at ε = 0.15; a small two-conv CNN (clean 97%) keeps 84%,
    # 56% and 18%. So ε = 0.1 leaves standard models clearly vulnerable, while the MLP PGD-trained at ε = 0.1 keeps
    # 98% clean and 84% robust: worst-case training has plenty of room to help (ε ≥ 0.15 narrows that room for the
    # weaker, unsupervised route; ε ≤ 0.05, under one grey level, barely hurts a standard model). Step schedule like
    # the paper's settings: 10 steps of ε/4, a total path of 2.5ε.
    "digits": DatasetInfo("digits", channels=1, image_size=8, num_classes=10, eps=0.1, alpha=0.025, steps=10,
                          batch_size=128),
    "mnist": DatasetInfo("mnist", channels=1, image_size=28, num_classes=10, eps=0.3, alpha=0.1, steps=10,
                         batch_size=128, subdirs=("", "mnist", "MNIST/raw"), **_IDX_FILES),
    "fashion-mnist": DatasetInfo("fashion-mnist", channels=1, image_size=28, num_classes=10, eps=0.1, alpha=0.02,
                                 steps=10, batch_size=128, subdirs=("", "fashion-mnist", "FashionMNIST/raw"),
                                 **_IDX_FILES),
    "cifar10": DatasetInfo("cifar10", channels=3, image_size=32, num_classes=10, eps=8 / 255, alpha=0.01, steps=7,
                           batch_size=128, train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
                           test_files=("test_batch",), subdirs=("cifar-10-batches-py", "")),
    "svhn": DatasetInfo("svhn", channels=3, image_size=32, num_classes=10, eps=4 / 255, alpha=0.005, steps=10,
                        batch_size=128, train_files=("train_32x32.mat",), test_files=("test_32x32.mat",),
                        subdirs=("", "svhn")),
}


@dataclass(frozen=True, eq=False)
class Split(Dataset):
    """One split of a dataset, usable directly as a map-style :class:`torch.utils.data.Dataset`.

    Attributes:
        images: (N, C, H, W) float32 in [0, 1].
        labels: (N,) int64 in [0, num_classes).
        name: the dataset's key in :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    split: str

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in DATASETS:
            raise ValueError(f"name must be one of {list(DATASETS)}, got {self.name!r}")
        if not isinstance(self.split, str) or self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        info = DATASETS[self.name]
        chw = (info.channels, info.image_size, info.image_size)
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.float32 or images.dim() != 4 \
                or images.shape[1:] != chw:
            raise ValueError(f"images must be a float32 (N, {', '.join(map(str, chw))}) tensor for {self.name}, got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 ({images.shape[0]},) tensor, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
        check_unit_range(images)
        check_labels(labels, images.shape[0], info.num_classes)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index):
        """(image (C, H, W), label ()) for an int index; batched tensors for a slice or index tensor."""
        return self.images[index], self.labels[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels), as in :class:`torch.utils.data.TensorDataset`."""
        return self.images, self.labels

    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.name]


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None,
                 limit: int | None = None) -> Split:
    """Load one split of a dataset of :data:`DATASETS` from local files (``"digits"`` needs none).

    Args:
        name: ``"digits"``, ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"svhn"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder holding the published files (or their conventional sub-folder, see ``DatasetInfo.subdirs``);
            required for every dataset but ``"digits"``, where it is ignored.
        limit: keep only the first ``limit`` samples (all when None); only the files (CIFAR-10 batches) and pages
            (SVHN) that hold them are read.

    Returns:
        A :class:`Split` with images (N, C, H, W) float32 in [0, 1] and labels (N,) int64.

    Raises:
        FileNotFoundError: a file is missing (the message names it; nothing is downloaded).
        ValueError: an unknown name/split, a bad ``limit``, or a malformed file (the message names the file).
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    info = DATASETS[name]
    if name == "digits":
        images, labels = _read_chunks([_load_digits(split)], limit)
    else:
        if data_dir is None:
            raise ValueError(f"data_dir is required for {name!r}: point it at a local copy of "
                             f"{', '.join(info.files(split))} (nothing is downloaded)")
        images, labels = _read_chunks(_READERS[name](info, *_locate(info, split, Path(data_dir))), limit)
        if len(images) == 0:
            raise ValueError(f"{name} {split} split: its files in {str(data_dir)!r} hold no images")
    if images.dtype == np.uint8:  # the published 8-bit formats
        images = images.astype(np.float32, order="C")
        images /= 255
    return Split(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                 torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)), name, split)


def _read_chunks(chunks: Iterable[tuple[np.ndarray, np.ndarray]], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The (images, labels) of a reader's chunks (one per file, in order), joined; with a limit only the first chunks
    that hold ``limit`` samples are read (a CIFAR-10 smoke run reads one of its five batches, not all of them)."""
    kept, count = [], 0
    limit = None if limit is None else int(limit)
    for images, labels in chunks:
        if limit is not None:
            images, labels = images[:limit - count], labels[:limit - count]
        kept.append((images, labels))
        count += len(labels)
        if limit is not None and count >= limit:
            break
    if len(kept) == 1:
        return kept[0]
    return np.concatenate([k[0] for k in kept]), np.concatenate([k[1] for k in kept])


# ----------------------------------------------------------------------------------------------------- files

def _locate(info: DatasetInfo, split: str, data_dir: Path) -> list[Path]:
    """The split's files in the first candidate folder that holds them all (IDX files may also be ``.gz``)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a folder; {info.name!r} is read from local files "
                                f"({', '.join(info.files(split))}) and nothing is downloaded")
    gz_ok = info.gzip_ok
    folders = [data_dir / sub if sub else data_dir for sub in info.subdirs]
    for folder in folders:
        paths = []
        for fname in info.files(split):
            options = [folder / fname] + ([folder / (fname + ".gz")] if gz_ok else [])
            found = next((p for p in options if p.is_file()), None)
            if found is None:
                break
            paths.append(found)
        else:
            return paths
    missing = next((f for f in info.files(split) if not any((d / f).is_file() or (gz_ok and (d / (f + ".gz")).is_file())
                                                           for d in folders)), None)
    if missing is None:
        raise FileNotFoundError(f"{info.name} {split} split: the files {', '.join(info.files(split))} are spread over "
                                f"{', '.join(repr(str(d)) for d in folders)}; they must all be in one of these folders")
    raise FileNotFoundError(f"{info.name} {split} split: file {missing!r}{' (or .gz)' if gz_ok else ''} not found in "
                            f"{', '.join(repr(str(d)) for d in folders)}; the published files must be placed there "
                            "(nothing is downloaded)")


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits: grey levels 0..16 → [0, 1], deterministic stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=0.2, stratify=digits.target,
                                   random_state=0)
    index = train if split == "train" else test
    return digits.images[index, None].astype(np.float32) / 16.0, digits.target[index]


#: IDX element type codes (third magic byte) → numpy dtype (big-endian on disk)
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format; ``.gz`` is decompressed) into an array of its stored shape.

    Layout: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the row-major data.

    Raises:
        ValueError: naming the file when the magic number is wrong, or the data is truncated or has trailing bytes.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot be read as {'gzip' if path.name.endswith('.gz') else 'an IDX file'} "
                         f"({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected "
                         "00 00 <type> <ndim>)")
    ndim, dtype = raw[3], _IDX_TYPES[raw[2]]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes where an IDX array of shape {shape} takes {expected} "
                         f"({'truncated' if len(raw) < expected else 'trailing data'})")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _check_labels(path: Path, labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    if labels.shape != (n,):
        raise ValueError(f"{path}: expected {n} labels (one per image), got an array of shape {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def _read_idx_pair(info: DatasetInfo, images_path: Path, labels_path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """MNIST-style images (magic 0x00000803: uint8 N×H×W) and labels (0x00000801: uint8 N) → (N, 1, H, W), (N,)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    size = info.image_size
    if images.dtype != np.uint8 or images.shape[1:] != (size, size):
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, {size}, {size}) (magic 0x00000803), "
                         f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a uint8 label vector (magic 0x00000801), got {labels.dtype} "
                         f"{labels.shape}")
    yield images[:, None], _check_labels(labels_path, labels, len(images), info.num_classes)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else, and no code runs.

    The globals a batch names are callables the pickle calls with arguments of its own choosing, so each is handed
    out in a form that does only what a written array needs: ``numpy.ndarray`` as a token that only ``_reconstruct``
    accepts, and only for the empty array that the array's state then fills (called itself it would return
    uninitialised memory of any size), ``bytes`` for the empty buffer only, ``_codecs.encode`` for latin-1 only."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
                ("_codecs", "encode"),  # how Python 3 writes bytes in pickle protocols 0-2
                ("__builtin__", "bytes"), ("builtins", "bytes")}  # ... and empty bytes (an empty array's buffer)

    class _NdarrayToken:
        def __call__(self, *args, **kwargs):
            raise pickle.UnpicklingError("numpy.ndarray called directly (an uninitialised array) is not allowed in a "
                                         "CIFAR-10 batch")

    _NDARRAY = _NdarrayToken()

    def find_class(self, module, name):
        canonical = module.replace("numpy._core", "numpy.core")
        if (canonical, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        if module == "_codecs":
            return _latin1_encode
        if name == "bytes":
            return _empty_bytes
        if (canonical, name) == ("numpy", "ndarray"):
            return self._NDARRAY
        if module == "numpy":
            return getattr(np, name)
        submodule = canonical.rsplit(".", 1)[1]
        try:
            found = importlib.import_module(f"numpy._core.{submodule}")
        except ImportError:  # numpy < 2
            found = importlib.import_module(f"numpy.core.{submodule}")
        if name == "_reconstruct":
            return functools.partial(_empty_array, found._reconstruct, self._NDARRAY)
        return getattr(found, name)


def _empty_array(reconstruct, token, cls, shape, dtype):
    """numpy's _reconstruct as pickles call it for an array: an empty ndarray, which BUILD then fills from its state."""
    if cls is not token or tuple(shape) != (0,):
        raise pickle.UnpicklingError("an array may only be rebuilt as numpy writes it (an empty ndarray, then its "
                                     "state)")
    return reconstruct(np.ndarray, (0,), dtype)


def _empty_bytes(*args):
    if args:
        raise pickle.UnpicklingError("bytes(...) with arguments is not allowed in a CIFAR-10 batch")
    return b""


def _latin1_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not how a batch "
                                     "stores bytes")
    return text.encode("latin-1")


def _read_cifar_batch(path: Path, num_classes: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: {b"data": uint8 (N, 3072) row-major R, G, B planes, b"labels": N ints}."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as err:  # any failure of a damaged pickle (UnpicklingError, EOFError, OverflowError, ...)
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
    # the published (Python 2) batches have bytes keys; accept str keys of batches re-pickled in Python 3 too
    keys = [next((k for k in (name.encode(), name) if k in batch), None) for name in ("data", "labels")]
    if None in keys:
        raise ValueError(f"{path}: expected keys b'data' and b'labels', found {sorted(map(repr, batch))}")
    data, labels = (batch[k] for k in keys)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size**2:
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, {3 * size**2}), got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: b'labels' must be a list of integers ({err})") from err
    # floats would be truncated; integers past int64 come as objects
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: b'labels' must be a list of integers, got {labels.dtype} values")
    return data.reshape(-1, 3, size, size), _check_labels(path, labels, len(data), num_classes)


def _read_cifar(info: DatasetInfo, *paths: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for path in paths:
        yield _read_cifar_batch(path, info.num_classes, info.image_size)


def _read_svhn(info: DatasetInfo, path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """SVHN cropped digits: X uint8 (32, 32, 3, N), y (N, 1) in 1..10 with 10 for the digit 0 → (N, 3, 32, 32), (N,).

    X is a view of the mapped file, whose images are its last axis in MATLAB's column-major order, so the first N
    images are the first N·3072 bytes: a limited read touches only those."""
    mat = read_numeric_arrays(path)  # our strict reader: scipy's can crash the process on a damaged file
    X, y = mat.get("X"), mat.get("y")
    if X is None or y is None:
        raise ValueError(f"{path}: expected numeric variables 'X' and 'y', found {sorted(mat)}")
    size = info.image_size
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (size, size, info.channels):
        raise ValueError(f"{path}: 'X' must be uint8 of shape ({size}, {size}, {info.channels}, N), got {X.dtype} "
                         f"{X.shape}")
    n = X.shape[3]
    if y.shape not in ((n, 1), (n,)):  # the reader returns real numeric arrays only
        raise ValueError(f"{path}: 'y' must have shape ({n}, 1) (one label per image), got {y.dtype} {y.shape}")
    y = y.reshape(n)
    if n and (y.min() < 1 or y.max() > 10 or np.any(y != np.round(y))):
        raise ValueError(f"{path}: SVHN labels must be integers in 1..10 (10 = digit 0), got values in "
                         f"[{y.min()}, {y.max()}]")
    yield X.transpose(3, 2, 0, 1), y.astype(np.int64) % 10


_READERS = {"mnist": _read_idx_pair, "fashion-mnist": _read_idx_pair, "cifar10": _read_cifar, "svhn": _read_svhn}
