"""The benchmark runner behind ``rmi-fast bench``: checks every implementation's value against ours, times each
pass, measures peak memory, and writes rows (one per case × implementation × pass) to JSON as it goes.

Every implementation listed for a case gets its rows: a timing, or a ``note`` (it cannot run here, and why) or an
``error`` (it failed, ran out of memory, or computed a different value; such an implementation is not timed).
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import env, measure, report
from .cases import Case, make_inputs
from .impls import Impl, Ours, baseline_name, for_case, matches

#: (atol, rtol) of a value and rtol of the gradients (max |g − g_ours| / max |g_ours|) against ours, per dtype: tight
#: enough in fp32 to tell a neighbouring convention apart (the positive pair among the negatives or not moves a
#: gradient by about 1%), loose enough for bf16 eager; fp32 on a GPU allows for TF32 products in a peer.
TOLERANCE = {"fp64": (1e-8, 1e-8, 1e-6), "fp32": (1e-4, 1e-4, 2e-3), "bf16": (5e-2, 5e-2, 1e-1),
             "fp16": (5e-2, 5e-2, 1e-1)}
TF32_TOLERANCE = (3e-3, 3e-3, 3e-2)
#: on the separate fwd and bwd rows of our fused backends (see :func:`fused_split_pass`)
FUSED_NOTE = "fused: the forward computes the gradients too, the backward only rescales them; compare fwd+bwd"

ROW_KEYS = ("case", "impl", "bound", "B", "D", "G", "dtype", "pass", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
            "tflops")


@dataclass
class Options:
    device: str = "cpu"
    passes: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
    impl_patterns: list[str] | None = None
    repeats: int = 10
    warmup: int = 1
    max_time_s: float = 10.0
    memory: bool = True
    seed: int = 0
    json_path: str | None = None
    append: bool = False
    suite: str = ""
    command: list[str] = field(default_factory=list)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _base_row(case: Case, impl: Impl, pass_: str, info: dict) -> dict:
    row = {"case": case.name, "impl": impl.name, "bound": case.bound, "B": case.B, "D": case.D, "G": case.G,
           "dtype": case.dtype, "pass": pass_, "median_ms": None, "p20_ms": None, "p80_ms": None,
           "peak_mem_mb": None, "tflops": None, "device": info["name"]}
    if "sm_count" in info:
        row["sm_count"] = info["sm_count"]
    if case.broadcast_x:
        row["broadcast_x"] = True
    return row


def evaluate(fn: Callable, leaves: list[torch.Tensor], autograd: bool):
    """(value, grads) of one call; also the warm-up that compiles what needs compiling."""
    out = fn()
    if not autograd:
        return _as_float(out), None
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return float(out.detach()), [None if g is None else g.detach().float() for g in grads]


def _as_float(out) -> float | None:
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return float(out.detach())
    if isinstance(out, (int, float)):
        return float(out)
    if isinstance(out, dict) and "loss" in out:
        return _as_float(out["loss"])
    return None


def mismatch(case: Case, value, grads, ref_value, ref_grads, device: str = "cpu") -> str | None:
    """Why (value, grads) is not the function ours computes, or None when it agrees within tolerance."""
    tf32 = case.dtype == "fp32" and device.startswith("cuda")
    atol, rtol, grtol = TF32_TOLERANCE if tf32 else TOLERANCE[case.dtype]
    if value is None or ref_value is None:
        return None
    if not math.isfinite(value) or abs(value - ref_value) > atol + rtol * abs(ref_value):
        return f"value {value:.6g} differs from ours {ref_value:.6g}"
    for i, (g, r) in enumerate(zip(grads or [], ref_grads or [])):
        if r is None:
            continue
        if g is None:
            return f"no gradient for input {i}, where ours has one"
        err = gradient_error(g, r)
        if not err <= grtol:
            return f"gradient of input {i} differs from ours (max error {err:.2g} of its largest entry)"
    return None


def gradient_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| relative to the largest |ref| (a gradient's entries span orders of magnitude; its largest
    sets the scale that matters); NaN or inf when got is not finite, so only `err <= tolerance` accepts."""
    return float((got - ref).abs().max()) / (float(ref.abs().max()) or 1.0)


