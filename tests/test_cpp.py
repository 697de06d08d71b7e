"""The C++ CPU kernels beyond the generic suites: many tiles and threads, fused vs unfused, huge scores, offset
diagonals, bitwise repeatability, memory, low precision, NaN, strides and the portable SIMD build."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rmi_fast as rf
from rmi_fast import backends, memory
from rmi_fast import reference as R
from rmi_fast.ops.spec import PairSpec

pytestmark = pytest.mark.skipif(backends.get("cpp").unavailable() is not None,
                                reason=f"cpp backend unavailable: {backends.get('cpp').unavailable()}")

F32 = dict(atol=2e-4, rtol=2e-4)
SPECS = {
    "infonce": PairSpec("row_lse"),
    "infonce_sym": PairSpec("row_lse", columns=True),
    "nt_xent": PairSpec("row_lse", diagonal="exclude"),
    "dv": PairSpec("global_lse", diagonal="exclude"),
    "smile": PairSpec("global_lse", "clip", clip=1.5, diagonal="exclude"),
    "nwj": PairSpec("row_sum", "exp_m1", diagonal="exclude"),
    "jsd": PairSpec("row_sum", "softplus", diagonal="exclude"),
    "jsd_zero": PairSpec("row_sum", "softplus", diagonal="zero"),
    "dv_zero": PairSpec("global_lse", diagonal="zero"),
}


@pytest.fixture
def cpp():
    return backends.get("cpp")


@pytest.fixture(autouse=True)
def _threads(torch_threads):
    """Two threads so that partitions and their reductions are exercised; restored afterwards."""
    torch_threads(2)


def _embeddings(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale / math.sqrt(shape[-1])


def _weights(spec, G, Bx, By, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) + 0.5 for s in spec.stat_shapes(G, Bx, By)]


def _oracle(x, y, scale, spec, weights):
    """fp64 statistics and gradients of the torch backend (the readable eager definition) on the same inputs."""
    x64, y64, s64 = x.double(), y.double(), torch.tensor(float(scale), dtype=torch.float64)
    stats = R.pair_stats(x64, y64, s64, spec)
    return stats, R.pair_grads(x64, y64, s64, spec, stats, [w.double() for w in weights], (True, True, True))


def _check(cpp, x, y, scale, spec, atol=2e-4, rtol=2e-4):
    G = max(x.shape[0], y.shape[0])
    weights = _weights(spec, G, x.shape[1], y.shape[1])
    s = torch.tensor(scale)
    stats = cpp.stats(x, y, s, spec)
    grads = cpp.grads(x, y, s, spec, stats, weights, (True, True, True))
    ref_stats, ref_grads = _oracle(x, y, scale, spec, weights)
    for got, ref in zip(stats, ref_stats):
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(SPECS))
def test_many_tiles_against_oracle(cpp, name):
    """B = 1000, D = 70: many row tiles, a ragged last tile, two partitions."""
    x = _embeddings((1, 1000, 70), 0)
    y = 0.5 * x + _embeddings((1, 1000, 70), 1)
    _check(cpp, x, y, 3.0, SPECS[name])


@pytest.mark.parametrize("name", ["infonce_sym", "dv", "smile", "jsd"])
def test_groups_with_a_broadcast_operand(cpp, name):
    x = _embeddings((1, 300, 20), 2)
    y = _embeddings((3, 300, 20), 3)
    _check(cpp, x, y, 2.0, SPECS[name])
    _check(cpp, y, x, 2.0, SPECS[name])


@pytest.mark.parametrize("name", ["infonce_sym", "infonce", "dv", "smile", "nwj", "jsd"])
@pytest.mark.parametrize("G,broadcast", [(2, None), (4, "x"), (9, "y"), (8, "x"), (3, "x")])
def test_groups_split_across_threads(cpp, name, G, broadcast):
    """Where the groups divide among the threads (G = 2, 4, 8 on two; G = 9 ≥ 4·2 in uneven chunks), each thread
    sweeps whole groups alone; G = 3 cuts every group's rows instead. Both agree with the oracle, fused and given
    the statistics, and with one thread, whichever operand is broadcast."""
    spec = SPECS[name]
    x = _embeddings((1 if broadcast == "x" else G, 40, 16), 13)
    y = 0.5 * x + _embeddings((1 if broadcast == "y" else G, 40, 16), 14)
    _check(cpp, x, y, 3.0, spec)
    s = torch.tensor(3.0)
    two = cpp.stats_and_grads(x, y, s, spec, (True, True, True))
    torch.set_num_threads(1)
    one = cpp.stats_and_grads(x, y, s, spec, (True, True, True))
    for a, b in zip([*two[0], *two[1:]], [*one[0], *one[1:]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_equals_unfused(cpp, name):
    spec = SPECS[name]
    x = _embeddings((2, 333, 24), 4)
    y = _embeddings((2, 333, 24), 5)
    s = torch.tensor(4.0)
    stats, dx, dy, ds = cpp.stats_and_grads(x, y, s, spec, (True, True, True))
    ref_stats = cpp.stats(x, y, s, spec)
    ref = cpp.grads(x, y, s, spec, ref_stats, [torch.ones_like(t) for t in ref_stats], (True, True, True))
    for a, b in zip(stats, ref_stats):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip((dx, dy, ds), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_symmetric_infonce_with_huge_scores(cpp):
    """|S| up to 1e4: row and column log-sum-exps finite and exact (running maxima merged across tiles)."""
    x = torch.nn.functional.normalize(_embeddings((1, 500, 32), 6), dim=-1)
    y = torch.nn.functional.normalize(_embeddings((1, 500, 32), 7), dim=-1)
    spec = SPECS["infonce_sym"]
    stats = cpp.stats(x, y, torch.tensor(1e4), spec)
    ref, _ = _oracle(x, y, 1e4, spec, _weights(spec, 1, 500, 500))
    assert stats[0].abs().max() > 1e3
    for got, want in zip(stats, ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=0.05, rtol=1e-5)
    _, dx, dy, _ = cpp.stats_and_grads(x, y, torch.tensor(1e4), spec, (True, True, False))
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all()
    loss = rf.infonce_loss(x[0], y[0], temperature=1e-4, symmetric=True, backend="cpp")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["dv", "smile"])
def test_reference_rising_past_fp32_range_between_tiles(cpp, name):
    """The fused global log-sum-exp keeps a partition's dy partial relative to its running maximum. When a later
    tile raises that maximum by more than about 104, the factor exp(old − new) underflows to 0: the partial must be
    zeroed, not left as it was. Rows 0–149 score near 0, rows 150–299 near 150; row tiles of 128 put both kinds in
    one partition's tiles."""
    g = torch.Generator().manual_seed(17)
    x = torch.zeros(1, 300, 2)
    x[0, :150, 1] = 1.0
    x[0, 150:, 0] = 1.0
    x += 0.01 * torch.randn(x.shape, generator=g)
    y = torch.stack([torch.ones(300), 0.01 * torch.randn(300, generator=g)], -1)[None]
    spec = dataclasses.replace(SPECS[name], clip=200.0)
    stats, dx, dy, dscale = cpp.stats_and_grads(x, y, torch.tensor(150.0), spec, (True, True, True))
    ref_stats, ref_grads = _oracle(x, y, 150.0, spec, [torch.ones(1)])
    torch.testing.assert_close(stats[0].double(), ref_stats[0], **F32)
    for got, ref in zip((dx, dy, dscale), ref_grads):
        torch.testing.assert_close(got.double(), ref, **F32)


