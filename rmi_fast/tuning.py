"""Measured dispatch: per device, the fastest backend and Triton backward variant for each measured shape.

``rmi-fast tune`` (:mod:`rmi_fast.bench.tune`) times every backend, and every backward variant of the Triton
kernels, on a grid of shapes, checks each against the ``torch`` backend, and writes the winners to a table:
``rmi_fast/tuned/<device key>.json``. ``backend="auto"`` and the Triton backward read the table of the device the
tensors are on and, for a shape, take the winner measured at the *nearest* shape of the same kernel, precision class
(16- or 32-bit) and determinism — nearest in octaves of Bx·By, D and G, so a shape beyond the grid takes the winner
at its edge. A device without a table falls back to first-principles defaults (the preference order and
``min_pairs_auto`` of :mod:`rmi_fast.backends`, the rules of :func:`rmi_fast.triton.backward.choose_plan`).

``RMI_FAST_TUNED=/path/table.json`` makes every device use that table; ``RMI_FAST_TUNED=off`` disables tables.
Tables are read once per device and cached (:func:`clear_cache` forgets them).
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .ops.spec import PairSpec
from .tracing import constant_result

#: the kernels a table distinguishes: the three families, the row family with its column statistics (CLIP) apart
KERNELS = ("row_lse", "row_lse+columns", "global_lse", "row_sum")
BACKENDS = ("cpp", "triton", "cuda", "torch")
PLANS = ("two_pass", "atomic", "split", "whole")
TABLE_DIR = Path(__file__).with_name("tuned")
FORMAT = 1


def kernel_of(spec: PairSpec) -> str:
    return "row_lse+columns" if spec.columns else spec.family


def bits_of(dtype: torch.dtype) -> int:
    """The precision class a table keys on: 16 (bf16/fp16 tensor-core inputs), 32 or 64."""
    return torch.finfo(dtype).bits


def _cpuinfo(field: str) -> str | None:
    """The value of the first line of /proc/cpuinfo that names ``field`` (None where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_simd_flags() -> list[str]:
    """The CPU's vector-extension flags that the kernels and the BLAS use (AVX-512, AVX2, FMA, AMX)."""
    flags = (_cpuinfo("flags") or "").split()
    return sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "avx2", "amx", "fma")))


def device_name(device: torch.device | str) -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or the CPU's model name with its widest vector extension
    (e.g. "AMD EPYC avx512"): cloud VMs report one model name for CPU generations whose fastest backends differ."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index or 0)
    if device.type != "cpu":
        return device.type
    flags = cpu_simd_flags()
    simd = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return f"{cpu_model()} {simd}" if simd else cpu_model()


def device_key(name: str) -> str:
    """A file-name-safe key of a device name: "NVIDIA H100 80GB HBM3" → "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class Entry:
    """What was fastest at one measured shape (Bx = By = B for a square grid; G groups, x broadcast when G > 1).

    deterministic: measured for deterministic runs (matters only with a Triton plan: Triton's variants differ)
    backend: the fastest backend; plan/split: the fastest Triton backward variant (None when Triton was not measured);
    ms: every backend's median (Triton's at its fastest variant), for the record (not used to dispatch).
    """

    kernel: str
    bits: int
    Bx: int
    By: int
    D: int
    G: int
    deterministic: bool
    backend: str
    plan: str | None = None
    split: int = 1
    ms: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        _require(self.kernel in KERNELS, f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        _require(self.bits in (16, 32, 64), f"bits must be 16, 32 or 64, got {self.bits!r}")
        for name in ("Bx", "By", "D", "G", "split"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        _require(isinstance(self.deterministic, bool),
                 f"deterministic must be true or false, got {self.deterministic!r}")
        _require(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _require(self.plan is None or self.plan in PLANS, f"plan must be None or one of {PLANS}, got {self.plan!r}")
        _require(not (self.deterministic and self.plan == "atomic"), "a deterministic entry cannot have plan 'atomic'")

    def distance(self, log_pairs: float, log_d: float, log_g: float) -> float:
        """Octaves between this entry's shape and another given by log2(Bx·By), log2 D and log2 G."""
        return (abs(math.log2(self.Bx * self.By) - log_pairs) + abs(math.log2(self.D) - log_d)
                + abs(math.log2(self.G) - log_g))


@dataclass
class Table:
    device: str
    entries: list[Entry]
    source: str = ""

    def nearest(self, kernel: str, bits: int, log_pairs: float, log_d: float, log_g: float, deterministic: bool,
                with_plan: bool = False) -> Entry | None:
        """The entry measured nearest to a shape (given by log2 of Bx·By, D and G) among those of the same kernel and
        precision class (with a Triton plan when ``with_plan``) that hold for the determinism asked — an entry
        without a Triton plan holds for both: the other backends are repeatable. Ties go to the larger measured
        shape. None when there is none."""
        best, best_key = None, None
        for e in self.entries:
            if e.kernel != kernel or e.bits != bits:
                continue
            if (with_plan or e.plan is not None) and (e.plan is None or e.deterministic != deterministic):
                continue
            key = (e.distance(log_pairs, log_d, log_g), -e.Bx * e.By * e.D * e.G)
            if best_key is None or key < best_key:
                best, best_key = e, key
        return best

    def to_json(self) -> dict:
        return {"format": FORMAT, "device": self.device, "source": self.source,
                "entries": [asdict(e) for e in self.entries]}


