"""``rmi-fast tune``: which backend, and which Triton backward variant, is fastest for each shape on this device.

For every shape of a grid (kernel × precision × B × D × G), every candidate — each backend usable here and, for
Triton, each backward variant: ``two_pass``, ``atomic``, ``split`` into 2–16 chunks, ``whole`` (batches of a few
tiles of whole rows), and the deterministic runs (no ``atomic``; chunks meet in fixed order) — computes the
negative-part statistics with every gradient (``stats_and_grads``: the work of a mean-reduced bound's forward and
backward). Each candidate's results are first
checked against the ``torch`` backend on fp32 copies of the same inputs; one that disagrees is recorded with the
reason and never timed. The winners make the device's tuned table (:mod:`rmi_fast.tuning`), which
``backend="auto"`` and the Triton backward then follow.

The report (JSON) holds every measurement and the table; ``--table`` writes the table alone, in the format
``rmi_fast/tuned/<device key>.json`` has.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import backends, tuning
from ..ops.spec import PairSpec
from . import env, measure
from .runner import TOLERANCE, error_text, free_memory, gradient_error

#: the reduction each kernel is measured with (the bounds' options: DV/JSD exclude the diagonal)
SPECS = {
    "row_lse": PairSpec("row_lse"),
    "row_lse+columns": PairSpec("row_lse", columns=True),
    "global_lse": PairSpec("global_lse", diagonal="exclude"),
    "row_sum": PairSpec("row_sum", transform="softplus", diagonal="exclude"),
}
SCALE = 5.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: chunk counts tried for the Triton ``split`` variant (those a shape has enough blocks for)
SPLITS = (2, 4, 8, 16)


@dataclass(frozen=True)
class Shape:
    """x is (B, D); y is (B, D), or (G, B, D) with x broadcast over the groups (the paper's critic) when G > 1."""

    kernel: str
    dtype: str
    B: int
    D: int
    G: int = 1

    @property
    def name(self) -> str:
        rows = f"G{self.G}xB{self.B}" if self.G > 1 else f"B{self.B}"
        return f"{self.kernel}/{rows}/D{self.D}/{self.dtype}"


def plan_name(plan: str, split: int) -> str:
    """A Triton backward variant with its chunk count where it has one: "split4", "whole2", "two_pass"."""
    return f"{plan}{split}" if plan == "split" or split > 1 else plan


@dataclass(frozen=True)
class Candidate:
    backend: str
    plan: str | None = None  # Triton's backward variant
    split: int = 1
    deterministic: bool = False

    @property
    def name(self) -> str:
        if self.plan is None:
            return self.backend
        variant = plan_name(self.plan, self.split)
        return f"{self.backend}:{variant}" + (":det" if self.deterministic else "")


def grid(device: str, quick: bool = False, kernels=tuning.KERNELS) -> list[Shape]:
    """The shapes measured: on a GPU the paper's critic (G = 64 locations, D = 2048), then square batches from 512
    to 32768 in bf16 (D = 512, then 128) and fp32 — in that order, so a run cut short by its budget has measured what
    matters most; on a CPU fp32 from 64 to 4096; ``quick``: tiny, for checks."""
    if quick:
        shapes = [Shape(k, "fp32", B, 16) for k in kernels for B in (16, 40)]
        shapes += [Shape(k, "fp32", 16, 16, 3) for k in kernels if k in ("global_lse", "row_sum")]
    elif device.startswith("cuda"):
        shapes = [Shape(k, dt, B, 2048, 64) for dt in ("bf16", "fp32") for k in kernels
                  if k in ("global_lse", "row_sum") for B in (128, 512)]
        shapes += [Shape(k, "bf16", B, D) for D in (512, 128) for k in kernels for B in (512, 2048, 8192, 32768)]
        shapes += [Shape(k, "fp32", B, 128) for k in kernels for B in (512, 2048, 8192, 32768)]
    else:
        shapes = [Shape(k, "fp32", B, D) for D in (32, 128) for k in kernels for B in (64, 256, 1024, 4096)]
    return shapes


def _triton_usable(device: str, quick: bool) -> bool:
    """Triton is a candidate on a GPU; on the CPU only in the quick check under the interpreter (never a real
    choice there: the CPU's "auto" does not consider it)."""
    if backends.get("triton").unavailable() is not None:
        return False
    return device.startswith("cuda") or (quick and backends.triton_interpreted())


def candidates(device: str, shape: Shape, quick: bool = False) -> list[Candidate]:
    out = [Candidate(name) for name in backends.preference(device) if name != "triton"]
    if _triton_usable(device, quick):
        from ..triton.backward import WHOLE_MAX_CHUNKS, whole_chunks
        from ..triton.common import tile_config, whole_max_rows

        blocks = math.ceil(shape.B / tile_config(shape.D, torch.device(device))["BLOCK_N"])
        splits = [k for k in SPLITS if k <= blocks]
        whole_max = whole_max_rows(torch.device(device), DTYPES[shape.dtype], SPECS[shape.kernel].columns)
        tiles = whole_chunks(shape.B, shape.B, whole_max)
        for det in (False, True):
            out.append(Candidate("triton", "two_pass", 1, det))
            if not det:
                out.append(Candidate("triton", "atomic", 1, det))
            out += [Candidate("triton", "split", k, det) for k in splits]
            if 0 < tiles <= WHOLE_MAX_CHUNKS:
                out.append(Candidate("triton", "whole", tiles, det))
    return out


def make_inputs(shape: Shape, device: str, seed: int = 0):
    """Unit-norm embeddings with correlated positives (y = normalize(x + 0.5·noise)), as the bench makes them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = F.normalize(torch.randn(1, shape.B, shape.D, generator=gen), dim=-1)
    y = F.normalize(x + 0.5 * torch.randn(shape.G, shape.B, shape.D, generator=gen), dim=-1)
    dt = DTYPES[shape.dtype]
    scale = torch.tensor(SCALE, device=device)
    return x.to(device=device, dtype=dt), y.to(device=device, dtype=dt), scale


def _backend(c: Candidate):
    if c.backend == "triton":
        from ..triton import TritonBackend

        return TritonBackend(backward=c.plan, split=c.split)
    return backends.get(c.backend)


def _results(backend, x, y, scale, spec):
    stats, dx, dy, dscale = backend.stats_and_grads(x, y, scale, spec, (True, True, True))
    return [*stats, dx, dy, dscale]


def mismatch(shape: Shape, got: list[torch.Tensor], ref: list[torch.Tensor]) -> str | None:
    """Why a candidate's (statistics, dx, dy, dscale) are not the reference's, or None when they agree: statistics
    within atol + rtol·|ref| entrywise, each gradient within grtol of its largest reference entry."""
    atol, rtol, grtol = TOLERANCE[shape.dtype]
    names = [f"statistic {i}" for i in range(len(ref) - 3)] + ["dx", "dy", "dscale"]
    for name, g, r in zip(names, got, ref):
        g, r = g.detach().double(), r.detach().double()
        if g.shape != r.shape:
            return f"{name} has shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        if name.startswith("statistic"):
            bad = ~((g - r).abs() <= atol + rtol * r.abs())
            if bool(bad.any()):
                return f"{name} differs (max error {float((g - r).abs().max()):.3g})"
        else:
            err = gradient_error(g, r)
            if not err <= grtol:
                return f"{name} differs (max error {err:.2g} of its largest entry)"
    return None


def _row(shape: Shape, c: Candidate, device_name: str) -> dict:
    return {"shape": shape.name, "kernel": shape.kernel, "dtype": shape.dtype, "B": shape.B, "D": shape.D,
            "G": shape.G, "candidate": c.name, "backend": c.backend, "plan": c.plan, "split": c.split,
            "deterministic": c.deterministic, "median_ms": None, "p20_ms": None, "p80_ms": None,
            "peak_mem_mb": None, "device": device_name}


def measure_shape(shape: Shape, device: str, device_name: str, *, quick: bool = False, warmup: int = 2,
                  repeats: int = 20, max_time_s: float = 0.5, on_candidate=None) -> list[dict]:
    """One row per candidate: its timing, or a ``note`` (it cannot serve this shape here) or an ``error``."""
    x, y, scale = make_inputs(shape, device)
    spec = SPECS[shape.kernel]
    ref = _results(backends.get("torch"), x.float(), y.float(), scale, spec)
    rows = []
    for c in candidates(device, shape, quick):
        row = _row(shape, c, device_name)
        rows.append(row)
        backend = _backend(c)
        spec_c = dataclasses.replace(spec, deterministic=c.deterministic)
        try:
            reason = backend.why_not(x, y, spec_c)
            if reason is not None:
                row["note"] = reason
                continue
            why = mismatch(shape, _results(backend, x, y, scale, spec_c), ref)
            if why is not None:
                row["error"] = f"mismatch: {why}"
                continue
            run = lambda _: _results(backend, x, y, scale, spec_c)  # noqa: E731
            t = measure.time_pass(lambda: None, run, device, warmup=warmup, repeats=repeats, max_time_s=max_time_s)
            row.update(median_ms=t.median, p20_ms=t.quantile(0.2), p80_ms=t.quantile(0.8))
            if device.startswith("cuda"):
                row["peak_mem_mb"] = measure.cuda_peak_mb(lambda: None, run)
        except Exception as exc:  # recorded; the other candidates still get measured
            row["error"] = error_text(exc)
        finally:
            free_memory(device)
            if on_candidate:
                on_candidate(row)
    return rows


# ------------------------------------------------------------------------------------------------- the table

def derive(rows: list[dict], device_name: str, eligible=tuning.BACKENDS, source: str = "") -> tuning.Table:
    """The table of a run: per measured shape and determinism, the fastest backend among ``eligible`` (Triton at its
    fastest variant; the other backends are repeatable, so they count for both) and Triton's fastest variant."""
    shapes: dict[tuple, list[dict]] = {}
    for r in rows:
        shapes.setdefault((r["kernel"], r["dtype"], r["B"], r["D"], r["G"]), []).append(r)
    entries = []
    for (kernel, dtype, B, D, G), rs in shapes.items():
        timed = [r for r in rs if r.get("median_ms") is not None]
        others = [r for r in timed if r["backend"] != "triton"]
        # determinism only changes Triton's variants: without them one entry serves both
        for det in ((False, True) if any(r["backend"] == "triton" for r in timed) else (False,)):
            variants = [r for r in timed if r["backend"] == "triton" and r["deterministic"] == det]
            best_variant = min(variants, key=lambda r: r["median_ms"]) if variants else None
            pool = [r for r in others + [best_variant] if r is not None and r["backend"] in eligible]
            if not pool:
                continue
            winner = min(pool, key=lambda r: r["median_ms"])
            ms = {r["backend"]: r["median_ms"] for r in others}
            if best_variant is not None:
                ms["triton"] = best_variant["median_ms"]
            entries.append(tuning.Entry(
                kernel, tuning.bits_of(DTYPES[dtype]), B, B, D, G, det, winner["backend"],
                best_variant["plan"] if best_variant else None, best_variant["split"] if best_variant else 1, ms))
    return tuning.Table(device_name, entries, source)


def summary(table: tuning.Table) -> str:
    """One line per entry: the shape, the winner, every backend's median and Triton's fastest variant."""
    lines = [f"tuned table for {table.device}: {len(table.entries)} entries",
             f"{'kernel':<16} {'bits':>4} {'B':>6} {'D':>5} {'G':>3} {'det':>3}  {'fastest':<7}  "
             f"{'median ms per backend':<44} triton plan"]
    for e in table.entries:
        times = "  ".join(f"{k} {v:.3g}" for k, v in sorted(e.ms.items(), key=lambda kv: kv[1]))
        plan = "-" if e.plan is None else plan_name(e.plan, e.split)
        det = "any" if e.plan is None else ("yes" if e.deterministic else "no")
        lines.append(f"{e.kernel:<16} {e.bits:>4} {e.Bx:>6} {e.D:>5} {e.G:>3} {det:>3}"
                     f"  {e.backend:<7}  {times:<44} {plan}")
    return "\n".join(lines)


def _save(report: dict, path: str | None) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def tune(*, device: str = "cpu", quick: bool = False, kernels=tuning.KERNELS, budget_s: float | None = None,
         max_time_s: float = 0.5, json_path: str | None = None, command=None, progress: bool = True) -> dict:
    """Measure the grid (starting no shape after ``budget_s`` seconds) and derive the table; the report (every row
    and the table so far) is rewritten after every shape. Returns the report."""
    from ..robust.utils import progress as bar

    info = env.device_info(device)
    shapes = grid(device, quick, kernels)
    warmup, repeats = (1, 3) if quick else (2, 20)
    eligible = backends.preference(device)
    report = {"device": info["name"], "device_info": info, "versions": env.versions(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": list(command or []), "quick": quick, "rows": [], "table": None}

    def checkpoint():  # the table of what is measured so far, and the report with it
        report["table"] = derive(report["rows"], info["name"], eligible, source=json_path or "").to_json()
        _save(report, json_path)

    t0 = time.perf_counter()
    total = sum(len(candidates(device, s, quick)) for s in shapes)
    with bar(total=total, desc="tune", enabled=progress) as pbar:
        for shape in shapes:
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                report["stopped"] = f"time budget of {budget_s:g} s spent before {shape.name}"
                break
            pbar.set_postfix_str(shape.name)
            report["rows"] += measure_shape(shape, device, info["name"], quick=quick, warmup=warmup, repeats=repeats,
                                            max_time_s=max_time_s, on_candidate=lambda _: pbar.update())
            checkpoint()
    checkpoint()
    return report


def table_from_report(path: str) -> tuning.Table:
    """Re-derive the table of a saved report (``rmi-fast tune --from-json``)."""
    try:
        report = json.loads(Path(path).read_text())
        rows = report["rows"]
        kind = report["device_info"]["type"]
        name = report["device"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a report of rmi-fast tune ({type(exc).__name__}: {exc})") from None
    if kind not in ("cpu", "cuda") or not isinstance(name, str) or not isinstance(rows, list):
        raise ValueError(f"{path} is not a report of rmi-fast tune (device_info.type {kind!r}, device {name!r}, "
                         f"rows of type {type(rows).__name__})")
    try:
        return derive(rows, name, backends.preference(kind), source=str(path))
    except (KeyError, TypeError, AttributeError) as exc:  # a row without the fields every measurement has
        raise ValueError(f"{path}: a row is not a measurement of rmi-fast tune ({type(exc).__name__}: {exc})") \
            from None
