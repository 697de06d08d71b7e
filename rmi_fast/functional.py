"""The public functions: validate, normalise shapes, split each bound into its positive and negative parts, dispatch.

Every bound is  t[g, i] = positive(S_ii) − negative(statistic of S)  (design §1). The positive part needs only the
paired scores S_ii = scale·<x_i, y_i> (O(B·D)); the negative part is the fused reduction of
:mod:`rmi_fast.ops.pairwise`, which never stores a B×B matrix and, for the MI bounds, returns the paired dots too.
The contrastive losses' extra terms (a class target, label smoothing's mean score, SupCon's same-class positives)
are O(B·D) too. With ``gather`` the negative part runs
against the rows of every data-parallel rank (:mod:`rmi_fast.distributed`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import backends, distributed
from .checks import check_values
from .ops.pairwise import pair_reduce, row_dots, stat_dtype
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


def _check_untransformed(name: str, t: torch.Tensor) -> None:
    """The kernels' autograd is first-order reverse mode with no batching rule, so neither torch.func's transforms
    nor forward-mode dual tensors can pass it: say so by name, where torch would ask for an autograd.Function
    rewritten for them."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        raise TypeError(f"{name} is a tensor inside a torch.func transform (vmap, grad, jacrev, ...), which rmi_fast's "
                        "kernels do not support: take gradients with torch.autograd.grad or .backward(), and batch "
                        "independent problems as (G, B, D) groups instead of vmap")
    if forward_ad.unpack_dual(t).tangent is not None:
        raise TypeError(f"{name} carries a forward-mode tangent (torch.autograd.forward_ad), which rmi_fast's kernels "
                        "do not support: their gradients are reverse mode, taken with torch.autograd.grad or "
                        ".backward()")


def _check_embeddings(name: str, t, ndims=(2, 3)) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_untransformed(name, t)
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}"
                        f"{' (nested)' if t.is_nested else ''}")
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
    dtype = stat_dtype(like)
    if isinstance(scale, torch.Tensor):
        scale = _scalar_tensor(name, scale, like)
        _check_finite_scale(name, scale)
        return scale
    _check_float_scale(name, scale)
    if not -torch.finfo(dtype).max <= scale <= torch.finfo(dtype).max:
        raise ValueError(f"{name} overflows the scores' {dtype}: |{name}| > {torch.finfo(dtype).max:.4g}")
    return torch.full((), float(scale), dtype=dtype, device=like.device)  # a fill, not a host-to-device copy


def _check_float_scale(name: str, scale) -> None:
    """A scale given as a number: real and finite."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(scale).__name__}")
    if not -math.inf < scale < math.inf:  # comparisons, not math.isfinite: they trace under torch.compile(dynamic=True)
        raise ValueError(f"{name} must be finite, got {_shown(scale)}")


def _scalar_tensor(name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d floating-point tensor on the inputs' device, in the statistics' dtype (autograd link kept)."""
    _check_untransformed(name, t)
    if t.dim() != 0 or not t.is_floating_point():
        raise ValueError(f"{name} must be a float or a 0-d floating-point tensor, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on the inputs' device {like.device}, got {t.device}")
    return t.to(stat_dtype(like))


def _check_finite_scale(name: str, scale: torch.Tensor) -> None:
    """A tensor scale's value (NaN, ±inf or, after exp, an overflow) would turn every score into NaN or inf."""
    check_values(torch.isfinite(scale), f"{name} must be finite", lambda: f", got {scale.item()}")


def _temperature_scale(temperature, like: torch.Tensor) -> torch.Tensor:
    """scale = 1/temperature as a 0-d tensor, for a positive finite temperature whose inverse fits the scores."""
    tau = _check_positive("temperature", temperature)
    if not 1.0 / tau <= torch.finfo(stat_dtype(like)).max:
        raise ValueError(f"temperature={_shown(tau)} is too small: the scale 1/temperature overflows the scores' "
                         f"{stat_dtype(like)}")
    return _scale_tensor("temperature", 1.0 / tau, like)