class TableError(ValueError):
    """A tuned table that cannot be read: the message names the file and the field."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TableError(message)


def from_json(data) -> Table:
    """A table from its JSON document (as :meth:`Table.to_json` writes it), validated field by field."""
    _require(isinstance(data, dict), "the top level must be an object")
    _require(data.get("format") == FORMAT, f"format must be {FORMAT}, got {data.get('format')!r}")
    _require(isinstance(data.get("device"), str), "device must be a string")
    _require(isinstance(data.get("entries"), list), "entries must be a list")
    entries = []
    for i, raw in enumerate(data["entries"]):
        try:
            _require(isinstance(raw, dict), "must be an object")
            names = {f.name for f in fields(Entry)}
            unknown, missing = sorted(set(raw) - names), sorted(names - set(raw) - {"plan", "split", "ms"})
            _require(not unknown, f"unknown fields {unknown}; an entry has {sorted(names)}")
            _require(not missing, f"missing fields {missing}")
            entries.append(Entry(**raw))
        except TableError as exc:
            raise TableError(f"entries[{i}]: {exc}") from None
    return Table(data["device"], entries, str(data.get("source", "")))


def load(path: str | Path) -> Table:
    path = Path(path)
    try:
        return from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TableError) as exc:
        raise TableError(f"tuned table {path}: {exc}") from None


def save(table: Table, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table.to_json(), indent=1) + "\n")


def default_path(name: str) -> Path:
    return TABLE_DIR / f"{device_key(name)}.json"


@functools.lru_cache(maxsize=None)
def _table(device: str, override: str) -> Table | None:
    if override == "off":
        return None
    path = Path(override) if override else default_path(device_name(device))
    if not override and not path.exists():
        return None
    return load(path)


def table_for(device: torch.device | str) -> Table | None:
    """The tuned table of a device (None when it has none or tables are off); read once per device."""
    return _table(str(torch.device(device)), os.environ.get("RMI_FAST_TUNED", ""))


def describe(device: torch.device | str) -> str:
    """Which table ``backend="auto"`` follows on a device, in words (for ``rmi-fast info``)."""
    override = os.environ.get("RMI_FAST_TUNED", "")
    name = device_name(device)
    if override == "off":
        return f"{name}: none (RMI_FAST_TUNED=off), first-principles defaults"
    try:
        table = table_for(device)
    except TableError as exc:
        return f"{name}: unusable, {exc}"
    if table is None:
        return f"{name}: none ({default_path(name).name} is not in {TABLE_DIR}), first-principles defaults"
    return f"{name}: {Path(override) if override else default_path(name)} ({len(table.entries)} entries)"


def clear_cache() -> None:
    _table.cache_clear()
    _lookup.cache_clear()


@functools.lru_cache(maxsize=4096)
def _lookup(device: str, kernel: str, bits: int, octaves: tuple[int, int, int, int], deterministic: bool,
            with_plan: bool) -> Entry | None:
    table = table_for(device)
    if table is None:
        return None
    # an octave [2^k, 2^(k+1)) is represented by its middle, log2 = k + 1/2
    bx, by, d, g = (k + 0.5 for k in octaves)
    return table.nearest(kernel, bits, bx + by, d, g, deterministic, with_plan)


# The arguments are plain ints and strings and the result is a constant for them, so torch.compile runs the lookup
# eagerly while tracing: a model compiled with fullgraph=True dispatches without a graph break.
@constant_result
def _fastest_backend(device: str, kernel: str, bits: int, octaves: tuple[int, int, int, int],
                     deterministic: bool) -> str:
    entry = _lookup(device, kernel, bits, octaves, deterministic, False)
    return "" if entry is None else entry.backend


def octave(n) -> int:
    """floor(log2 n) for n ≥ 1, found by comparisons: under torch.compile with dynamic shapes each is a guard on the
    size, so one compiled graph serves every size of the octave and the dispatch inside it stays right."""
    k = 0
    while n >= (2 << k):
        k += 1
    return k


def _shape_key(x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> tuple:
    """What a lookup keys on: device, kernel, precision class, octaves of Bx, By, D and G, determinism."""
    G = max(x.shape[0], y.shape[0])
    octaves = (octave(x.shape[1]), octave(y.shape[1]), octave(x.shape[2]), octave(G))
    return str(x.device), kernel_of(spec), bits_of(x.dtype), octaves, bool(spec.deterministic)


def fastest_backend(x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> str | None:
    """The backend measured fastest for inputs of this size (by octave of Bx, By, D and G) on their device; None
    without a table."""
    return _fastest_backend(*_shape_key(x, y, spec)) or None


def triton_plan(x: torch.Tensor, y: torch.Tensor, spec: PairSpec) -> tuple[str, int] | None:
    """(variant, split) of the Triton backward measured fastest at the nearest shape; None without a table."""
    entry = _lookup(*_shape_key(x, y, spec), True)
    return None if entry is None else (entry.plan, entry.split)
