"""row_sum: r_i = Σ_j T_ij with T = exp(S − 1) ("exp_m1": NWJ) or softplus(S) ("softplus": JSD).

Elementwise family: G_ij = w_i·T'(S_ij) needs no normaliser, so the statistic and the gradient come from the
same score tiles. The statistic is the shared sweep of :mod:`.backward` run with :func:`stat_tile` and no
gradient; the fused path (:func:`stats_and_grads`) adds the gradients to that very sweep.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backward
from .common import T_EXP_M1, sigmoid, softplus


# T(S): exp(S − 1) or softplus(S) (stable for |S| large).
@triton.jit
def stat_tile(S, TRANSFORM: tl.constexpr):
    if TRANSFORM == T_EXP_M1:
        T = tl.exp(S - 1.0)
    else:
        T = softplus(S)
    return T


# G_ij = w_i·T'(S_ij): T' = exp(S − 1) for exp_m1, σ(S) for softplus.
@triton.jit
def grad_tile(S, i2, j2, g, i_ok, j_ok, stat0_ptr, stat1_ptr, w0_ptr, w1_ptr, stride_0g, stride_1g, stride_w0g,
              stride_w1g, clip, TRANSFORM: tl.constexpr, COLUMNS: tl.constexpr):
    w = tl.load(w0_ptr + g * stride_w0g + i2, mask=i_ok, other=0.0)
    if TRANSFORM == T_EXP_M1:
        grad = w * tl.exp(S - 1.0)
    else:
        grad = w * sigmoid(S)
    return grad


def stats(x, y, scale, spec) -> list[torch.Tensor]:
    stat, *_ = backward.run(x, y, scale, spec, grad_tile, [], [], (False, False, False), stat_tile=stat_tile)
    return [stat]


def grads(x, y, scale, spec, stats, weights, want, plan=None):
    # The statistic is not needed: G depends on S alone.
    _, dx, dy, dscale = backward.run(x, y, scale, spec, grad_tile, [], weights, want, plan)
    return dx, dy, dscale


def stats_and_grads(x, y, scale, spec, want, plan=None):
    """Statistic and unit-weight gradients from one sweep (plus the dy sweep of the two-pass variants)."""
    G = max(x.shape[0], y.shape[0])
    ones = torch.ones((G, x.shape[1]), dtype=torch.float32, device=x.device)
    stat, dx, dy, dscale = backward.run(x, y, scale, spec, grad_tile, [], [ones], want, plan, stat_tile=stat_tile)
    return [stat], dx, dy, dscale
