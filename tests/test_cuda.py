"""The ``cuda`` backend (csrc/cuda/, rmi_fast/cuda.py).

On a CUDA device: every family and option of the kernel contract against the fp64 oracle (statistics, dx, dy and
dscale for arbitrary upstream weights), in float32, bfloat16 and float16, odd sizes, each operand broadcast over
groups, diagonal offsets, huge and NaN scores, determinism, the public API end to end, and one large case whose
B² passes 2³¹ (oracle computed in row chunks). Everywhere: the backend explains why it is unavailable, an explicit
backend="cuda" on CPU tensors raises with that reason, and a CUDA build exposes its binding.
"""
from __future__ import annotations

import math

import pytest
import torch

import rmi_fast as rf
from rmi_fast import backends
from rmi_fast import reference as R
from rmi_fast.ops.spec import PairSpec

from conftest import check_non_finite_like_torch, tolerance


def _compiled():
    try:
        from rmi_fast import _C
    except ImportError:
        return None
    return _C


_C = _compiled()
WITH_CUDA_BUILD = _C is not None and getattr(_C, "with_cuda", False)
needs_cuda_build = pytest.mark.skipif(not WITH_CUDA_BUILD, reason="rmi_fast._C was built without CUDA")


# ---------------------------------------------------------------------------------------------- CPU-runnable


def test_backend_reports_a_reason_or_is_usable():
    reason = backends.get("cuda").unavailable()
    if torch.cuda.is_available() and WITH_CUDA_BUILD:
        assert reason is None
    else:
        assert isinstance(reason, str) and len(reason) > 10
        if torch.version.cuda is None:
            assert "without CUDA" in reason
        elif not WITH_CUDA_BUILD:
            assert "_C" in reason


def test_explicit_cuda_backend_on_cpu_tensors_raises_with_the_reason():
    x = torch.randn(8, 4)
    with pytest.raises(rf.BackendUnavailable, match="backend='cuda'") as info:
        rf.mi_bound(x, x, "infonce", backend="cuda")
    expected = backends.get("cuda").unavailable() or "serves CUDA tensors"
    assert expected in str(info.value)


def test_cuda_backend_refuses_cpu_tensors_and_float64():
    b = backends.get("cuda")
    x = torch.randn(1, 8, 4)
    assert b.why_not(x, x, PairSpec("row_lse")) is not None
    assert b.why_not(x.double(), x.double(), PairSpec("row_lse")) is not None


