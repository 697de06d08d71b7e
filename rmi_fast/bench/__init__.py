"""Kernel benchmarks: the case registry (:mod:`.cases`), the implementations timed (:mod:`.impls`), timing and
memory (:mod:`.measure`), the runner (:mod:`.runner`), tables (:mod:`.report`) and figures (:mod:`.plot`).

:func:`bench` is what ``rmi-fast bench`` calls; ``benchmarks/`` holds the pytest-benchmark view of the same cases.
"""
from __future__ import annotations

from pathlib import Path

from . import cases as cases_mod


def list_cases(device: str, *, quick: bool = False, scaling: bool = False, patterns=None) -> list[str]:
    return [c.name for c in _selected(device, quick, scaling, patterns)]


def _selected(device: str, quick: bool, scaling: bool, patterns) -> list:
    """The suite's cases that the patterns select; ValueError when they select none."""
    suite = cases_mod.suite_name(device, quick=quick, scaling=scaling)
    selected = cases_mod.select(cases_mod.SUITES[suite], patterns)
    if not selected:
        names = ", ".join(c.name for c in cases_mod.SUITES[suite])
        raise ValueError(f"--cases {','.join(patterns)} matches no case of suite {suite!r}; its cases: {names}")
    return selected


def bench(*, device: str = "cpu", quick: bool = False, scaling: bool = False, case_patterns=None,
          impl_patterns=None, passes=None, repeats: int | None = None, warmup: int | None = None,
          max_time_s: float | None = None, memory: bool = True, seed: int = 0, json_path: str | None = None,
          append: bool = False, plot_path: str | None = None, markdown_path: str | None = None, command=None,
          echo=print) -> dict:
    """Run a suite and print its table; write the JSON (after every case), the PNG and the markdown table.

    device "cpu" or "cuda[:i]"; quick: the short CPU suite; scaling: the B and D sweeps (plot = scaling curves).
    append: keep the rows of an existing ``json_path`` report of this device, but those measured again (a suite run
    in parts; the table, markdown and plot show them all).
    Raises ValueError for a selection that matches nothing.
    """
    from . import report, runner

    if append and json_path is None:
        raise ValueError("--append adds to the report of --json FILE: give the file")
    suite = cases_mod.suite_name(device, quick=quick, scaling=scaling)
    selected = _selected(device, quick, scaling, case_patterns)
    if impl_patterns:
        from .impls import for_case, matches, registry

        known = [i.name for i in registry()]
        unmatched = [p for p in impl_patterns if not any(matches(name, [p]) for name in known)]
        if unmatched:
            raise ValueError(f"--impls {','.join(unmatched)} matches no implementation; known: {', '.join(known)}")
        if not any(matches(i.name, impl_patterns) for case in selected for i in for_case(case, device)):
            raise ValueError(f"--impls {','.join(impl_patterns)} selects no implementation of the selected cases on "
                             f"{device} (the GPU peers run on CUDA devices only)")
    if passes is None:
        passes = ("fwd+bwd",) if quick or scaling else cases_mod.PASSES
    opts = runner.Options(
        device=device, passes=tuple(passes), impl_patterns=impl_patterns,
        repeats=repeats if repeats is not None else (5 if quick or scaling else 10),
        warmup=warmup if warmup is not None else (3 if device.startswith("cuda") else 1),
        max_time_s=max_time_s if max_time_s is not None else (3.0 if quick else 10.0),
        memory=memory, seed=seed, json_path=json_path, append=append, suite=suite, command=list(command or []))
    result = runner.run(selected, opts)
    echo(report.table(result))
    if markdown_path:
        report.write_markdown(result, markdown_path)
    if plot_path:
        render_plot(result, plot_path, scaling=scaling)
    return result


def render_plot(result: dict, path: str, *, scaling: bool) -> None:
    from . import plot

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    (plot.scaling if scaling else plot.speedups)(result, path)
