"""Measured dispatch: the tuned tables (rmi_fast.tuning), the tuner that writes them (rmi-fast tune), and the
dispatch that follows them ("auto"'s backend, the Triton backward's variant)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

import rmi_fast as rf
from rmi_fast import backends, cli, tuning
from rmi_fast.bench import tune
from rmi_fast.ops.spec import PairSpec

TRITON = backends.get("triton").unavailable() is None
needs_triton = pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _entry(kernel="row_lse", B=1024, D=128, G=1, backend="cpp", bits=32, deterministic=False, plan=None, split=1):
    return tuning.Entry(kernel, bits, B, B, D, G, deterministic, backend, plan, split, {backend: 1.0})


@pytest.fixture
def use_table(tmp_path, monkeypatch):
    """Install a table (a list of entries) for every device through RMI_FAST_TUNED; forgotten afterwards."""

    def install(entries):
        path = tmp_path / "table.json"
        tuning.save(tuning.Table("test device", list(entries)), path)
        monkeypatch.setenv("RMI_FAST_TUNED", str(path))
        tuning.clear_cache()
        return path

    yield install
    monkeypatch.delenv("RMI_FAST_TUNED")
    tuning.clear_cache()


def _log2(B, D, G=1):
    return 2 * math.log2(B), math.log2(D), math.log2(G)


# --------------------------------------------------------------------------------------------------- the table

def test_table_round_trip_and_nearest_shape(tmp_path):
    table = tuning.Table("dev", [_entry(B=512, backend="torch"), _entry(B=8192, backend="cpp"),
                                 _entry(B=8192, D=512, backend="torch"), _entry("row_sum", B=512),
                                 _entry(B=2048, bits=16, backend="torch")])
    tuning.save(table, tmp_path / "t.json")
    loaded = tuning.load(tmp_path / "t.json")
    assert loaded.entries == table.entries and loaded.device == "dev"
    assert [e.ms for e in loaded.entries] == [e.ms for e in table.entries]

    def winner(B, D=128, kernel="row_lse", bits=32):
        return table.nearest(kernel, bits, *_log2(B, D), deterministic=False).backend

    assert winner(256) == "torch" and winner(1024) == "torch"  # 1 octave of B from 512, 3 from 8192
    assert winner(4096) == "cpp" and winner(65536) == "cpp"  # beyond the grid: its edge
    assert winner(2048) == "cpp"  # 2 octaves from each: the larger measured shape
    assert winner(8192, D=768) == "torch"  # nearest in D
    assert winner(64, bits=16) == "torch"  # its own precision class only
    assert table.nearest("global_lse", 32, *_log2(512, 128), deterministic=False) is None


def test_determinism_matters_only_for_triton_plans():
    table = tuning.Table("dev", [_entry(B=512, backend="cuda"),
                                 _entry(B=4096, backend="triton", plan="atomic"),
                                 _entry(B=4096, backend="cuda", deterministic=True, plan="split", split=4)])
    det = table.nearest("row_lse", 32, *_log2(4096, 128), deterministic=True)
    fast = table.nearest("row_lse", 32, *_log2(4096, 128), deterministic=False)
    assert (det.backend, det.plan, det.split) == ("cuda", "split", 4)
    assert (fast.backend, fast.plan) == ("triton", "atomic")
    assert table.nearest("row_lse", 32, *_log2(512, 128), deterministic=True).backend == "cuda"  # no plan: both
    assert table.nearest("row_lse", 32, *_log2(512, 128), deterministic=True, with_plan=True).plan == "split"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format=7), "format must be 1"),
    (lambda d: d.update(entries={}), "entries must be a list"),
    (lambda d: d["entries"][0].update(bits=8), r"entries\[0\]: bits must be 16, 32 or 64"),
    (lambda d: d["entries"][0].update(backend="cudnn"), r"entries\[0\]: backend must be one of"),
    (lambda d: d["entries"][0].update(plan="three_pass"), r"entries\[0\]: plan must be None or one of"),
    (lambda d: d["entries"][0].update(B=0), r"entries\[0\]: unknown fields \['B'\]"),
    (lambda d: d["entries"][0].pop("backend"), r"entries\[0\]: missing fields \['backend'\]"),
    (lambda d: d["entries"][0].update(deterministic="no"), r"entries\[0\]: deterministic must be true or false"),
    (lambda d: d["entries"][0].update(D=0), r"entries\[0\]: D must be a positive integer"),
    (lambda d: d["entries"][0].update(deterministic=True, plan="atomic"),
         r"entries\[0\]: a deterministic entry cannot have plan 'atomic'"),
])
def test_a_bad_table_names_the_file_and_the_field(tmp_path, mutate, message):
    data = tuning.Table("dev", [_entry()]).to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(tuning.TableError, match=rf"tuned table {path}: {message}"):
        tuning.load(path)


def test_an_unreadable_table_is_reported(tmp_path, use_table):
    path = use_table([_entry()])
    path.write_text("{not json")
    tuning.clear_cache()
    x = torch.randn(8, 4)
    with pytest.raises(tuning.TableError, match=f"tuned table {path}: .*Expecting property name"):
        rf.mi_bound(x, x, "infonce")


def test_device_keys():
    assert tuning.device_key("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.device_key("  ") == "unknown"
    assert tuning.default_path("NVIDIA H200").name == "nvidia-h200.json"
    assert [tuning.octave(n) for n in (1, 2, 3, 4, 1023, 1024, 65536)] == [0, 1, 1, 2, 9, 10, 16]


def test_cpu_device_names_carry_the_vector_extension(monkeypatch):
    """Cloud VMs report one model name for CPU generations with and without AVX-512, whose fastest backends differ:
    each gets its own table, and the shipped AVX-512 one is found by its name."""
    cpuinfo = {"model name": "AMD EPYC", "flags": "fpu sse2 avx2 fma avx512f avx512dq avx512_bf16"}
    monkeypatch.setattr(tuning, "_cpuinfo", cpuinfo.get)
    assert tuning.device_name("cpu") == "AMD EPYC avx512"
    assert tuning.default_path(tuning.device_name("cpu")).is_file()
    cpuinfo["flags"] = "fpu sse2 avx2 fma"
    assert tuning.device_name("cpu") == "AMD EPYC avx2" and tuning.cpu_simd_flags() == ["avx2", "fma"]
    cpuinfo["flags"] = "fp asimd"
    assert tuning.device_name("cpu") == "AMD EPYC"



def test_info_names_the_table_auto_follows(use_table, monkeypatch, tmp_path):
    path = use_table([_entry(), _entry(B=8192)])
    name = tuning.device_name("cpu")
    assert tuning.describe("cpu") == f"{name}: {path} (2 entries)"
    out = subprocess.run([sys.executable, "-m", "rmi_fast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert f"dispatch tables (backend='auto'):\n  cpu     {name}: {path} (2 entries)" in out.stdout, out.stderr
    monkeypatch.setenv("RMI_FAST_TUNED", "off")
    assert tuning.describe("cpu") == f"{name}: none (RMI_FAST_TUNED=off), first-principles defaults"
    (tmp_path / "bad.json").write_text("{")
    monkeypatch.setenv("RMI_FAST_TUNED", str(tmp_path / "bad.json"))
    assert tuning.describe("cpu").startswith(f"{name}: unusable, tuned table {tmp_path / 'bad.json'}: ")
    monkeypatch.setenv("RMI_FAST_TUNED", "")
    monkeypatch.setattr(tuning, "device_name", lambda device: "Some CPU avx2")
    tuning.clear_cache()
    assert tuning.describe("cpu") == (f"Some CPU avx2: none (some-cpu-avx2.json is not in {tuning.TABLE_DIR}), "
                                      "first-principles defaults")


# ------------------------------------------------------------------------------------------------ the dispatch

def test_auto_follows_the_table(use_table):
    use_table([_entry(B=64, D=32, backend="torch"), _entry(B=4096, D=32, backend="cpp"),
               _entry("global_lse", B=64, D=32, backend="triton")])  # not a CPU choice: ignored
    spec = PairSpec("row_lse")

    def chosen(B, spec=spec):
        x = torch.randn(1, B, 32)
        return backends.select("auto", x, x, spec).name

    assert chosen(48) == "torch" and chosen(100) == "torch"
    assert chosen(2048) == "cpp" and chosen(100_000 // 8) == "cpp"
    assert chosen(48, PairSpec("global_lse")) == "cpp"  # the measured winner cannot run here: preference order
    assert chosen(48, PairSpec("row_sum", transform="softplus")) == "cpp"  # no entry for the kernel: defaults
    # the public functions take the measured backend, with the same values
    x, y = torch.randn(40, 32, dtype=torch.float64).float(), torch.randn(40, 32)
    torch.testing.assert_close(rf.mi_bound(x, y, "infonce"), rf.mi_bound(x, y, "infonce", backend="cpp"))


def test_without_a_table_auto_uses_the_defaults(monkeypatch):
    monkeypatch.setenv("RMI_FAST_TUNED", "off")
    tuning.clear_cache()
    try:
        x = torch.randn(1, 16, 8)
        assert tuning.fastest_backend(x, x, PairSpec("row_lse")) is None
        assert backends.select("auto", x, x, PairSpec("row_lse")).name == backends.preference("cpu")[0]
    finally:
        monkeypatch.delenv("RMI_FAST_TUNED")
        tuning.clear_cache()


def test_on_a_gpu_auto_takes_the_cuda_kernels_only_where_measured(use_table, monkeypatch):
    """Without a table: Triton above its crossover, the torch backend below it (the CUDA kernels are checked only on
    a GPU); a table that measured the CUDA kernels fastest puts them first. A GPU's dispatch simulated on CPU
    tensors: its preference order, every backend capable, Triton's real crossover."""
    from rmi_fast.triton import TritonBackend

    class Capable(backends.Backend):
        def __init__(self, name, min_pairs_auto=0):
            self.name, self.min_pairs_auto = name, min_pairs_auto

    fakes = {"triton": Capable("triton", TritonBackend.min_pairs_auto), "cuda": Capable("cuda"),
             "torch": Capable("torch")}
    monkeypatch.setattr(backends, "preference", lambda device: backends._PREFERENCE["cuda"])
    monkeypatch.setattr(backends, "_load", lambda names: names)
    monkeypatch.setattr(backends, "get", fakes.__getitem__)

    def chosen(B):
        x = torch.randn(1, B, 8)
        return backends.select("auto", x, x, PairSpec("row_lse")).name

    use_table([])
    assert chosen(64) == "torch" and chosen(2047) == "torch" and chosen(2048) == "triton"
    use_table([_entry(B=64, D=8, backend="cuda")])
    assert chosen(64) == "cuda" and chosen(4096) == "cuda"  # the nearest measured shape


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_backward_follows_the_table(use_table, deterministic):
    from rmi_fast.triton import TritonBackend
    from rmi_fast.triton.backward import Plan, resolve_plan

    use_table([_entry("row_sum", B=64, D=16, backend="triton", plan="atomic"),
               _entry("row_sum", B=64, D=16, backend="triton", deterministic=True, plan="split", split=8)])
    spec = PairSpec("row_sum", transform="softplus", diagonal="exclude", deterministic=deterministic)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 40, 16, generator=g), torch.randn(1, 40, 16, generator=g)
    plan = resolve_plan(x, y, spec, None)
    # 40 rows are 3 interpreter blocks of 16: the measured 8 chunks are cut to 3
    assert plan == (Plan("split", 3) if deterministic else Plan("atomic"))
    assert resolve_plan(x, y, spec, Plan("two_pass")) == Plan("two_pass")  # an explicit plan wins
    scale = torch.tensor(2.0)
    got = TritonBackend().stats_and_grads(x, y, scale, spec, (True, True, True))
    want = backends.get("torch").stats_and_grads(x, y, scale, spec, (True, True, True))
    for a, b in zip([*got[0], *got[1:]], [*want[0], *want[1:]]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_auto_with_a_table_compiles_without_graph_breaks(use_table):
    use_table([_entry(B=16, D=8, backend="torch"), _entry(B=256, D=8, backend="cpp")])

    def loss(a, b):
        return rf.infonce_loss(a, b, temperature=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for B in (12, 300, 20):  # torch, cpp, torch again: each size's backend, in the graph
        a, b = torch.randn(B, 8, requires_grad=True), torch.randn(B, 8)
        got = compiled(a, b)
        (ga,) = torch.autograd.grad(got, a)
        want = loss(a, b)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ga, torch.autograd.grad(want, a)[0])


# ------------------------------------------------------------------------------------------------- the tuner

def _row(kernel, B, backend, ms, plan=None, split=1, deterministic=False, dtype="fp32"):
    return {"kernel": kernel, "dtype": dtype, "B": B, "D": 128, "G": 1, "backend": backend, "plan": plan,
            "split": split, "deterministic": deterministic, "median_ms": ms}


def test_derive_takes_the_fastest_of_each_shape():
    rows = [
        _row("row_lse", 512, "torch", 1.0), _row("row_lse", 512, "cuda", 1.5),
        _row("row_lse", 512, "triton", 2.0, "two_pass"), _row("row_lse", 512, "triton", 1.8, "split", 4),
        _row("row_lse", 512, "triton", 3.0, "two_pass", deterministic=True),
        _row("row_lse", 512, "triton", 2.5, "split", 4, deterministic=True),
        _row("row_lse", 8192, "torch", 40.0), _row("row_lse", 8192, "cuda", None),  # failed: not timed
        _row("row_lse", 8192, "triton", 9.0, "atomic"), _row("row_lse", 8192, "triton", 12.0, "two_pass"),
        _row("row_lse", 8192, "triton", 12.5, "two_pass", deterministic=True),
        _row("row_sum", 512, "cpp", 3.0, dtype="bf16"), _row("row_sum", 512, "torch", 2.0, dtype="bf16"),
    ]
    table = tune.derive(rows, "dev", eligible=("triton", "cuda", "torch"))
    got = {(e.kernel, e.bits, e.Bx, e.deterministic): (e.backend, e.plan, e.split, e.ms) for e in table.entries}
    assert got == {
        ("row_lse", 32, 512, False): ("torch", "split", 4, {"torch": 1.0, "cuda": 1.5, "triton": 1.8}),
        ("row_lse", 32, 512, True): ("torch", "split", 4, {"torch": 1.0, "cuda": 1.5, "triton": 2.5}),
        ("row_lse", 32, 8192, False): ("triton", "atomic", 1, {"torch": 40.0, "triton": 9.0}),
        ("row_lse", 32, 8192, True): ("triton", "two_pass", 1, {"torch": 40.0, "triton": 12.5}),
        # cpp is faster than nothing here: not eligible on this device; no Triton rows: one entry for both
        ("row_sum", 16, 512, False): ("torch", None, 1, {"cpp": 3.0, "torch": 2.0}),
    }


@needs_triton
def test_every_candidate_is_checked_before_it_is_timed(monkeypatch):
    """A variant that computes a wrong gradient is recorded with the reason, never timed, and never the winner."""
    from rmi_fast.triton import row_sum

    real = row_sum.stats_and_grads

    def atomic_is_wrong(x, y, scale, spec, want, plan=None):
        stat, dx, dy, dscale = real(x, y, scale, spec, want, plan)
        return (stat, dx * 1.1, dy, dscale) if plan is not None and plan.variant == "atomic" else (stat, dx, dy, dscale)

    monkeypatch.setattr(row_sum, "stats_and_grads", atomic_is_wrong)
    shape = tune.Shape("row_sum", "fp32", 40, 16)
    rows = tune.measure_shape(shape, "cpu", "dev", quick=True, warmup=0, repeats=1)
    by_name = {r["candidate"]: r for r in rows}
    assert set(by_name) == {"cpp", "torch", "triton:two_pass", "triton:atomic", "triton:split2", "triton:whole",
                            "triton:two_pass:det", "triton:split2:det", "triton:whole:det"}
    assert by_name["triton:atomic"]["error"].startswith("mismatch: dx differs")
    assert by_name["triton:atomic"]["median_ms"] is None
    assert all(r["median_ms"] > 0 and "error" not in r for n, r in by_name.items() if n != "triton:atomic")
    table = tune.derive(rows, "dev")
    assert {e.plan for e in table.entries} <= {"two_pass", "split", "whole"} and len(table.entries) == 2


def test_tune_command_writes_the_report_and_the_table(tmp_path, capsys, monkeypatch):
    # the candidates without Triton's interpreter (measured in the test above): cpp and torch, in seconds
    monkeypatch.setattr(tune, "_triton_usable", lambda device, quick: False)
    report, table = tmp_path / "tune.json", tmp_path / "table.json"
    assert cli.main(["tune", "--quick", "--kernels", "row_lse,global_lse", "--max-time", "0.05",
                     "--json", str(report), "--table", str(table)]) == 0
    out = capsys.readouterr().out
    assert f"table written to {table}" in out and "row_lse" in out
    data = json.loads(report.read_text())
    assert {r["kernel"] for r in data["rows"]} == {"row_lse", "global_lse"}
    assert all(r["median_ms"] > 0 for r in data["rows"])
    written = tuning.load(table)
    assert written.device == data["device"] and len(written.entries) == 5  # 2 + 2 square shapes, 1 with G = 3
    assert tune.table_from_report(str(report)).entries == written.entries
    assert cli.main(["tune", "--from-json", str(report)]) == 0


def test_tune_command_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--from-json .* is not a report of rmi-fast tune"):
        (tmp_path / "x.json").write_text("{}")
        cli.main(["tune", "--from-json", str(tmp_path / "x.json")])
    for report, words in [({"device": "x", "device_info": {"type": "tpu"}, "rows": []}, "device_info.type 'tpu'"),
                          ({"device": "x", "device_info": {"type": "cpu"}, "rows": [1, 2]},
                           "a row is not a measurement"),
                          ({"device": "x", "device_info": {"type": "cpu"}, "rows": [{"B": 1}]}, "KeyError: 'kernel'")]:
        (tmp_path / "x.json").write_text(json.dumps(report))
        with pytest.raises(SystemExit, match=f"--from-json .*{re.escape(words)}"):
            cli.main(["tune", "--from-json", str(tmp_path / "x.json")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda, but no CUDA device"):
            cli.main(["tune", "--device", "cuda"])
    with pytest.raises(SystemExit):
        cli.main(["tune", "--kernels", "row_max"])
    assert "unknown kernels row_max" in capsys.readouterr().err