@pytest.mark.parametrize("diagonal", ["exclude", "zero"])
@pytest.mark.parametrize("family,transform", [("row_lse", "none"), ("global_lse", "none"), ("global_lse", "clip"),
                                              ("row_sum", "exp_m1"), ("row_sum", "softplus")])
@pytest.mark.parametrize("offset", [30, -5])
def test_diagonal_offset(cpp, family, transform, diagonal, offset):
    """Bx != By: row i's diagonal entry is column i + diag_offset (y holds other ranks' rows too)."""
    spec = PairSpec(family, transform, clip=1.0, diagonal=diagonal, diag_offset=offset,
                    columns=family == "row_lse")
    x = _embeddings((2, 90, 12), 8)
    y = _embeddings((2, 150, 12), 9)
    _check(cpp, x, y, 2.0, spec)


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("name", ["infonce_sym", "dv", "smile", "jsd", "nwj"])
def test_bitwise_repeatable(cpp, name, G):
    """G = 4 on two threads: the groups are split across the threads, a broadcast x's gradient summed over them."""
    spec = SPECS[name]
    B = 700 // G
    x = _embeddings((1, B, 40), 10)
    y = _embeddings((G, B, 40), 11)
    s = torch.tensor(5.0)
    w = _weights(spec, G, B, B)
    for _ in range(2):
        runs = [(cpp.stats_and_grads(x, y, s, spec, (True, True, True)),
                 cpp.grads(x, y, s, spec, cpp.stats(x, y, s, spec), w, (True, True, True))) for _ in range(3)]
        flat = [[t for part in (fused[0], fused[1:], unfused) for t in part] for fused, unfused in runs]
        for other in flat[1:]:
            assert all(torch.equal(a, b) for a, b in zip(flat[0], other))
        torch.set_num_threads(1)  # and again single-threaded


