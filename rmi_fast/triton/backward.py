"""The gradient sweep shared by the three families, its three variants, and the dispatch between them.

Given the family's gradient matrix G (G_ij = Σ weight · dStat/dS_ij, computed tile by tile from S and the O(B)
fp32 statistics by the family's ``grad_tile``), every family needs

    dx = scale · G·y,      dy = scale · Gᵀ·x,      dscale = Σ_ij G_ij · <x_i, y_j>,

summed over groups for an operand broadcast over them. One kernel, :func:`sweep_kernel`, computes them: a program
owns a block of rows of one operand ("own", A) and sweeps blocks of rows of the other ("other", B), recomputing
the score tile and G for each, accumulating a (BLOCK_M, BLOCK_D) slice of its own gradient rows in fp32 registers
(no store until the end), and optionally adding its contribution to the other operand's gradient with fp32
atomics. A D wider than BLOCK_D adds a grid axis over feature blocks, each of which recomputes the score tiles.
Run with x as A it produces dx; run "transposed" (y as A, the tile is Sᵀ) it produces dy. The row_sum family also
takes its statistic from this sweep (its gradient needs no normaliser, so statistic and gradient come from the
same tiles).

Backward variants (all exact; see :func:`choose_plan`):

* ``two_pass`` — (a) two atomic-free passes: dx by row programs sweeping columns, dy by column programs sweeping
  rows. Computes S twice (2 + 2 GEMM-equivalents per feature block) but every store is plain: deterministic.
* ``atomic``   — (b) one pass: row programs produce dx and add Gᵀ·x into an fp32 dy buffer with atomics
  (1 + 2 GEMM-equivalents, plus By·D atomics per row block). Not deterministic.
* ``split``    — (c) two passes whose sweeps are each cut into ``split`` chunks run by separate programs: more
  programs for small B. The chunks' fp32 partial gradients meet through atomics, or, when deterministic, in
  per-chunk fp32 buffers summed in a fixed order.
* ``whole``    — (d) two passes like (a), for small batches: a program's one tile holds every row of the other
  operand, or of one of ``split`` chunks of them (at most 256 rows a tile in 16-bit, :func:`~.common.whole_max_rows`),
  so it computes S once and walks D in slices, where (a) has a grid axis over feature blocks that recomputes S for
  each (2 + 2 GEMM-equivalents at any D). Its chunks' partial gradients meet as in (c).

The gradient of a broadcast operand is a sum over groups: the group is a grid axis, and the per-group programs'
results meet like split chunks do (atomics, or fp32 partial buffers summed in fixed order when deterministic).
``dscale`` is reduced from one fp32 partial per program in fixed order.

Memory: O(B·D) for the gradients (+ fp32 buffers of the same order: ``split`` × groups partials when
deterministic), O(programs) for the dscale partials; no B×B array exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import tuning
from ..backends import CUDA_MAX_GRID_YZ
from .common import EXCLUDE, ZERO, DIAGONAL_CODE, TRANSFORM_CODE, diagonal_mask, dot_precision, group_layout, \
    lse_ref, lse_shift, lse_value, mma, SMS, score_tile, stat_buffer, tile_config, whole_max_rows

# How a program's own gradient rows leave it.
OWN_NONE = tl.constexpr(0)     # not wanted (statistic or dscale only)
OWN_STORE = tl.constexpr(1)    # the program owns the rows outright: cast to the input dtype and store
OWN_PARTIAL = tl.constexpr(2)  # fp32 partial of one (group, chunk) into its own slice of a buffer: summed later
OWN_ATOMIC = tl.constexpr(3)   # fp32 atomic add into one buffer shared by the groups / chunks


# Derivation. For a tile of own rows a and other rows b (the spec's (i, j) = (a, b), or (b, a) when transposed):
#   raw_ab = <A_a, B_b>,  S_ab = scale·raw_ab,  G_ab = grad_tile(S_ab)  (0 off the matrix and on a non-included
#   diagonal, whose entries are constants or absent),
#   own_a  += Σ_b G_ab · B_b          (dot of the (M, N) G tile with the (N, BLOCK_D) slice of B)
#   other_b += Σ_a G_ab · A_a         (dot of Gᵀ with the (M, BLOCK_D) slice of A; atomics: other programs share b)
#   dscale  += Σ_ab G_ab · raw_ab ,   stat_a += Σ_b T_ab (row_sum only: the transform, diagonal excluded or zeroed).
# ONLINE (row_lse, unit weights, one chunk per row): G = the row softmax, whose normaliser r_a = m + log l is built in
# the same sweep — as in attention's forward pass — by keeping own_a, dscale_a and l_a relative to the running max m
# (multiplied by e^(m_old − m_new) whenever m grows) and dividing by l at the end. One sweep gives r, dx and dscale.
# Both gradients get the factor scale once, at the end. G is multiplied by 1/norm (norm = max |weight|) before it
# is rounded to the operand dtype for the tensor-core dot, and by norm after: fp16 would otherwise flush the tiny
# weights of a mean over a large batch (≈ 1/B² per entry) to zero. Every G/norm is then at most 1 but NWJ's
# e^(S − 1), which passes fp16's range (65504) from S ≈ 12.1: for fp16 operands NWJ keeps G in fp32 (WIDE_GRAD) and
# multiplies in TF32, whose 10-bit mantissa is fp16's, so the products are as exact as fp16's and never overflow.
# WHOLE (the "whole" plan, for a few hundred other rows at most): one tile holds every other row of the program's
# chunk (the launcher sizes BLOCK_N and the chunks so that each program has exactly one tile), so it computes its
# score tile once and walks D in BLOCK_D slices, writing each slice of own and other at once — where the
# feature-block grid axis would recompute the tile per slice (at the paper's critic shape, D = 2048: 4 times). With
# one chunk the tile is the whole row, so ONLINE's normaliser is final before the first slice.
@triton.jit
def sweep_kernel(
    own_ptr, other_ptr, stat_ptr, dscale_ptr,
    a_ptr, b_ptr, scale_ptr, norm_ptr, stat0_ptr, stat1_ptr, w0_ptr, w1_ptr,
    NA, NB, D, diag_offset, clip, n_split,
    stride_ag, stride_an, stride_ad, stride_bg, stride_bn, stride_bd,
    stride_op, stride_og, stride_on, stride_od,
    stride_tg, stride_tn, stride_td,
    stride_sp, stride_sg,
    stride_0g, stride_1g, stride_w0g, stride_w1g,
    GRAD_TILE: tl.constexpr, STAT_TILE: tl.constexpr, TRANSPOSED: tl.constexpr, OWN_BCAST: tl.constexpr,
    OWN_MODE: tl.constexpr, OTHER_ATOMIC: tl.constexpr, STATS: tl.constexpr, ONLINE: tl.constexpr,
    DSCALE: tl.constexpr,
    DIAG: tl.constexpr, TRANSFORM: tl.constexpr, COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, WIDE_GRAD: tl.constexpr, GRAD_PRECISION: tl.constexpr, WHOLE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_gs = tl.program_id(1)
    pid_d = tl.program_id(2)
    g = (pid_gs // n_split).to(tl.int64)
    chunk = pid_gs % n_split

    # This program's share of the sweep: other-blocks [lo, hi) of group g.
    n_blocks = tl.cdiv(NB, BLOCK_N)
    per_chunk = tl.cdiv(n_blocks, n_split)
    lo = chunk * per_chunk
    hi = tl.minimum(lo + per_chunk, n_blocks)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    m_ok = offs_m < NA
    d_ok = offs_d < D
    a_grp = a_ptr + g * stride_ag  # stride 0 for a broadcast operand
    b_grp = b_ptr + g * stride_bg
    scale = tl.load(scale_ptr).to(tl.float32)
    norm = tl.load(norm_ptr)
    inv_norm = 1.0 / norm

    if OWN_BCAST:
        part_idx = g * n_split + chunk  # one slice per (group, chunk); the group index of the output is 0
        grp_idx = g * 0
    else:
        part_idx = chunk.to(tl.int64)
        grp_idx = g
    own_out = own_ptr + part_idx * stride_op + grp_idx * stride_og

    own_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    stat_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_run = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # ONLINE: running max and Σ e^(T − m_run)
    l_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if OTHER_ATOMIC & (not WHOLE):
        a_slice = tl.load(a_grp + offs_m[:, None] * stride_an + offs_d[None, :] * stride_ad,
                          mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    for blk in range(lo, hi):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < NB
        raw = score_tile(a_grp, b_grp, offs_m, offs_n, NA, NB, D, stride_an, stride_ad, stride_bn, stride_bd,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        S = scale * raw
        if TRANSPOSED:
            i2 = offs_n[None, :]
            j2 = offs_m[:, None]
            i_ok = n_ok[None, :]
            j_ok = m_ok[:, None]
        else:
            i2 = offs_m[:, None]
            j2 = offs_n[None, :]
            i_ok = m_ok[:, None]
            j_ok = n_ok[None, :]
        valid = i_ok & j_ok
        on_diag = diagonal_mask(i2, j2, diag_offset, DIAG)
        if DIAG == ZERO:
            S = tl.where(on_diag, 0.0, S)
        counted = valid  # the entries the statistic counts (a zeroed diagonal is counted, with S = 0)
        if DIAG == EXCLUDE:
            counted = valid & ~on_diag
        if STATS:
            stat_acc += tl.sum(tl.where(counted, STAT_TILE(S, TRANSFORM), 0.0), axis=1)
        if ONLINE:
            # Everything accumulated so far is relative to e^(m_run): rescale it when the running max grows.
            T = tl.where(counted, S, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(T, axis=1))
            alpha = lse_shift(m_run, m_new)
            prob = tl.exp(T - lse_ref(m_new)[:, None])
            l_run = l_run * alpha + tl.sum(prob, axis=1)
            m_run = m_new
            own_acc = own_acc * alpha[:, None]
            ds_acc = ds_acc * alpha
        if (OWN_MODE != OWN_NONE) | OTHER_ATOMIC | DSCALE:
            if ONLINE:
                grad = prob  # e^(S − m_run); divided by l_run after the sweep: the row softmax
            else:
                grad = GRAD_TILE(S, i2, j2, g, i_ok, j_ok, stat0_ptr, stat1_ptr, w0_ptr, w1_ptr,
                                 stride_0g, stride_1g, stride_w0g, stride_w1g, clip, TRANSFORM, COLUMNS)
            grad = tl.where(valid & ~on_diag, grad, 0.0)
            if DSCALE:
                ds_acc += tl.sum(grad * raw, axis=1)
            if WHOLE & ONLINE:  # the whole row is in this tile: its softmax is final
                grad = grad * tl.where(l_run > 0, 1.0 / l_run, 0.0)[:, None]
            if WIDE_GRAD:  # G stays fp32 and the operand slices are widened to it (GRAD_PRECISION: TF32)
                grad_lp = grad * inv_norm
            else:
                grad_lp = (grad * inv_norm).to(b_ptr.dtype.element_ty)
            if WHOLE:
                for d0 in range(0, D, BLOCK_D):
                    offs_w = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                    w_ok = offs_w < D
                    if OWN_MODE != OWN_NONE:
                        b_slice = tl.load(b_grp + offs_n[:, None] * stride_bn + offs_w[None, :] * stride_bd,
                                          mask=n_ok[:, None] & w_ok[None, :], other=0.0)
                        part = mma(grad_lp, b_slice.to(grad_lp.dtype), None, GRAD_PRECISION) * (scale * norm)
                        emit(own_out, part, offs_m, offs_w, m_ok, w_ok, stride_on, stride_od, OWN_MODE)
                    if OTHER_ATOMIC:
                        a_slice = tl.load(a_grp + offs_m[:, None] * stride_an + offs_w[None, :] * stride_ad,
                                          mask=m_ok[:, None] & w_ok[None, :], other=0.0)
                        add_other(other_ptr + g * stride_tg, grad_lp, a_slice, scale * norm, offs_n, offs_w, n_ok,
                                  w_ok, stride_tn, stride_td, GRAD_PRECISION)
            else:
                if OWN_MODE != OWN_NONE:
                    b_slice = tl.load(b_grp + offs_n[:, None] * stride_bn + offs_d[None, :] * stride_bd,
                                      mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                    own_acc = mma(grad_lp, b_slice.to(grad_lp.dtype), own_acc, GRAD_PRECISION)
                if OTHER_ATOMIC:
                    add_other(other_ptr + g * stride_tg, grad_lp, a_slice, scale * norm, offs_n, offs_d, n_ok, d_ok,
                              stride_tn, stride_td, GRAD_PRECISION)

    # Only the programs of the first feature block report the D-independent results (others recomputed them).
    if ONLINE:
        inv_l = tl.where(l_run > 0, 1.0 / l_run, 0.0)
        own_acc = own_acc * inv_l[:, None]
        ds_acc = ds_acc * inv_l
        stat_acc = lse_value(m_run, l_run)
    if pid_d == 0:
        if STATS | ONLINE:
            tl.store(stat_ptr + chunk.to(tl.int64) * stride_sp + g * stride_sg + offs_m, stat_acc, mask=m_ok)
        if DSCALE:
            tl.store(dscale_ptr + pid_gs.to(tl.int64) * tl.num_programs(0) + pid_m, tl.sum(ds_acc, axis=0))
    if (OWN_MODE != OWN_NONE) & (not WHOLE):
        emit(own_out, own_acc * (scale * norm), offs_m, offs_d, m_ok, d_ok, stride_on, stride_od, OWN_MODE)


@triton.jit
def add_other(out_ptr, grad_lp, a_slice, factor, offs_n, offs_d, n_ok, d_ok, stride_n, stride_d,
              GRAD_PRECISION: tl.constexpr):
    """The other operand's share of a tile: factor·Gᵀ·(a slice), added to its fp32 buffer with atomics (other
    programs share its rows)."""
    part = mma(tl.trans(grad_lp), a_slice.to(grad_lp.dtype), None, GRAD_PRECISION) * factor
    emit(out_ptr, part, offs_n, offs_d, n_ok, d_ok, stride_n, stride_d, OWN_ATOMIC)


@triton.jit
def emit(out_ptr, value, offs_r, offs_d, r_ok, d_ok, stride_r, stride_d, MODE: tl.constexpr):
    """A (rows, BLOCK_D) block of a gradient leaves the program: added with fp32 atomics (OWN_ATOMIC) or stored in
    the output's dtype (OWN_STORE, and OWN_PARTIAL's fp32 slice)."""
    out = out_ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    mask = r_ok[:, None] & d_ok[None, :]
    if MODE == OWN_ATOMIC:
        tl.atomic_add(out, value, mask=mask, sem="relaxed")
    else:
        tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------ dispatch

VARIANTS = ("two_pass", "atomic", "split", "whole")

# Thresholds of choose_plan, the fallback on a device without a tuned table (`rmi-fast tune` writes one; see
# rmi_fast.tuning). First-principles values, not measured.
#: aim for at least this many programs per pass before splitting sweeps
TARGET_PROGRAMS = 4 * SMS
#: (b) keeps dy in an fp32 atomic buffer; use it while that buffer (By·D·4 bytes per group) stays L2-resident
ATOMIC_MAX_BUFFER_BYTES = 16 << 20
#: never split a sweep into more chunks than this (each chunk re-reads its own rows' operand)
MAX_SPLIT = 64
#: (d) for batches of at most this many whole tiles (a deterministic run keeps an fp32 partial gradient per chunk)
WHOLE_MAX_CHUNKS = 4


@dataclass(frozen=True)
class Plan:
    """variant ∈ VARIANTS; split = chunks per sweep (1 except for "split" and "whole")."""

    variant: str
    split: int = 1


def choose_plan(Bx: int, By: int, D: int, G: int, deterministic: bool, block_m: int = 64,
                block_n: int = 64, block_d: int = 128, whole_max: int = 0) -> Plan:
    """The backward variant for a shape (see the module docstring for the trade-offs).

    * D spans several feature blocks, either side's rows fit a few whole tiles (of ``whole_max`` rows) and those
      keep at least half the SMs busy → ``whole``: S once per pass instead of once per feature block, which even in
      a single wave of programs is less than half the work of the alternatives;
    * too few programs to fill the GPU (small B, few groups) → ``split`` into enough chunks;
    * else, when atomics are allowed and the fp32 dy buffer is L2-sized → ``atomic`` (one pass: S computed once
      instead of twice per feature block);
    * else → ``two_pass``.
    """
    d_blocks = triton.cdiv(D, block_d)
    row_programs = min(triton.cdiv(Bx, block_m), triton.cdiv(By, block_m)) * G
    tiles = whole_chunks(Bx, By, whole_max)
    if d_blocks > 1 and 0 < tiles <= WHOLE_MAX_CHUNKS and 2 * row_programs * tiles >= SMS:
        return Plan("whole", tiles)
    programs = row_programs * d_blocks
    if programs < TARGET_PROGRAMS:
        chunks = min(triton.cdiv(TARGET_PROGRAMS, programs), triton.cdiv(min(Bx, By), block_n), MAX_SPLIT)
        if chunks > 1:
            return Plan("split", chunks)
    if not deterministic and By * D * 4 <= ATOMIC_MAX_BUFFER_BYTES:
        return Plan("atomic")
    return Plan("two_pass")


def check_plan(plan: Plan, deterministic: bool) -> None:
    if plan.variant not in VARIANTS:
        raise ValueError(f"backward variant must be one of {VARIANTS}, got {plan.variant!r}")
    if plan.split < 1:
        raise ValueError(f"split must be ≥ 1, got {plan.split}")
    if plan.variant == "atomic" and deterministic:
        raise ValueError("the 'atomic' backward variant uses atomics and cannot be deterministic")


def whole_chunks(Bx: int, By: int, whole_max: int) -> int:
    """The fewest chunks the whole plan needs: tiles of at most whole_max rows over the larger side (0: no tile)."""
    return triton.cdiv(max(Bx, By), whole_max) if whole_max else 0


def whole_tiles(NB: int, split: int) -> tuple[int, int]:
    """(rows a tile, tiles) of the whole plan's pass over NB other rows cut into ``split`` chunks: one tile each, of
    a power of two rows, as few as that takes (never an empty one: its program would leave its gradient unwritten)."""
    rows = max(16, triton.next_power_of_2(triton.cdiv(NB, split)))
    return rows, triton.cdiv(NB, rows)


def rows_in_one_program(plan: Plan, NB: int) -> bool:
    """Whether the plan's row sweep gives one program every column of its rows (two_pass; whole in one tile): then
    it can build the row log-sum-exp and its gradients in the same sweep."""
    return plan.variant == "two_pass" or (plan.variant == "whole" and whole_tiles(NB, plan.split)[1] == 1)


# ------------------------------------------------------------------------------------------------------ launcher

@dataclass
class _Problem:
    """Everything one family's sweeps share: inputs, options, fp32 statistics and weights."""

    x: torch.Tensor
    y: torch.Tensor
    scale: torch.Tensor
    spec: object
    grad_tile: object
    stat_tile: object
    stats: list
    weights: list
    norm: torch.Tensor


