"""Readable eager-PyTorch definitions: the oracle every test compares against, and the ``torch`` backend.

Part 1 defines every bound and loss of design §1 directly from its formula on the materialised score matrix, with
gradients by autograd. It is deliberately naive and shares no code with the kernels, so it is an independent check;
run it in fp64 for an oracle.

Part 2 is the ``torch`` backend's implementation of the kernel contract of :mod:`rmi_fast.ops.spec` (statistics and
closed-form gradients of the negative part). It materialises the B×B score matrix of each group: the eager
baseline, kept as lean as eager PyTorch allows: the scores, the transform and the gradient matrix are computed in
place where autograd does not record, since each fresh B×B allocation costs a CPU about as much as a pass over it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops.spec import PairSpec

# ---------------------------------------------------------------------------------------------------------------
# Part 1: the oracle.  x: (B, D) or (G, B, D); y likewise; a 2-D operand is broadcast over the groups of the other.
# Each bound returns the per-anchor terms t of shape (G, B) (G = 1 for two 2-D inputs); the bound is t.mean().
# ---------------------------------------------------------------------------------------------------------------


def scores(x: torch.Tensor, y: torch.Tensor, scale=1.0) -> torch.Tensor:
    """S[g, i, j] = scale · <x[g, i], y[g, j]>  → (G, B, B)."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    y3 = y if y.dim() == 3 else y.unsqueeze(0)
    return scale * torch.matmul(x3, y3.transpose(-1, -2))


def _off_diagonal(S: torch.Tensor) -> torch.Tensor:
    return ~torch.eye(S.shape[-1], dtype=torch.bool, device=S.device)


def _diag(S: torch.Tensor) -> torch.Tensor:
    return S.diagonal(dim1=-2, dim2=-1)


def _negatives(S: torch.Tensor, diagonal: str) -> torch.Tensor:
    """The score matrix as the negative terms see it: diagonal dropped (−∞) or zeroed (the released code)."""
    if diagonal == "zero":
        return S.masked_fill(~_off_diagonal(S), 0.0)
    return S.masked_fill(~_off_diagonal(S), -math.inf)


def infonce(x, y, scale=1.0):
    """t_i = S_ii − log Σ_j exp S_ij + log B  (the positive is one of the B classes)."""
    S = scores(x, y, scale)
    B = S.shape[-1]
    return _diag(S) - torch.logsumexp(S, dim=-1) + math.log(B)


def nwj(x, y, scale=1.0, diagonal="exclude"):
    """t_i = S_ii − (1/(B−1)) Σ_{j≠i} exp(S_ij − 1)."""
    S = scores(x, y, scale)
    B = S.shape[-1]
    neg = torch.exp(_negatives(S, diagonal) - 1.0)
    return _diag(S) - neg.sum(-1) / (B - 1)


def dv(x, y, scale=1.0, diagonal="exclude"):
    """t_i = S_ii − log[(1/(B(B−1))) Σ_{k≠l} exp S_kl]; the log term is one number per group."""
    S = scores(x, y, scale)
    B = S.shape[-1]
    log_term = torch.logsumexp(_negatives(S, diagonal).flatten(-2), dim=-1) - math.log(B * (B - 1))
    return _diag(S) - log_term.unsqueeze(-1)


def smile(x, y, scale=1.0, clip=5.0, diagonal="exclude"):
    """As dv, with the scores clamped to [−clip, clip] inside the log term only (Song & Ermon 2020)."""
    S = scores(x, y, scale)
    B = S.shape[-1]
    clipped = _negatives(S.clamp(-clip, clip), diagonal)
    log_term = torch.logsumexp(clipped.flatten(-2), dim=-1) - math.log(B * (B - 1))
    return _diag(S) - log_term.unsqueeze(-1)


def jsd(x, y, scale=1.0, diagonal="exclude"):
    """t_i = 2·log 2 − softplus(−S_ii) − (1/(B−1)) Σ_{j≠i} softplus(S_ij)   (Deep InfoMax convention)."""
    S = scores(x, y, scale)
    B = S.shape[-1]
    if diagonal == "zero":
        neg = F.softplus(S.masked_fill(~_off_diagonal(S), 0.0))
    else:
        neg = F.softplus(S).masked_fill(~_off_diagonal(S), 0.0)
    return 2 * math.log(2.0) - F.softplus(-_diag(S)) - neg.sum(-1) / (B - 1)


def mine(x, y, scale=1.0, ema=None, diagonal="exclude"):
    """MINE (Belghazi et al. 2018): the value of ``dv``; the gradient of its log term is taken against ``ema``.

    With m = mean_{k≠l} exp S_kl the log term is log m, whose gradient ∇m/m is replaced by ∇m/ema (the bias-corrected
    estimator). ``ema`` is a float or 0-d tensor (no gradient); ``None`` uses the batch's own m (then equal to dv).
    """
    t = dv(x, y, scale, diagonal)
    S = scores(x, y, scale)
    B = S.shape[-1]
    mean_exp = torch.exp(_negatives(S, diagonal)).flatten(-2).sum(-1) / (B * (B - 1))
    denom = mean_exp.detach() if ema is None else torch.as_tensor(ema, dtype=S.dtype, device=S.device)
    surrogate = -(mean_exp / denom).unsqueeze(-1)
    return t.detach() + (surrogate - surrogate.detach()) + (_diag(S) - _diag(S).detach())


