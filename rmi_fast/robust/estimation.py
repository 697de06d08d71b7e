"""MI estimation for a frozen encoder (Algorithm 2 of Zhu, Zhang & Evans) and the bound of Theorem 3.4.

    I(X; g(X))        ≈ Î_T*(X; g(X))       T* = a fresh critic trained to maximise Î on clean batches
    I_worst(g)        ≈ Î_T*(X'; g(X'))      T* trained against worst-case batches X' (Algorithm 1, re-attacked
                                              for the current critic at every step: max_T min_X' Î_T)
    RV_ε(g)           = I(X; g(X)) − I_worst(g)         representation vulnerability, in nats

The critic is fitted on one split and the estimate averaged over the full batches of another (the same batch size,
on which DV / InfoNCE values depend).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rmi_fast.attacks import eval_mode
from rmi_fast.checks import check_bool, check_instance, check_int, check_real

from .critics import Critic, CriticConfig
from .utils import (check_images, check_schedule, derived_seed, epoch_order, make_generator, minibatches, progress,
                    resolve_device, seeded, steps_per_epoch)
from .worst_case import AttackConfig, MIConfig, mi_estimate, worst_case_batch


@dataclass(frozen=True)
class EstimationConfig:
    """critic: architecture of the fresh critic; attack: the ε-ball and PGD of the worst case; epochs, lr,
    batch_size: the critic's fit (Adam)."""

    critic: CriticConfig
    attack: AttackConfig
    mi: MIConfig = field(default_factory=MIConfig)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name, cls in (("critic", CriticConfig), ("attack", AttackConfig), ("mi", MIConfig)):
            check_instance(name, getattr(self, name), cls)
        check_schedule(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MIEstimate:
    """mi_natural: Î(X; g(X)); mi_worst: Î(X'; g(X')) on worst-case batches; rv = mi_natural − mi_worst (nats)."""

    mi_natural: float
    mi_worst: float

    @property
    def rv(self) -> float:
        return self.mi_natural - self.mi_worst

    def to_dict(self) -> dict:
        return {"mi_natural": self.mi_natural, "mi_worst": self.mi_worst, "rv": self.rv}


def adversarial_accuracy_bound(mi_worst: float, num_classes: int) -> float:
    """Theorem 3.4: with uniform labels over |Y| classes, every downstream classifier's adversarial accuracy is at
    most (I_worst + ln 2) / ln |Y| (MI in nats). Not clipped to 1: a value ≥ 1 means the bound is vacuous.

    A negative estimate (a lower bound such as DV can fall below 0 on a poor critic) counts as 0: the true MI is
    never negative, so the theorem's bound is at least ln 2 / ln |Y|."""
    num_classes = check_int("num_classes", num_classes, 2)
    mi_worst = check_real("mi_worst", mi_worst, allow_negative=True)
    return (max(mi_worst, 0.0) + math.log(2.0)) / math.log(num_classes)


def _with_frozen_encoder(fn):
    """Run ``fn(encoder, ...)`` with the encoder in eval mode and without parameter gradients (gradients still reach
    its input), and give both back afterwards: an MI estimate taken in the middle of training must not stop the
    encoder from learning."""
    @functools.wraps(fn)
    def run(encoder: nn.Module, *args, **kwargs):
        check_instance("encoder", encoder, nn.Module)
        flags = [(p, p.requires_grad) for p in encoder.parameters()]
        with eval_mode(encoder):
            try:
                for p, _ in flags:
                    p.requires_grad_(False)
                return fn(encoder, *args, **kwargs)
            finally:
                for p, flag in flags:
                    p.requires_grad_(flag)
    return run


def _check_estimation_args(encoder, config, **flags) -> None:
    """The arguments every estimation function shares: a config whose critic takes the encoder's representations
    (where the encoder states their width), and True/False flags."""
    check_instance("config", config, EstimationConfig)
    dim = getattr(getattr(encoder, "config", None), "dim", None)
    if isinstance(dim, int) and dim != config.critic.rep_dim:
        raise ValueError(f"config.critic.rep_dim ({config.critic.rep_dim}) must equal the encoder's representation "
                         f"size ({dim})")
    for name, value in flags.items():
        check_bool(name, value)


@_with_frozen_encoder
def fit_critic(encoder: nn.Module, images: torch.Tensor, config: EstimationConfig, *, worst_case: bool,
               device: str | torch.device = "cpu", show_progress: bool = False) -> Critic:
    """Train a fresh critic on the frozen ``encoder`` over ``images`` (N, C, H, W): clean batches, or (worst_case)
    batches re-attacked against the current critic at every step. Returns the critic in eval mode."""
    _check_estimation_args(encoder, config, worst_case=worst_case, show_progress=show_progress)
    check_images(images, config.critic, at_least=2)
    device = resolve_device(device)
    n = images.shape[0]
    batch = min(config.batch_size, n)
    with seeded(config.seed):
        critic = Critic(config.critic).to(device)
    optimizer = torch.optim.Adam(critic.parameters(), lr=config.lr)
    generator = make_generator(config.seed, device)
    per_epoch = steps_per_epoch(n, batch)
    images = images.to(device)
    what = "worst-case" if worst_case else "natural"
    bar = progress(total=config.epochs * per_epoch, desc=f"fit critic ({what} MI)", enabled=show_progress)
    for epoch in range(config.epochs):
        for idx in minibatches(n, batch, order=epoch_order(n, config.seed, epoch), drop_last=True):
            x = images[idx.to(device)]
            if worst_case:
                x = worst_case_batch(encoder, critic, x, config.attack, config.mi, generator=generator)
            critic.train()
            optimizer.zero_grad(set_to_none=True)
            mi = mi_estimate(encoder, critic, x, config.mi)
            (-mi).backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(mi=f"{mi.item():.3f}", refresh=False)
    bar.close()
    return critic.eval()


@_with_frozen_encoder
def evaluate_mi(encoder: nn.Module, critic: Critic, images: torch.Tensor, config: EstimationConfig, *,
                worst_case: bool, device: str | torch.device = "cpu") -> float:
    """Mean of the critic's bound over the full batches of ``images``, clean or worst-case (against this critic)."""
    _check_estimation_args(encoder, config, worst_case=worst_case)
    check_instance("critic", critic, Critic)
    check_images(images, config.critic, at_least=2)
    device = resolve_device(device)
    n = images.shape[0]
    batch = min(config.batch_size, n)
    generator = make_generator(derived_seed(config.seed, 1), device)
    values = []
    for idx in minibatches(n, batch, drop_last=True):
        x = images[idx].to(device)
        if worst_case:
            x = worst_case_batch(encoder, critic, x, config.attack, config.mi, generator=generator)
        with torch.no_grad():
            values.append(mi_estimate(encoder, critic, x, config.mi).item())
    return sum(values) / len(values)


def estimate_mi(encoder: nn.Module, fit_images: torch.Tensor, eval_images: torch.Tensor, config: EstimationConfig,
                *, device: str | torch.device = "cpu", show_progress: bool = False) -> MIEstimate:
    """Algorithm 2: natural and worst-case MI of a frozen encoder (a fresh critic for each), and so its RV."""
    _check_estimation_args(encoder, config, show_progress=show_progress)
    check_images(fit_images, config.critic, name="fit_images", at_least=2)  # both before the first fit
    check_images(eval_images, config.critic, name="eval_images", at_least=2)
    estimates = {}
    for worst in (False, True):
        critic = fit_critic(encoder, fit_images, config, worst_case=worst, device=device, show_progress=show_progress)
        estimates[worst] = evaluate_mi(encoder, critic, eval_images, config, worst_case=worst, device=device)
    return MIEstimate(mi_natural=estimates[False], mi_worst=estimates[True])
