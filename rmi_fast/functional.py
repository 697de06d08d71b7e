"""The public functions: validate, normalise shapes, split each bound into its positive and negative parts, dispatch.

Every bound is  t[g, i] = positive(S_ii) − negative(statistic of S)  (design §1). The positive part needs only the
paired scores S_ii = scale·<x_i, y_i> (O(B·D), eager, autograd); the negative part is the fused reduction of
:mod:`rmi_fast.ops.pairwise`, which never stores a B×B matrix.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import backends
from .ops.pairwise import pair_reduce
from .ops.spec import PairSpec

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_LAYOUTS = ("blocked", "interleaved")
#: bound -> (family, transform of the negatives)
_BOUND_FAMILY = {
    "infonce": ("row_lse", "none"),
    "nwj": ("row_sum", "exp_m1"),
    "dv": ("global_lse", "none"),
    "mine": ("global_lse", "none"),
    "smile": ("global_lse", "clip"),
    "jsd": ("row_sum", "softplus"),
}
BOUNDS = tuple(_BOUND_FAMILY)


# ----------------------------------------------------------------------------------------------------- validation

def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_embeddings(name: str, t, ndims=(2, 3)) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        shapes = " or ".join({2: "(B, D)", 3: "(G, B, D)"}[n] for n in ndims)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.shape[-2] == 0 or t.shape[-1] == 0 or (t.dim() == 3 and t.shape[0] == 0):
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")


def _check_pair(xname: str, x: torch.Tensor, yname: str, y: torch.Tensor, same_rows: bool = True) -> None:
    if x.device != y.device:
        raise ValueError(f"{xname} and {yname} must be on the same device, got {x.device} and {y.device}")
    if x.dtype != y.dtype:
        raise TypeError(f"{xname} and {yname} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{xname} and {yname} must have the same feature size D, got {x.shape[-1]} and {y.shape[-1]}")
    if same_rows and x.shape[-2] != y.shape[-2]:
        raise ValueError(f"{xname} and {yname} must have the same batch size B, got {x.shape[-2]} and {y.shape[-2]}")
    if x.dim() == 3 and y.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"{xname} and {yname} must have the same number of groups G, got {x.shape[0]} and {y.shape[0]}")


def _scale_tensor(name: str, scale, like: torch.Tensor) -> torch.Tensor:
    """A float or 0-d tensor → 0-d tensor of the statistics' dtype on the inputs' device (keeps its autograd link)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(f"{name} must be a float or a 0-d floating-point tensor, got {scale.dtype} of shape "
                             f"{tuple(scale.shape)}")
        if scale.device != like.device:
            raise ValueError(f"{name} must be on the inputs' device {like.device}, got {scale.device}")
        return scale.to(dtype)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite, got {scale}")
    return torch.tensor(float(scale), dtype=dtype, device=like.device)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_backend(backend) -> None:
    if backend != "auto" and backend not in backends.names():
        raise ValueError(f"backend must be 'auto' or one of {backends.names()}, got {backend!r}")


def _as_groups(x: torch.Tensor, y: torch.Tensor):
    """(B, D) → (1, B, D) views; a 2-D operand stays a single group that the kernels broadcast (never copied)."""
    return (x if x.dim() == 3 else x.unsqueeze(0)), (y if y.dim() == 3 else y.unsqueeze(0))


def _reduce(terms: torch.Tensor, reduction: str, squeeze: bool) -> torch.Tensor:
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    return terms.squeeze(0) if squeeze else terms


