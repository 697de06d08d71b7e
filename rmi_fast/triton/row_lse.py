"""row_lse: r_i = logsumexp_j S_ij and, with ``columns``, c_j = logsumexp_i S_ij (InfoNCE, symmetric InfoNCE/CLIP).

Forward: one sweep of row programs over column tiles (:func:`lse_kernel`), online log-sum-exp per row; the
column statistics come from the same tiles as fp32 (max, sum) partials per row block, merged by
:func:`column_merge_kernel`. The LSE sweep also serves the global family (its statistic is the log-sum-exp of
the row log-sum-exps). Backward: the shared sweep of :mod:`.backward` with :func:`grad_tile`; with unit weights
and the two-pass plan the forward and the dx sweep are fused (:func:`stats_and_grads`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backward
from .common import EXCLUDE, ZERO, DIAGONAL_CODE, diagonal_mask, dot_precision, fwd_config, group_layout, \
    clamp_keep_nan, interpreted, lse_combine, lse_value, score_tile, tile_lse


# Derivation. For a row block and a column tile, T = S with the excluded entries (and rows/columns past the
# matrix) at −∞ (T = clamp(S, ±clip) for the global family). Per row the running pair (m, l) satisfies
# logsumexp_j T_ij = m + log l over the tiles seen so far; a new tile with (m', l') = (max_j T, Σ_j e^(T − m'))
# merges as m'' = max(m, m'), l'' = l·e^(m − m'') + l'·e^(m' − m'') — a running max, never a fixed shift, so
# |S| up to fp32's range stays finite. The exponents are measured from lse_ref(m), which is m, or 0 where m = ±∞:
# a row with a +∞ score gives +∞ as torch.logsumexp does, not ∞ − ∞ = NaN. With COLUMNS each tile also yields,
# per column, the pair over this block's rows; stored as fp32 partials (G, row blocks, By) — O(B²/BLOCK_M), not
# B×B — and merged the same way.
@triton.jit
def lse_kernel(
    r_ptr, cmax_ptr, csum_ptr,
    x_ptr, y_ptr, scale_ptr,
    NA, NB, D, diag_offset, clip,
    stride_xg, stride_xn, stride_xd, stride_yg, stride_yn, stride_yd,
    stride_rg, stride_cg, stride_cp,
    DIAG: tl.constexpr, CLIP: tl.constexpr, COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_ok = offs_m < NA
    x_grp = x_ptr + g * stride_xg
    y_grp = y_ptr + g * stride_yg
    scale = tl.load(scale_ptr).to(tl.float32)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for blk in range(0, tl.cdiv(NB, BLOCK_N)):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < NB
        S = scale * score_tile(x_grp, y_grp, offs_m, offs_n, NA, NB, D, stride_xn, stride_xd, stride_yn, stride_yd,
                               BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        on_diag = diagonal_mask(offs_m[:, None], offs_n[None, :], diag_offset, DIAG)
        if DIAG == ZERO:
            S = tl.where(on_diag, 0.0, S)
        if CLIP:
            S = clamp_keep_nan(S, clip)
        counted = m_ok[:, None] & n_ok[None, :]
        if DIAG == EXCLUDE:
            counted = counted & ~on_diag
        T = tl.where(counted, S, float("-inf"))
        tm, ts = tile_lse(T, 1)
        m, l = lse_combine(m, l, tm, ts)
        if COLUMNS:
            cm, cs = tile_lse(T, 0)
            part = g * stride_cg + pid_m.to(tl.int64) * stride_cp + offs_n
            tl.store(cmax_ptr + part, cm, mask=n_ok)
            tl.store(csum_ptr + part, cs, mask=n_ok)
    tl.store(r_ptr + g * stride_rg + offs_m, lse_value(m, l), mask=m_ok)


# Derivation. Column j's partials (m_p, s_p), one per row block p, merge with the same running-max rule as the
# rows: c_j = M + log Σ_p s_p·e^(m_p − M). Fixed order over p: deterministic.
@triton.jit
def column_merge_kernel(c_ptr, cmax_ptr, csum_ptr, NB, P, stride_c_g, stride_pg, stride_pp, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < NB
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    cmax = cmax_ptr + g * stride_pg + offs  # pointers advance by one row block per step (64-bit arithmetic)
    csum = csum_ptr + g * stride_pg + offs
    for _ in range(0, P):
        m, s = lse_combine(m, s, tl.load(cmax, mask=ok, other=float("-inf")), tl.load(csum, mask=ok, other=0.0))
        cmax += stride_pp
        csum += stride_pp
    tl.store(c_ptr + g * stride_c_g + offs, lse_value(m, s), mask=ok)


def lse_rows(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, spec, clip: bool = False,
             columns: bool = False) -> list[torch.Tensor]:
    """[r] or [r, c]: fp32 row (and column) log-sum-exps of T, r: (G, Bx), c: (G, By)."""
    G, sxg, syg = group_layout(x, y)
    Bx, By, D = x.shape[1], y.shape[1], x.shape[2]
    cfg = fwd_config(x.device, Bx, G, x.dtype)
    BM = cfg["BLOCK_M"]
    row_blocks = triton.cdiv(Bx, BM)
    r = torch.empty((G, Bx), dtype=torch.float32, device=x.device)
    if columns:
        cmax = torch.empty((G, row_blocks, By), dtype=torch.float32, device=x.device)
        csum = torch.empty_like(cmax)
    else:
        cmax = csum = r  # unused (COLUMNS is off)
    lse_kernel[(row_blocks, G)](
        r, cmax, csum, x, y, scale,
        Bx, By, D, spec.diag_offset, float(spec.clip),
        sxg, x.stride(1), x.stride(2), syg, y.stride(1), y.stride(2),
        r.stride(0), cmax.stride(0) if columns else 0, cmax.stride(1) if columns else 0,
        DIAG=DIAGONAL_CODE[spec.diagonal], CLIP=clip, COLUMNS=columns,
        BLOCK_M=BM, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=dot_precision(x.dtype, x.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not columns:
        return [r]
    c = torch.empty((G, By), dtype=torch.float32, device=x.device)
    block = 16 if interpreted(x.device) else 256
    column_merge_kernel[(triton.cdiv(By, block), G)](c, cmax, csum, By, row_blocks, c.stride(0), cmax.stride(0),
                                                     cmax.stride(1), BLOCK=block)
    return [r, c]


# G_ij = w_i·e^(S_ij − r_i) [+ v_j·e^(S_ij − c_j)]: row (and column) softmax weighted by the upstream gradient.
@triton.jit
def grad_tile(S, i2, j2, g, i_ok, j_ok, stat0_ptr, stat1_ptr, w0_ptr, w1_ptr, stride_0g, stride_1g, stride_w0g,
              stride_w1g, clip, TRANSFORM: tl.constexpr, COLUMNS: tl.constexpr):
    r = tl.load(stat0_ptr + g * stride_0g + i2, mask=i_ok, other=0.0)
    w = tl.load(w0_ptr + g * stride_w0g + i2, mask=i_ok, other=0.0)
    grad = w * tl.exp(S - r)
    if COLUMNS:
        c = tl.load(stat1_ptr + g * stride_1g + j2, mask=j_ok, other=0.0)
        v = tl.load(w1_ptr + g * stride_w1g + j2, mask=j_ok, other=0.0)
        grad += v * tl.exp(S - c)
    return grad


def stats(x, y, scale, spec) -> list[torch.Tensor]:
    return lse_rows(x, y, scale, spec, columns=spec.columns)


def grads(x, y, scale, spec, stats, weights, want, plan=None):
    _, dx, dy, dscale = backward.run(x, y, scale, spec, grad_tile, stats, weights, want, plan)
    return dx, dy, dscale


def stats_and_grads(x, y, scale, spec, want, plan=None):
    """Statistics and unit-weight gradients, or None where fusing gains nothing.

    Without ``columns`` and with the two_pass plan (or a whole plan in one tile), the statistic sweep and the dx sweep
    are one (online softmax, see backward.sweep_kernel): 2 + 2 GEMM-equivalents instead of 1 + 2 + 2. The atomic
    plan already needs only 1 + 2 after the statistic, and the chunks of a split sweep cannot share one running
    normaliser; column statistics are not known until every row block has been seen.
    """
    plan = backward.resolve_plan(x, y, spec, plan)
    if spec.columns or not backward.rows_in_one_program(plan, y.shape[1]):
        return None
    ones = torch.ones((max(x.shape[0], y.shape[0]), x.shape[1]), dtype=torch.float32, device=x.device)
    stat, dx, dy, dscale = backward.run(x, y, scale, spec, grad_tile, [], [ones], want, plan, online=True)
    return [stat], dx, dy, dscale
