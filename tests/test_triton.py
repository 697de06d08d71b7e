"""The triton backend against the fp64 oracle of rmi_fast.reference.

Without a GPU the kernels run under Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), so shapes are small
but chosen to cross tile edges (tiles are 16 wide there): B ∈ {1, 2, 17, 33}, D not a multiple of 16, Bx ≠ By. With
a GPU the same tests run the compiled kernels, and the tests marked ``gpu`` add the large shapes (B² > 2³¹).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rmi_fast as rf
from rmi_fast import backends
from rmi_fast import reference as R
from rmi_fast.ops.pairwise import pair_reduce
from rmi_fast.ops.spec import PairSpec

from conftest import check_non_finite_like_torch, tolerance

pytestmark = [
    pytest.mark.skipif(backends.get("triton").unavailable() is not None,
                       reason=f"triton backend unavailable: {backends.get('triton').unavailable()}"),
    # The interpreter evaluates both sides of every tl.where with numpy (e.g. log 0 = −∞ on a tile's padding rows,
    # which no store keeps): its floating-point warnings are expected.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUNDS = ["infonce", "nwj", "dv", "smile", "jsd"]
FP32 = tolerance(torch.float32)


def _inputs(xs, ys, dtype=torch.float32, seed=0, device=DEVICE):
    """Correlated (x, y) with scores of order 1; a 2-D operand is broadcast over the other's groups."""
    g = torch.Generator().manual_seed(seed)
    D = xs[-1]
    x = torch.randn(xs, generator=g, dtype=torch.float64) / math.sqrt(D)
    y = 0.8 * torch.randn(ys, generator=g, dtype=torch.float64) / math.sqrt(D)
    same_groups = len(xs) == 3 and len(ys) == 3 and xs[0] == ys[0]
    base = x if x.dim() == 2 or same_groups else x[0]
    n = min(xs[-2], ys[-2])
    y[..., :n, :] += 0.6 * base[..., :n, :]  # the positive pairs (i, i) are correlated
    return (x.to(device, dtype).requires_grad_(), y.to(device, dtype).requires_grad_())


def _backend(variant="auto", split=None):
    from rmi_fast.triton import TritonBackend

    return TritonBackend(variant, split)


def _oracle_bound(bound, x, y, scale, weights, **kw):
    """fp64 per-anchor terms and the gradients of Σ weights·terms for x, y and scale (same rounded inputs)."""
    x64 = x.detach().cpu().double().requires_grad_()
    y64 = y.detach().cpu().double().requires_grad_()
    s64 = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    t = R.BOUNDS[bound](x64, y64, s64, **kw)
    if x.dim() == 2 and y.dim() == 2:
        t = t.squeeze(0)
    return (t.detach(),) + torch.autograd.grad((t * weights.cpu().double()).sum(), (x64, y64, s64))


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual.detach().cpu().double(), expected.cpu().double(), **(tol or FP32))


# ------------------------------------------------------------------------------------------------ public functions

SHAPES = {
    "B2": ((2, 5), (2, 5)),
    "B17_D13": ((17, 13), (17, 13)),
    "B33_D40": ((33, 40), (33, 40)),
    "x_broadcast": ((17, 11), (3, 17, 11)),
    "y_broadcast": ((2, 17, 9), (17, 9)),
}


# every bound on every small shape; B = 33 (three tiles each way, D over three K blocks) for a row and a sum bound
CASES = [(b, s) for b in BOUNDS for s in SHAPES if s != "B33_D40"] + [(b, "B33_D40") for b in ("infonce", "jsd")]