def _paired_scores(x3: torch.Tensor, y3: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """S_ii = scale·<x_i, y_i> in the statistics' dtype → (G, B)."""
    dt = scale.dtype
    return scale * (x3.to(dt) * y3.to(dt)).sum(-1)


# ----------------------------------------------------------------------------------------------------- MI bounds

def mi_bound(x: torch.Tensor, y: torch.Tensor, bound: str = "infonce", *, scale=1.0, reduction: str = "mean",
             backend: str = "auto", clip: float = 5.0, diagonal: str = "exclude", mine_ema=None,
             deterministic: bool = False) -> torch.Tensor:
    """A lower bound (or proxy) on I(X; Y) from the critic S[g, i, j] = scale·<x[g, i], y[g, j]>.

    Args:
        x, y: (B, D) or (G, B, D); a 2-D operand is broadcast over the other's G groups. fp32/bf16/fp16 give fp32,
            fp64 gives fp64. Positive pairs are (x_i, y_i).
        bound: "infonce" | "nwj" | "dv" | "smile" | "jsd" | "mine" (design §1).
        scale: float or 0-d tensor (gets a gradient when it requires one: a learnable temperature).
        reduction: "mean" → 0-d; "sum" → 0-d; "none" → the per-anchor terms t of shape (B,) or (G, B).
        backend: "auto" or one of :func:`rmi_fast.available_backends`.
        clip: the clamp of ``smile``'s log term.
        diagonal: how the negatives of nwj/dv/smile/jsd/mine treat S_ii: "exclude" (default) or "zero" (the
            released code of Zhu et al.: S_ii replaced by 0 and counted, normaliser unchanged).
        mine_ema: for "mine": the moving average of mean_{k≠l} exp S_kl the log term's gradient is taken against
            (float or 0-d tensor; None uses the batch's own mean, which makes mine equal to dv). See :class:`MINE`.
        deterministic: bitwise-repeatable results (backends that use atomics switch to fixed-order reductions).
    """
    _check_embeddings("x", x)
    _check_embeddings("y", y)
    _check_pair("x", x, "y", y)
    _check_choice("bound", bound, BOUNDS)
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("diagonal", diagonal, ("exclude", "zero"))
    _check_backend(backend)
    clip = _check_positive("clip", clip)
    B = x.shape[-2]
    if bound != "infonce" and B < 2:
        raise ValueError(f"bound={bound!r} needs negatives: x and y must hold at least 2 rows, got B={B}")
    s = _scale_tensor("scale", scale, x)
    x3, y3 = _as_groups(x, y)
    family, transform = _BOUND_FAMILY[bound]
    spec = PairSpec(family, transform, clip=clip, diagonal="include" if bound == "infonce" else diagonal,
                    deterministic=deterministic)
    fused = reduction != "none" and bound != "mine"
    stat = pair_reduce(x3, y3, s, spec, backend, fused=fused)[0]
    pos = _paired_scores(x3, y3, s)
    if bound == "infonce":
        terms = pos - stat + math.log(B)
    elif bound == "nwj":
        terms = pos - stat / (B - 1)
    elif bound == "jsd":
        terms = 2 * math.log(2.0) - F.softplus(-pos) - stat / (B - 1)
    else:  # dv, smile, mine: one log term per group
        log_n = math.log(B * (B - 1))
        if bound == "mine":
            stat = _mine_log_term(stat, log_n, mine_ema)
        terms = pos - (stat - log_n).unsqueeze(-1)
    return _reduce(terms, reduction, squeeze=(x.dim() == 2 and y.dim() == 2))


def _mine_log_term(L: torch.Tensor, log_n: float, ema) -> torch.Tensor:
    """Value L; gradient ∇L·m/ema with m = exp(L − log n) the batch's mean of exp S over negatives.

    ∇ log m = ∇m / m, and MINE's bias-corrected gradient is ∇m / ema = ∇L · (m / ema).
    """
    if ema is None:
        return L
    ema = torch.as_tensor(ema, dtype=L.dtype, device=L.device).detach()
    factor = torch.exp(L.detach() - log_n) / ema
    return L.detach() + (L - L.detach()) * factor


class MINE:
    """MINE's moving average: ``value = mine(x, y)`` returns dv's value with the bias-corrected gradient.

    momentum: weight of the old average (Belghazi et al. use 0.99). The average starts at the first batch's mean.
    """

    def __init__(self, momentum: float = 0.99, **bound_kwargs):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.ema: torch.Tensor | None = None
        self.bound_kwargs = bound_kwargs

    def __call__(self, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        opts = {**self.bound_kwargs, **kwargs}
        with torch.no_grad():  # this batch's mean of exp S over the negatives, exp(L − log n), averaged over groups
            x3, y3 = _as_groups(x.detach(), y.detach())
            s = _scale_tensor("scale", opts.get("scale", 1.0), x)
            spec = PairSpec("global_lse", diagonal=opts.get("diagonal", "exclude"))
            L = pair_reduce(x3, y3, s, spec, opts.get("backend", "auto"))[0]
            B = x.shape[-2]
            mean_exp = torch.exp(L - math.log(B * (B - 1))).mean()
            self.ema = mean_exp if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * mean_exp
        return mi_bound(x, y, "mine", mine_ema=self.ema, **opts)


# ----------------------------------------------------------------------------------------------- contrastive losses

def infonce_loss(za: torch.Tensor, zb: torch.Tensor, *, temperature: float = 0.1, symmetric: bool = False,
                 reduction: str = "mean", backend: str = "auto", deterministic: bool = False) -> torch.Tensor:
    """Cross-entropy of S = za·zbᵀ/τ against the diagonal: mean_i CE(S_i·, i) = log B − InfoNCE.

    za, zb: (B, D). symmetric=True averages the row and the column cross-entropies (the CLIP loss).
    reduction "none" → (B,): per anchor, (row_i + column_i)/2 when symmetric.
    """
    _check_embeddings("za", za, ndims=(2,))
    _check_embeddings("zb", zb, ndims=(2,))
    _check_pair("za", za, "zb", zb)
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_backend(backend)
    tau = _check_positive("temperature", temperature)
    s = _scale_tensor("temperature", 1.0 / tau, za)
    xa, xb = _as_groups(za, zb)
    spec = PairSpec("row_lse", columns=bool(symmetric), deterministic=deterministic)
    stats = pair_reduce(xa, xb, s, spec, backend, fused=reduction != "none")
    pos = _paired_scores(xa, xb, s)
    loss = stats[0] - pos
    if symmetric:
        loss = 0.5 * (loss + stats[1] - pos)
    return _reduce(loss, reduction, squeeze=True)


def nt_xent_loss(z: torch.Tensor, *, n_views: int = 2, temperature: float = 0.5, normalize: bool = True,
                 layout: str = "blocked", reduction: str = "mean", backend: str = "auto",
                 deterministic: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR) over V views of N samples.

    z: (V·N, D) in the "blocked" layout [all view-1 rows; all view-2 rows; …] or the "interleaved" one
    [s1v1, s1v2, …, s2v1, …]. Each anchor's positives are the other views of its sample; its denominator runs over
    every other row. loss_a = logsumexp_{k≠a} S_ak − mean_p S_ap with S = ẑ·ẑᵀ/τ (ẑ = z/‖z‖ when ``normalize``).
    reduction "none" → (V·N,) in the input's row order.
    """
    _check_embeddings("z", z, ndims=(2,))
    _check_choice("layout", layout, _LAYOUTS)
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_backend(backend)
    if isinstance(n_views, bool) or not isinstance(n_views, numbers.Integral) or n_views < 2:
        raise ValueError(f"n_views must be an integer ≥ 2, got {n_views!r}")
    if z.shape[0] % n_views:
        raise ValueError(f"z has {z.shape[0]} rows, which is not divisible by n_views={n_views}")
    tau = _check_positive("temperature", temperature)
    n = z.shape[0] // n_views
    if normalize:
        z = F.normalize(z, dim=-1)
    s = _scale_tensor("temperature", 1.0 / tau, z)
    z3 = z.unsqueeze(0)
    spec = PairSpec("row_lse", diagonal="exclude", deterministic=deterministic)
    lse = pair_reduce(z3, z3, s, spec, backend, fused=reduction != "none")[0][0]
    # Σ_{p ∈ views of a's sample} <z_a, z_p> = <z_a, Σ_views z> − <z_a, z_a>: O(V·N·D), no V×V block needed.
    zc = z.to(s.dtype)
    per_sample = zc.view(n_views, n, -1) if layout == "blocked" else zc.view(n, n_views, -1).transpose(0, 1)
    view_sum = per_sample.sum(0)  # (N, D)
    owner = view_sum.repeat(n_views, 1) if layout == "blocked" else view_sum.repeat_interleave(n_views, 0)
    positives = s * ((zc * owner).sum(-1) - (zc * zc).sum(-1)) / (n_views - 1)
    return _reduce(lse - positives, reduction, squeeze=False)


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ["cpp", "torch"] on a CPU box (+ "triton", "cuda" with a GPU)."""
    return backends.available_backends()
