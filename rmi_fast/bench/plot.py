"""PNG figures of a benchmark report (matplotlib, Agg backend).

:func:`scaling` draws time and peak memory against B (at the most common D) and against D (at the B of the D sweep)
on log axes, one line per implementation, so the crossover where the fused kernels start to win is visible.
:func:`speedups` draws each implementation's speedup over eager PyTorch per case.
"""
from __future__ import annotations

from collections import Counter, defaultdict


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _timed(report: dict, pass_: str) -> list[dict]:
    return [r for r in report["rows"] if r["pass"] == pass_ and r.get("median_ms") and r["impl"] != "gemm-x4"]


def _sweeps(rows: list[dict]):
    """(rows of the B sweep, D fixed), (rows of the D sweep, B fixed)."""
    d0 = Counter(r["D"] for r in rows).most_common(1)[0][0]
    b_sweep = [r for r in rows if r["D"] == d0]
    others = [r for r in rows if r["D"] != d0]
    if not others:
        return b_sweep, []
    b0 = Counter(r["B"] for r in others).most_common(1)[0][0]
    return b_sweep, [r for r in rows if r["B"] == b0]


def _series(ax, rows: list[dict], x: str, y: str) -> None:
    lines = defaultdict(list)
    for r in rows:
        if r.get(y) is not None:
            lines[r["impl"]].append((r[x], r[y]))
    for impl, pts in lines.items():
        pts.sort()
        style = "-o" if impl.startswith("rmi_fast[") and impl != "rmi_fast[torch]" else "--s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def scaling(report: dict, path: str, pass_: str = "fwd+bwd") -> None:
    rows = _timed(report, pass_)
    if not rows:
        raise ValueError(f"no timed {pass_} rows to plot")
    plt = _pyplot()
    b_sweep, d_sweep = _sweeps(rows)
    ncols = 2 if d_sweep else 1
    fig, axes = plt.subplots(2, ncols, figsize=(6.5 * ncols, 8), squeeze=False)
    bound, dtype = rows[0]["bound"], rows[0]["dtype"]
    panels = [(b_sweep, "B", f"D = {b_sweep[0]['D']}")]
    if d_sweep:
        panels.append((d_sweep, "D", f"B = {d_sweep[0]['B']}"))
    for col, (sel, x, fixed) in enumerate(panels):
        _series(axes[0][col], sel, x, "median_ms")
        axes[0][col].set_title(f"{bound} {pass_}, {dtype}, {fixed}: time")
        axes[0][col].set_ylabel("median ms")
        _series(axes[1][col], sel, x, "peak_mem_mb")
        axes[1][col].set_title("extra peak memory")
        axes[1][col].set_ylabel("MB")
        axes[1][col].set_xlabel(x)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report.get('device')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedups(report: dict, path: str, pass_: str = "fwd+bwd") -> None:
    rows = [r for r in _timed(report, pass_) + _timed(report, "step") if r.get("speedup_vs_eager")]
    if not rows:
        raise ValueError(f"no {pass_} rows with a speedup over eager to plot")
    plt = _pyplot()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    value = {(r["case"], r["impl"]): r["speedup_vs_eager"] for r in rows}
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(cases) * max(1, len(impls)) ** 0.5 + 1.5))
    height = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        ys = [i + k * height for i, c in enumerate(cases) if (c, impl) in value]
        xs = [value[(c, impl)] for c in cases if (c, impl) in value]
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels(cases, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"speedup over eager PyTorch ({pass_}; training step: over rmi_fast[torch])")
    ax.set_title(str(report.get("device")), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