@pytest.mark.parametrize("bound, shape", CASES, ids=[f"{b}-{s}" for b, s in CASES])
def test_bound_per_anchor_terms_and_gradients(bound, shape):
    """reduction="none" with non-uniform upstream weights (the unfused backward) and a learnable scale."""
    x, y = _inputs(*SHAPES[shape])
    scale = torch.tensor(1.7, device=DEVICE, requires_grad=True)
    kw = {} if bound == "infonce" else {"clip": 0.8} if bound == "smile" else {}
    t = rf.mi_bound(x, y, bound, scale=scale, reduction="none", backend="triton", **kw)
    w = torch.rand(t.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    gx, gy, gs = torch.autograd.grad((t * w).sum(), (x, y, scale))
    ref, rgx, rgy, rgs = _oracle_bound(bound, x, y, 1.7, w, **kw)
    assert t.dtype == torch.float32 and gx.dtype == x.dtype
    _close(t, ref)
    _close(gx, rgx)
    _close(gy, rgy)
    _close(gs, rgs, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("bound", BOUNDS)
def test_bound_mean_uses_the_fused_path(bound):
    """reduction="mean": gradients computed with the statistics (row_sum in the same sweep) and rescaled."""
    x, y = _inputs((3, 17, 13), (17, 13), seed=2)
    scale = torch.tensor(0.9, device=DEVICE, requires_grad=True)
    t = rf.mi_bound(x, y, bound, scale=scale, backend="triton", diagonal="zero" if bound == "jsd" else "exclude")
    gx, gy, gs = torch.autograd.grad(2.5 * t, (x, y, scale))
    kw = {} if bound == "infonce" else {"diagonal": "zero" if bound == "jsd" else "exclude"}
    n = t.new_full((3, 17), 2.5 / 51)
    ref, rgx, rgy, rgs = _oracle_bound(bound, x, y, 0.9, n, **kw)
    _close(t, ref.mean())
    _close(gx, rgx)
    _close(gy, rgy)
    _close(gs, rgs, atol=1e-3, rtol=1e-3)


def test_infonce_single_row():
    x, y = _inputs((1, 6), (1, 6))
    t = rf.mi_bound(x, y, "infonce", reduction="none", backend="triton")
    (gx,) = torch.autograd.grad(t.sum(), x)
    assert t.item() == pytest.approx(0.0, abs=1e-6) and torch.count_nonzero(gx) == 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_loss_and_learnable_temperature(symmetric):
    za, zb = _inputs((17, 20), (17, 20), seed=4)
    loss = rf.infonce_loss(za, zb, temperature=0.3, symmetric=symmetric, reduction="none", backend="triton")
    w = torch.linspace(0.2, 1.8, 17, device=DEVICE)
    ga, gb = torch.autograd.grad((loss * w).sum(), (za, zb))
    a64, b64 = za.detach().cpu().double().requires_grad_(), zb.detach().cpu().double().requires_grad_()
    ref = R.infonce_loss(a64, b64, temperature=0.3, symmetric=symmetric)
    rga, rgb = torch.autograd.grad((ref * w.cpu().double()).sum(), (a64, b64))
    _close(loss, ref)
    _close(ga, rga)
    _close(gb, rgb)


def test_nt_xent_excludes_self_pairs():
    z = _inputs((2 * 9, 12), (2 * 9, 12), seed=6)[0]
    loss = rf.nt_xent_loss(z, n_views=2, temperature=0.5, backend="triton")
    (gz,) = torch.autograd.grad(loss, z)
    z64 = z.detach().cpu().double().requires_grad_()
    ref = R.nt_xent_loss(z64, 2, 0.5).mean()
    (rgz,) = torch.autograd.grad(ref, z64)
    _close(loss, ref)
    _close(gz, rgz)


def test_any_strides():
    x = torch.randn(40, 17, device=DEVICE).T.requires_grad_()  # (17, 40): feature stride 17
    y = torch.randn(17, 80, device=DEVICE)[:, ::2].requires_grad_()  # (17, 40): feature stride 2
    t = rf.mi_bound(x, y, "infonce", scale=0.3, backend="triton")
    gx, gy = torch.autograd.grad(t, (x, y))
    ref, rgx, rgy, _ = _oracle_bound("infonce", x, y, 0.3, torch.full((17,), 1 / 17))
    _close(t, ref.mean())
    _close(gx, rgx)
    _close(gy, rgy)


# ---------------------------------------------------------------------------------------------- kernel contract

# Every family / transform / diagonal option; Bx ≠ By with the positives at (i, i + diag_offset).
DIAGONALS = ("include", "exclude", "zero")
SPECS = (
    [PairSpec("row_lse", diagonal=d, columns=c) for d in DIAGONALS for c in (False, True)]
    + [PairSpec("global_lse", t, clip=0.7, diagonal=d) for t in ("none", "clip") for d in DIAGONALS]
    + [PairSpec("row_sum", t, diagonal=d) for t in ("exp_m1", "softplus") for d in DIAGONALS]
)


def _spec_id(s):
    return f"{s.family}-{s.transform}-{s.diagonal}" + ("-columns" if s.columns else "")


def _contract_case(spec, xs=(2, 17, 13), ys=(1, 23, 13), seed=0):
    """Inputs, fp64 oracle statistics, random upstream weights and the fp64 oracle gradients."""
    x, y = (t.detach() for t in _inputs(xs, ys, seed=seed))
    scale = torch.tensor(1.3, device=DEVICE)
    x64, y64, s64 = x.cpu().double(), y.cpu().double(), scale.cpu().double()
    ref = R.pair_stats(x64, y64, s64, spec)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [torch.rand(r.shape, generator=g, dtype=torch.float64) + 0.25 for r in ref]
    rgrads = R.pair_grads(x64, y64, s64, spec, ref, weights, (True, True, True))
    return x, y, scale, ref, [w.float().to(DEVICE) for w in weights], rgrads


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_contract_matches_oracle(spec):
    spec = dataclasses.replace(spec, diag_offset=4)
    x, y, scale, ref, weights, rgrads = _contract_case(spec)
    be = _backend()
    stats = be.stats(x, y, scale, spec)
    assert [tuple(s.shape) for s in stats] == spec.stat_shapes(2, 17, 23)
    for s, r in zip(stats, ref):
        assert s.dtype == torch.float32
        _close(s, r)
    for got, want in zip(be.grads(x, y, scale, spec, stats, weights, (True, True, True)), rgrads):
        _close(got, want)


@pytest.mark.parametrize("want", [(True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("family", ["row_lse", "row_sum"])
def test_only_wanted_gradients(family, want):
    rows = family == "row_lse"
    spec = PairSpec(family, "none" if rows else "softplus", diagonal="exclude", columns=rows)
    x, y, scale, ref, weights, rgrads = _contract_case(spec, xs=(1, 17, 13), ys=(2, 17, 13))
    be = _backend()
    stats = be.stats(x, y, scale, spec)
    got = be.grads(x, y, scale, spec, stats, weights, want)
    for g, w, r in zip(got, want, rgrads):
        assert (g is None) != w
        if w:
            _close(g, r)


# (family, transform, diagonal, forced backward variant, broadcast side, deterministic): row_sum fuses in every
# variant; row_lse's online sweep (statistic + dx in one) runs with the two-pass plan, other plans fall back.
FUSED = [
    ("row_sum", "exp_m1", "exclude", "auto", "x", False),
    ("row_lse", "none", "exclude", "two_pass", "x", True),
    ("row_lse", "none", "zero", "two_pass", "y", False),
    ("row_lse", "none", "include", "split", "x", False),
    ("row_lse", "none", "include", "whole", "y", False),
    ("row_sum", "exp_m1", "exclude", "whole", "x", True),
]


@pytest.mark.parametrize("family, transform, diagonal, variant, side, deterministic", FUSED,
                         ids=["-".join(map(str, c[:5])) + ("-det" if c[5] else "") for c in FUSED])
def test_fused_stats_and_grads(family, transform, diagonal, variant, side, deterministic):
    spec = PairSpec(family, transform, diagonal=diagonal, diag_offset=2, deterministic=deterministic)
    # D = 37: three feature blocks of the interpreter's 16 (three slices of the whole plan's tile), a ragged last
    xs, ys = ((1, 17, 37), (3, 20, 37)) if side == "x" else ((3, 17, 37), (1, 20, 37))
    x, y, scale, ref, _, _ = _contract_case(spec, xs, ys)
    ones = [torch.ones_like(r) for r in ref]
    rgrads = R.pair_grads(x.cpu().double(), y.cpu().double(), scale.cpu().double(), spec, ref, ones, (True,) * 3)
    stats, *grads = _backend(variant).stats_and_grads(x, y, scale, spec, (True, True, True))
    _close(stats[0], ref[0])
    for got, want in zip(grads, rgrads):
        _close(got, want)


# ----------------------------------------------------------------------------------------------- backward variants

VARIANTS = [("two_pass", None), ("atomic", None), ("split", 2), ("split", 3), ("whole", None), ("whole", 3)]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("variant, split", VARIANTS, ids=[f"{v}{s or ''}" for v, s in VARIANTS])
@pytest.mark.parametrize("side", ["x_broadcast", "y_broadcast"])
def test_backward_variant(side, variant, split, deterministic):
    if variant == "atomic" and deterministic:
        pytest.skip("the atomic variant is not deterministic (tested to refuse below)")
    spec = PairSpec("row_lse", diagonal="exclude", columns=True, diag_offset=3, deterministic=deterministic)
    xs, ys = ((1, 17, 37), (2, 36, 37)) if side == "x_broadcast" else ((2, 17, 37), (1, 36, 37))
    x, y, scale, ref, weights, rgrads = _contract_case(spec, xs, ys, seed=7)
    be = _backend(variant, split)
    stats = be.stats(x, y, scale, spec)
    for got, want in zip(be.grads(x, y, scale, spec, stats, weights, (True, True, True)), rgrads):
        _close(got, want)


@pytest.mark.parametrize("variant, split", VARIANTS, ids=[f"{v}{s or ''}" for v, s in VARIANTS])
def test_backward_variant_row_sum_fused(variant, split):
    spec = PairSpec("row_sum", "softplus", diagonal="zero")
    x, y, scale, ref, _, _ = _contract_case(spec, (2, 33, 37), (2, 33, 37), seed=8)
    ones = [torch.ones_like(r) for r in ref]
    rgrads = R.pair_grads(x.cpu().double(), y.cpu().double(), scale.cpu().double(), spec, ref, ones, (True,) * 3)
    stats, *grads = _backend(variant, split).stats_and_grads(x, y, scale, spec, (True, True, True))
    _close(stats[0], ref[0])
    for got, want in zip(grads, rgrads):
        _close(got, want)


def test_dispatch_thresholds():
    from rmi_fast.triton.backward import MAX_SPLIT, Plan, check_plan, choose_plan

    assert choose_plan(256, 256, 128, 1, False) == Plan("split", 4)  # 4 row blocks: split to fill the GPU
    assert choose_plan(256, 256, 128, 1, True).variant == "split"  # split stays atomic-free when deterministic
    assert choose_plan(512, 512, 2048, 64, False) == Plan("atomic")  # the paper's critic shape: enough programs
    assert choose_plan(65536, 65536, 512, 1, False) == Plan("two_pass")  # dy buffer too big for L2
    assert choose_plan(65536, 65536, 128, 1, True) == Plan("two_pass")  # deterministic: never atomics
    assert choose_plan(16384, 16384, 128, 1, True) == Plan("split", 3)  # 256 row blocks: < 4 per SM
    assert choose_plan(2, 2, 8, 1, False) == Plan("atomic")  # one block: nothing to split, one pass
    assert choose_plan(64, 8192, 64, 1, False).split <= MAX_SPLIT
    # the paper's critic (64 groups): S once per pass instead of once per 512 features, in two tiles at B = 512
    assert choose_plan(128, 128, 2048, 64, True, block_d=512, whole_max=256) == Plan("whole")
    assert choose_plan(512, 512, 2048, 64, True, block_d=512, whole_max=256) == Plan("whole", 2)
    assert choose_plan(2048, 2048, 2048, 64, True, block_d=512, whole_max=256).variant != "whole"  # 8 tiles
    assert choose_plan(128, 128, 512, 64, True, block_d=512, whole_max=256).variant != "whole"  # one block already
    assert choose_plan(128, 128, 2048, 16, True, block_d=512, whole_max=256).variant != "whole"  # 32 programs
    assert choose_plan(128, 128, 2048, 64, True, block_d=64).variant != "whole"  # no tile (fp32 on the FMA units)
    with pytest.raises(ValueError, match="cannot be deterministic"):
        check_plan(Plan("atomic"), deterministic=True)
    with pytest.raises(ValueError, match="variant must be one of"):
        check_plan(Plan("three_pass"), deterministic=False)


def test_whole_plan_cuts_batches_beyond_its_tile():
    """A whole plan asked for fewer chunks than the batch needs (limit + 1 rows: two tiles) gets as many as it needs,
    each pass running as many as its own side's rows take (over x's rows 1, over y's 2), and stays exact."""
    from rmi_fast.triton.backward import Plan, resolve_plan
    from rmi_fast.triton.common import whole_max_rows

    limit = whole_max_rows(torch.device(DEVICE), torch.float32)
    spec = PairSpec("global_lse", diagonal="exclude", diag_offset=-3)
    x, y, scale, _, weights, rgrads = _contract_case(spec, (1, 40, 16), (2, limit + 1, 16), seed=3)
    assert resolve_plan(x, y, spec, Plan("whole")) == Plan("whole", 2)
    be = _backend("whole")
    for got, want in zip(be.grads(x, y, scale, spec, be.stats(x, y, scale, spec), weights, (True, True, True)),
                         rgrads):
        _close(got, want)


def test_plans_keep_their_chunks_within_the_grid(monkeypatch):
    """Grid axis 1 holds (group, chunk): a chosen plan whose chunks would take it past 65535 programs gets fewer (or
    none), an explicit one is refused."""
    from rmi_fast import tuning
    from rmi_fast.triton.backward import Plan, resolve_plan

    spec = PairSpec("row_sum", transform="softplus", diagonal="exclude")
    x, row = torch.randn(1, 64, 16), torch.randn(1, 64, 16)
    y = row.expand(20000, 64, 16)  # groups as a stride-0 view: no memory
    monkeypatch.setattr(tuning, "triton_plan", lambda *args: ("split", 4))
    assert resolve_plan(x, y, spec, None) == Plan("split", 3)  # 3 · 20000 ≤ 65535
    assert resolve_plan(x, row.expand(40000, 64, 16), spec, None) == Plan("two_pass")
    with pytest.raises(ValueError, match="needs 80000 programs on grid axis 1, more than 65535"):
        resolve_plan(x, y, spec, Plan("split", 4))


def test_a_measured_whole_plan_without_its_tile_falls_back(monkeypatch):
    """Tables are keyed by the operands' width, not by allow_tf32: one measured with TF32 on may name "whole" for
    fp32, which has no tile with TF32 off. "auto" then takes choose_plan's plan; an explicit "whole" is refused."""
    from rmi_fast import tuning
    from rmi_fast.triton import backward
    from rmi_fast.triton.backward import Plan, choose_plan, resolve_plan

    monkeypatch.setattr(backward, "whole_max_rows", lambda *args: 0)  # as for fp32 on a GPU with TF32 off
    monkeypatch.setattr(tuning, "triton_plan", lambda *args: ("whole", 2))
    spec = PairSpec("row_lse")
    x, y = torch.randn(1, 256, 512), torch.randn(1, 256, 512)
    cfg = backward.tile_config(512, x.device, x.dtype)
    assert resolve_plan(x, y, spec, None) == choose_plan(256, 256, 512, 1, False, cfg["BLOCK_M"], cfg["BLOCK_N"],
                                                         cfg["BLOCK_D"], 0)
    with pytest.raises(ValueError, match="'whole' backward variant has no tile"):
        resolve_plan(x, y, spec, Plan("whole"))


# ---------------------------------------------------------------------------------------- determinism, precision

@pytest.mark.parametrize("bound", ["infonce", "jsd"])
def test_deterministic_is_bitwise_repeatable(bound):
    x, y = _inputs((17, 24), (2, 17, 24), seed=9)
    runs = []
    for _ in range(2):
        t = rf.mi_bound(x, y, bound, scale=3.0, reduction="none", backend="triton", deterministic=True)
        runs.append((t.detach(), *torch.autograd.grad(t.sum(), (x, y))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bound", ["infonce", "dv", "jsd"])
def test_half_precision_inputs(bound, dtype):
    """bf16/fp16 operands (tensor-core tiles), fp32 statistics, gradients in the input dtype."""
    x, y = _inputs((2, 17, 16), (17, 16), dtype=dtype, seed=10)
    t = rf.mi_bound(x, y, bound, scale=2.0, reduction="none", backend="triton")
    w = torch.rand(t.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    gx, gy = torch.autograd.grad((t * w).sum(), (x, y))
    assert t.dtype == torch.float32 and gx.dtype == dtype and gy.dtype == dtype
    ref, rgx, rgy, _ = _oracle_bound(bound, x, y, 2.0, w)
    tol = tolerance(dtype)
    _close(t, ref, **tol)
    _close(gx, rgx, **tol)
    _close(gy, rgy, **tol)


def test_fp16_keeps_tiny_upstream_weights():
    """Upstream weights ≈ 3e-6 (a mean over a large batch): each G_ij = w_i·P_ij is a few units of fp16's subnormal
    spacing (6e-8) while dx = scale·G·y is not so small. G is divided by max |w| before its fp16 rounding (and the
    result multiplied back), so nothing flushes to zero inside the kernel."""
    spec = PairSpec("row_lse")
    g = torch.Generator().manual_seed(11)
    x = (1e-3 * torch.randn(1, 17, 16, generator=g)).half().to(DEVICE)
    y = (0.25 * torch.randn(1, 17, 16, generator=g)).half().to(DEVICE)
    scale = torch.tensor(100.0, device=DEVICE)
    w = (torch.rand(1, 17, generator=g, dtype=torch.float64) + 0.25) * 3e-6
    x64, y64, s64 = x.cpu().double(), y.cpu().double(), scale.cpu().double()
    rdx = R.pair_grads(x64, y64, s64, spec, R.pair_stats(x64, y64, s64, spec), [w], (True, False, False))[0]
    be = _backend()
    dx = be.grads(x, y, scale, spec, be.stats(x, y, scale, spec), [w.float().to(DEVICE)], (True, False, False))[0]
    assert rdx.abs().max() > 1e-5  # representable in fp16 (subnormal spacing 6e-8)
    _close(dx.float() / 1e-5, rdx / 1e-5, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bound", ["infonce", "dv", "smile", "jsd", "infonce_symmetric"])
def test_huge_scores_are_finite_and_exact(bound):
    """|S| up to 1e4: every log-sum-exp keeps a running max (never a fixed shift)."""
    x, y = (t.detach() for t in _inputs((24, 8), (24, 8), seed=5))
    scale = 1e4 / (x @ y.T).abs().max().item()
    x.requires_grad_()
    if bound == "infonce_symmetric":
        t = rf.infonce_loss(x, y, temperature=1 / scale, symmetric=True, reduction="none", backend="triton")
        ref = R.infonce_loss(x.detach().cpu().double(), y.cpu().double(), 1 / scale, symmetric=True)
    else:
        t = rf.mi_bound(x, y, bound, scale=scale, reduction="none", backend="triton")
        ref = R.BOUNDS[bound](x.detach().cpu().double(), y.cpu().double(), scale).squeeze(0)
    (gx,) = torch.autograd.grad(t.sum(), x)
    assert torch.isfinite(t).all() and torch.isfinite(gx).all()
    _close(t, ref, atol=0.5, rtol=1e-4)  # 1e-4 of |S| ≈ 1e4 is fp32's resolution of the scores themselves


NON_FINITE_SPECS = {
    "row_lse": PairSpec("row_lse", diagonal="exclude"), "row_lse_columns": PairSpec("row_lse", columns=True),
    "global_lse": PairSpec("global_lse"), "global_lse_clip": PairSpec("global_lse", "clip", clip=2.0),
    "softplus": PairSpec("row_sum", "softplus"), "exp_m1": PairSpec("row_sum", "exp_m1", diagonal="exclude"),
}


@pytest.mark.parametrize("spec", list(NON_FINITE_SPECS))
@pytest.mark.parametrize("entry", ["inf", "nan"])
@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_scores_give_what_torch_gives(spec, entry, fused):
    """A +∞ score makes its row's (and column's, group's) log-sum-exp +∞, as torch.logsumexp does, not ∞ − ∞ = NaN;
    a NaN input stays NaN through every statistic and gradient it touches, the clamp of SMILE included."""
    spec = NON_FINITE_SPECS[spec]
    x, y = (t.detach() for t in _inputs((2, 17, 8), (17, 8), seed=12))
    x[0, 5, 3] = float(entry)  # row 5 of group 0: ±∞ scores (by the sign of y_j3), or NaN ones
    results = []
    for backend in ("triton", "torch"):
        xg = x.clone().requires_grad_()
        stats = pair_reduce(xg, y.unsqueeze(0), torch.tensor(1.0, device=DEVICE), spec, backend, fused=fused)
        (gx,) = torch.autograd.grad(sum(s.sum() for s in stats), xg)
        results.append([*stats, gx])
    clamped = entry == "inf" and spec.transform == "clip"  # SMILE's clamp takes ±∞ to ±clip: all stays finite
    assert clamped == all(torch.isfinite(t).all() for t in results[1])
    for ours, torch_backend in zip(*results):
        torch.testing.assert_close(ours, torch_backend, **FP32, equal_nan=True)


@pytest.mark.parametrize("spec", list(NON_FINITE_SPECS))
@pytest.mark.parametrize("entry", ["inf", "nan"])
def test_non_finite_scores_reach_every_gradient_as_torch_gives(spec, entry):
    """The same inputs through the backend's statistics and gradients for both operands and the scale."""
    x, y = (t.detach() for t in _inputs((2, 17, 8), (1, 17, 8), seed=12))
    x[0, 5, 3] = float(entry)
    check_non_finite_like_torch(_backend(), x, y, torch.tensor(1.0, device=DEVICE), NON_FINITE_SPECS[spec], FP32)


# --------------------------------------------------------------------------------------------------- availability

def test_backend_is_listed_and_refuses_what_it_cannot_serve():
    assert "triton" in rf.available_backends()
    be = backends.get("triton")
    x = torch.randn(1, 4, 3, dtype=torch.float64, device=DEVICE)
    assert "float64" in be.why_not(x, x, PairSpec("row_lse"))
    with pytest.raises(rf.BackendUnavailable, match="float64"):
        rf.mi_bound(x[0], x[0], backend="triton")


def test_without_gpu_or_interpreter_the_reason_is_given():
    code = textwrap.dedent("""
        import torch, rmi_fast as rf
        from rmi_fast import backends
        assert not torch.cuda.is_available()
        print(backends.get("triton").unavailable())
        try:
            rf.mi_bound(torch.randn(4, 3), torch.randn(4, 3), backend="triton")
        except rf.BackendUnavailable as exc:
            print(exc)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "backend='triton' cannot serve these inputs: no CUDA" in out.stdout


def test_fp32_follows_allow_tf32():
    from rmi_fast.triton.common import dot_precision

    cuda, before = torch.device("cuda"), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32, cuda) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32, cuda) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert dot_precision(torch.bfloat16, cuda) == "ieee"  # bf16/fp16 operands: tensor cores, fp32 accumulation


# The launchers themselves, run inside offline.compile_launches: every launch is compiled for sm_90 from the exact
# arguments it was given (Triton's specialisation on them included) instead of run. One JSON record per launch.
_COMPILE_SM90 = """
import dataclasses, json, torch
from rmi_fast.ops.spec import PairSpec
from rmi_fast.triton import backward, common, global_lse, offline, row_lse, row_sum
from rmi_fast.triton.backward import Plan

def launches(dtype, D, B=256, G=4):
    x, y, yg = (torch.randn(*shape, D).to(dtype) for shape in ((1, B), (1, B), (G, B)))
    s, want, one, zero = torch.tensor(2.0), (True, True, True), [torch.ones(1, B)], [torch.zeros(1, B)]
    clip, nwj = PairSpec("row_lse", columns=True), PairSpec("row_sum", "exp_m1", diagonal="exclude")
    critic = PairSpec("global_lse", "clip", diagonal="exclude")
    det = dataclasses.replace(critic, deterministic=True)
    yield "infonce fused", lambda: row_lse.stats_and_grads(x, y, s, PairSpec("row_lse"), want, Plan("two_pass"))
    # every other feature: no stride is 1, so the launch's loads are neither vectorised nor staged asynchronously
    xs, ys = (torch.randn(1, B, 2 * D).to(dtype)[..., ::2] for _ in range(2))
    yield "infonce fused strided", lambda: row_lse.stats_and_grads(xs, ys, s, PairSpec("row_lse"), want,
                                                                   Plan("two_pass"))
    yield "clip forward", lambda: row_lse.stats(x, y, s, clip)
    yield "clip backward", lambda: row_lse.grads(x, y, s, clip, zero * 2, one * 2, want, Plan("two_pass"))
    yield "nwj fused", lambda: row_sum.stats_and_grads(x, y, s, nwj, want, Plan("two_pass"))
    yield "jsd atomic", lambda: row_sum.stats_and_grads(x, y, s, PairSpec("row_sum", "softplus"), want, Plan("atomic"))
    yield "critic forward", lambda: global_lse.stats(x, yg, s, critic)  # few programs: 64-row blocks
    many = torch.randn(common.SMS, B, D).to(dtype)
    yield "critic forward, many groups", lambda: global_lse.stats(x, many, s, critic)  # 128-row blocks
    for name, spec in (("critic split", critic), ("critic split deterministic", det)):
        yield name, lambda spec=spec: global_lse.grads(x, yg, s, spec, [torch.zeros(G)], [torch.ones(G)], want,
                                                        Plan("split", 4))
    # the whole plan's tile at its largest (B = 256 rows)
    yield "critic whole", lambda: global_lse.grads(x, yg, s, critic, [torch.zeros(G)], [torch.ones(G)], want,
                                                   Plan("whole"))
    yield "infonce whole", lambda: row_lse.stats_and_grads(x, y, s, PairSpec("row_lse"), want, Plan("whole"))
    # with the column statistics' term the whole tile holds 128 rows (256 spill)
    yield "clip whole", lambda: row_lse.grads(x, y, s, clip, zero * 2, one * 2, want, Plan("whole"))

# every variant at the bar shape; elsewhere the paths a precision changes (fp16 NWJ's fp32 gradient tile, TF32, the
# FMA units of fp32 without TF32)
CASES = (("bf16", 512, None), ("bf16", 768, {"nwj fused"}), ("fp16", 64, {"infonce fused", "nwj fused"}),
         ("tf32", 96, {"infonce fused", "clip backward"}),
         ("fp32", 512, {"infonce fused", "critic split", "jsd atomic", "critic forward, many groups"}))
records = []
for precision, D, only in CASES:
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    for variant, launch in launches(dtype, D):
        if only is not None and variant not in only:
            continue
        with offline.compile_launches(90) as compiled:
            launch()
        records += [dict(precision=precision, D=D, variant=variant, **dataclasses.asdict(k)) for k in compiled]
print(json.dumps(records))
"""


@pytest.fixture(scope="module")
def sm90_launches():
    """What every launcher variant would run on an H100, compiled here: a record per launch (see _COMPILE_SM90)."""
    from rmi_fast.triton import offline

    if offline.unsupported() is not None:
        pytest.skip(offline.unsupported())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_launches_compile_for_sm90_without_spills(sm90_launches):
    """Every launcher variant compiles for sm_90 as launched (Triton's specialisation on the arguments included), fits
    a block's shared memory, and no kernel spills registers to local memory. Their tensor-core products are Hopper's
    wgmma (HGMMA) and, for contiguous inputs, their tiles are staged asynchronously (cp.async or TMA); strided inputs
    compile too, to plain loads, still without spills."""
    variants = {(r["precision"], r["D"], r["variant"]) for r in sm90_launches}
    assert len(variants) == 13 + 1 + 2 + 2 + 4, sorted(variants)
    forward_rows = {r["constants"]["BLOCK_M"] for r in sm90_launches if r["kernel"] == "lse_kernel"}
    assert forward_rows == {64, 128}, forward_rows
    for r in sm90_launches:
        where = f"{r['precision']} D={r['D']} {r['variant']}: {r['kernel']} {r['constants']}"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} B"
        assert r["shared_bytes"] <= 227 * 1024, f"{where} needs {r['shared_bytes']} B of shared memory (sm_90: 227 KB)"
        if r["kernel"] in ("sweep_kernel", "lse_kernel"):
            ops = r["instructions"]
            if "strided" not in r["variant"]:
                assert ops["LDGSTS"] + ops["UTMALDG"] > 0, f"{where}: tiles loaded without cp.async/TMA: {ops}"
            if r["precision"] != "fp32":  # fp32 without TF32 multiplies on the FMA units
                assert ops["HGMMA"] > 0, f"{where}: no wgmma: {ops}"


@pytest.mark.slow
def test_bar_shapes_compute_each_score_tile_once_per_pass(sm90_launches):
    """At the design's bar shapes (bf16, D = 512 and 768) the gradient sweeps keep as wide a slice of D as registers
    allow: one feature block at D = 512, so each backward pass computes the score tiles once, two at D = 768."""
    for r in sm90_launches:
        if r["precision"] == "bf16" and r["kernel"] == "sweep_kernel" and r["variant"] not in (
                "jsd atomic", "critic whole", "infonce whole", "clip whole"):
            blocks = math.ceil(r["D"] / r["constants"]["BLOCK_D"])
            assert blocks == (1 if r["D"] == 512 else 2), f"{r['variant']} at D={r['D']}: {blocks} feature blocks"


# ------------------------------------------------------------------------------------------------------- GPU only

def _chunked_oracle(x, y, scale, spec, weights, dtype, chunk=4096):
    """Statistics and (dx, dy, dscale) of the contract computed eagerly in ``dtype``, ``chunk`` rows at a time.

    The rows' pieces of S are built with the reference's own formulas (rmi_fast.reference: the transform, the
    diagonal through diag_offset shifted to the chunk, the gradient matrix); no B×B array exists at once.
    Run in fp32 (with TF32 off) it is the oracle; in bf16/fp16 it is eager PyTorch in that precision.
    """
    xc, yc, sc = x.to(dtype), y.to(dtype), scale.to(dtype)
    Bx = x.shape[1]

    def pieces():
        for i0 in range(0, Bx, chunk):
            # rows i0… of S: their positives sit diag_offset + i0 columns to the right of the piece's own row 0
            part = dataclasses.replace(spec, diag_offset=spec.diag_offset + i0)
            raw = torch.matmul(xc[:, i0:i0 + chunk], yc.transpose(-1, -2))
            yield i0, part, raw

    # statistics: row pieces directly; column and global log-sum-exps merged over the pieces
    rows, cols, flat = [], [], []
    for i0, part, raw in pieces():
        T = R._transformed(sc * raw, part, R._diagonal_mask(part, raw.shape[-2], raw.shape[-1], raw.device))
        if spec.family == "row_sum":
            rows.append(T.float().sum(-1))
        else:
            rows.append(torch.logsumexp(T.float(), dim=-1))
            if spec.columns:
                cols.append(torch.logsumexp(T.float(), dim=-2))
            flat.append(torch.logsumexp(T.float().flatten(-2), dim=-1))
    if spec.family == "global_lse":
        stats = [torch.logsumexp(torch.stack(flat), dim=0)]
    else:
        stats = [torch.cat(rows, dim=-1)] + ([torch.logsumexp(torch.stack(cols), dim=0)] if spec.columns else [])
    G = max(x.shape[0], y.shape[0])
    dx = torch.zeros((G, *x.shape[1:]), dtype=torch.float32, device=x.device)  # fp32 sums across the pieces
    dy = torch.zeros((G, *y.shape[1:]), dtype=torch.float32, device=x.device)
    dscale = torch.zeros((), dtype=torch.float32, device=x.device)
    for i0, part, raw in pieces():
        rs = [stats[0][:, i0:i0 + chunk] if spec.family != "global_lse" else stats[0]] + stats[1:]
        ws = [weights[0][:, i0:i0 + chunk] if spec.family != "global_lse" else weights[0]] + weights[1:]
        Gm = R.pair_grad_matrix(sc * raw, part, [r.to(dtype) for r in rs], [w.to(dtype) for w in ws])
        dx[:, i0:i0 + chunk] = (sc * torch.matmul(Gm, yc)).float()
        dy += (sc * torch.matmul(Gm.transpose(-1, -2), xc[:, i0:i0 + chunk])).float()
        dscale += (Gm.float() * raw.float()).sum()
    if x.shape[0] == 1:
        dx = dx.sum(0, keepdim=True)
    if y.shape[0] == 1:
        dy = dy.sum(0, keepdim=True)
    return stats, (dx.to(dtype), dy.to(dtype), dscale)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


GPU_CASES = [
    ("row_lse-columns", PairSpec("row_lse", columns=True)),
    ("global_lse-clip", PairSpec("global_lse", "clip", diagonal="exclude")),
    ("row_sum-softplus", PairSpec("row_sum", "softplus", diagonal="exclude")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name, spec", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize("B", [4096, 65536])
def test_gpu_large_batch_error_within_twice_eager(B, name, spec, dtype):
    """Against an fp32 chunked oracle, the kernels' error is at most 2× eager PyTorch's in the same dtype.

    B = 65536: B² > 2³¹, so every B·B offset must be 64-bit. No B×B array is stored by either side.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    D = 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1, B, D, device="cuda", generator=g) / math.sqrt(D)).to(dtype)
    y = (0.6 * x.float() + 0.8 * torch.randn(1, B, D, device="cuda", generator=g) / math.sqrt(D)).to(dtype)
    scale = torch.tensor(4.0, device="cuda")
    weights = [torch.rand(s, device="cuda", generator=g) / B for s in spec.stat_shapes(1, B, B)]
    be = _backend()
    stats = be.stats(x, y, scale, spec)
    grads = be.grads(x, y, scale, spec, stats, weights, (True, True, True))
    ref_stats, ref_grads = _chunked_oracle(x.float(), y.float(), scale, spec, weights, torch.float32)
    if dtype == torch.float32:
        eager_stats, eager_grads = ref_stats, ref_grads
        floor = 1e-4
    else:
        eager_stats, eager_grads = _chunked_oracle(x, y, scale, spec, weights, dtype)
        floor = 1e-3
    for got, want, eager in zip(list(stats) + list(grads), ref_stats + list(ref_grads),
                                eager_stats + list(eager_grads)):
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) <= max(2 * _rel_err(eager, want), floor)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_online_fused_row_lse(dtype):
    """B = 65536: the online sweep (statistic + dx) and the column sweep, against the chunked fp32 oracle."""
    torch.backends.cuda.matmul.allow_tf32 = False
    B, D = 65536, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(1, B, D, device="cuda", generator=g) / math.sqrt(D)).to(dtype)
    y = (0.6 * x.float() + 0.8 * torch.randn(1, B, D, device="cuda", generator=g) / math.sqrt(D)).to(dtype)
    scale = torch.tensor(10.0, device="cuda")
    spec = PairSpec("row_lse", diagonal="exclude")
    stats, *grads = _backend("two_pass").stats_and_grads(x, y, scale, spec, (True, True, True))
    ones = [torch.ones(1, B, device="cuda")]
    ref_stats, ref_grads = _chunked_oracle(x.float(), y.float(), scale, spec, ones, torch.float32)
    eager = _chunked_oracle(x, y, scale, spec, ones, dtype)[1] if dtype != torch.float32 else None
    assert _rel_err(stats[0], ref_stats[0]) < 1e-5
    for k, (got, want) in enumerate(zip(grads, ref_grads)):
        bound = 1e-4 if eager is None else max(2 * _rel_err(eager[k], want), 1e-3)
        assert _rel_err(got, want) <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("variant, split", VARIANTS, ids=[f"{v}{s or ''}" for v, s in VARIANTS])
def test_gpu_paper_critic_shape(variant, split):
    """dv with x broadcast over G = 64 locations, D = 2048 (the paper's critic), every backward variant."""
    spec = PairSpec("global_lse", diagonal="exclude")
    x = torch.randn(1, 256, 2048, device="cuda", dtype=torch.bfloat16) / 45
    y = torch.randn(64, 256, 2048, device="cuda", dtype=torch.bfloat16) / 45
    scale = torch.tensor(1.0, device="cuda")
    weights = [torch.rand(64, device="cuda")]
    be = _backend(variant, split)
    stats = be.stats(x, y, scale, spec)
    grads = be.grads(x, y, scale, spec, stats, weights, (True, True, True))
    ref_stats, ref_grads = _chunked_oracle(x.float(), y.float(), scale, spec, weights, torch.float32)
    _, eager_grads = _chunked_oracle(x, y, scale, spec, weights, torch.bfloat16)
    assert _rel_err(stats[0], ref_stats[0]) < 1e-4
    for got, want, eager in zip(grads, ref_grads, eager_grads):
        assert _rel_err(got, want) <= max(2 * _rel_err(eager, want), 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
@pytest.mark.parametrize("entry", ["inf", "nan"])
@pytest.mark.parametrize("spec", list(NON_FINITE_SPECS))
def test_gpu_non_finite_scores_give_what_torch_gives(spec, entry, precision):
    """The compiled kernels on inputs with an infinite or NaN entry, across several tiles: statistics as torch's
    (+∞ from a +∞ score, NaN kept through SMILE's clamp), gradients finite and close wherever torch's are."""
    x, y = (t.detach() for t in _inputs((2, 300, 96), (1, 300, 96), seed=13,
                                         dtype=torch.bfloat16 if precision == "bf16" else torch.float32))
    x[0, 150, 7] = float(entry)
    tol = FP32 if precision == "ieee" else dict(atol=2e-2, rtol=2e-2)
    check_non_finite_like_torch(_backend(), x, y, torch.tensor(1.0, device=DEVICE), NON_FINITE_SPECS[spec], tol)


@pytest.mark.gpu
def test_gpu_deterministic_bitwise_and_tf32_switch():
    x, y = _inputs((2, 3000, 96), (3000, 96), device="cuda")
    for allow in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = allow
        runs = []
        for _ in range(2):
            t = rf.mi_bound(x, y, "infonce", scale=5.0, backend="triton", deterministic=True)
            runs.append((t.detach(), *torch.autograd.grad(t, (x, y))))
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    torch.backends.cuda.matmul.allow_tf32 = False
