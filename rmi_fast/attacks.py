"""Adversarial attacks on any differentiable objective: PGD and APGD over per-sample ℓ∞ / ℓ2 balls.

Both attacks *maximise* ``loss_fn(x_adv)`` over the feasible set

    F(x) = { x' : ‖x'_n − x_n‖ ≤ ε for every sample n }  ∩  [lo, hi]^shape        (``clamp=(lo, hi)``)

where n indexes the leading (batch) dimension of ``x`` (shape (N, ...), e.g. images (N, C, H, W)). The objective is
either batch-level (a 0-d tensor, e.g. the batch MI bound of worst-case MI training — Algorithm 1 of Zhu, Zhang &
Evans 2020 *minimises* the MI, so the caller passes ``loss_fn = lambda x: -bound(x)``) or per-sample (an (N,) tensor,
e.g. cross-entropy with ``reduction="none"``; its gradient is that of the sum, and best iterates are kept per sample).

Gradients are taken with :func:`torch.autograd.grad` with respect to the adversarial input only, so no parameter's
``.grad`` is touched, and the modules given in ``models`` run in eval mode during the attack (dropout off, batch-norm
on running statistics) and get their previous train/eval state back afterwards, also when the attack raises.

:func:`gradient_masking_check` compares the adversarial accuracies of attacks of increasing strength and flags the
pattern of obfuscated gradients (a weaker attack that succeeds more often than a stronger one).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .checks import check_bool, check_int, check_real, check_values

__all__ = ["NORMS", "apgd", "apgd_checkpoints", "eval_mode", "gradient_masking_check", "pgd"]

NORMS = ("Linf", "L2")
#: APGD's momentum weight (Croce & Hein 2020, Eq. (2)): x(k+1) = x(k) + α(z(k+1) − x(k)) + (1 − α)(x(k) − x(k−1)).
APGD_MOMENTUM = 0.75

LossFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------- validation

def _check_clamp(clamp) -> tuple[float, float] | None:
    if clamp is None:
        return None
    pair = tuple(clamp) if isinstance(clamp, Iterable) and not isinstance(clamp, (str, bytes)) else ()
    if len(pair) != 2:
        raise TypeError(f"clamp must be a (lo, hi) pair or None, got {clamp!r}")
    lo, hi = (check_real("clamp", v, allow_negative=True) for v in pair)
    if not lo < hi:
        raise ValueError(f"clamp must be a (lo, hi) pair with lo < hi, got {clamp!r}")
    return lo, hi


def _check_models(models) -> tuple[nn.Module, ...]:
    if not isinstance(models, (nn.Module, Iterable)):
        raise TypeError(f"models must be an nn.Module or a sequence of them, got {type(models).__name__}")
    models = (models,) if isinstance(models, nn.Module) else tuple(models)
    for m in models:
        if not isinstance(m, nn.Module):
            raise TypeError(f"models must be an nn.Module or a sequence of them, got an element of type "
                            f"{type(m).__name__}")
    return models


def _check_input(x, clamp: tuple[float, float] | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have a leading batch dimension, shape (N, ...), got a 0-d tensor")
    x = x.detach()
    if clamp is not None and x.numel():
        check_values(((x >= clamp[0]) & (x <= clamp[1])).all(),
                     f"x has values outside clamp={clamp}; pass inputs in that range (e.g. unnormalised images) or "
                     "clamp=None", lambda: f"; x spans [{x.min().item():.4g}, {x.max().item():.4g}]")
    return x


def _check_common(loss_fn, x, eps, norm, restarts, clamp, models, generator):
    """Validate the arguments pgd and apgd share; returns the normalised (x, eps, clamp, models)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    eps = check_real("eps", eps)
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    check_int("restarts", restarts, 1)
    clamp = _check_clamp(clamp)
    x = _check_input(x, clamp)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator must be on x's device ({x.device}), got one on {generator.device}")
    return x, eps, clamp, _check_models(models)