def _weight_norm(weights, device) -> torch.Tensor:
    """max |weight| over every statistic's weights (1 when they are all 0) as an fp32 device scalar: no sync."""
    if not weights:
        return torch.ones((), dtype=torch.float32, device=device)
    m = torch.stack([w.abs().amax() for w in weights]).amax()
    return torch.where(m > 0, m, torch.ones_like(m))


def _sweep(p: _Problem, *, transposed: bool, split: int, own_mode: int, other: torch.Tensor | None,
           stat_out: torch.Tensor | None, dscale_parts: bool, online: bool = False, whole: bool = False):
    """Launch one sweep. Returns (own result or None, dscale partials or None).

    own_mode: OWN_NONE / OWN_STORE / OWN_PARTIAL / OWN_ATOMIC (see the kernel); other: the fp32 atomic buffer of the
    other operand's gradient (Gb, Nb, D) or None; stat_out: (split, G, NA) fp32 for the row statistic or None;
    online: the row log-sum-exp and its unit-weight gradients in one sweep (split must be 1); whole: one tile of
    the other rows per chunk (split = whole_tiles' count), D walked in slices.
    """
    a, b = (p.y, p.x) if transposed else (p.x, p.y)
    G, sag, sbg = group_layout(a, b)
    NA, NB, D = a.shape[1], b.shape[1], a.shape[2]
    own_bcast = a.shape[0] == 1 and G > 1
    cfg = tile_config(D, a.device, a.dtype, atomic=other is not None,
                      whole_rows=whole_tiles(NB, split)[0] if whole else 0)
    BM, BD = cfg["BLOCK_M"], cfg["BLOCK_D"]
    d_blocks = triton.cdiv(D, BD) if (own_mode or other is not None) and not whole else 1
    grid = (triton.cdiv(NA, BM), G * split, d_blocks)

    own = None
    if own_mode == OWN_STORE:
        own = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        so = (0, *own.stride())
    elif own_mode == OWN_PARTIAL:
        parts = (G if own_bcast else 1) * split
        own = torch.empty((parts, a.shape[0], NA, D), dtype=torch.float32, device=a.device)
        so = own.stride()
    elif own_mode == OWN_ATOMIC:
        own = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
        so = (0, 0 if own_bcast else own.stride(0), own.stride(1), own.stride(2))
    else:
        so = (0, 0, 0, 0)
    if other is not None:
        st = (other.stride(0) if other.shape[0] > 1 else 0, other.stride(1), other.stride(2))
    else:
        st = (0, 0, 0)
    ds = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=a.device) if dscale_parts else None
    dummy = p.norm  # stands in for absent pointers; never dereferenced (the matching constexpr is off)
    stat0, stat1, w0, w1 = (p.stats + [dummy, dummy])[:2] + (p.weights + [dummy, dummy])[:2]
    spec = p.spec
    precision = dot_precision(a.dtype, a.device)
    wide = a.dtype == torch.float16 and spec.transform == "exp_m1"  # NWJ's e^(S − 1) in fp16: see the kernel
    sweep_kernel[grid](
        own if own is not None else dummy, other if other is not None else dummy,
        stat_out if stat_out is not None else dummy, ds if ds is not None else dummy,
        a, b, p.scale, p.norm, stat0, stat1, w0, w1,
        NA, NB, D, spec.diag_offset, float(spec.clip), split,
        sag, a.stride(1), a.stride(2), sbg, b.stride(1), b.stride(2),
        *so, *st,
        *(stat_out.stride()[:2] if stat_out is not None else (0, 0)),
        *(t.stride(0) if t.dim() == 2 else 1 for t in (stat0, stat1, w0, w1)),
        GRAD_TILE=p.grad_tile, STAT_TILE=p.stat_tile, TRANSPOSED=transposed, OWN_BCAST=own_bcast,
        OWN_MODE=own_mode, OTHER_ATOMIC=other is not None, STATS=stat_out is not None and not online,
        ONLINE=online, DSCALE=dscale_parts,
        DIAG=DIAGONAL_CODE[spec.diagonal], TRANSFORM=TRANSFORM_CODE[spec.transform], COLUMNS=spec.columns,
        BLOCK_M=BM, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=BD,
        PRECISION=precision, WIDE_GRAD=wide, GRAD_PRECISION="tf32" if wide else precision, WHOLE=whole,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return own, ds


def _finish(own: torch.Tensor, mode: int, like: torch.Tensor) -> torch.Tensor:
    """The gradient in the input dtype: partials summed over their leading axis in a fixed order."""
    if mode == OWN_PARTIAL:
        own = own.sum(0)
    return own.to(like.dtype)


def _own_mode(operand: torch.Tensor, G: int, split: int, deterministic: bool) -> int:
    """Store directly when one program owns the rows; otherwise partial buffers (deterministic) or atomics."""
    shared = split > 1 or (operand.shape[0] == 1 and G > 1)
    if not shared:
        return OWN_STORE
    return OWN_PARTIAL if deterministic else OWN_ATOMIC


def resolve_plan(x: torch.Tensor, y: torch.Tensor, spec, plan: Plan | None) -> Plan:
    """The given plan, validated; else the plan measured fastest at the nearest shape on this device (its tuned
    table, :mod:`rmi_fast.tuning`), else :func:`choose_plan`'s for these shapes."""
    G, (Bx, D), By = max(x.shape[0], y.shape[0]), x.shape[1:], y.shape[1]
    whole_max = whole_max_rows(x.device, x.dtype, spec.columns)
    chosen = plan is None
    if plan is None:
        cfg = tile_config(D, x.device, x.dtype)
        measured = tuning.triton_plan(x, y, spec)
        # The table is keyed by the operands' width, not by allow_tf32: a "whole" measured with TF32 on has no tile
        # for fp32 while it is off.
        if measured is not None and not (measured[0] == "whole" and not whole_max):
            variant, split = measured
            # a split measured at a larger shape: no more chunks than either sweep has blocks
            plan = Plan(variant, max(1, min(split, triton.cdiv(min(Bx, By), cfg["BLOCK_N"]))))
        else:
            plan = choose_plan(Bx, By, D, G, spec.deterministic, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"],
                               whole_max)
    check_plan(plan, spec.deterministic)
    if plan.variant == "whole":  # at least as many chunks as the tiles need
        if not whole_max:
            raise ValueError(f"the 'whole' backward variant has no tile for {x.dtype} inputs here (fp32 without TF32 "
                             "multiplies on the FMA units, whose operand tiles would not fit its registers)")
        plan = Plan("whole", max(plan.split, whole_chunks(Bx, By, whole_max)))
    if G * plan.split > CUDA_MAX_GRID_YZ:  # grid axis 1 holds (group, chunk): a CUDA grid's y side is 65535 at most
        if not chosen:
            raise ValueError(f"{plan} over {G} groups needs {G * plan.split} programs on grid axis 1, more than "
                             f"{CUDA_MAX_GRID_YZ}")
        fewer = CUDA_MAX_GRID_YZ // G
        plan = Plan("split", fewer) if plan.variant == "split" and fewer > 1 else Plan("two_pass")
    return plan


def run(x, y, scale, spec, grad_tile, stats, weights, want, plan: Plan | None = None, stat_tile=None,
        online: bool = False):
    """(dx, dy, dscale) — and the row statistic computed in the same sweep, with ``stat_tile`` (row_sum) or
    ``online`` (row_lse with unit weights and the two_pass or whole plan: r, dx and dscale from one sweep, then dy
    from the column sweep with that r).

    x: (Gx, Bx, D), y: (Gy, By, D); scale: 0-d; stats / weights: fp32 lists as in rmi_fast.ops.spec.
    Returns (stat or None, dx or None, dy or None, dscale or None); gradients in the input dtypes.
    """
    G, Bx = max(x.shape[0], y.shape[0]), x.shape[1]
    plan = resolve_plan(x, y, spec, plan)
    if online and not rows_in_one_program(plan, y.shape[1]):
        raise ValueError(f"the online row sweep needs every column of a row in one program, not {plan}")
    want_dx, want_dy, want_dscale = want
    weights = [stat_buffer(w) for w in weights]
    p = _Problem(x, y, scale, spec, grad_tile, stat_tile, [stat_buffer(s) for s in stats], weights,
                 _weight_norm(weights, x.device))
    split = plan.split if plan.variant in ("split", "whole") else 1
    whole = plan.variant == "whole"
    # chunks of the row pass (over y's rows) and the column pass (over x's): a whole pass runs as many as its tiles
    row_split, col_split = (whole_tiles(n, split)[1] for n in (y.shape[1], Bx)) if whole else (split, split)
    atomic_dy = plan.variant == "atomic" and want_dy
    with_stat = stat_tile is not None or online
    row_pass = want_dx or atomic_dy or with_stat or (want_dscale and not want_dy)
    stat = dx = dy = dscale_parts = None

    if row_pass:
        mode = _own_mode(x, G, row_split, spec.deterministic) if want_dx else OWN_NONE
        dy_buf = torch.zeros(y.shape, dtype=torch.float32, device=y.device) if atomic_dy else None
        stat_out = torch.empty((row_split, G, Bx), dtype=torch.float32, device=x.device) if with_stat else None
        own, dscale_parts = _sweep(p, transposed=False, split=row_split, own_mode=mode, other=dy_buf,
                                   stat_out=stat_out, dscale_parts=want_dscale, online=online, whole=whole)
        if want_dx:
            dx = _finish(own, mode, x)
        if atomic_dy:
            dy = dy_buf.to(y.dtype)
        if stat_out is not None:
            stat = stat_out.sum(0)
        if online:
            p.stats = [stat]  # the column sweep's normaliser
    if want_dy and dy is None:
        mode = _own_mode(y, G, col_split, spec.deterministic)
        own, parts = _sweep(p, transposed=True, split=col_split, own_mode=mode, other=None, stat_out=None,
                            dscale_parts=want_dscale and dscale_parts is None, whole=whole)
        dy = _finish(own, mode, y)
        dscale_parts = parts if dscale_parts is None else dscale_parts
    dscale = dscale_parts.sum().to(scale.dtype) if want_dscale else None
    return stat, dx, dy, dscale
