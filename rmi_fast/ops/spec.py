"""The one kernel contract every backend implements.

Every MI bound and contrastive loss in this package splits into

* a *positive* part, O(B·D): the paired scores S_ii = scale·<x_i, y_i>, computed eagerly with autograd;
* a *negative* part, O(B²·D): a reduction over the whole score matrix S = scale · x·yᵀ, which is where the time
  and the memory go. It is the only thing a backend computes, and it never stores S.

The negative part is one of three *families* of reductions over T = transform(S) (T_ij = S_ij for "none"):

==============  =================================================  ===============================================
family          statistic (per group g)                           gradient dStat/dS_ij given upstream weights
==============  =================================================  ===============================================
``row_lse``     r_i = logsumexp_j S_ij  (and, with ``columns``,   G_ij = w_i·exp(S_ij − r_i) + v_j·exp(S_ij − c_j)
                c_j = logsumexp_i S_ij)
``global_lse``  L = logsumexp_{i,j} T_ij, T = S or clamp(S, ±c)    G_ij = w·exp(T_ij − L)·T'(S_ij)
``row_sum``     r_i = Σ_j T_ij, T = exp(S − 1) or softplus(S)      G_ij = w_i·T'(S_ij)
==============  =================================================  ===============================================

Diagonal entries (i, i + diag_offset) are handled by ``diagonal``: ``"include"`` keeps them, ``"exclude"`` drops
them (−∞ inside a log-sum-exp, 0 inside a sum), ``"zero"`` replaces their score by 0 (the released code of Zhu et
al.; such an entry no longer depends on x or y, so its gradient is 0).

From G the input gradients are   dx = scale·G·y,   dy = scale·Gᵀ·x,   dscale = Σ_ij G_ij·<x_i, y_j>,
summed over groups for an operand that is broadcast over them.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("row_lse", "global_lse", "row_sum")
TRANSFORMS = {"row_lse": ("none",), "global_lse": ("none", "clip"), "row_sum": ("exp_m1", "softplus")}
DIAGONALS = ("include", "exclude", "zero")


@dataclass(frozen=True)
class PairSpec:
    """Non-tensor options of one negative-part reduction (hashable: it keys compiled kernels).

    family:        "row_lse" | "global_lse" | "row_sum"
    transform:     "none" | "clip" (global_lse) | "exp_m1" | "softplus" (row_sum)
    clip:          the clamp bound c of transform "clip"
    diagonal:      "include" | "exclude" | "zero"
    diag_offset:   column index of row 0's diagonal entry (nonzero when y holds other ranks' rows too)
    columns:       row_lse only: also return the column log-sum-exps c_j (symmetric InfoNCE / CLIP)
    deterministic: bitwise-repeatable results (no atomics, fixed reduction order)
    """

    family: str
    transform: str = "none"
    clip: float = 5.0
    diagonal: str = "include"
    diag_offset: int = 0
    columns: bool = False
    deterministic: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.transform not in TRANSFORMS[self.family]:
            raise ValueError(f"transform for {self.family} must be one of {TRANSFORMS[self.family]}, got {self.transform!r}")
        if self.diagonal not in DIAGONALS:
            raise ValueError(f"diagonal must be one of {DIAGONALS}, got {self.diagonal!r}")
        if self.columns and self.family != "row_lse":
            raise ValueError("columns=True is only defined for the row_lse family")

    @property
    def n_stats(self) -> int:
        return 2 if self.columns else 1

    def stat_shapes(self, G: int, Bx: int, By: int) -> list[tuple[int, ...]]:
        """Shapes of the statistics a backend returns (and of the weights its backward takes)."""
        if self.family == "global_lse":
            return [(G,)]
        return [(G, Bx), (G, By)] if self.columns else [(G, Bx)]