def test_importing_the_backend_initialises_no_gpu():
    import subprocess
    import sys

    code = ("import torch, rmi_fast.cuda as c; b = c.CudaBackend(); b.unavailable(); "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@needs_cuda_build
def test_binding_exposes_the_kernels():
    for name in ("cuda_row_stats", "cuda_lse_merge", "cuda_row_grads", "cuda_dscale_partial_count"):
        assert callable(getattr(_C, name))


@needs_cuda_build
def test_binding_partial_count_and_validation_on_cpu():
    own, other = torch.empty(1, 130, 8), torch.empty(4, 130, 8)
    assert _C.cuda_dscale_partial_count(own, other) == 3  # broadcast own: one partial per 64-row block
    assert _C.cuda_dscale_partial_count(other, own) == 12  # one per block and group
    out = torch.empty(4, 130)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        _C.cuda_row_stats(other, own, torch.ones(1), "lse", 5.0, "include", 0, True, out, 0)


# ---------------------------------------------------------------------------------------------- GPU

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECS = {
    "row_lse": PairSpec("row_lse"),
    "row_lse_columns": PairSpec("row_lse", columns=True),
    "row_lse_exclude": PairSpec("row_lse", diagonal="exclude"),
    "row_lse_zero_offset_columns": PairSpec("row_lse", diagonal="zero", diag_offset=3, columns=True),
    "global_lse": PairSpec("global_lse"),
    "global_lse_exclude": PairSpec("global_lse", diagonal="exclude"),
    "global_clip_exclude": PairSpec("global_lse", transform="clip", clip=2.0, diagonal="exclude"),
    "global_clip_zero": PairSpec("global_lse", transform="clip", clip=1.5, diagonal="zero"),
    "exp_m1_exclude": PairSpec("row_sum", transform="exp_m1", diagonal="exclude"),
    "exp_m1_offset": PairSpec("row_sum", transform="exp_m1", diagonal="exclude", diag_offset=-2),
    "softplus_exclude": PairSpec("row_sum", transform="softplus", diagonal="exclude"),
    "softplus_zero": PairSpec("row_sum", transform="softplus", diagonal="zero"),
}
# (Gx, Gy, Bx, By, D): odd sizes (no 16-byte loads), vector-friendly sizes, several tiles, groups, each side
# broadcast, Bx != By (y holding other ranks' rows).
SHAPES = {
    "odd": (1, 1, 37, 37, 19),
    "tiles": (1, 1, 200, 200, 64),
    "groups": (3, 3, 70, 70, 40),
    "x_broadcast": (1, 4, 65, 65, 24),
    "y_broadcast": (4, 1, 65, 65, 24),
    "rect": (1, 1, 50, 130, 136),
}


def _operands(shape, dtype, seed=0, device="cuda"):
    Gx, Gy, Bx, By, D = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Gx, Bx, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    y = torch.randn(Gy, By, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    return x.to(dtype).to(device), y.to(dtype).to(device)


def _weights(spec, G, Bx, By, seed=1, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in spec.stat_shapes(G, Bx, By)]


def _close(got, want, dtype, what):
    """got (kernel) against want (fp64 oracle on the same rounded inputs), tolerance scaled by want's magnitude."""
    tol = tolerance(dtype)
    mag = float(want.abs().max()) if want.numel() else 1.0  # errors relative to the largest entry
    mag = mag if mag > 0 else 1.0
    torch.testing.assert_close(got.double(), want.double(), atol=tol["atol"] * mag, rtol=tol["rtol"],
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _oracle(x, y, scale, spec, weights):
    x64, y64, s64 = x.double(), y.double(), torch.tensor(float(scale), dtype=torch.float64, device=x.device)
    stats = R.pair_stats(x64, y64, s64, spec)
    grads = R.pair_grads(x64, y64, s64, spec, stats, weights, (True, True, True))
    return stats, grads


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(SPECS))
def test_contract_matches_fp64_oracle(name, shape, dtype):
    spec = SPECS[name]
    x, y = _operands(SHAPES[shape], dtype)
    G, Bx, By = max(x.shape[0], y.shape[0]), x.shape[1], y.shape[1]
    scale = torch.tensor(0.7, device="cuda")
    weights = _weights(spec, G, Bx, By)
    b = backends.get("cuda")
    assert b.why_not(x, y, spec) is None

    stats = b.stats(x, y, scale, spec)
    want_stats, (wdx, wdy, wds) = _oracle(x, y, 0.7, spec, weights)
    assert len(stats) == len(want_stats)
    for k, (got, want) in enumerate(zip(stats, want_stats)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        _close(got, want, dtype, f"stat {k}")

    dx, dy, ds = b.grads(x, y, scale, spec, stats, [w.float() for w in weights], (True, True, True))
    assert dx.shape == x.shape and dx.dtype == x.dtype and dy.shape == y.shape and dy.dtype == y.dtype
    _close(dx, wdx, dtype, "dx")
    _close(dy, wdy, dtype, "dy")
    _close(ds, wds, dtype, "dscale")

    # Each gradient alone (other launch paths: dscale from the dy launch, or from a launch without d_own).
    only_dy = b.grads(x, y, scale, spec, stats, [w.float() for w in weights], (False, True, True))
    assert only_dy[0] is None
    _close(only_dy[2], wds, dtype, "dscale (dy launch)")
    only_ds = b.grads(x, y, scale, spec, stats, [w.float() for w in weights], (False, False, True))
    _close(only_ds[2], wds, dtype, "dscale alone")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_strided_operands(dtype):
    spec = PairSpec("row_lse", columns=True)
    base_x, base_y = _operands((1, 1, 90, 90, 48), dtype)
    x = base_x[:, ::2, 3:35]  # row stride 96 elements, start not 16-byte aligned (element loads)
    y = base_y.transpose(1, 2).contiguous().transpose(1, 2)[:, 1::2, 3:35]  # non-unit stride along D
    b = backends.get("cuda")
    scale = torch.tensor(1.3, device="cuda")
    weights = _weights(spec, 1, x.shape[1], y.shape[1])
    stats = b.stats(x, y, scale, spec)
    want_stats, (wdx, wdy, wds) = _oracle(x, y, 1.3, spec, weights)
    for got, want in zip(stats, want_stats):
        _close(got, want, dtype, "stat")
    dx, dy, ds = b.grads(x, y, scale, spec, stats, [w.float() for w in weights], (True, True, True))
    _close(dx, wdx, dtype, "dx")
    _close(dy, wdy, dtype, "dy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", ["row_lse_columns", "global_lse_exclude", "softplus_exclude"])
def test_huge_scores_stay_finite_and_exact(name, dtype):
    spec = SPECS[name]
    x, y = _operands((1, 1, 96, 96, 32), dtype)
    x = torch.nn.functional.normalize(x.float(), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(y.float(), dim=-1).to(dtype)
    scale = torch.tensor(1e4, device="cuda")  # |S| up to 1e4
    stats = backends.get("cuda").stats(x, y, scale, spec)
    want, _ = _oracle(x, y, 1e4, spec, _weights(spec, 1, 96, 96))
    for got, w in zip(stats, want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), w, atol=0.5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["row_lse_columns", "global_clip_exclude", "exp_m1_exclude", "softplus_zero"])
def test_nan_never_gives_a_finite_result(name):
    spec = SPECS[name]
    x, y = _operands((1, 1, 70, 70, 16), torch.float32)
    x[0, 5, 3] = float("nan")
    b = backends.get("cuda")
    scale = torch.tensor(1.0, device="cuda")
    stats = b.stats(x, y, scale, spec)
    if spec.family == "global_lse":
        assert torch.isnan(stats[0]).all()
    else:
        assert torch.isnan(stats[0][0, 5])
        assert torch.isfinite(stats[0][0, :5]).all()
        if spec.columns:
            assert torch.isnan(stats[1]).all()  # every column sees row 5
    weights = [torch.ones_like(s) for s in stats]
    dx, dy, ds = b.grads(x, y, scale, spec, stats, weights, (True, True, True))
    assert not torch.isfinite(ds)
    assert not torch.isfinite(dy).all()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["precise", "tf32", "bf16"])
@pytest.mark.parametrize("name", ["row_lse_columns", "global_lse", "global_clip_exclude", "softplus_exclude"])
def test_infinite_scores_give_what_torch_gives(name, precision):
    """An infinite input gives ±∞ scores (3xTF32 splits it as ∞ + 0, not ∞ + NaN), and a +∞ score makes its row's,
    column's and group's log-sum-exp +∞ as torch.logsumexp does, not ∞ − ∞ = NaN: the statistics equal the torch
    backend's on the same values, and the gradients are finite exactly where its are, and close there."""
    spec = SPECS[name]
    x, y = _operands((1, 1, 70, 70, 16), torch.bfloat16 if precision == "bf16" else torch.float32)
    x[0, 5, 3] = float("inf")
    tol = dict(atol=2e-2, rtol=2e-2) if precision != "precise" else tolerance(torch.float32)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        check_non_finite_like_torch(backends.get("cuda"), x, y, torch.tensor(1.0, device="cuda"), spec, tol)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_bitwise_repeatable(dtype):
    spec = PairSpec("global_lse", diagonal="exclude")
    x, y = _operands((1, 4, 130, 130, 72), dtype)
    b = backends.get("cuda")
    scale = torch.tensor(0.9, device="cuda")
    runs = []
    for _ in range(2):
        stats = b.stats(x, y, scale, spec)
        runs.append((*stats, *b.grads(x, y, scale, spec, stats, [torch.ones_like(stats[0])], (True, True, True))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.gpu
def test_tf32_mode_follows_allow_tf32():
    spec = PairSpec("row_lse")
    x, y = _operands((1, 1, 64, 64, 256), torch.float32)
    b = backends.get("cuda")
    scale = torch.tensor(1.0, device="cuda")
    want, _ = _oracle(x, y, 1.0, spec, _weights(spec, 1, 64, 64))
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        fast = b.stats(x, y, scale, spec)[0]
        torch.backends.cuda.matmul.allow_tf32 = False
        precise = b.stats(x, y, scale, spec)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    torch.testing.assert_close(fast.double(), want[0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(precise.double(), want[0], atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bound", ["infonce", "nwj", "dv", "smile", "jsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_public_api_with_learnable_scale(bound, dtype):
    x, y = _operands((1, 3, 45, 45, 20), dtype, seed=3)
    x, y = x[0].clone().requires_grad_(), y.requires_grad_()  # 2-D x broadcast over 3 groups (the paper's critic)
    scale = torch.tensor(0.8, device="cuda", requires_grad=True)
    kw = {} if bound == "infonce" else {"diagonal": "exclude"}
    value = rf.mi_bound(x, y, bound, scale=scale, backend="cuda", **kw)
    got = (value.detach(), *torch.autograd.grad(value, (x, y, scale)))

    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    s64 = torch.tensor(0.8, dtype=torch.float64, device="cuda", requires_grad=True)
    ref = R.BOUNDS[bound](x64, y64, s64, **kw).mean()
    want = (ref.detach(), *torch.autograd.grad(ref, (x64, y64, s64)))
    for name, g, w in zip(("value", "dx", "dy", "dscale"), got, want):
        _close(g, w, dtype, name)


@pytest.mark.gpu
def test_symmetric_infonce_loss_end_to_end():
    za, zb = _operands((1, 1, 300, 300, 64), torch.bfloat16, seed=5)
    za, zb = za[0].clone().requires_grad_(), zb[0].clone().requires_grad_()
    loss = rf.infonce_loss(za, zb, temperature=0.1, symmetric=True, backend="cuda")
    got = (loss.detach(), *torch.autograd.grad(loss, (za, zb)))
    a64, b64 = za.detach().double().requires_grad_(), zb.detach().double().requires_grad_()
    ref = R.infonce_loss(a64, b64, temperature=0.1, symmetric=True).mean()
    want = (ref.detach(), *torch.autograd.grad(ref, (a64, b64)))
    for name, g, w in zip(("loss", "dza", "dzb"), got, want):
        _close(g, w, torch.bfloat16, name)


def _chunked_symmetric_oracle(x, y, scale, w_row, w_col, chunk=2048):
    """fp64 r, c, dx, dy of row_lse with columns for (B, D) inputs, never holding more than chunk × B scores."""
    x64, y64 = x.double(), y.double()
    B = x64.shape[0]
    r = torch.empty(B, dtype=torch.float64, device=x.device)
    col_m = torch.full((B,), -math.inf, dtype=torch.float64, device=x.device)
    col_s = torch.zeros(B, dtype=torch.float64, device=x.device)
    for i in range(0, B, chunk):
        S = scale * x64[i:i + chunk] @ y64.T
        r[i:i + chunk] = torch.logsumexp(S, dim=1)
        m = torch.maximum(col_m, S.max(dim=0).values)
        col_s = col_s * torch.exp(col_m - m) + torch.exp(S - m).sum(0)
        col_m = m
    c = col_m + torch.log(col_s)
    dx = torch.empty_like(x64)
    dy = torch.zeros_like(y64)
    for i in range(0, B, chunk):
        S = scale * x64[i:i + chunk] @ y64.T
        G = w_row[i:i + chunk, None] * torch.exp(S - r[i:i + chunk, None]) + w_col[None, :] * torch.exp(S - c[None, :])
        dx[i:i + chunk] = scale * G @ y64
        dy += scale * G.T @ x64[i:i + chunk]
    return r, c, dx, dy


@pytest.mark.gpu
@pytest.mark.slow
def test_large_batch_beyond_int32_pairs():
    B, D = 65536, 64  # B² = 2³² score pairs
    x, y = _operands((1, 1, B, B, D), torch.bfloat16, seed=7)
    spec = PairSpec("row_lse", columns=True)
    b = backends.get("cuda")
    scale = torch.tensor(2.0, device="cuda")
    w_row = torch.full((1, B), 1.0 / B, device="cuda")
    w_col = torch.full((1, B), -0.5 / B, device="cuda")
    r, c = b.stats(x, y, scale, spec)
    dx, dy, _ = b.grads(x, y, scale, spec, [r, c], [w_row, w_col], (True, True, False))
    wr, wc, wdx, wdy = _chunked_symmetric_oracle(x[0], y[0], 2.0, w_row[0].double(), w_col[0].double())
    _close(r[0], wr, torch.bfloat16, "r")
    _close(c[0], wc, torch.bfloat16, "c")
    _close(dx[0], wdx, torch.bfloat16, "dx")
    _close(dy[0], wdy, torch.bfloat16, "dy")


@pytest.mark.gpu
@pytest.mark.parametrize("bound", ["infonce", "nwj", "jsd"])
def test_fp16_gradients_within_twice_eager_fp16_error(bound):
    """fp16 inputs: the gradient product runs in TF32 (fp16 values exact, G rounded to fp16's 11 bits in fp32's
    range), so the error against the fp64 oracle stays within 2× that of the same formula run eagerly in fp16."""
    x, y = _operands((1, 1, 256, 256, 64), torch.float16, seed=13)
    x, y = x[0].clone().requires_grad_(), y[0].clone().requires_grad_()
    value = rf.mi_bound(x, y, bound, backend="cuda")
    got = torch.autograd.grad(value, (x, y))
    x16, y16 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    eager = torch.autograd.grad(R.BOUNDS[bound](x16, y16).float().mean(), (x16, y16))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    want = torch.autograd.grad(R.BOUNDS[bound](x64, y64).mean(), (x64, y64))
    for name, g, e, w in zip(("dx", "dy"), got, eager, want):
        err = (g.double() - w).abs().max().item()
        eager_err = (e.double() - w).abs().max().item()
        assert err <= 2 * eager_err + 1e-6 * w.abs().max().item(), (name, err, eager_err)
