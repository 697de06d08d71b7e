"""Timing and peak memory of one pass of one implementation.

Timing: CPU wall-clock medians after warm-up (``time.perf_counter``); on a GPU, CUDA events around the timed region
only. A backward pass runs its forward in an untimed setup step each repetition.

Peak memory: on a GPU the caching allocator's peak (``torch.cuda.max_memory_allocated``) above what was allocated
before the pass. On the CPU the resident high-water mark (``getrusage(...).ru_maxrss``) in a fresh subprocess per
case (:func:`cpu_peak_memory`, which runs ``python -m rmi_fast.bench.measure``; read as VmHWM, see
:func:`_maxrss_mb`), above the process's resident size after imports, input creation and the pass's setup. Between measurements the high-water mark is reset through
``/proc/self/clear_refs``; glibc is told to give every allocation of 1 MiB or more back to the system on free, so
memory freed by one implementation is not silently reused by the next.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import cases as cases_mod
from . import impls as impls_mod

Setup = Callable[[], object]
Run = Callable[[object], None]


def pass_steps(fn: Callable, leaves: list[torch.Tensor], autograd: bool, pass_: str) -> tuple[Setup, Run]:
    """(setup, run) of a pass: setup is untimed (clears gradients; runs the forward of a backward pass)."""

    def clear():
        for t in leaves:
            t.grad = None

    if not autograd:
        return (lambda: None), (lambda _: fn())
    if pass_ == "fwd":
        return clear, (lambda _: fn())
    if pass_ == "bwd":
        def forward():
            clear()
            return fn()

        return forward, (lambda out: out.backward())
    if pass_ == "fwd+bwd":
        return clear, (lambda _: fn().backward())
    raise ValueError(f"pass must be one of {cases_mod.PASSES}, got {pass_!r}")


@dataclass
class Timing:
    samples_ms: list[float]

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_ms)
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pass(setup: Setup, run: Run, device: str, *, warmup: int, repeats: int, max_time_s: float) -> Timing:
    """Median-ready samples in ms: ``warmup`` untimed runs, then up to ``repeats`` timed ones (at least 3 when the
    time cap ``max_time_s`` stops it early)."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        run(setup())
    sync(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats:
        state = setup()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            run(state)
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run(state)
            samples.append((time.perf_counter() - t0) * 1e3)
        del state
        if len(samples) >= 3 and time.perf_counter() - start_all > max_time_s:
            break
    return Timing(samples)


def cuda_peak_mb(setup: Setup, run: Run) -> float:
    """Extra GPU memory of one pass: the allocator's peak above what was allocated after its setup."""
    state = setup()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(state)
    torch.cuda.synchronize()
    del state
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------ CPU: resident memory

def _maxrss_mb() -> float:
    """The resident high-water mark in MiB: VmHWM of /proc/self/status where there is one, else ru_maxrss.

    Both are the same counter of the address space; ru_maxrss is also raised to the mark at which any thread of the
    process last exited, and that part cannot be reset, so a reset followed by ru_maxrss can under-report.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _reset_hwm() -> bool:
    """Reset the resident high-water mark to the current resident size (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _probe(case: cases_mod.Case, impl_names: list[str], passes: list[str], seed: int) -> dict:
    """In this (fresh) process: the extra resident MiB of each pass of each implementation."""
    inputs = cases_mod.make_inputs(case, "cpu", seed)
    leaves = list(inputs.values())
    reset_ok = _reset_hwm()
    out: dict = {"hwm_reset": reset_ok, "results": {}}
    for name in impl_names:
        impl = impls_mod.find(name)
        res = out["results"][name] = {}
        try:
            fn = impl.build(case, inputs, "cpu")
            for p in impl.passes(case):
                if p not in passes:
                    continue
                setup, run = pass_steps(fn, leaves, impl.autograd(case), p)
                if reset_ok:  # warm-up: lazy buffers, compilation; not counted
                    run(setup())
                state = setup()
                gc.collect()
                _reset_hwm()
                base = _maxrss_mb()
                run(state)
                res[p] = max(0.0, _maxrss_mb() - base)  # the mark may read a page lower than at the reset
                del state
        except Exception as exc:  # recorded per implementation; the others still get measured
            res["error"] = f"{type(exc).__name__}: {exc}"
        fn = None
        gc.collect()
    return out


def cpu_peak_memory(case: cases_mod.Case, impl_names: list[str], passes: list[str], seed: int,
                    timeout_s: float = 900) -> dict:
    """Run :func:`_probe` in a fresh interpreter → {"hwm_reset": bool, "results": {impl: {pass: MiB | "error"}}}."""
    request = json.dumps({"case": case.as_dict(), "impls": impl_names, "passes": passes, "seed": seed})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="1048576")
    proc = subprocess.run([sys.executable, "-m", "rmi_fast.bench.measure", request], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory probe exited with {proc.returncode}: {tail[0]}")
    return json.loads(lines[-1])


def _main(argv: list[str]) -> int:
    req = json.loads(argv[0])
    result = _probe(cases_mod.case_from_dict(req["case"]), req["impls"], req["passes"], req["seed"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