def test_no_quadratic_memory():
    """A fused call at B = 6144 grows the peak RSS by far less than one B×B fp32 matrix (151 MB)."""
    code = textwrap.dedent("""
        import resource, torch, rmi_fast as rf
        from rmi_fast import backends
        from rmi_fast.ops.spec import PairSpec
        torch.set_num_threads(2)
        B, D = 6144, 32
        x, y = torch.randn(1, B, D) / 6, torch.randn(1, B, D) / 6
        cpp, s = backends.get("cpp"), torch.tensor(2.0)
        cpp.stats_and_grads(x[:, :256], y[:, :256], s, PairSpec("row_lse"), (True, True, True))  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for spec in (PairSpec("row_lse", columns=True), PairSpec("global_lse"), PairSpec("row_sum", "softplus")):
            cpp.stats_and_grads(x, y, s, spec, (True, True, True))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < 6144 * 6144 * 4 / 4, f"peak RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", ["infonce_sym", "dv", "jsd"])
def test_huge_page_outputs_against_oracle(cpp, name):
    """Gradients of 2 MiB and more (here dy, 4 MiB, and its partials) come from the huge-page allocator: same values."""
    x = _embeddings((1, 128, 2048), 15)
    y = 0.5 * x + _embeddings((4, 128, 2048), 16)
    _check(cpp, x, y, 3.0, SPECS[name])


def test_huge_page_tensors_are_freed():
    """rmi_fast.memory.empty_like's tensors own their memory: 200 of 16 MiB, each dropped, leave the RSS flat."""
    code = textwrap.dedent("""
        import resource, torch
        from rmi_fast import memory
        like = torch.empty(4, 1024, 1024)
        t = memory.empty_like(like)
        assert t.shape == like.shape and t.dtype == torch.float32 and t.is_contiguous()
        t.fill_(1.5)
        assert float(t.sum()) == 1.5 * like.numel()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(200):
            memory.empty_like(like).fill_(0.0)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB over 200 tensors of 16 MiB"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(cpp, dtype):
    x = _embeddings((1, 257, 33), 12).to(dtype)
    y = _embeddings((1, 257, 33), 13).to(dtype)
    for name in ("infonce_sym", "smile", "jsd"):
        spec = SPECS[name]
        stats, dx, dy, ds = cpp.stats_and_grads(x, y, torch.tensor(3.0), spec, (True, True, True))
        assert stats[0].dtype == torch.float32 and dx.dtype == dtype and dy.dtype == dtype
        ref_stats, (rdx, rdy, rds) = _oracle(x.float(), y.float(), 3.0, spec, [torch.ones_like(t) for t in stats])
        for a, b in zip(stats, ref_stats):
            torch.testing.assert_close(a.double(), b, **F32)
        torch.testing.assert_close(dx.double(), rdx, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(dy.double(), rdy, atol=2e-2, rtol=2e-2)
    xa = x[0].clone().requires_grad_()
    t = rf.infonce_loss(xa, y[0], backend="cpp")
    (gx,) = torch.autograd.grad(t, xa)
    assert t.dtype == torch.float32 and gx.dtype == dtype


@pytest.mark.parametrize("name", ["infonce_sym", "dv", "smile", "nwj", "jsd"])
def test_nan_is_never_finite(cpp, name):
    spec = SPECS[name]
    x = _embeddings((1, 200, 16), 14)
    y = _embeddings((1, 200, 16), 15)
    x[0, 123, 5] = float("nan")
    stats, dx, dy, ds = cpp.stats_and_grads(x, y, torch.tensor(2.0), spec, (True, True, True))
    if spec.family == "global_lse":
        assert torch.isnan(stats[0]).all()
    else:
        assert torch.isnan(stats[0][0, 123]) and torch.isfinite(stats[0][0, :123]).all()
    if spec.columns:
        assert torch.isnan(stats[1]).all()
    # Every dy_j sums over row 123 (dy_123 too, unless its pair (123, 123) is excluded from the negatives).
    others = torch.arange(200) != 123
    assert torch.isnan(dy[0, others]).any(-1).all() and torch.isnan(ds)
    assert torch.isnan(dx[0, 123]).all()


def test_any_strides(cpp):
    base = _embeddings((2, 40, 300), 16)
    x = base[:, :, ::3].transpose(0, 1)[:, :, :60].transpose(0, 1)  # non-contiguous (2, 40, 60)
    y = _embeddings((60, 2, 40), 17).permute(1, 2, 0)
    assert not x.is_contiguous() and not y.is_contiguous()
    spec = SPECS["infonce_sym"]
    got = cpp.stats_and_grads(x, y, torch.tensor(2.0), spec, (True, True, True))
    want = cpp.stats_and_grads(x.contiguous(), y.contiguous(), torch.tensor(2.0), spec, (True, True, True))
    for a, b in zip([*got[0], *got[1:]], [*want[0], *want[1:]]):
        assert torch.equal(a, b)


def test_capabilities(cpp):
    x = torch.randn(1, 8, 4, dtype=torch.float64)
    assert "fp64" in cpp.why_not(x, x, SPECS["infonce"])
    assert "CPU" in cpp.why_not(x.float().to("meta"), x.float().to("meta"), SPECS["infonce"])
    assert backends.select("auto", x, x, SPECS["infonce"]).name == "torch"
    big = torch.randn(1, 4096, 4)
    assert backends.select("auto", big, big, SPECS["infonce"]).name == "cpp"
    assert cpp.fused and cpp.name == "cpp"


_BUILD_SPECS = (PairSpec("row_lse", columns=True), PairSpec("global_lse", "clip", clip=1.0, diagonal="exclude"),
                PairSpec("row_sum", "softplus", diagonal="exclude"), PairSpec("row_sum", "exp_m1"))


@pytest.mark.parametrize("D", [9, 48])
@pytest.mark.parametrize("isa,gemm", [("base", None), ("avx2", None), ("avx2", "blas"), (None, None),
                                      (None, "blas")])
def test_every_build_against_oracle(isa, gemm, D):
    """Each instruction-set build (RMI_FAST_CPU_ISA caps the choice; a CPU without it gets the next narrower one),
    with its register-blocked tile GEMMs (D = 48, a multiple of the vector width) or the BLAS (D = 9, or
    RMI_FAST_CPU_GEMM=blas), agrees with the fp64 oracle. 150 rows: ragged row blocks and column panels."""
    code = textwrap.dedent(f"""
        import sys, torch, rmi_fast._C as C
        from rmi_fast import backends
        from rmi_fast.ops.spec import PairSpec
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randn(1, 150, {D}, generator=g) / {D} ** 0.5 for _ in range(2))
        out = [C.cpu_isa(), C.cpu_tile_gemm()]
        for spec in {_BUILD_SPECS!r}:
            st, dx, dy, ds = backends.get("cpp").stats_and_grads(x, y, torch.tensor(1.7), spec, (True, True, True))
            out.append([t.double() for t in (*st, dx, dy, ds)])
        torch.save(out, sys.argv[1])
    """)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rmi_fast_isa_{os.getpid()}_{isa}_{gemm}_{D}.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RMI_FAST_CPU_ISA", "RMI_FAST_CPU_GEMM")}
    env.update({k: v for k, v in (("RMI_FAST_CPU_ISA", isa), ("RMI_FAST_CPU_GEMM", gemm)) if v})
    subprocess.run([sys.executable, "-c", code, path], env=env, check=True)
    chosen_isa, chosen_gemm, *results = torch.load(path)
    os.remove(path)
    if isa == "base":
        assert chosen_isa == "base" and chosen_gemm == "blas"
    if gemm == "blas":
        assert chosen_gemm == "blas"
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(1, 150, D, generator=g) / D ** 0.5 for _ in range(2))
    for spec, got in zip(_BUILD_SPECS, results):
        stats, grads = _oracle(x, y, 1.7, spec, [torch.ones(s) for s in spec.stat_shapes(1, 150, 150)])
        for a, b in zip(got, (*stats, *grads)):
            torch.testing.assert_close(a, b.double().reshape(a.shape), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["infonce_sym", "dv", "smile", "jsd"])
@pytest.mark.parametrize("G,B,D", [(1, 203, 80), (2, 37, 48), (1, 300, 16), (1, 70, 272)])
def test_register_blocked_gemm_shapes(cpp, name, G, B, D):
    """D a multiple of 16, so the tile GEMMs are the register-blocked ones wherever the CPU has AVX2 or AVX-512:
    ragged row blocks, a ragged last column panel and packing strip, reductions longer than one block (B = 203, 300),
    feature blocks of 4 vectors plus a narrower one (80 = 5 vectors, 272 = 17), a single narrow block (16, 48)."""
    x = _embeddings((G, B, D), 11)
    y = 0.5 * x + _embeddings((G, B, D), 12)
    _check(cpp, x, y, 3.0, SPECS[name])
    _check(cpp, x[:1], y, 3.0, SPECS[name])


def test_scores_stay_accurate_over_long_reductions(cpp):
    """A score is a sum of D products. Summed in blocks, as a BLAS does, its fp32 error stays within a few
    eps·scale·Σ_d|x_d·y_d| at D = 65536; one running sum over all of D had erred by 25–76 of those units (and
    InfoNCE terms rose above log B by far more than fp32 rounding). A row's LSE is dominated by its positive."""
    B, D, scale = 8, 65536, 100.0 / 65536
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, B, D, generator=g)
    y = 0.7 * x + 0.7 * torch.randn(1, B, D, generator=g)
    (lse,) = cpp.stats(x, y, torch.tensor(scale), SPECS["infonce"])
    (ref,) = R.pair_stats(x.double(), y.double(), torch.tensor(scale, dtype=torch.float64), SPECS["infonce"])
    unit = torch.finfo(torch.float32).eps * scale * (x.double() * y.double()).abs().sum(-1)
    err = ((lse.double() - ref).abs() / unit).max().item()
    assert err < 12, f"LSE error {err:.1f} eps·scale·Σ|x·y|"


