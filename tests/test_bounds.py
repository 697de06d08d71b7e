"""Every bound, on every CPU backend, against the fp64 oracle of rmi_fast.reference: values, per-anchor terms and
gradients for x, y and a learnable scale, with a non-uniform upstream gradient, over odd shapes and groups."""
from __future__ import annotations

import math

import pytest
import torch

import rmi_fast as rf
from rmi_fast import backends
from rmi_fast import reference as R
from rmi_fast.ops.spec import PairSpec

from conftest import tolerance

BOUNDS = ["infonce", "nwj", "dv", "smile", "jsd"]
# (x shape, y shape): plain, odd sizes, each operand broadcast over groups, both grouped.
SHAPES = {
    "B2": ((2, 5), (2, 5)),
    "B17_D13": ((17, 13), (17, 13)),
    "B257_D70": ((257, 70), (257, 70)),
    "x_broadcast": ((19, 11), (4, 19, 11)),
    "y_broadcast": ((3, 23, 9), (23, 9)),
    "grouped": ((2, 31, 6), (2, 31, 6)),
}


def _inputs(xs, ys, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = xs[-1]
    x = (torch.randn(xs, generator=g, dtype=torch.float64) / math.sqrt(D)).to(dtype)
    y = (0.6 * x.to(torch.float64).expand(*ys[:-2], *xs[-2:]) if len(ys) >= len(xs) else 0.6 * x[0].to(torch.float64))
    y = (y + 0.8 * torch.randn(ys, generator=g, dtype=torch.float64) / math.sqrt(D)).to(dtype)
    return x.requires_grad_(), y.requires_grad_()


def _oracle(bound, x, y, scale, reduction, weights, **kw):
    """fp64 value and gradients of the oracle on the same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    s64 = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    t = R.BOUNDS[bound](x64, y64, s64, **kw)
    if x.dim() == 2 and y.dim() == 2:
        t = t.squeeze(0)
    value = {"mean": t.mean(), "sum": t.sum(), "none": t}[reduction]
    out = (value * weights.double()).sum() if reduction == "none" else value
    return (value.detach(),) + torch.autograd.grad(out, (x64, y64, s64))


def _kwargs(bound, diagonal):
    kw = {} if bound == "infonce" else {"diagonal": diagonal}
    if bound == "smile":
        kw["clip"] = 2.0
    return kw


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bound_matches_oracle(backend, bound, shape, reduction):
    x, y = _inputs(*SHAPES[shape])
    scale = torch.tensor(2.5, requires_grad=True)
    kw = _kwargs(bound, "exclude")
    t = rf.mi_bound(x, y, bound, scale=scale, reduction=reduction, backend=backend, **kw)
    assert t.dtype == torch.float32
    weights = torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none" else torch.ones(())
    gx, gy, gs = torch.autograd.grad((t * weights).sum(), (x, y, scale))
    ref, rgx, rgy, rgs = _oracle(bound, x, y, 2.5, reduction, weights, **kw)
    tol = tolerance(torch.float32)
    assert t.shape == ref.shape
    torch.testing.assert_close(t.double(), ref, **tol)
    torch.testing.assert_close(gx.double(), rgx, **tol)
    torch.testing.assert_close(gy.double(), rgy, **tol)
    torch.testing.assert_close(gs.double(), rgs, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("bound", ["nwj", "dv", "smile", "jsd"])
def test_zero_diagonal_compatibility(backend, bound):
    """diagonal="zero" reproduces the released code: S_ii counted as 0 among the negatives."""
    x, y = _inputs((13, 7), (13, 7), seed=3)
    kw = _kwargs(bound, "zero")
    t = rf.mi_bound(x, y, bound, scale=1.5, reduction="none", backend=backend, **kw)
    w = torch.linspace(0.5, 1.5, 13)
    gx, gy = torch.autograd.grad((t * w).sum(), (x, y))
    ref, rgx, rgy, _ = _oracle(bound, x, y, 1.5, "none", w, **kw)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(t.double(), ref, **tol)
    torch.testing.assert_close(gx.double(), rgx, **tol)
    torch.testing.assert_close(gy.double(), rgy, **tol)


def test_sum_reduction_and_infonce_single_row(backend):
    x, y = _inputs((9, 4), (9, 4))
    for bound in BOUNDS:
        total = rf.mi_bound(x, y, bound, reduction="sum", backend=backend)
        terms = rf.mi_bound(x, y, bound, reduction="none", backend=backend)
        torch.testing.assert_close(total, terms.sum(), atol=1e-5, rtol=1e-5)
    one = rf.mi_bound(x[:1], y[:1], "infonce", backend=backend)  # B = 1: the only class is the positive
    assert one.item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_flow_only_where_required(backend):
    x, y = _inputs((12, 5), (12, 5))
    y = y.detach()
    scale = torch.tensor(1.0)  # not learnable
    t = rf.mi_bound(x, y, "dv", scale=scale, backend=backend)
    t.backward()
    assert x.grad is not None and y.grad is None and scale.grad is None


@pytest.mark.parametrize("bound", ["infonce", "dv", "jsd"])
def test_retained_graph_backward_repeats(backend, bound):
    """A mean bound (fused where the backend fuses) run backward on a retained graph and then once more, freeing it,
    then through autograd.grad on a fresh graph: every gradient is the oracle's (the saved unit gradients are rescaled
    in place only by the backward that frees the graph)."""
    x, y = _inputs((2, 31, 6), (2, 31, 6))
    scale = torch.tensor(1.3, requires_grad=True)
    value = rf.mi_bound(x, y, bound, scale=scale, backend=backend)
    ref = _oracle(bound, x, y, 1.3, "mean", None, **_kwargs(bound, "exclude"))
    tol = tolerance(torch.float32)
    for passes in (1, 2):
        value.backward(retain_graph=passes == 1)
        for got, want in zip((x.grad, y.grad, scale.grad), ref[1:]):
            torch.testing.assert_close(got.double(), passes * want, **tol)
    again = torch.autograd.grad(rf.mi_bound(x, y, bound, scale=scale, backend=backend), (x, y, scale))
    for got, want in zip(again, ref[1:]):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("bound", ["infonce", "dv"])
def test_second_derivatives_are_refused(backend, bound):
    """create_graph through the kernels' first-order backward raises rather than leave this op out of a second
    derivative."""
    x, y = _inputs((17, 5), (17, 5))
    value = rf.mi_bound(x, y, bound, backend=backend) + x.pow(3).sum()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(value, x, create_graph=True)


@pytest.mark.parametrize("used", ["rows", "columns", "neither"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_statistic_left_unused_gets_no_gradient(backend, used, fused):
    """Only one of the row and column log-sum-exps reaches the loss (or neither, next to a term that does): the
    gradients are those of the used one alone, against the fp64 oracle with zero weight on the other."""
    from rmi_fast.ops.pairwise import pair_reduce
    from rmi_fast.ops.spec import PairSpec

    spec = PairSpec("row_lse", columns=True)
    x, y = (t.unsqueeze(0).detach().requires_grad_() for t in _inputs((23, 9), (23, 9)))
    r, c = pair_reduce(x, y, torch.tensor(2.0), spec, backend, fused=fused)
    loss = {"rows": r.sum(), "columns": c.sum(), "neither": (x * y).sum()}[used]
    if fused and used != "neither" and backends.get(backend).fused:
        with pytest.raises(RuntimeError, match="fused=False"):
            loss.backward()
        return
    loss.backward()
    s64 = torch.tensor(2.0, dtype=torch.float64)
    x64, y64 = x.detach().double(), y.detach().double()
    stats = R.pair_stats(x64, y64, s64, spec)
    w = [torch.full_like(stats[0], float(used == "rows")), torch.full_like(stats[1], float(used == "columns"))]
    dx, dy, _ = R.pair_grads(x64, y64, s64, spec, stats, w, (True, True, False))
    if used == "neither":
        dx, dy = dx + y64, dy + x64
    torch.testing.assert_close(x.grad.double(), dx, **tolerance(torch.float32))
    torch.testing.assert_close(y.grad.double(), dy, **tolerance(torch.float32))


@pytest.mark.parametrize("rows", ["compiled", "large", "small"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bound", ["infonce", "dv", "jsd"])
@pytest.mark.parametrize("shape", ["x_broadcast", "y_broadcast", "grouped"])
def test_grouped_positives_on_every_path(backend, bound, shape, reduction, rows, monkeypatch):
    """The positive part of grouped inputs on each of its paths: the C++ row kernels (contiguous fp32 CPU groups)
    and, without them, the elementwise product for small inputs and its skipping for large ones (batched
    matrix-vector products and einsum; forced here at small sizes). Fused (mean) and not (none), value and gradients,
    the scale's included, match the oracle."""
    from rmi_fast import memory
    from rmi_fast.ops import pairwise

    if rows == "compiled" and memory.compiled_cpu() is None:
        pytest.skip("the compiled module is not built")
    if rows != "compiled":
        monkeypatch.setattr(pairwise, "_row_kernels", lambda *tensors: None)
    monkeypatch.setattr(pairwise, "_PRODUCT_ELEMENTS", 0 if rows == "large" else 1 << 40)
    x, y = _inputs(*SHAPES[shape])
    scale = torch.tensor(1.3, requires_grad=True)
    value = rf.mi_bound(x, y, bound, scale=scale, backend=backend, reduction=reduction)
    weights = torch.rand(value.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    (value * weights if reduction == "none" else value).sum().backward()
    ref = _oracle(bound, x, y, 1.3, reduction, weights if reduction == "none" else None, **_kwargs(bound, "exclude"))
    tol = tolerance(torch.float32)
    for got, want in zip((value, x.grad, y.grad, scale.grad), ref):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("fused", [False, True])
def test_positives_alone(backend, fused):
    """Only pair_reduce's paired dots reach the loss: dx = w·y, dy = w·x; rows that differ are refused."""
    from rmi_fast.ops.pairwise import pair_reduce
    from rmi_fast.ops.spec import PairSpec

    x, y = _inputs((3, 17, 6), (17, 6))
    y = y.unsqueeze(0).detach().requires_grad_()
    w = torch.rand(3, 17, generator=torch.Generator().manual_seed(4))
    _, dots = pair_reduce(x, y, torch.tensor(2.0), PairSpec("global_lse", diagonal="exclude"), backend, fused=fused,
                          positives=True)
    (dots * w).sum().backward()
    torch.testing.assert_close(dots.double(), (x.double() * y.double()).sum(-1).detach(), **tolerance(torch.float32))
    torch.testing.assert_close(x.grad, w.unsqueeze(-1) * y.detach(), **tolerance(torch.float32))
    torch.testing.assert_close(y.grad, (w.unsqueeze(-1) * x.detach()).sum(0, keepdim=True), **tolerance(torch.float32))
    with pytest.raises(ValueError, match="same rows"):
        pair_reduce(x, y[:, :9], torch.tensor(2.0), PairSpec("global_lse"), backend, positives=True)


@pytest.mark.parametrize("name", ["auto", "torch", "cpp", "triton"])
def test_pair_reduce_refuses_operands_outside_the_contract(name):
    """Every backend assumes 3-D operands of one dtype and device, one D and group counts G or 1: pair_reduce says
    which of them does not hold before any backend runs (the cpp one would have cast a bf16 x to fp32, Triton's tile
    products refuse mixed operands only when compiled for a GPU)."""
    from rmi_fast.ops.pairwise import pair_reduce
    from rmi_fast.ops.spec import PairSpec

    x, spec, s = torch.randn(2, 8, 4), PairSpec("row_lse"), torch.tensor(1.0)
    for y, error, message in ((x.bfloat16(), TypeError, "same dtype, got torch.float32 and torch.bfloat16"),
                              (x[0], ValueError, r"must be \(G, B, D\)"),
                              (torch.randn(2, 8, 5), ValueError, "same feature size D, got 4 and 5"),
                              (torch.randn(3, 8, 4), ValueError, "group counts must match or be 1, got 2 and 3")):
        with pytest.raises(error, match=message):
            pair_reduce(x, y, s, spec, name)


def test_any_strides(backend):
    """Transposed and sliced views give the same result as their contiguous copies."""
    x = torch.randn(32, 17).T  # (17, 32), transposed
    y = torch.randn(17, 64)[:, ::2]  # (17, 32), every other column
    for bound in BOUNDS:
        a = rf.mi_bound(x, y, bound, reduction="none", backend=backend, scale=0.3)
        b = rf.mi_bound(x.contiguous(), y.contiguous(), bound, reduction="none", backend=backend, scale=0.3)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bound", ["infonce", "dv", "smile", "jsd"])
def test_huge_scores_are_finite_and_exact(backend, bound):
    """|S| up to 1e4: a running max (never a fixed shift) keeps the log-sum-exps exact."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 8, generator=g)
    y = x + 0.3 * torch.randn(24, 8, generator=g)
    scale = 1e4 / (x @ y.T).abs().max().item()
    t = rf.mi_bound(x, y, bound, scale=scale, reduction="none", backend=backend)
    ref = R.BOUNDS[bound](x.double(), y.double(), scale).squeeze(0)
    assert torch.isfinite(t).all()
    torch.testing.assert_close(t.double(), ref, atol=0.5, rtol=1e-4)  # 1e-4 of |S| ~ 1e4 is fp32's resolution


@pytest.mark.parametrize("bound", BOUNDS)
def test_nan_in_never_comes_out_finite(backend, bound):
    x, y = _inputs((10, 6), (10, 6))
    x = x.detach().clone()
    x[3, 2] = float("nan")
    t = rf.mi_bound(x, y.detach(), bound, reduction="none", backend=backend)
    # Row 3's own term is NaN; the global bounds (dv, smile) make every term NaN; the bound's mean is NaN.
    assert torch.isnan(t[3])
    assert torch.isnan(rf.mi_bound(x, y.detach(), bound, backend=backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    """bf16/fp16 inputs give fp32 results (fp32 accumulation); fp64 gives fp64. Gradients keep the input dtype.

    A backend that does not serve a dtype (cpp leaves fp64 to the torch backend) must say so when asked explicitly,
    while "auto" still serves it.
    """
    x, y = _inputs((21, 16), (21, 16), dtype=dtype)
    from rmi_fast import backends

    reason = backends.get(backend).why_not(x.unsqueeze(0), y.unsqueeze(0), rf.ops.PairSpec("row_lse"))
    if reason is not None:
        with pytest.raises(rf.BackendUnavailable, match="cannot serve these inputs"):
            rf.mi_bound(x, y, "dv", backend=backend)
        backend = "auto"
    for bound in BOUNDS:
        t = rf.mi_bound(x, y, bound, scale=2.0, backend=backend)
        assert t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        ref = R.BOUNDS[bound](x.detach().double(), y.detach().double(), 2.0).mean()
        torch.testing.assert_close(t.double(), ref, **tolerance(dtype))
        (gx,) = torch.autograd.grad(t, x)
        assert gx.dtype == dtype


def test_mine_gradient_against_moving_average(backend):
    x, y = _inputs((15, 6), (15, 6))
    ema = torch.tensor(1.7)
    t = rf.mi_bound(x, y, "mine", scale=1.3, mine_ema=ema, backend=backend)
    gx, gy = torch.autograd.grad(t, (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = R.mine(x64, y64, 1.3, ema=1.7).mean()
    rgx, rgy = torch.autograd.grad(ref, (x64, y64))
    torch.testing.assert_close(t.double(), R.dv(x64, y64, 1.3).mean().detach(), **tolerance(torch.float32))
    torch.testing.assert_close(gx.double(), rgx, **tolerance(torch.float32))
    torch.testing.assert_close(gy.double(), rgy, **tolerance(torch.float32))


def test_mine_tracks_the_moving_average(backend):
    x, y = _inputs((15, 6), (15, 6))
    mine = rf.MINE(momentum=0.5, scale=1.3, backend=backend)
    mine(x, y)
    B = 15
    batch_mean = torch.exp(R.scores(x.detach().double(), y.detach().double(), 1.3))[0]
    batch_mean = (batch_mean.sum() - batch_mean.diagonal().sum()) / (B * (B - 1))
    assert mine.ema.item() == pytest.approx(batch_mean.item(), rel=1e-4)
    mine(x, y)  # same batch again: the average is unchanged
    assert mine.ema.item() == pytest.approx(batch_mean.item(), rel=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mine_gradient_stays_finite_far_above_the_average(backend, reduction):
    """A batch mean 87 nats above the moving average: m/ema ≈ 1e38. The mean's gradient is exact; a sum's (B times
    larger, past fp32's range in the product with the ratio) is that of the capped ratio: finite, pointing the
    oracle's way, not larger than it."""
    x, y = _inputs((4, 3), (4, 3))
    ema = 1e-38
    t = rf.mi_bound(x, y, "mine", mine_ema=ema, reduction=reduction, backend=backend)
    gx, gy = torch.autograd.grad(t.sum(), (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = R.mine(x64, y64, 1.0, ema=ema)
    rgx, rgy = torch.autograd.grad(ref.mean() if reduction == "mean" else ref.sum(), (x64, y64))
    for g, r in ((gx, rgx), (gy, rgy)):
        assert torch.isfinite(g).all()
        if reduction == "mean":
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
        else:
            assert torch.equal(g.sign(), r.sign().float()) and (g.double().abs() <= r.abs() * (1 + 1e-4)).all()


@pytest.mark.parametrize("where", ["first batch", "later batch"])
def test_mine_leaves_a_nan_batch_out_of_the_average(backend, where):
    """A NaN batch gets a NaN value but does not poison the average: the next clean batch's value and gradients are
    those of a MINE that never saw it."""
    (x1, y1), (x2, y2) = _inputs((10, 6), (10, 6)), _inputs((10, 6), (10, 6), seed=1)
    nan = torch.full_like(x1, math.nan)
    seen, clean = rf.MINE(momentum=0.5, backend=backend), rf.MINE(momentum=0.5, backend=backend)
    if where == "later batch":
        seen(x1, y1), clean(x1, y1)
    assert torch.isnan(seen(nan, y1))
    t, t_ref = seen(x2, y2), clean(x2, y2)
    assert torch.isfinite(seen.log_ema) and torch.equal(seen.log_ema, clean.log_ema)
    grads, grads_ref = torch.autograd.grad(t, (x2, y2)), torch.autograd.grad(t_ref, (x2, y2))
    assert torch.equal(t, t_ref) and all(torch.equal(g, r) for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("case", ["all exp S underflow", "scores near 1e4"])
def test_mine_stays_exact_at_extreme_scores(backend, case):
    """The moving average is kept in log space: where exp S under- or overflows fp32 the value is still dv's and the
    gradient, against the batch's own average on the first call, is dv's."""
    x, y = _inputs((12, 8), (12, 8))
    with torch.no_grad():
        if case == "all exp S underflow":  # every score near −110: exp S = 0 in fp32
            x.mul_(0.1)[:, 0] = 11.0
            y.mul_(0.1)[:, 0] = -10.0
        else:
            y.copy_(x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4)))
    scale = 1.0 if case == "all exp S underflow" else 1e4 / 8
    t = rf.MINE(scale=scale, backend=backend)(x, y)
    gx, gy = torch.autograd.grad(t, (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = R.dv(x64, y64, scale).mean()
    rgx, rgy = torch.autograd.grad(ref, (x64, y64))
    s_max = scale * (x64 @ y64.T).abs().max().item()  # fp32 scores carry an error of about 1e-7·|S|
    torch.testing.assert_close(t.double(), ref.detach(), rtol=1e-5, atol=3e-7 * s_max)
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    torch.testing.assert_close(gx.double(), rgx, rtol=1e-3, atol=1e-3 * rgx.abs().max().item())
    torch.testing.assert_close(gy.double(), rgy, rtol=1e-3, atol=1e-3 * rgy.abs().max().item())


@pytest.mark.parametrize("name", ["cpp", "torch", "triton"])
def test_fp16_nwj_past_the_fp16_range(name):
    """NWJ's G = w·e^(S − 1), and its unit-weight gradients Σ_j e^(S_ij − 1)·y_j, pass fp16's largest value (65504)
    while the gradients of the mean do not: fp16 inputs take the unfused backward, and the Triton kernels keep G in
    fp32, so the gradients are finite and fp16-accurate."""
    g = torch.Generator().manual_seed(12)
    u = torch.randn(16, generator=g)
    u = u / u.norm() * math.sqrt(12.8)  # every score ≈ 13
    x = (u + 0.05 * torch.randn(17, 16, generator=g)).half().requires_grad_()
    y = (u + 0.05 * torch.randn(17, 16, generator=g)).half().requires_grad_()
    reason = backends.get(name).why_not(x.unsqueeze(0), y.unsqueeze(0), PairSpec("row_sum", "exp_m1"))
    if reason is not None:
        pytest.skip(reason)
    t = rf.mi_bound(x, y, "nwj", backend=name)
    gx, gy = torch.autograd.grad(t, (x, y))
    x64, y64 = (v.detach().double().requires_grad_() for v in (x, y))
    ref = R.nwj(x64, y64).mean()
    rgx, rgy = torch.autograd.grad(ref, (x64, y64))
    assert (x64.detach() @ y64.detach().T).max() > 13.0  # e^(S − 1) > 65504 somewhere
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    torch.testing.assert_close(t.double(), ref.detach(), rtol=1e-3, atol=0.0)
    torch.testing.assert_close(gx.double(), rgx, rtol=3e-2, atol=3e-2 * rgx.abs().max().item())
    torch.testing.assert_close(gy.double(), rgy, rtol=3e-2, atol=3e-2 * rgy.abs().max().item())


def test_deterministic_is_bitwise_repeatable(backend):
    x, y = _inputs((64, 24), (64, 24))
    runs = []
    for _ in range(2):
        t = rf.mi_bound(x, y, "dv", scale=3.0, backend=backend, deterministic=True)
        runs.append((t.detach(), *torch.autograd.grad(t, (x, y))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _gaussian_critic_inputs(n, d, rho, seed):
    """Samples of (X, Y) with corr ρ per dimension, embedded so that <x̃, ỹ> is the exact log density ratio.

    log p(y|x)/p(y) = −d/2·log(1−ρ²) − (ρ²|x|² − 2ρ<x,y> + ρ²|y|²) / (2(1−ρ²)), a sum of a bilinear term, a term in x
    alone, one in y alone and a constant: x̃ = [a·x, q(x), 1, 1], ỹ = [y, 1, q(y), c] with a = ρ/(1−ρ²).
    """
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, d, generator=g, dtype=torch.float64)
    ys = rho * xs + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g, dtype=torch.float64)
    a, b = rho / (1 - rho**2), rho**2 / (2 * (1 - rho**2))
    c = -0.5 * d * math.log(1 - rho**2)
    one = torch.ones(n, 1, dtype=torch.float64)
    x_t = torch.cat([a * xs, -b * (xs**2).sum(1, keepdim=True), one, one], 1)
    y_t = torch.cat([ys, one, -b * (ys**2).sum(1, keepdim=True), c * one], 1)
    return x_t, y_t, c


@pytest.mark.parametrize("bound", ["infonce", "nwj", "dv"])
def test_correlated_gaussians_with_the_exact_critic_recover_the_true_mi(backend, bound):
    """With the optimal critic each bound estimates I = −d/2·log(1−ρ²) (NWJ's optimal critic is 1 + log ratio)."""
    d, rho, n = 2, 0.6, 4096
    x_t, y_t, c = _gaussian_critic_inputs(n, d, rho, seed=7)
    if bound == "nwj":
        y_t[:, -1] += 1.0
    true_mi = c
    est = rf.mi_bound(x_t.float(), y_t.float(), bound, backend=backend).item()
    assert est == pytest.approx(true_mi, abs=0.06), (bound, est, true_mi)
