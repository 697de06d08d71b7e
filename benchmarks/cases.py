"""The pytest-benchmark view of the shared case registry (:mod:`rmi_fast.bench.cases`, also used by
``rmi-fast bench``): one test per case × implementation × pass, timed with the same passes and checked against ours
with the same tolerances as the CLI runner.

CPU: wall-clock rounds of ``benchmark.pedantic`` (``--benchmark-min-rounds`` of them, after warm-up). CUDA: the
same, synchronised, plus CUDA-event medians and the allocator's peak memory in ``extra_info``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from rmi_fast.bench import cases as registry
from rmi_fast.bench import impls, measure, runner

HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Param:
    device: str
    case: registry.Case
    impl: str
    pass_: str

    @property
    def id(self) -> str:
        return f"{self.device}-{self.case.name}-{self.impl}-{self.pass_}"


def params(op: str, symmetric: bool | None = None) -> list:
    """pytest.param for every suite case of ``op`` × every implementation listed for it × its passes."""
    out = []
    for kind, case in registry.for_op(op, symmetric):
        device = "cuda" if kind == "cuda" else "cpu"
        marks = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")] if kind == "cuda" else []
        for impl in impls.for_case(case, device):
            for pass_ in impl.passes(case):
                p = Param(device, case, impl.name, pass_)
                out.append(pytest.param(p, id=p.id, marks=marks))
    return out


@functools.lru_cache(maxsize=1)
def _reference(device: str, case: registry.Case):
    return runner.ours_reference(case, device, registry.make_inputs(case, device))


def run(benchmark, param: Param, rounds: int) -> None:
    """Check the implementation's value against ours, then time the pass."""
    case, device = param.case, param.device
    impl = impls.find(param.impl)
    reason = impl.why_not(case, device)
    if reason:
        pytest.skip(reason)
    inputs = registry.make_inputs(case, device)
    leaves = list(inputs.values())
    fn = impl.build(case, inputs, device)
    autograd = impl.autograd(case)
    value, grads = runner.evaluate(fn, leaves, autograd)
    ref = _reference(device, case)
    if ref is not None and not isinstance(impl, impls.Ours):
        bad = runner.mismatch(case, value, grads, *ref, device=device)
        if bad:
            pytest.fail(f"{impl.name} does not compute {case.name}: {bad}")
    grads = None
    setup, run_pass = measure.pass_steps(fn, leaves, autograd, param.pass_)
    benchmark.extra_info.update(case=case.name, impl=impl.name, bound=case.bound, B=case.B, D=case.D, G=case.G,
                                dtype=case.dtype, pass_=param.pass_, value=value)
    cuda = device == "cuda"
    warmup = 3 if cuda else 1
    median_s = None
    if cuda:
        t = measure.time_pass(setup, run_pass, device, warmup=warmup, repeats=max(rounds, 10), max_time_s=10.0)
        benchmark.extra_info.update(cuda_event_median_ms=t.median, cuda_event_p20_ms=t.quantile(0.2),
                                    cuda_event_p80_ms=t.quantile(0.8),
                                    peak_mem_mb=measure.cuda_peak_mb(setup, run_pass))
        median_s = t.median * 1e-3
        warmup = 0

    def untimed_setup():  # a backward pass's forward is launched here: it must finish before the clock starts
        state = setup()
        measure.sync(device)
        return (state,), {}

    def target(state):
        run_pass(state)
        measure.sync(device)

    benchmark.pedantic(target, setup=untimed_setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if median_s is None and benchmark.stats is not None:
        median_s = benchmark.stats.stats.median
    row = {"impl": impl.name, "pass": param.pass_}
    flops = case.flops(param.pass_) if param.pass_ in registry.PASSES else None
    if flops and median_s and not runner.fused_split_pass(row, case):
        benchmark.extra_info["tflops"] = flops / median_s / 1e12