@pytest.mark.parametrize("Gx,Gy", [(1, 5), (5, 1), (5, 5), (1, 1)])
@pytest.mark.parametrize("D", [13, 64])
def test_row_kernels_against_oracle(Gx, Gy, D):
    """The positive part's row kernels (csrc/cpu/rows.h): the paired dots with either side broadcast, and the
    weighted rows summed into a broadcast operand or added row by row (overwriting, accumulating, accumulating onto
    the rescaled rows), against fp64; D = 13 leaves a vector tail."""
    C = memory.compiled_cpu()
    x, y = _embeddings((Gx, 37, D), 20), _embeddings((Gy, 37, D), 21)
    G = max(Gx, Gy)
    torch.testing.assert_close(C.cpu_row_dots(x, y).double(), (x.double() * y.double()).sum(-1), **F32)
    w = torch.rand(G, 37, generator=torch.Generator().manual_seed(22))
    for out_groups, other in ((Gx, y), (Gy, x)):  # x's gradient from y's rows and y's from x's
        part = w.double().unsqueeze(-1) * other.double()
        want = part.sum(0, keepdim=True) if out_groups == 1 else part.expand(G, 37, D)
        start = _embeddings((out_groups, 37, D), 23)
        for accumulate, keep in ((False, 0.5), (True, 1.0), (True, -0.75)):
            out = start.clone()
            C.cpu_add_weighted_rows(out, w, other, accumulate, keep)
            torch.testing.assert_close(out.double(), want + keep * start.double() * accumulate, **F32)


def test_row_kernels_refuse_bad_inputs():
    C = memory.compiled_cpu()
    x, y = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    with pytest.raises(RuntimeError, match="y must be a contiguous float32"):
        C.cpu_row_dots(x, y.double())
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        C.cpu_row_dots(x.transpose(1, 2).contiguous().transpose(1, 2), y)
    with pytest.raises(RuntimeError, match="same rows and features"):
        C.cpu_row_dots(x, y[:, :5].contiguous())
    with pytest.raises(RuntimeError, match="group counts"):
        C.cpu_row_dots(x, torch.randn(3, 8, 4))
    with pytest.raises(RuntimeError, match="w must have 2 dimensions"):
        C.cpu_add_weighted_rows(x.clone(), torch.rand(2, 8, 1), y, True)
    with pytest.raises(RuntimeError, match="must agree"):
        C.cpu_add_weighted_rows(x.clone(), torch.rand(2, 7), y, True)
    with pytest.raises(RuntimeError, match="out must have 1 or 2 groups"):
        C.cpu_add_weighted_rows(torch.zeros(3, 8, 4), torch.rand(2, 8), y, True)