def _shown(value) -> str:
    """A bad argument as its message shows it. While torch.compile traces, a number is not shown: it may be a symbol
    (dynamic=True, or once it has changed between calls), whose formatting would break the trace and replace this
    message with the compiler's."""
    if torch.compiler.is_compiling() and isinstance(value, numbers.Real):
        return "a value outside that range (traced by torch.compile)"
    return repr(value)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {_shown(value)}")
    return float(value)


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


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
    return scale * row_dots(x3, y3, scale.dtype)


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {_shown(value)}")
    return float(value)


def _check_gather(gather) -> None:
    group_type = getattr(torch.distributed, "ProcessGroup", ())
    if not isinstance(gather, bool) and not (group_type and isinstance(gather, group_type)):
        raise TypeError(f"gather must be a bool or a torch.distributed ProcessGroup, got {type(gather).__name__}")


def _check_index_tensor(name: str, t, rows: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """An integer (rows,) tensor on ``like``'s device → int64."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {what}, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of {what}, got {t.dtype}")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on the embeddings' device {like.device}, got {t.device}")
    return t.long()


def _check_targets(targets, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    targets = _check_index_tensor("targets", targets, za.shape[0], za, "class indices into the rows of zb")
    C = zb.shape[0]
    check_values(((targets >= 0) & (targets < C)).all(), f"targets must lie in [0, C) = [0, {C}) (C = rows of zb)",
                 lambda: f", got values in [{int(targets.min())}, {int(targets.max())}]")
    return targets


def _resolve_scale(temperature, logit_scale, like: torch.Tensor, default_temperature: float) -> torch.Tensor:
    """scale = 1/temperature, or exp(logit_scale) (CLIP's learnable log-scale; its gradient flows). Not both."""
    if temperature is not None and logit_scale is not None:
        raise ValueError("give either temperature (scale = 1/temperature) or logit_scale (scale = exp(logit_scale)), "
                         "not both")
    if logit_scale is not None:
        scale = _scale_tensor("logit_scale", logit_scale, like).exp()
        _check_finite_scale("exp(logit_scale)", scale)
        return scale
    return _temperature_scale(default_temperature if temperature is None else temperature, like)


def _negative_stats(x3: torch.Tensor, y3: torch.Tensor, s: torch.Tensor, spec: PairSpec, backend: str, fused: bool,
                    gather):
    """Statistics of the negative part of x3's anchors against y3's rows, or, with ``gather``, against the rows of
    every rank (see :mod:`rmi_fast.distributed`).

    x3: (Gx, B, D), y3: (Gy, B, D). Returns (stats, keys, rank): ``keys`` is the candidate set the statistics ran
    over, y3 itself or (Gy, W·B, D) gathered in rank order, where this rank's anchor i pairs with column rank·B + i.
    """
    if not gather:
        return pair_reduce(x3, y3, s, spec, backend, fused=fused), y3, 0
    _, rank, _ = distributed.process_group(gather)
    keys = distributed.all_gather_rows(y3, gather)
    spec = dataclasses.replace(spec, diag_offset=rank * x3.shape[-2])
    if spec.family != "global_lse":
        return pair_reduce(x3, keys, s, spec, backend, fused=fused), keys, rank
    # One log-sum-exp per group over the pairs of every rank: combine the per-rank ones. Its upstream weights
    # exp(L_r − L) differ between groups, so the unit-weight (fused) gradients do not apply.
    L = pair_reduce(x3, keys, s, spec, backend, fused=False)[0]
    return [distributed.all_reduce_logsumexp(L, gather)], keys, rank


def _world_size(gather) -> int:
    return distributed.process_group(gather)[2] if gather else 1


# ------------------------------------------------------------------------------------------------------- autocast

#: Device types whose torch.autocast the public functions follow.
_AUTOCAST_DEVICES = ("cuda", "cpu")
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _follows_autocast(*names: str):
    """A public function under torch.autocast behaves as its eager formula, whose scores are a matmul, would there:
    the embeddings named ``names`` (fp32/fp16/bf16; fp64 stays, as autocast leaves it) are cast to the autocast dtype
    of their device type, so mixed inputs (bf16 features against fp32 class embeddings) run in it. The function itself
    then runs with autocast off, so that its statistics stay fp32 on every backend: autocast would otherwise round
    the ``torch`` backend's score matrix, and the eager parts' products, to its dtype."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            active = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
            if not active:
                return fn(*args, **kwargs)
            call = signature.bind(*args, **kwargs)
            for name in names:
                t = call.arguments.get(name)
                if isinstance(t, torch.Tensor) and t.device.type in active and t.dtype in _AUTOCAST_CASTS:
                    call.arguments[name] = t.to(torch.get_autocast_dtype(t.device.type))
            return _without_autocast(active, fn, *call.args, **call.kwargs)

        return run

    return wrap


def _without_autocast(device_types: list[str], fn, *args, **kwargs):
    """fn(*args, **kwargs) with autocast off for each of ``device_types`` (nested contexts, which torch.compile
    traces, where an ExitStack of them it does not)."""
    if not device_types:
        return fn(*args, **kwargs)
    with torch.autocast(device_types[0], enabled=False):
        return _without_autocast(device_types[1:], fn, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------- MI bounds

@_follows_autocast("x", "y")
def mi_bound(x: torch.Tensor, y: torch.Tensor, bound: str = "infonce", *, scale=1.0, reduction: str = "mean",
             backend: str = "auto", clip: float = 5.0, diagonal: str = "exclude", mine_ema=None,
             deterministic: bool = False, gather=False) -> torch.Tensor:
    """A lower bound (or proxy) on I(X; Y) from the critic S[g, i, j] = scale·<x[g, i], y[g, j]>.

    Args:
        x, y: (B, D) or (G, B, D); a 2-D operand is broadcast over the other's G groups. fp32/bf16/fp16 give fp32,
            fp64 gives fp64; under torch.autocast, fp32/bf16/fp16 run in its dtype, as torch.matmul would. Positive
            pairs are (x_i, y_i).
        bound: "infonce" | "nwj" | "dv" | "smile" | "jsd" | "mine" (design §1).
        scale: float or 0-d tensor (gets a gradient when it requires one: a learnable temperature).
        reduction: "mean" → 0-d; "sum" → 0-d; "none" → the per-anchor terms t of shape (B,) or (G, B).
        backend: "auto" or one of :func:`rmi_fast.available_backends`.
        clip: the clamp of ``smile``'s log term. Its derivative is taken as 0 where |S| equals clip exactly (where
            torch.clamp's autograd takes 1), on every backend.
        diagonal: how the negatives of nwj/dv/smile/jsd/mine treat S_ii: "exclude" (default) or "zero" (the
            released code of Zhu et al.: S_ii replaced by 0 and counted, normaliser unchanged).
        mine_ema: for "mine": the moving average of mean_{k≠l} exp S_kl the log term's gradient is taken against
            (float or 0-d tensor; None uses the batch's own mean, which makes mine equal to dv). See :class:`MINE`.
        deterministic: bitwise-repeatable results (backends that use atomics switch to fixed-order reductions).
        gather: True (default process group) or a ProcessGroup: negatives from every rank of an initialised
            torch.distributed group. Each rank gets its own anchors' terms against the W·B rows of all ranks (the
            mean over ranks is the bound of the whole batch; B is then W·B in the formulas), and its inputs get
            W × the whole-batch gradient, which DDP's averaging makes exact. See :mod:`rmi_fast.distributed`.
    """
    clip = _check_bound_args(x, y, bound, reduction, backend, clip, diagonal, deterministic, gather)
    if mine_ema is not None and bound != "mine":
        raise ValueError(f"mine_ema is the moving average of bound='mine' only, got bound={bound!r}")
    log_ema = None if mine_ema is None else _log_moving_average(mine_ema, x)
    return _bound(x, y, bound, scale, reduction, backend, clip, diagonal, log_ema, deterministic, gather)


def _check_bound_args(x, y, bound, reduction, backend, clip, diagonal, deterministic, gather) -> float:
    """mi_bound's checks of everything but scale and mine_ema; → clip as a float."""
    _check_embeddings("x", x)
    _check_embeddings("y", y)
    _check_pair("x", x, "y", y)
    clip = _check_bound_options(bound, reduction, backend, clip, diagonal, deterministic, gather)
    B = x.shape[-2] * _world_size(gather)
    if bound != "infonce" and B < 2:
        raise ValueError(f"bound={bound!r} needs negatives: x and y must hold at least 2 rows, got B={B}")
    return clip


def _check_bound_options(bound, reduction, backend, clip, diagonal, deterministic, gather) -> float:
    """The checks of mi_bound's options that need no inputs; → clip as a float."""
    _check_choice("bound", bound, BOUNDS)
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_choice("diagonal", diagonal, ("exclude", "zero"))
    if bound == "infonce" and diagonal == "zero":
        raise ValueError("diagonal='zero' applies to the negatives of nwj, dv, smile, jsd and mine: infonce's "
                         "positive is one of its B classes")
    _check_backend(backend)
    _check_flags(deterministic=deterministic)
    _check_gather(gather)
    return _check_positive("clip", clip)


def _log_moving_average(ema, like: torch.Tensor):
    """log of MINE's moving average (a positive finite float or 0-d tensor): a float, or a 0-d tensor without
    gradient in the statistics' dtype."""
    if not isinstance(ema, torch.Tensor):
        return math.log(_check_positive("mine_ema", ema))
    ema = _scalar_tensor("mine_ema", ema, like).detach()
    check_values(torch.isfinite(ema) & (ema > 0), "mine_ema must be a positive finite number",
                 lambda: f", got {ema.item()}")
    return ema.log()


def _bound(x, y, bound, scale, reduction, backend, clip, diagonal, log_ema, deterministic, gather) -> torch.Tensor:
    """mi_bound on checked arguments (log_ema: the log of mine's moving average, or None)."""
    B = x.shape[-2] * _world_size(gather)
    s = _scale_tensor("scale", scale, x)
    x3, y3 = _as_groups(x, y)
    family, transform = _BOUND_FAMILY[bound]
    spec = PairSpec(family, transform, clip=clip, diagonal="include" if bound == "infonce" else diagonal,
                    deterministic=deterministic)
    fused = reduction != "none" and bound != "mine"
    if gather:
        stat = _negative_stats(x3, y3, s, spec, backend, fused, gather)[0][0]
        pos = _paired_scores(x3, y3, s)
    else:  # the positives from the same op: their gradients join the negatives' in place
        stats, dots = pair_reduce(x3, y3, s, spec, backend, fused=fused, positives=True)
        stat, pos = stats[0], s * dots
    if bound == "infonce":
        terms = pos - stat + math.log(B)
    elif bound == "nwj":
        terms = pos - stat / (B - 1)
    elif bound == "jsd":
        terms = 2 * math.log(2.0) - F.softplus(-pos) - stat / (B - 1)
    else:  # dv, smile, mine: one log term per group
        log_n = math.log(B * (B - 1))
        if bound == "mine":
            stat = _mine_log_term(stat, log_n, log_ema, 1 if reduction == "mean" else x.shape[-2])
        terms = pos - (stat - log_n).unsqueeze(-1)
    return _reduce(terms, reduction, squeeze=(x.dim() == 2 and y.dim() == 2))


def _mine_log_term(L: torch.Tensor, log_n: float, log_ema, upstream: int) -> torch.Tensor:
    """Value L; gradient ∇L·m/ema with m = exp(L − log n) the batch's mean of exp S over negatives.

    ∇ log m = ∇m / m, and MINE's bias-corrected gradient is ∇m / ema = ∇L · (m / ema). The ratio is taken in log
    space, so neither m nor the average under- or overflows on its own, and the value stays exactly L. A ratio is
    capped where its product with L's largest upstream gradient would leave the dtype's range: ``upstream`` is 1 for
    a mean, and for a sum (or per-anchor terms weighted by at most 1 each) the number of anchors, whose terms all
    hold L. Past the cap the gradient is that of the cap; below it, exact.
    """
    if log_ema is None:
        return L
    ratio = torch.exp(L.detach() - log_n - log_ema).clamp(max=torch.finfo(L.dtype).max / upstream)
    return L.detach() + (L - L.detach()) * ratio


class MINE:
    """MINE's moving average: ``value = mine(x, y)`` returns dv's value with the bias-corrected gradient.

    momentum: weight of the old average (Belghazi et al. use 0.99). The average starts at the first batch's mean and
    is kept as its log (``log_ema``), so batches whose scores are far from 0 neither under- nor overflow it. A batch
    whose mean is NaN or infinite gets its NaN value but is left out of the average, and the average follows the
    inputs' device.
    ``bound_kwargs`` and the call's keyword arguments are :func:`mi_bound`'s options (scale, reduction, backend,
    clip, diagonal, deterministic, gather); with ``gather`` the average is over the pairs of every rank.
    """

    def __init__(self, momentum: float = 0.99, **bound_kwargs):
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {_shown(momentum)}")
        _check_mine_options(bound_kwargs)
        # the options that need no inputs are checked now, not at the first call
        o = {**_MINE_OPTIONS, **bound_kwargs}
        _check_bound_options("mine", o["reduction"], o["backend"], o["clip"], o["diagonal"], o["deterministic"],
                             o["gather"])
        if not isinstance(o["scale"], torch.Tensor):
            _check_float_scale("scale", o["scale"])
        self.momentum = float(momentum)
        self.log_ema: torch.Tensor | None = None
        self.bound_kwargs = bound_kwargs

    @property
    def ema(self) -> torch.Tensor | None:
        """The moving average of mean_{k≠l} exp S_kl (None before the first batch)."""
        return None if self.log_ema is None else self.log_ema.exp()

    @_follows_autocast("x", "y")
    def __call__(self, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        _check_mine_options(kwargs)
        o = {**_MINE_OPTIONS, **self.bound_kwargs, **kwargs}
        clip = _check_bound_args(x, y, "mine", o["reduction"], o["backend"], o["clip"], o["diagonal"],
                                 o["deterministic"], o["gather"])
        with torch.no_grad():  # log of this batch's mean of exp S over the negatives, exp(L − log n), over groups
            x3, y3 = _as_groups(x.detach(), y.detach())
            s = _scale_tensor("scale", o["scale"], x)
            spec = PairSpec("global_lse", diagonal=o["diagonal"], deterministic=o["deterministic"])
            L = _negative_stats(x3, y3, s, spec, o["backend"], False, o["gather"])[0][0]
            B = x.shape[-2] * _world_size(o["gather"])
            log_mean = torch.logsumexp(L, 0) - math.log(L.numel() * B * (B - 1))
            if self.log_ema is None:
                self.log_ema = log_mean
            else:  # log(momentum·ema + (1 − momentum)·mean)
                old = self.log_ema.to(log_mean.device)
                keep = math.log(self.momentum) if self.momentum > 0 else -math.inf
                blended = torch.logaddexp(old + keep, log_mean + math.log1p(-self.momentum))
                # A batch whose mean is not finite (NaN or inf inputs) returns its NaN below but stays out of the
                # average, where it would poison every later batch; an average not yet finite restarts from this one.
                self.log_ema = torch.where(log_mean.isfinite(), torch.where(old.isfinite(), blended, log_mean), old)
        return _bound(x, y, "mine", o["scale"], o["reduction"], o["backend"], clip, o["diagonal"], self.log_ema,
                      o["deterministic"], o["gather"])


#: MINE's options: mi_bound's keyword arguments and their defaults, but for its own moving average.
_MINE_OPTIONS = {name: p.default for name, p in inspect.signature(mi_bound).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "mine_ema"}


def _check_mine_options(options: dict) -> None:
    unknown = sorted(set(options) - set(_MINE_OPTIONS))
    if unknown:
        raise TypeError(f"MINE takes mi_bound's options {sorted(_MINE_OPTIONS)}, got {unknown}")


# ----------------------------------------------------------------------------------------------- contrastive losses

def _smoothed_cross_entropy(lse: torch.Tensor, pos: torch.Tensor, anchors: torch.Tensor, candidates: torch.Tensor,
                            s: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-anchor cross-entropy from its row log-sum-exp, with label smoothing ε, in O(B·D):

    (1−ε)·CE_i + ε·mean_j(−log p_ij) = lse_i − (1−ε)·S_i,target − ε·mean_j S_ij,  mean_j S_ij = s·<a_i, mean_j c_j>.
    lse, pos: (B,); anchors: (B, D); candidates: (C, D).
    """
    if smoothing == 0.0:
        return lse - pos
    dt = s.dtype
    mean_scores = s * (anchors.to(dt) @ candidates.to(dt).mean(0))
    return lse - (1.0 - smoothing) * pos - smoothing * mean_scores


@_follows_autocast("za", "zb")
def infonce_loss(za: torch.Tensor, zb: torch.Tensor, *, temperature: float | None = None, logit_scale=None,
                 targets: torch.Tensor | None = None, normalize: bool = False, detach_keys: bool = False,
                 label_smoothing: float = 0.0, symmetric: bool = False, reduction: str = "mean",
                 backend: str = "auto", deterministic: bool = False, gather=False) -> torch.Tensor:
    """Cross-entropy of the scores S = scale·za·zbᵀ: mean_i CE(S_i·, i) = log B − InfoNCE.

    Args:
        za: (B, D) anchors. zb: (B, D) keys, the positive of anchor i being row i; or, with ``targets``, (C, D)
            candidates (e.g. one text embedding per class) with the positive of anchor i at row targets[i].
        temperature: τ, scale = 1/τ; default 0.1. logit_scale: instead of temperature (giving both is an error):
            scale = exp(logit_scale), a float or 0-d tensor that gets its gradient (CLIP's learnable log-scale).
        targets: (B,) integer class indices into the rows of zb (TeCoA-style classification against class
            embeddings); the log-sum-exp runs over the C candidates. Not with symmetric or gather.
        normalize: cosine similarity (za, zb L2-normalised first).
        detach_keys: no gradient to zb (a stop-gradient on the key side, as in RoCL).
        label_smoothing: ε ∈ [0, 1): (1−ε)·CE + ε·mean over candidates of −log p (as torch's cross_entropy).
        symmetric: average the row and the column cross-entropies (the CLIP loss).
        reduction: "mean" | "sum" → 0-d; "none" → (B,), per anchor ((row_i + column_i)/2 when symmetric).
        gather: True or a ProcessGroup: keys (and, when symmetric, anchors) of every rank are the negatives (see
            :func:`mi_bound` and :mod:`rmi_fast.distributed`); each rank gets its own anchors' losses.
    """
    _check_embeddings("za", za, ndims=(2,))
    _check_embeddings("zb", zb, ndims=(2,))
    _check_pair("za", za, "zb", zb, same_rows=targets is None)
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_backend(backend)
    _check_flags(normalize=normalize, detach_keys=detach_keys, symmetric=symmetric, deterministic=deterministic)
    _check_gather(gather)
    smoothing = _check_fraction("label_smoothing", label_smoothing)
    if targets is not None:
        if symmetric:
            raise ValueError("symmetric=True is not defined with targets: the columns of S are classes, not anchors")
        if gather:
            raise ValueError("gather=True does not apply with targets: the candidates zb are the same on every rank, "
                             "so each rank's loss is already exact")
        targets = _check_targets(targets, za, zb)
    s = _resolve_scale(temperature, logit_scale, za, default_temperature=0.1)
    if normalize:
        za, zb = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    if detach_keys:
        zb = zb.detach()
    fused = reduction != "none"
    spec = PairSpec("row_lse", columns=symmetric and not gather, deterministic=deterministic)
    stats, keys, _ = _negative_stats(za.unsqueeze(0), zb.unsqueeze(0), s, spec, backend, fused, gather)
    pos = _paired_scores(za, zb if targets is None else zb.index_select(0, targets), s)
    loss = _smoothed_cross_entropy(stats[0][0], pos, za, keys[0], s, smoothing)
    if symmetric:  # column j: the keys as anchors against every anchor
        if gather:
            col_stats, anchors, _ = _negative_stats(zb.unsqueeze(0), za.unsqueeze(0), s, spec, backend, fused, gather)
            col_lse, anchors = col_stats[0][0], anchors[0]
        else:
            col_lse, anchors = stats[1][0], za
        loss = 0.5 * (loss + _smoothed_cross_entropy(col_lse, pos, zb, anchors, s, smoothing))
    return _reduce(loss, reduction, squeeze=False)


def _view_sums(keys: torch.Tensor, n_views: int, layout: str) -> torch.Tensor:
    """Row a → Σ over the views v of a's sample of keys[v] (a's own row included): (V·N, D) → (V·N, D), O(V·N·D)."""
    n = keys.shape[0] // n_views
    per_sample = keys.view(n_views, n, -1) if layout == "blocked" else keys.view(n, n_views, -1).transpose(0, 1)
    total = per_sample.sum(0)  # (N, D)
    return total.repeat(n_views, 1) if layout == "blocked" else total.repeat_interleave(n_views, 0)


def _class_sums(keys: torch.Tensor, labels: torch.Tensor, deterministic: bool = False):
    """Row a → (Σ_{b: labels_b = labels_a} keys_b, #{b: labels_b = labels_a}), without a label-by-label matrix.

    keys: (R, D), labels: (R,) int64 → (R, D), (R,). Sorting the labels makes each class a run of consecutive rows
    (static shapes, no host sync). The rows are scatter-added into their run's slot, or, when ``deterministic``
    (no atomics on any device), each run's sum is a difference of fp64 prefix sums over the sorted rows.
    """
    R = labels.shape[0]
    order = torch.argsort(labels)
    ordered = labels.index_select(0, order)
    starts = torch.cat([torch.ones_like(ordered[:1], dtype=torch.bool), ordered[1:] != ordered[:-1]])
    if not deterministic:
        slot_of_sorted = torch.cumsum(starts, 0) - 1
        slot = torch.empty_like(slot_of_sorted).scatter_(0, order, slot_of_sorted)
        sums = torch.zeros_like(keys).index_add(0, slot, keys)
        counts = keys.new_zeros(R).index_add(0, slot, torch.ones_like(keys[:, 0]))
        return sums.index_select(0, slot), counts.index_select(0, slot)
    pos = torch.arange(R, device=labels.device)
    ends = torch.cat([starts[1:], torch.ones_like(starts[:1])])
    first = torch.cummax(torch.where(starts, pos, 0), 0).values  # run start of each sorted row
    last = (R - 1) - torch.cummax(torch.where(ends.flip(0), pos, 0), 0).values.flip(0)  # run end
    prefix = torch.cat([keys.new_zeros(1, keys.shape[1], dtype=torch.float64),
                        keys.index_select(0, order).double().cumsum(0)])
    sorted_sums = (prefix.index_select(0, last + 1) - prefix.index_select(0, first)).to(keys.dtype)
    sorted_counts = (last - first + 1).to(keys.dtype)
    return (torch.empty_like(keys).index_copy(0, order, sorted_sums),
            keys.new_empty(R).index_copy(0, order, sorted_counts))


@_follows_autocast("z")
def nt_xent_loss(z: torch.Tensor, *, n_views: int | None = None, temperature: float = 0.5, normalize: bool = True,
                 layout: str | None = None, labels: torch.Tensor | None = None, detach_keys: bool = False,
                 reduction: str = "mean", backend: str = "auto", deterministic: bool = False,
                 gather=False) -> torch.Tensor:
    """NT-Xent (SimCLR) over V views of N samples, or, with ``labels``, the supervised contrastive loss (SupCon).

    Args:
        z: (V·N, D) in the "blocked" layout [all view-1 rows; all view-2 rows; …] (default) or the "interleaved" one
            [s1v1, s1v2, …, s2v1, …]; or (N, V, D), the views of each sample side by side (layout implied).
        n_views: V for a 2-D z (default 2); for a 3-D z it is z.shape[1] (a different value is an error).
        labels: (N,) integer class per sample: every other row of the same class is a positive (SupCon, Khosla et
            al. 2020); V = 1 is then allowed, and an anchor without any positive gets loss 0.
        detach_keys: the key side of S (and of the positives) carries no gradient: S = ẑ·stop_grad(ẑ)ᵀ (RoCL).

    loss_a = logsumexp_{k≠a} S_ak − mean_{p ∈ P(a)} S_ap with S = ẑ·ẑᵀ/τ (ẑ = z/‖z‖ when ``normalize``) and P(a)
    the other views of a's sample (or the other rows of a's class). Σ_p S_ap comes from per-sample (per-class) sums
    of the rows in O(V·N·D): no matrix beyond the fused negative part's. reduction "none" → (V·N,) in the input's row
    order, or (N, V) for a 3-D z. gather: negatives (and, with labels, positives) from every rank, see
    :func:`mi_bound`; the views of one sample must sit on one rank.
    """
    _check_embeddings("z", z, ndims=(2, 3))
    _check_choice("reduction", reduction, _REDUCTIONS)
    _check_backend(backend)
    _check_flags(normalize=normalize, detach_keys=detach_keys, deterministic=deterministic)
    _check_gather(gather)
    min_views = 1 if labels is not None else 2
    out_shape = None
    if z.dim() == 3:
        if layout is not None:
            raise ValueError("layout applies to a 2-D z only: a 3-D z is (N, V, D), the views of a sample side by side")
        if n_views is not None and n_views != z.shape[1]:
            raise ValueError(f"n_views={n_views!r} contradicts z of shape (N, V, D) = {tuple(z.shape)}")
        n_views, layout, out_shape = z.shape[1], "interleaved", z.shape[:2]
        z = z.reshape(-1, z.shape[-1])
    else:
        layout = "blocked" if layout is None else layout
        _check_choice("layout", layout, _LAYOUTS)
        n_views = 2 if n_views is None else n_views
    if isinstance(n_views, bool) or not isinstance(n_views, numbers.Integral) or n_views < min_views:
        raise ValueError(f"n_views must be an integer ≥ {min_views}, got {n_views!r}")
    if z.shape[0] % n_views:
        raise ValueError(f"z has {z.shape[0]} rows, which is not divisible by n_views={n_views}")
    n = z.shape[0] // n_views
    if labels is not None:
        labels = _check_index_tensor("labels", labels, n, z, "class labels, one per sample")
    if z.shape[0] * _world_size(gather) < 2:
        raise ValueError(f"z must hold at least 2 rows (an anchor needs negatives), got {z.shape[0]}")
    s = _temperature_scale(temperature, z)
    if normalize:
        z = F.normalize(z, dim=-1)
    keys = z.detach() if detach_keys else z
    # Every anchor has a positive (fused unit weights valid) unless labels leave some without one.
    fused = reduction != "none" and (labels is None or n_views >= 2)
    spec = PairSpec("row_lse", diagonal="exclude", deterministic=deterministic)
    stats, all_keys, rank = _negative_stats(z.unsqueeze(0), keys.unsqueeze(0), s, spec, backend, fused, gather)
    lse = stats[0][0]
    dt = s.dtype
    if labels is None:  # the other views of a's sample: all on this rank
        same, count = _view_sums(keys.to(dt), n_views, layout), n_views - 1
    else:
        row_labels = labels.repeat(n_views) if layout == "blocked" else labels.repeat_interleave(n_views)
        if gather:
            row_labels = distributed.all_gather_rows(row_labels, gather)
        same, count = _class_sums(all_keys[0].to(dt), row_labels, deterministic)
        rows = z.shape[0]
        same, count = same.narrow(0, rank * rows, rows), count.narrow(0, rank * rows, rows) - 1
    # Σ_{p ∈ P(a)} <z_a, k_p> = <z_a, Σ_{same sample / class} k> − <z_a, k_a>
    zc = z.to(dt)
    positives = s * ((zc * same).sum(-1) - (zc * keys.to(dt)).sum(-1))
    if labels is None:
        loss = lse - positives / count
    else:
        loss = torch.where(count > 0, lse - positives / count.clamp(min=1), torch.zeros_like(lse))
    if out_shape is not None:
        loss = loss.view(out_shape)
    return _reduce(loss, reduction, squeeze=False)


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ["cpp", "torch"] on a CPU box (+ "triton", "cuda" with a GPU)."""
    return backends.available_backends()
