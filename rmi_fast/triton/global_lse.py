"""global_lse: L_g = logsumexp_{i,j} T_ij with T = S ("none": DV, MINE) or clamp(S, ±clip) ("clip": SMILE).

Forward: the row log-sum-exp sweep of :mod:`.row_lse` with the clamp applied in-tile gives each row's (max, sum)
pair as r_i = m_i + log l_i; the group's statistic merges them, L = logsumexp_i r_i — exact, since a log-sum-exp
over all entries is the log-sum-exp of the row log-sum-exps. Backward: the shared sweep with :func:`grad_tile`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backward
from .common import T_CLIP, clamp_keep_nan
from .row_lse import lse_rows


def stats(x, y, scale, spec) -> list[torch.Tensor]:
    r = lse_rows(x, y, scale, spec, clip=spec.transform == "clip")[0]  # (G, Bx) fp32
    return [torch.logsumexp(r, dim=-1)]  # fixed-order fp32 merge of the rows' partials: (G,)


# G_ij = w·e^(T_ij − L)·T'(S_ij), T' = 1 for "none" and 1(|S_ij| < clip) for "clip" (the clamp's derivative).
@triton.jit
def grad_tile(S, i2, j2, g, i_ok, j_ok, stat0_ptr, stat1_ptr, w0_ptr, w1_ptr, stride_0g, stride_1g, stride_w0g,
              stride_w1g, clip, TRANSFORM: tl.constexpr, COLUMNS: tl.constexpr):
    L = tl.load(stat0_ptr + g * stride_0g)
    w = tl.load(w0_ptr + g * stride_w0g)
    if TRANSFORM == T_CLIP:
        T = clamp_keep_nan(S, clip)
        grad = w * tl.exp(T - L) * tl.where(tl.abs(S) < clip, 1.0, 0.0)  # multiplied: a NaN score stays NaN
    else:
        grad = w * tl.exp(S - L)
    return grad


def grads(x, y, scale, spec, stats, weights, want, plan=None):
    _, dx, dy, dscale = backward.run(x, y, scale, spec, grad_tile, stats, weights, want, plan)
    return dx, dy, dscale