def ours_reference(case: Case, device: str, inputs: dict) -> tuple[float, list] | None:
    """(value, grads) of the first of our backends (preference order) that serves the case; None if none does."""
    leaves = list(inputs.values())
    for impl in for_case(case, device):
        if isinstance(impl, Ours) and impl.why_not(case, device) is None:
            try:
                return evaluate(impl.build(case, inputs, device), leaves, impl.autograd(case))
            except Exception:  # that backend cannot serve these inputs: try the next
                continue
    return None


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300]


class Runner:
    """Runs cases one by one; ``report`` holds the JSON document, rewritten after every case."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.info = env.device_info(opts.device)
        self.report = {"device": self.info["name"], "device_info": self.info, "versions": env.versions(),
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "suite": opts.suite, "command": opts.command, "rows": []}
        if opts.append and opts.json_path and Path(opts.json_path).exists():
            self._adopt(report.load(opts.json_path))

    def _adopt(self, earlier: dict) -> None:
        """Continue an earlier report of this device (``--append``): its rows stay, but those measured again."""
        if earlier.get("device") != self.info["name"]:
            raise ValueError(f"--append: {self.opts.json_path} holds a run on {earlier.get('device')!r}, this one is "
                             f"on {self.info['name']!r}")
        self.report["rows"] = earlier["rows"]
        commands = earlier.get("commands") or [earlier.get("command", [])]
        self.report["commands"] = commands + [self.opts.command]

    # ---------------------------------------------------------------------------------------------------------
    def run(self, cases: list[Case], on_case: Callable[[list[dict]], None] | None = None) -> dict:
        t0 = time.perf_counter()
        for k, case in enumerate(cases, 1):
            _progress(f"[{k}/{len(cases)}] {case.name}")
            rows = self.run_case(case)
            fresh = {(r["case"], r["impl"], r["pass"]) for r in rows}
            self.report["rows"] = [r for r in self.report["rows"] if (r["case"], r["impl"], r["pass"]) not in fresh]
            self.report["rows"] += rows
            derive([r for r in self.report["rows"] if r["case"] == case.name], case)  # with --append's earlier rows
            self.save()
            if on_case:
                on_case(rows)
        _progress(f"done: {len(self.report['rows'])} rows in {time.perf_counter() - t0:.0f} s")
        return self.report

    def save(self) -> None:
        if not self.opts.json_path:
            return
        path = Path(self.opts.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1) + "\n")
        os.replace(tmp, path)

    # ---------------------------------------------------------------------------------------------------------
    def _impls(self, case: Case) -> list[Impl]:
        impls = for_case(case, self.opts.device)
        pats = self.opts.impl_patterns
        return [i for i in impls if matches(i.name, pats)] if pats else impls

    def run_case(self, case: Case) -> list[dict]:
        o = self.opts
        inputs = make_inputs(case, o.device, o.seed)
        leaves = list(inputs.values())
        rows: list[dict] = []
        timed: list[str] = []
        ref = None  # (value, grads) of the first of ours that runs: what every other impl is checked against
        for impl in self._impls(case):
            passes = [p for p in impl.passes(case) if p in o.passes or p == "step"]
            impl_rows = [_base_row(case, impl, p, self.info) for p in passes]
            rows.extend(impl_rows)
            if not impl_rows:
                continue
            reason = impl.why_not(case, o.device)
            if reason:
                for r in impl_rows:
                    r["note"] = reason
                _progress(f"    {impl.name:<20} skipped: {reason}")
                continue
            fn = None
            try:
                fn = impl.build(case, inputs, o.device)
                value, grads = evaluate(fn, leaves, impl.autograd(case))
                if ref is None and isinstance(impl, Ours):
                    ref = (value, grads)
                else:
                    if ref is None:  # no backend of ours among the impls (--impls): the check runs all the same
                        ref = ours_reference(case, o.device, inputs) or False  # False: none of ours serves it
                    bad = ref and mismatch(case, value, grads, *ref, device=o.device)
                    if bad:
                        raise _Mismatch(bad)
                grads = None
                for r in impl_rows:
                    r["value"] = value
                    self._time(case, impl, fn, leaves, r)
                    _progress(f"    {impl.name:<20} {r['pass']:<8} {r['median_ms']:10.3f} ms")
                timed.append(impl.name)
            except Exception as exc:  # recorded in the rows: one failing implementation does not stop the run
                for r in impl_rows:
                    if r["median_ms"] is None:
                        r["error"] = error_text(exc) if not isinstance(exc, _Mismatch) else f"mismatch: {exc}"
                _progress(f"    {impl.name:<20} error: {impl_rows[-1].get('error')}")
            finally:
                fn = None
                free_memory(o.device)
        if o.memory and not o.device.startswith("cuda") and timed:
            self._cpu_memory(case, rows, timed)
        return rows

    def _time(self, case: Case, impl: Impl, fn, leaves, row: dict) -> None:
        o = self.opts
        setup, run = measure.pass_steps(fn, leaves, impl.autograd(case), row["pass"])
        t = measure.time_pass(setup, run, o.device, warmup=o.warmup, repeats=o.repeats, max_time_s=o.max_time_s)
        row.update(median_ms=t.median, p20_ms=t.quantile(0.2), p80_ms=t.quantile(0.8), repeats=len(t.samples_ms))
        flops = case.flops(row["pass"]) if row["pass"] in ("fwd", "bwd", "fwd+bwd") else None
        if flops and not fused_split_pass(row, case):
            row["tflops"] = flops / (t.median * 1e-3) / 1e12
        if o.memory and o.device.startswith("cuda"):
            row["peak_mem_mb"] = measure.cuda_peak_mb(setup, run)

    def _cpu_memory(self, case: Case, rows: list[dict], timed: list[str]) -> None:
        _progress(f"    peak memory of {len(timed)} implementations in a fresh process ...")
        try:
            probe = measure.cpu_peak_memory(case, timed, [*self.opts.passes, "step"], self.opts.seed)
        except Exception as exc:
            for r in rows:
                if r["impl"] in timed:
                    r["memory_error"] = error_text(exc)
            return
        for r in rows:
            res = probe["results"].get(r["impl"], {})
            if r["pass"] in res:
                r["peak_mem_mb"] = res[r["pass"]]
                if not probe["hwm_reset"]:
                    r["memory_note"] = "high-water mark could not be reset: cumulative over earlier passes"
            elif "error" in res:
                r["memory_error"] = res["error"]


class _Mismatch(Exception):
    pass


def fused_split_pass(row: dict, case: Case) -> bool:
    """A separate fwd or bwd row of one of our backends where the bound's gradients come with its forward (a plain
    mean or sum; fp16 inputs take the unfused backward): the forward does the backward's GEMMs, so neither row's
    time is what its nominal FLOP count or eager's same pass assume."""
    return (row["impl"].startswith("rmi_fast[") and row["pass"] in ("fwd", "bwd") and case.op != "train_step"
            and case.dtype != "fp16")


def derive(rows: list[dict], case: Case) -> None:
    """Speedup against the baseline implementation and, for fused rows, the share of the GEMM reference's rate; the
    separate fwd and bwd rows of fused backends get a note instead."""
    by = {(r["impl"], r["pass"]): r for r in rows if r.get("median_ms")}
    base = baseline_name(case)
    for r in rows:
        if not r.get("median_ms"):
            continue
        if fused_split_pass(r, case):
            r["note"] = FUSED_NOTE
            continue
        b = by.get((base, r["pass"]))
        if b:
            r["speedup_vs_eager"] = b["median_ms"] / r["median_ms"]
        g = by.get(("gemm-x4", r["pass"]))
        if g and r["impl"].startswith("rmi_fast[") and r["impl"] != "rmi_fast[torch]":
            r["pct_gemm"] = 100.0 * g["median_ms"] / r["median_ms"]


def run(cases: list[Case], opts: Options, on_case=None) -> dict:
    return Runner(opts).run(cases, on_case)
