"""`rmi-fast bench` runs end to end and writes a valid report; bad arguments get clear errors. No timing assertions."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rmi_fast import cli
from rmi_fast.bench import cases, impls

REQUIRED = ("case", "impl", "bound", "B", "D", "G", "dtype", "pass", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
            "tflops")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    files = {"json": out / "bench.json", "plot": out / "bench.png", "markdown": out / "README.md"}
    files["markdown"].write_text("# results\n\n<!-- rmi-fast bench: begin -->\nold\n<!-- rmi-fast bench: end -->\ntail\n")
    cmd = [sys.executable, "-m", "rmi_fast.cli", "bench", "--quick", "--cases", "nwj", "--impls",
           "rmi_fast*,eager,gemm-x4", "--repeats", "2", "--max-time", "1",
           "--json", str(files["json"]), "--plot", str(files["plot"]), "--markdown", str(files["markdown"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, files


def test_quick_run_writes_a_valid_report(quick_run):
    proc, files = quick_run
    report = json.loads(files["json"].read_text())
    assert report["device"] and report["device_info"]["type"] == "cpu"
    assert {"torch", "rmi_fast", "python", "backends", "peers"} <= set(report["versions"])
    rows = report["rows"]
    assert rows and all(set(REQUIRED) <= set(r) for r in rows)
    assert {r["case"] for r in rows} == {"nwj/B2048/D128/fp32"}
    assert {r["pass"] for r in rows} == {"fwd+bwd"}
    by_impl = {r["impl"]: r for r in rows}
    assert {"rmi_fast[torch]", "eager", "gemm-x4"} <= set(by_impl)
    for r in rows:
        if r["median_ms"] is None:  # an implementation that cannot run here says why
            assert r.get("note") or r.get("error"), r
            continue
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["tflops"] > 0
        assert r["peak_mem_mb"] is not None or r.get("memory_error"), r
    assert by_impl["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert by_impl["eager"]["value"] == pytest.approx(by_impl["rmi_fast[torch]"]["value"], rel=1e-3, abs=1e-3)


def test_quick_run_prints_the_table_and_writes_plot_and_markdown(quick_run):
    proc, files = quick_run
    assert "nwj/B2048/D128/fp32" in proc.stdout and "median ms" in proc.stdout
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["markdown"].read_text()
    assert md.startswith("# results") and md.endswith("tail\n") and "old" not in md
    assert "| nwj/B2048/D128/fp32 |" in md


def test_rerender_from_json(quick_run, tmp_path, capsys):
    _, files = quick_run
    assert cli.main(["bench", "--from-json", str(files["json"]), "--markdown", str(tmp_path / "t.md")]) == 0
    assert "nwj/B2048/D128/fp32" in capsys.readouterr().out
    assert (tmp_path / "t.md").read_text().count("| nwj/B2048/D128/fp32 |") >= 1


def test_rerender_names_a_file_that_is_not_text(tmp_path, capsys):
    binary = tmp_path / "enc.pt"
    binary.write_bytes(b"\x80\x02}q\x00.")
    assert cli.main(["bench", "--from-json", str(binary)]) == 2
    assert f"cannot read benchmark JSON {binary}" in capsys.readouterr().err


def test_append_continues_an_earlier_report(quick_run, tmp_path):
    """A suite run in parts: the earlier rows stay, the case run again replaces its own rows, the new case is added;
    a report of another device is refused."""
    _, files = quick_run
    report = tmp_path / "parts.json"
    report.write_text(files["json"].read_text())
    earlier = json.loads(report.read_text())["rows"]
    argv = ["bench", "--quick", "--impls", "rmi_fast[torch],eager", "--repeats", "2", "--max-time", "0.5",
            "--no-memory", "--json", str(report), "--append"]
    assert cli.main([*argv, "--cases", "infonce"]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert rows[:len(earlier)] == earlier and {r["case"] for r in rows[len(earlier):]} == {"infonce/B2048/D128/fp32"}
    assert cli.main([*argv, "--cases", "nwj"]) == 0
    again = json.loads(report.read_text())
    keys = [(r["case"], r["impl"], r["pass"]) for r in again["rows"]]
    assert len(keys) == len(set(keys)) == len(rows)
    # gemm-x4 was not measured again: its earlier row stays, its speedup now against the new eager row
    kept, = [r for r in again["rows"] if r["impl"] == "gemm-x4"]
    old, = [r for r in earlier if r["impl"] == "gemm-x4"]
    eager, = [r for r in again["rows"] if r["impl"] == "eager" and r["case"] == kept["case"]]
    assert kept["median_ms"] == old["median_ms"] and eager["median_ms"] != old["median_ms"] / old["speedup_vs_eager"]
    assert kept["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / kept["median_ms"])
    assert len(again["commands"]) == 3
    other = json.loads(report.read_text())
    other["device"] = "another machine"
    report.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="--append: .* holds a run on 'another machine'"):
        cli.main([*argv, "--cases", "nwj"])


@pytest.mark.parametrize("edit, words", [
    (lambda r: r.update(rows=[1, 2]), "rows[0] must be an object, got int"),
    (lambda r: r["rows"][1].pop("impl"), "rows[1] needs a string 'impl', got None"),
    (lambda r: r["rows"][0].update(median_ms="x"), "rows[0] 'median_ms' must be a number or null, got 'x'"),
    (lambda r: r.update(device_info=3), "'device_info' must be an object, got int"),
    (lambda r: r["rows"][0].pop("B"), "rows[0] needs a positive integer 'B', got None"),
    (lambda r: r["rows"][0].update(bound=None), "rows[0] needs a string 'bound', got None"),
])
def test_rerender_refuses_a_malformed_report(quick_run, tmp_path, capsys, edit, words):
    _, files = quick_run
    report = json.loads(files["json"].read_text())
    edit(report)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    assert cli.main(["bench", "--from-json", str(bad)]) == 2
    assert f"{bad}: {words}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--passes", "fwd,sideways"], "unknown passes sideways"),
    (["bench", "--repeats", "0"], "expected a positive int"),
    (["bench", "--plot", "out.pdf"], "must end in .png"),
    (["bench", "--cases", "no-such-case"], "matches no case"),
    (["bench", "--cases", "no-such-case", "--list"], "matches no case"),
    (["bench", "--impls", "rmi_fast*,no-such-impl"], "--impls no-such-impl matches no implementation"),
    (["bench", "--device", "tpu"], "--device must be"),
    (["bench", "--quick", "--device", "cuda"], None),
    (["bench", "--quick", "--impls", "memeff,inf-cl"], "--impls memeff,inf-cl selects no implementation of the "
                                                       "selected cases on cpu"),
    (["bench", "--seed", str(2**64)], "expected an integer in [0, 2**63)"),
    (["tune", "--quick", "--install"], "its table cannot be --install-ed"),
    (["bench", "--quick", "--append"], "--append adds to the report of --json FILE"),
])
def test_bad_arguments_are_explained(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code != 0
    text = str(exc.value.code) + capsys.readouterr().err
    if message:
        assert message in text


def test_rerender_keeps_a_row_without_its_p80_and_spares_a_file_without_markers(quick_run, tmp_path, capsys):
    _, files = quick_run
    report = json.loads(files["json"].read_text())
    report["rows"][0]["p80_ms"] = None
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(report))
    assert cli.main(["bench", "--from-json", str(partial), "--markdown", str(tmp_path / "new" / "table.md")]) == 0
    assert "| nwj/B" in (tmp_path / "new" / "table.md").read_text()
    notes = tmp_path / "NOTES.md"
    notes.write_text("my notes\n")
    capsys.readouterr()
    assert cli.main(["bench", "--from-json", str(partial), "--markdown", str(notes)]) == 2
    assert f"--markdown {notes}: the file exists without the markers" in capsys.readouterr().err
    assert notes.read_text() == "my notes\n"


def test_peers_are_checked_against_ours_when_ours_are_not_selected(monkeypatch, tmp_path):
    """--impls eager alone: its value is still checked against an rmi_fast backend before it is timed."""
    build = impls.Eager.build

    def off_by_two(self, case, inputs, device):
        fn = build(self, case, inputs, device)
        return lambda: 2 * fn()

    monkeypatch.setattr(impls.Eager, "build", off_by_two)
    out = tmp_path / "eager.json"
    cli.main(["bench", "--quick", "--cases", "nwj", "--impls", "eager", "--passes", "fwd+bwd", "--repeats", "1",
              "--max-time", "0.1", "--no-memory", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["median_ms"] is None and r["error"].startswith("mismatch: value") for r in rows)


def test_registry_names_are_unique_and_every_impl_is_findable():
    for suite in cases.SUITES.values():
        names = [c.name for c in suite]
        assert len(names) == len(set(names))
    for impl in impls.registry():
        assert impls.find(impl.name) is impl.__class__ or impls.find(impl.name).name == impl.name


def test_impl_patterns_take_exact_names_and_globs():
    """"rmi_fast[cpp]" is also a glob (its brackets match one character): the exact name selects it."""
    assert impls.matches("rmi_fast[cpp]", ["rmi_fast[cpp]"])
    assert impls.matches("rmi_fast[cpp]", ["rmi_fast*"]) and impls.matches("eager", ["torch.compile", "eag*"])
    assert not impls.matches("rmi_fast[torch]", ["rmi_fast[cpp]"]) and not impls.matches("eager", ["compile"])


def test_fused_backends_split_passes_carry_a_note_not_a_rate():
    """Our fused backends compute the gradients in the forward: their separate fwd and bwd rows get a note and no
    speedup (fwd+bwd keeps both); eager's rows, and ours in fp16 (unfused backward), are compared as usual."""
    from rmi_fast.bench.runner import FUSED_NOTE, derive

    for dtype, fused in (("fp32", True), ("fp16", False)):
        case = cases.Case("infonce", 1024, 128, dtype=dtype)
        rows = [{"case": case.name, "impl": impl, "pass": p, "median_ms": ms}
                for impl, ms in (("rmi_fast[cpp]", 2.0), ("eager", 4.0)) for p in ("fwd", "bwd", "fwd+bwd")]
        derive(rows, case)
        for r in rows:
            split_of_ours = fused and r["impl"] == "rmi_fast[cpp]" and r["pass"] != "fwd+bwd"
            assert (r.get("note") == FUSED_NOTE) is split_of_ours
            assert ("speedup_vs_eager" in r) is not split_of_ours


def test_case_prefixes_end_at_a_slash():
    """"infonce" selects the infonce cases, not infonce_loss's; longer prefixes and globs work as before."""
    suite = cases.SUITES["cpu"]
    names = {c.name for c in cases.select(suite, ["infonce"])}
    assert names and all(n.startswith("infonce/") for n in names)
    assert {c.name for c in cases.select(suite, ["infonce/B8192"])} == {"infonce/B8192/D128/fp32"}
    assert {c.name for c in cases.select(suite, ["dv/G64xB128"])} == {"dv/G64xB128/D2048/fp32/xbcast"}
    assert {c.name for c in cases.select(suite, ["infonce_loss/*"])} == {
        c.name for c in suite if c.name.startswith("infonce_loss/")}
