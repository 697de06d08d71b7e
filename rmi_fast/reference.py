"""Readable eager-PyTorch definitions: the oracle every test compares against, and the ``torch`` backend.

Part 1 defines every bound and loss of design §1 directly from its formula on the materialised score matrix, with
gradients by autograd. It is deliberately naive and shares no code with the kernels, so it is an independent check;
run it in fp64 for an oracle.

Part 2 is the ``torch`` backend's implementation of the kernel contract of :mod:`rmi_fast.ops.spec` (statistics and
closed-form gradients of the negative part). It materialises one B×B score matrix per group: the eager baseline.
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


def _transformed(S: torch.Tensor, spec: PairSpec, mask) -> torch.Tensor:
    """T = transform(S) with the diagonal handled; excluded entries are the reduction's identity."""
    if mask is not None and spec.diagonal == "zero":
        S = S.masked_fill(mask, 0.0)
    if spec.transform == "clip":
        T = S.clamp(-spec.clip, spec.clip)
    elif spec.transform == "exp_m1":
        T = torch.exp(S - 1.0)
    elif spec.transform == "softplus":
        T = F.softplus(S)
    else:
        T = S
    if mask is not None and spec.diagonal == "exclude":
        T = T.masked_fill(mask, -math.inf if spec.family != "row_sum" else 0.0)
    return T


def _eager_scores(x, y, scale):
    ct = compute_dtype(x.dtype)
    return scale.to(ct) * torch.matmul(x.to(ct), y.to(ct).transpose(-1, -2))


def pair_stats(x, y, scale, spec: PairSpec) -> list[torch.Tensor]:
    return _stats_of(_eager_scores(x, y, scale), spec)


def _stats_of(S: torch.Tensor, spec: PairSpec) -> list[torch.Tensor]:
    """The statistics of the scores S (G, Bx, By): transformed, diagonal handled, reduced."""
    T = _transformed(S, spec, _diagonal_mask(spec, S.shape[-2], S.shape[-1], S.device))
    if spec.family == "row_lse":
        stats = [torch.logsumexp(T, dim=-1)]
        if spec.columns:
            stats.append(torch.logsumexp(T, dim=-2))
        return stats
    if spec.family == "global_lse":
        return [torch.logsumexp(T.flatten(-2), dim=-1)]
    return [T.sum(-1)]


def pair_grad_matrix(S, spec: PairSpec, stats, weights) -> torch.Tensor:
    """G_ij = Σ_stat weight · dStat/dS_ij, the closed forms of the table in rmi_fast.ops.spec."""
    mask = _diagonal_mask(spec, S.shape[-2], S.shape[-1], S.device)
    T = _transformed(S, spec, mask)
    if spec.family == "row_lse":
        G = weights[0].unsqueeze(-1) * torch.exp(T - stats[0].unsqueeze(-1))
        if spec.columns:
            G = G + weights[1].unsqueeze(-2) * torch.exp(T - stats[1].unsqueeze(-2))
    elif spec.family == "global_lse":
        G = weights[0][:, None, None] * torch.exp(T - stats[0][:, None, None])
        if spec.transform == "clip":
            G = G * (S.abs() < spec.clip)
    elif spec.transform == "exp_m1":
        G = weights[0].unsqueeze(-1) * T
    else:  # softplus' = sigmoid
        G = weights[0].unsqueeze(-1) * torch.sigmoid(S)
        if mask is not None and spec.diagonal == "exclude":
            G = G.masked_fill(mask, 0.0)
    if mask is not None and spec.diagonal == "zero":
        G = G.masked_fill(mask, 0.0)
    return G


def pair_grads(x, y, scale, spec: PairSpec, stats, weights, want):
    """(dx, dy, dscale) for the upstream weights of each statistic; None where ``want`` is False."""
    ct = compute_dtype(x.dtype)
    xc, yc = x.to(ct), y.to(ct)
    raw = torch.matmul(xc, yc.transpose(-1, -2))
    return _grads_of_scores(x, y, xc, yc, raw, scale.to(ct) * raw, scale, spec, stats, weights, want)


def pair_stats_and_grads(x, y, scale, spec: PairSpec, want):
    """The statistics and their gradients for unit upstream weights from one score matrix: three matrix products,
    where the statistics and then pair_grads take four."""
    ct = compute_dtype(x.dtype)
    xc, yc = x.to(ct), y.to(ct)
    raw = torch.matmul(xc, yc.transpose(-1, -2))
    S = scale.to(ct) * raw
    stats = _stats_of(S, spec)
    ones = [torch.ones_like(t) for t in stats]
    return (stats, *_grads_of_scores(x, y, xc, yc, raw, S, scale, spec, stats, ones, want))


def _grads_of_scores(x, y, xc, yc, raw, S, scale, spec: PairSpec, stats, weights, want):
    """pair_grads given the inputs in the statistics' dtype (xc, yc), their products raw = x·yᵀ and S = scale·raw."""
    ct = raw.dtype
    sc = scale.to(ct)
    G = pair_grad_matrix(S, spec, stats, [w.to(ct) for w in weights])
    dx = dy = dscale = None
    if want[0]:
        dx = (sc * torch.matmul(G, yc)).sum(0, keepdim=True) if x.shape[0] == 1 else sc * torch.matmul(G, yc)
        dx = dx.to(x.dtype)
    if want[1]:
        GT = G.transpose(-1, -2)
        dy = (sc * torch.matmul(GT, xc)).sum(0, keepdim=True) if y.shape[0] == 1 else sc * torch.matmul(GT, xc)
        dy = dy.to(y.dtype)
    if want[2]:
        dscale = (G * raw).sum().to(scale.dtype)
    return dx, dy, dscale