def _check_loss(loss, per_sample: bool, n: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a torch.Tensor, got {type(loss).__name__}")
    expected = (n,) if per_sample else ()
    if tuple(loss.shape) != expected:
        what = f"an ({n},) tensor of per-sample losses" if per_sample else "a 0-d tensor (a batch-level objective)"
        hint = "; pass per_sample=True for per-sample losses" if not per_sample and loss.dim() == 1 else ""
        raise ValueError(f"loss_fn must return {what} with per_sample={per_sample}, got shape "
                         f"{tuple(loss.shape)}{hint}")
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn must return a floating-point tensor, got {loss.dtype}")
    return loss


# ----------------------------------------------------------------------------------------------------- building blocks

@contextlib.contextmanager
def eval_mode(models: Iterable[nn.Module] | nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block; restore every submodule's own train/eval flag afterwards."""
    models = _check_models(models)
    states = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in states:
            m.training = training


def _per_sample_norms(v: torch.Tensor) -> torch.Tensor:
    """‖v_n‖₂ over all but the leading dimension: (N, ...) → (N, 1, ..., 1), ready to broadcast against v."""
    return v.reshape(v.shape[0], -1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


class _FeasibleSet:
    """F(x): the per-sample ε-ball around x in ``norm``, intersected with the ``clamp`` box.

    For ℓ∞ clamping the ball then the box is the exact Euclidean projection onto F (both are boxes). For ℓ2 it is the
    projection onto the ball followed by the box, which stays in the ball because x lies in the box (clamping moves
    every coordinate of x + δ towards x).
    """

    def __init__(self, x: torch.Tensor, eps: float, norm: str, clamp: tuple[float, float] | None):
        self.x, self.eps, self.norm, self.clamp = x, eps, norm, clamp

    def project(self, z: torch.Tensor) -> torch.Tensor:
        delta = z - self.x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = _per_sample_norms(delta)
            delta = delta * (self.eps / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)
        z = self.x + delta
        return z if self.clamp is None else z.clamp(*self.clamp)

    def ascent(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit norm: sign(g) for ℓ∞, g/‖g_n‖₂ per sample for ℓ2 (0 where g_n = 0)."""
        if self.norm == "Linf":
            return grad.sign()
        return grad / _per_sample_norms(grad).clamp_min(torch.finfo(grad.dtype).tiny)

    def random_point(self, generator: torch.Generator | None) -> torch.Tensor:
        """A random start: uniform in the ℓ∞ ball, or a uniform direction at a radius ~ U(0, ε) in the ℓ2 ball."""
        x = self.x
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        draw = dict(generator=generator, dtype=dtype, device=x.device)
        if self.norm == "Linf":
            delta = (2 * torch.rand(x.shape, **draw) - 1) * self.eps
        else:
            direction = torch.randn(x.shape, **draw)
            direction = direction / _per_sample_norms(direction).clamp_min(torch.finfo(dtype).tiny)
            delta = direction * self.eps * torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), **draw)
        return self.project(x + delta.to(x.dtype))


def _objective(loss_fn: LossFn, z: torch.Tensor, per_sample: bool, with_grad: bool):
    """loss_fn at z → (values, detached: (N,) or 0-d; gradient of their sum with respect to z, or None)."""
    if not with_grad:
        with torch.no_grad():
            return _check_loss(loss_fn(z), per_sample, z.shape[0]).detach(), None
    z = z.detach().requires_grad_(True)
    loss = _check_loss(loss_fn(z), per_sample, z.shape[0])
    grad = torch.autograd.grad(loss.sum(), z, allow_unused=True)[0] if loss.requires_grad else None
    if grad is None:
        raise ValueError("loss_fn's output does not depend differentiably on its input x_adv (was it detached or "
                         "computed under torch.no_grad?)")
    return loss.detach(), grad


def _keep_best(best_x, best_val, z, val):
    """Take z where its objective beats the best so far: per sample for (N,) values, as a whole batch for 0-d ones."""
    better = val > best_val
    return torch.where(better.reshape(-1, *([1] * (z.dim() - 1))), z, best_x), torch.where(better, val, best_val)


def _unimproved(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float("-inf"), device=x.device)


# ----------------------------------------------------------------------------------------------------- PGD

def _pgd_run(loss_fn, feasible: _FeasibleSet, start, alpha, steps, per_sample, use_best):
    """One PGD trajectory from ``start`` → (returned iterate, its objective value)."""
    z, best_x, best_val = start, start, _unimproved(start)
    for _ in range(steps):
        val, grad = _objective(loss_fn, z, per_sample, with_grad=True)
        best_x, best_val = _keep_best(best_x, best_val, z, val)
        z = feasible.project(z + alpha * feasible.ascent(grad))
    val, _ = _objective(loss_fn, z, per_sample, with_grad=False)
    return _keep_best(best_x, best_val, z, val) if use_best else (z, val)


def pgd(loss_fn: LossFn, x: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str = "Linf",
        random_start: bool = False, restarts: int = 1, clamp: tuple[float, float] | None = (0.0, 1.0),
        use_best: bool = True, per_sample: bool = False, models: Iterable[nn.Module] | nn.Module = (),
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent of ``loss_fn`` over the per-sample ε-ball around ``x`` (Madry et al. 2018).

    Each step moves every sample by ``alpha`` along sign(∇) (``"Linf"``) or ∇/‖∇_n‖₂ (``"L2"``), projects onto the
    ε-ball around x and then clamps to ``clamp``.

    Args:
        loss_fn: x_adv (N, ...) → the objective to maximise: a 0-d tensor, or with ``per_sample=True`` an (N,) tensor
            of per-sample losses (their sum is differentiated). Called in eval mode of ``models``, with grad enabled.
        x: (N, ...) floating-point inputs (e.g. images (N, C, H, W)) inside ``clamp``; detached first.
        eps: radius ε ≥ 0 of each sample's ball. alpha: step size > 0. steps: number of gradient steps ≥ 0.
        norm: ``"Linf"`` or ``"L2"``.
        random_start: start from a random point of the ball (uniform for ℓ∞; uniform direction, radius ~ U(0, ε)
            for ℓ2) instead of x.
        restarts: number of runs ≥ 1; the first starts as ``random_start`` says, every further one from a random
            point; the best run is kept (per sample when ``per_sample``).
        clamp: (lo, hi) box the result is clamped to after each projection, or None.
        use_best: return the best iterate seen by the objective (the start included) rather than the last one.
        per_sample: whether ``loss_fn`` returns per-sample losses (N,) instead of a 0-d objective.
        models: modules put in eval mode during the attack and restored to their previous state afterwards.
        generator: torch.Generator for the random starts (on x's device), for reproducible attacks.

    Returns:
        x_adv: detached tensor with x's shape, dtype and device. ``eps == 0`` or ``steps == 0`` gives x (clamped).
    """
    x, eps, clamp, models = _check_common(loss_fn, x, eps, norm, restarts, clamp, models, generator)
    alpha = check_real("alpha", alpha, positive=True)
    steps = check_int("steps", steps, 0)
    for name, flag in (("random_start", random_start), ("use_best", use_best), ("per_sample", per_sample)):
        check_bool(name, flag)
    feasible = _FeasibleSet(x, eps, norm, clamp)
    if eps == 0 or steps == 0 or x.shape[0] == 0:
        return feasible.project(x)
    best_x, best_val = x, _unimproved(x)
    with torch.enable_grad(), eval_mode(models):
        for r in range(restarts):
            start = feasible.random_point(generator) if random_start or r > 0 else x
            z, val = _pgd_run(loss_fn, feasible, start, alpha, steps, per_sample, use_best)
            best_x, best_val = _keep_best(best_x, best_val, z, val)
    return best_x.detach()


# ----------------------------------------------------------------------------------------------------- APGD

def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ⌈p_j·N⌉ < N: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    steps = check_int("steps", steps, 0)
    p_prev, p, points = 0.0, 0.22, []
    while p < 1.0:
        w = math.ceil(p * steps - 1e-9)
        if 0 < w < steps and (not points or w > points[-1]):
            points.append(w)
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return points


def _apgd_run(loss_fn, feasible: _FeasibleSet, start, steps, rho, checkpoints):
    """One APGD trajectory (Croce & Hein 2020, Algorithm 1) from ``start`` → (best iterate, its (N,) losses).

    Per sample: step size η(0) = 2ε; momentum step z(k+1) = P(x(k) + η∇), x(k+1) = P(x(k) + α(z(k+1) − x(k)) +
    (1 − α)(x(k) − x(k−1))) with α = 0.75 (no momentum in the first step). At each checkpoint w_j, η is halved and the
    iterate restarts from the best point when (1) fewer than ρ·(w_j − w_{j−1}) of the steps since w_{j−1} increased
    the loss, or (2) η was not halved at w_{j−1} and the best loss has not improved since.
    """
    n = start.shape[0]
    bcast = (-1,) + (1,) * (start.dim() - 1)
    eta = torch.full((n,), 2 * feasible.eps, dtype=start.dtype, device=start.device)
    z = z_prev = start
    val, grad = _objective(loss_fn, z, True, with_grad=True)
    best_x, best_val, best_grad = z, val, grad
    last_val, increases, last_check = val, torch.zeros(n, device=start.device), 0
    best_at_check, halved_at_check = best_val, torch.zeros(n, dtype=torch.bool, device=start.device)
    checkpoints = set(checkpoints)
    for k in range(steps):
        candidate = feasible.project(z + eta.view(bcast) * feasible.ascent(grad))
        if k > 0:
            candidate = feasible.project(z + APGD_MOMENTUM * (candidate - z) + (1 - APGD_MOMENTUM) * (z - z_prev))
        z_prev, z = z, candidate
        val, grad = _objective(loss_fn, z, True, with_grad=True)
        increases += val > last_val
        last_val = val
        better = val > best_val
        best_x, best_val = _keep_best(best_x, best_val, z, val)
        best_grad = torch.where(better.view(bcast), grad, best_grad)
        if k + 1 in checkpoints:
            stalled = (increases < rho * (k + 1 - last_check)) | (~halved_at_check & (best_val <= best_at_check))
            eta = torch.where(stalled, eta / 2, eta)
            z = torch.where(stalled.view(bcast), best_x, z)
            grad = torch.where(stalled.view(bcast), best_grad, grad)
            last_val = torch.where(stalled, best_val, val)
            increases.zero_()
            last_check, best_at_check, halved_at_check = k + 1, best_val, stalled
    return best_x, best_val


def apgd(loss_fn: LossFn, x: torch.Tensor, *, eps: float, steps: int, norm: str = "Linf", restarts: int = 1,
         clamp: tuple[float, float] | None = (0.0, 1.0), rho: float = 0.75,
         models: Iterable[nn.Module] | nn.Module = (), generator: torch.Generator | None = None) -> torch.Tensor:
    """Auto-PGD (Croce & Hein, ICML 2020): PGD with momentum and a step size that adapts to the progress made.

    Starts from a random point of the ball, uniform as :func:`pgd`'s (every restart draws a new one; the reference
    implementation scales its draw out to the ball's boundary), uses η = 2ε, halves η at checkpoints where the loss
    stopped rising and restarts from the best point then (see :func:`apgd_checkpoints`; the conditions as the paper
    states them, so the second may already halve η at the first checkpoint, which the reference implementation
    skips); the best iterate of each sample over all steps and restarts is returned. Costs ``restarts·(steps + 1)``
    forward/backward passes.

    Args:
        loss_fn: x_adv (N, ...) → (N,) per-sample losses to maximise (e.g. cross-entropy with reduction="none";
            margin losses are the usual alternative).
        x, eps, norm, restarts, clamp, models, generator: as in :func:`pgd`. steps: iterations ≥ 0.
        rho: the fraction ρ ∈ [0, 1] of loss-increasing steps below which a checkpoint halves the step size.

    Returns:
        x_adv: detached tensor with x's shape, dtype and device.
    """
    x, eps, clamp, models = _check_common(loss_fn, x, eps, norm, restarts, clamp, models, generator)
    steps = check_int("steps", steps, 0)
    rho = check_real("rho", rho)
    if rho > 1:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    feasible = _FeasibleSet(x, eps, norm, clamp)
    if eps == 0 or steps == 0 or x.shape[0] == 0:
        return feasible.project(x)
    checkpoints = apgd_checkpoints(steps)
    best_x, best_val = x, _unimproved(x)
    with torch.enable_grad(), eval_mode(models):
        for _ in range(restarts):
            z, val = _apgd_run(loss_fn, feasible, feasible.random_point(generator), steps, rho, checkpoints)
            best_x, best_val = _keep_best(best_x, best_val, z, val)
    return best_x.detach()


# ----------------------------------------------------------------------------------------------------- masking check

def gradient_masking_check(results, *, tolerance: float | None = None,
                           tiers: Mapping[str, int] | None = None) -> list[str]:
    """Warnings about gradient masking from adversarial accuracies of attacks ordered weakest → strongest.

    A stronger attack must not leave more samples correct than a weaker one: every pair (weaker, stronger) where
    the weaker attack reaches a lower adversarial accuracy than the stronger one by more than ``tolerance`` is
    flagged (the stronger attack is being foiled, the signature of obfuscated gradients, Athalye et al. 2018). With
    ``tiers`` (attack name → strength, higher is stronger) only attacks of different tiers are compared, the weaker
    being the one of the lower tier: attacks of one tier are peers (say PGD with restarts and APGD), of which either
    may be ahead by a few samples. An entry named ``"natural"`` (any case, anywhere in the list) is the clean
    accuracy; an adversarial accuracy above it is flagged too.

    Args:
        results: ordered (attack_name, adversarial_accuracy) pairs (or a mapping in that order), accuracies all as
            fractions in [0, 1] or all as percentages in [0, 100] (read as percentages when any is above 1).
        tolerance: allowed slack in the accuracies' unit; default one percentage point (0.01 for fractions, 1.0
            when any accuracy is above 1, i.e. percentages) — a few samples of a small test set, since different
            attacks maximising the same loss may each leave a different sample or two correct.
        tiers: strength of every attack in ``results`` (each a non-negative int); default: the list order, each
            attack its own tier.

    Returns:
        The warning messages (an empty list when the accuracies are consistent).
    """
    if not isinstance(results, Iterable) or isinstance(results, (str, bytes)):
        raise TypeError(f"results must be (attack_name, accuracy) pairs or a mapping, got {type(results).__name__}")
    items = list(results.items() if isinstance(results, Mapping) else results)
    pairs = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            raise TypeError(f"results must be (attack_name, accuracy) pairs, got {item!r}")
        name, acc = item
        if any(name == seen for seen, _ in pairs):  # tiers and the messages name attacks: one entry per name
            raise ValueError(f"results: {name!r} appears twice; give each attack a name of its own")
        acc = check_real(f"results[{name!r}]", acc)
        if acc > 100:
            raise ValueError(f"results[{name!r}] must be an accuracy, a fraction in [0, 1] or a percentage in "
                             f"[0, 100], got {acc!r}")
        pairs.append((name, acc))
    percent = any(acc > 1 for _, acc in pairs)
    tol = (1.0 if percent else 0.01) if tolerance is None else check_real("tolerance", tolerance)
    unit = "%" if percent else ""
    natural = [acc for name, acc in pairs if name.lower() == "natural"]
    attacks = [(name, acc) for name, acc in pairs if name.lower() != "natural"]
    if tiers is None:
        tiers = {name: i for i, (name, _) in enumerate(attacks)}
    elif not isinstance(tiers, Mapping):
        raise TypeError(f"tiers must be a mapping of attack name to strength, got {type(tiers).__name__}")
    else:
        missing = [name for name, _ in attacks if name not in tiers]
        if missing:
            raise ValueError(f"tiers gives no strength for {missing}")
        tiers = {name: check_int(f"tiers[{name!r}]", tiers[name], 0) for name, _ in attacks}
    warnings = []
    for weak, weak_acc in attacks:
        for strong, strong_acc in attacks:
            if tiers[weak] < tiers[strong] and weak_acc < strong_acc - tol:
                warnings.append(
                    f"possible gradient masking: the weaker attack {weak!r} reaches lower adversarial accuracy "
                    f"({weak_acc:g}{unit}) than the stronger attack {strong!r} ({strong_acc:g}{unit}); the stronger "
                    f"attack is not finding adversarial examples the weaker one finds")
    for nat in natural:
        for name, acc in attacks:
            if acc > nat + tol:
                warnings.append(
                    f"adversarial accuracy under {name!r} ({acc:g}{unit}) is above the natural accuracy "
                    f"({nat:g}{unit}): the attack makes the model more accurate, so it is broken or masked")
    return warnings
