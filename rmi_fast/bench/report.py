"""Rendering of benchmark rows: the terminal table, a markdown table (optionally spliced into a README between
markers), and loading a saved JSON report."""
from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- rmi-fast bench: begin -->", "<!-- rmi-fast bench: end -->"


def load(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read benchmark JSON {path}: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise ValueError(f"{path} is not an `rmi-fast bench --json` report (no 'rows' list)")
    for key in ("device_info", "versions"):
        if not isinstance(report.get(key, {}), dict):
            raise ValueError(f"{path}: '{key}' must be an object, got {type(report[key]).__name__}")
    for i, row in enumerate(report["rows"]):
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"{path}: rows[{i}] {problem}")
    return report


#: The fields of a row that the table and the plots read: names, the shape, and measurements (numbers, or null when
#: missing).
_ROW_TEXT = ("case", "impl", "pass", "bound", "dtype")
_ROW_SHAPE = ("B", "D", "G")
_ROW_NUMBERS = ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "tflops", "speedup_vs_eager", "pct_gemm")
_ROW_NOTES = ("error", "note", "memory_error")


def _row_problem(row) -> str | None:
    """What is wrong with one saved row (None when it can be rendered)."""
    if not isinstance(row, dict):
        return f"must be an object, got {type(row).__name__}"
    for key in _ROW_TEXT:
        if not isinstance(row.get(key), str):
            return f"needs a string '{key}', got {row.get(key)!r}"
    for key in _ROW_SHAPE:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"needs a positive integer '{key}', got {value!r}"
    for key in _ROW_NUMBERS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"'{key}' must be a number or null, got {value!r}"
    for key in _ROW_NOTES:
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"'{key}' must be a string or null, got {row[key]!r}"
    return None


def _rate(row: dict, gpu: bool) -> str:
    t = row.get("tflops")
    if t is None:
        return ""
    return f"{t:.1f}" if gpu else f"{t * 1e3:.1f}"


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 1000 else f"{v:.3g}"


def _cells(row: dict, gpu: bool) -> list[str]:
    spread = ""
    if row.get("p20_ms") is not None and row.get("p80_ms") is not None:
        spread = f"{_ms(row['p20_ms'])}–{_ms(row['p80_ms'])}"
    note = row.get("error") or row.get("note") or row.get("memory_error") or ""
    if row.get("error"):
        note = "ERROR " + note
    return [row["case"], row["impl"], row["pass"], _num(row.get("median_ms"), ".3f"), spread,
            _num(row.get("speedup_vs_eager"), ".2f") + ("x" if row.get("speedup_vs_eager") else ""),
            _rate(row, gpu), _num(row.get("pct_gemm"), ".0f"), _num(row.get("peak_mem_mb"), ".1f"), note]


def _headers(gpu: bool) -> list[str]:
    return ["case", "impl", "pass", "median ms", "p20–p80 ms", "vs eager", "TFLOP/s" if gpu else "GFLOP/s",
            "% gemm", "peak MB", "note"]


def _is_gpu(report: dict) -> bool:
    return report.get("device_info", {}).get("type") == "cuda"


def table(report: dict, rows: list[dict] | None = None, note_width: int = 60) -> str:
    """Fixed-width text table; consecutive rows of one case share its name."""
    gpu = _is_gpu(report)
    rows = report["rows"] if rows is None else rows
    body = []
    last = None
    for r in rows:
        cells = _cells(r, gpu)
        cells[-1] = cells[-1][:note_width]
        if cells[0] == last:
            cells[0] = ""
        else:
            last = cells[0]
        body.append(cells)
    head = _headers(gpu)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    right = {3, 4, 5, 6, 7, 8}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(c) for c in body]
    return "\n".join(line.rstrip() for line in lines)


def markdown(report: dict, passes=("fwd+bwd", "step")) -> str:
    """A markdown table of the headline rows (forward+backward and training steps) with the run's provenance."""
    gpu = _is_gpu(report)
    rows = [r for r in report["rows"] if r["pass"] in passes]
    v = report.get("versions", {})
    lines = [f"Device: {report.get('device')} · torch {v.get('torch')} · rmi_fast {v.get('rmi_fast')} · "
             f"{report.get('created', '')}", "",
             "| " + " | ".join(_headers(gpu)) + " |", "|" + "---|" * len(_headers(gpu))]
    for r in rows:
        cells = [c.replace("|", "\\|") for c in _cells(r, gpu)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: str | Path) -> None:
    """Write the markdown table to ``path``; in a file holding the BEGIN/END markers, replace only what is between."""
    path = Path(path)
    block = markdown(report)
    if path.exists():
        check_markdown_target(path)
        head, rest = path.read_text().split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block)


def check_markdown_target(path: str | Path) -> None:
    """An existing file is written only between its markers: one without them (a README, say) is refused whole."""
    path = Path(path)
    if path.is_file():
        text = path.read_text()
        if BEGIN not in text or END not in text:
            raise ValueError(f"--markdown {path}: the file exists without the markers {BEGIN} and {END} between "
                             "which the table goes; refusing to overwrite it")