BOUNDS = {"infonce": infonce, "nwj": nwj, "dv": dv, "smile": smile, "jsd": jsd, "mine": mine}


def infonce_loss(za, zb, temperature=0.1, symmetric=False, targets=None, label_smoothing=0.0):
    """Per-anchor cross-entropy of S = za·zbᵀ/τ against the diagonal (or ``targets``, indices into zb's rows) → (B,);
    symmetric averages rows and columns; ``label_smoothing`` as in torch's cross_entropy."""
    S = za @ zb.T / temperature
    target = torch.arange(S.shape[0], device=S.device) if targets is None else targets
    rows = F.cross_entropy(S, target, reduction="none", label_smoothing=label_smoothing)
    if not symmetric:
        return rows
    return 0.5 * (rows + F.cross_entropy(S.T, target, reduction="none", label_smoothing=label_smoothing))


def views_index(n_samples: int, n_views: int, layout: str, device=None) -> torch.Tensor:
    """sample[a]: which sample row a of z belongs to, for the "blocked" or "interleaved" layout."""
    a = torch.arange(n_samples * n_views, device=device)
    return a % n_samples if layout == "blocked" else a // n_views


def nt_xent_loss(z, n_views=2, temperature=0.5, normalize=True, layout="blocked", labels=None):
    """NT-Xent (SimCLR) per anchor → (V·N,): −mean over the positives p of log softmax_{k≠a}(S_a·)[p]. The positives
    are the other views of a's sample, or with ``labels`` (N,) every other row of a's class (SupCon; an anchor
    without a positive gets 0)."""
    if normalize:
        z = F.normalize(z, dim=-1)
    S = z @ z.T / temperature
    n = S.shape[0] // n_views
    sample = views_index(n, n_views, layout, z.device)
    group = sample if labels is None else labels[sample]
    self_mask = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    log_p = torch.log_softmax(S.masked_fill(self_mask, -math.inf), dim=-1)
    positive = (group[:, None] == group[None, :]) & ~self_mask
    return -(log_p.masked_fill(~positive, 0.0).sum(-1)) / positive.sum(-1).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# Part 2: the torch backend — the kernel contract (rmi_fast.ops.spec) on a materialised score matrix.
# x: (Gx, Bx, D), y: (Gy, By, D) with Gx, Gy ∈ {1, G}; scale: 0-d tensor.
# ---------------------------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _diagonal_mask(spec: PairSpec, Bx: int, By: int, device) -> torch.Tensor | None:
    if spec.diagonal == "include":
        return None
    rows = torch.arange(Bx, device=device)
    cols = torch.arange(By, device=device)
    return cols[None, :] == (rows[:, None] + spec.diag_offset)


def _transformed(S: torch.Tensor, spec: PairSpec, mask=None) -> torch.Tensor:
    """T = transform(S) with the diagonal handled (``mask``: S's diagonal entries, found here when not given);
    excluded entries are the reduction's identity."""
    if mask is None:
        mask = _diagonal_mask(spec, S.shape[-2], S.shape[-1], S.device)
    if mask is not None and spec.diagonal == "zero":
        S = S.masked_fill(mask, 0.0)
    if spec.transform == "clip":
        T = S.clamp(-spec.clip, spec.clip)
    elif spec.transform == "exp_m1":
        T = (S - 1.0).exp_()
    elif spec.transform == "softplus":
        T = F.softplus(S)
    else:
        T = S
    if mask is not None and spec.diagonal == "exclude":  # in place on a tensor of the transform's own, never on S
        fill = -math.inf if spec.family != "row_sum" else 0.0
        T = T.masked_fill(mask, fill) if T is S or _recorded(T) else T.masked_fill_(mask, fill)
    return T


def _recorded(t: torch.Tensor) -> bool:
    """Whether autograd records ops on t, which an in-place op could then invalidate (tests differentiate
    pair_stats; inside the custom op nothing is recorded)."""
    return torch.is_grad_enabled() and t.requires_grad


def _scores(x, y, scale, keep_raw: bool):
    """(xc, yc, raw, S): the inputs in the statistics' dtype, raw = x·yᵀ (only when ``keep_raw``: d scale needs it)
    and S = scale·raw, written over raw otherwise. Each B×B matrix is a fresh allocation, which on a CPU costs a page
    fault per 4 KiB on first touch, about as much as a pass over it: Part 2 allocates as few as it can."""
    ct = compute_dtype(x.dtype)
    xc, yc = x.to(ct), y.to(ct)
    raw = torch.matmul(xc, yc.transpose(-1, -2))
    sc = scale.to(ct)
    S = raw * sc if keep_raw or _recorded(raw) or _recorded(sc) else raw.mul_(sc)
    return xc, yc, (raw if keep_raw else None), S


def pair_stats(x, y, scale, spec: PairSpec) -> list[torch.Tensor]:
    S = _scores(x, y, scale, keep_raw=False)[3]
    return _stats_of(_transformed(S, spec), spec)


def _stats_of(T: torch.Tensor, spec: PairSpec) -> list[torch.Tensor]:
    """The statistics of T = transform(S) (G, Bx, By), diagonal handled (see _transformed): reduced."""
    if spec.family == "row_lse":
        stats = [torch.logsumexp(T, dim=-1)]
        if spec.columns:
            stats.append(torch.logsumexp(T, dim=-2))
        return stats
    if spec.family == "global_lse":
        return [torch.logsumexp(T.flatten(-2), dim=-1)]
    return [T.sum(-1)]


def pair_grad_matrix(S, spec: PairSpec, stats, weights, T=None) -> torch.Tensor:
    """G_ij = Σ_stat weight · dStat/dS_ij, the closed forms of the table in rmi_fast.ops.spec. T: transform(S) as
    _transformed gives it, when the caller has it and needs it no more (it may be overwritten); else computed."""
    mask = _diagonal_mask(spec, S.shape[-2], S.shape[-1], S.device)
    if spec.transform == "softplus":  # softplus' = sigmoid, of S itself
        G = torch.sigmoid(S).mul_(weights[0].unsqueeze(-1))
        if mask is not None:  # an excluded or zeroed entry does not depend on x or y
            G.masked_fill_(mask, 0.0)
        return G
    if T is None:
        T = _transformed(S, spec, mask)
    if spec.family == "row_lse":
        G = (T - stats[0].unsqueeze(-1)).exp_().mul_(weights[0].unsqueeze(-1))
        if spec.columns:
            G.add_((T - stats[1].unsqueeze(-2)).exp_().mul_(weights[1].unsqueeze(-2)))
    elif spec.family == "global_lse":
        G = (T - stats[0][:, None, None]).exp_().mul_(weights[0][:, None, None])
        if spec.transform == "clip":
            G.masked_fill_((S >= spec.clip) | (S <= -spec.clip), 0.0)
    else:  # exp_m1: T' = T, a tensor of the transform's own
        G = T.mul_(weights[0].unsqueeze(-1))
    if mask is not None and spec.diagonal == "zero":
        G.masked_fill_(mask, 0.0)
    return G


def pair_grads(x, y, scale, spec: PairSpec, stats, weights, want):
    """(dx, dy, dscale) for the upstream weights of each statistic; None where ``want`` is False."""
    xc, yc, raw, S = _scores(x, y, scale, keep_raw=want[2])
    G = pair_grad_matrix(S, spec, stats, [w.to(S.dtype) for w in weights])
    return _grads_of(x, y, xc, yc, raw, G, scale, want)


def pair_stats_and_grads(x, y, scale, spec: PairSpec, want):
    """The statistics and their gradients for unit upstream weights from one score matrix: three matrix products,
    where the statistics and then pair_grads take four."""
    xc, yc, raw, S = _scores(x, y, scale, keep_raw=want[2])
    T = _transformed(S, spec)
    stats = _stats_of(T, spec)
    G = pair_grad_matrix(S, spec, stats, [torch.ones_like(t) for t in stats], T)
    return (stats, *_grads_of(x, y, xc, yc, raw, G, scale, want))


def _grads_of(x, y, xc, yc, raw, G, scale, want):
    """(dx, dy, dscale) from the gradient matrix G, the inputs in the statistics' dtype (xc, yc) and raw = x·yᵀ."""
    sc = scale.to(G.dtype)
    dx = dy = dscale = None
    if want[0]:
        dx = _scaled_product(G, yc, sc, x.shape[0] == 1).to(x.dtype)
    if want[1]:
        dy = _scaled_product(G.transpose(-1, -2), xc, sc, y.shape[0] == 1).to(y.dtype)
    if want[2]:
        dscale = (G * raw).sum().to(scale.dtype)
    return dx, dy, dscale


def _scaled_product(M: torch.Tensor, other: torch.Tensor, sc: torch.Tensor, broadcast: bool) -> torch.Tensor:
    """sc · M @ other for M (G, R, C) and other (Go, C, D), Go ∈ {1, G}: → (G, R, D), or, for an operand broadcast
    over the groups, its gradient Σ_g sc · M_g @ other_g → (1, R, D). The scale goes on the smaller side, and the
    broadcast sum is one GEMM over the (g, c) pairs, (R, G·C) @ (G·C, D): at the paper's critic shape (G = 64,
    B = 128, D = 2048) a batched product would write a (G, B, D) tensor, 64 MiB, only to sum it."""
    G, R, C = M.shape
    if broadcast:
        if G == 1:
            return torch.matmul(M[0], other[0] * sc).unsqueeze(0)
        product = torch.matmul(M.transpose(0, 1).reshape(R, G * C), other.reshape(G * C, -1))
        return (product * sc).unsqueeze(0)
    return torch.matmul(M, other * sc)
