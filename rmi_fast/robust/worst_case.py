"""Worst-case mutual information (Algorithm 1 of Zhu, Zhang & Evans).

    I_worst(g) = min over X' with ‖X'_i − X_i‖∞ ≤ ε (and X' ∈ [0, 1])  of  Î(X'; g(X'))

where Î is the critic's batch-level bound. The inner minimum is found by PGD-ℓ∞ on the whole batch at once: sign
steps of size α on −Î, projection to the ε-ball around the clean batch and to [0, 1], models in eval mode, no
random start by default, the best (lowest-MI) iterate kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .critics import ESTIMATORS


@dataclass(frozen=True)
class MIConfig:
    """How the critic's scores become an MI estimate.

    bound: "dv" (the paper), "jsd" or "infonce". diagonal: "exclude" (negatives are the off-diagonal pairs) or
    "zero" (the released code's DV: the positive pair counted among the negatives with score 0). backend: the
    rmi_fast backend of the bound ("auto" = fused where available, "torch" = eager on materialised scores).
    """

    bound: str = "dv"
    diagonal: str = "exclude"
    backend: str = "auto"

    def __post_init__(self):
        if self.bound not in ESTIMATORS:
            raise ValueError(f"bound must be one of {list(ESTIMATORS)}, got {self.bound!r}")
        if self.diagonal not in ("exclude", "zero"):
            raise ValueError(f"diagonal must be 'exclude' or 'zero', got {self.diagonal!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttackConfig:
    """PGD-ℓ∞ settings of the worst-case MI (Algorithm 1).

    eps: radius of the per-sample ℓ∞ ball; alpha: step size; steps: iterations (0 → the clean batch);
    random_start, restarts: off / 1 in the paper; through_input_branch: let the attack's gradient flow through the
    critic's input branch too (False reproduces the released code, which detached it — the perturbation then acts on
    the MI only through g(X')).
    """

    eps: float
    alpha: float
    steps: int
    random_start: bool = False
    restarts: int = 1
    through_input_branch: bool = False

    def __post_init__(self):
        if not self.eps >= 0:
            raise ValueError(f"eps must be ≥ 0, got {self.eps!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {self.restarts!r}")

    @property
    def active(self) -> bool:
        return self.eps > 0 and self.steps > 0

    def to_dict(self) -> dict:
        return asdict(self)


def mi_estimate(encoder: nn.Module, critic: nn.Module, x: torch.Tensor, mi: MIConfig, *,
                detach_local: bool = False) -> torch.Tensor:
    """Î(X; g(X)) on a batch: x (B, C, H, W) → 0-d tensor (nats for dv/infonce)."""
    return critic(x, encoder(x), bound=mi.bound, diagonal=mi.diagonal, backend=mi.backend, detach_local=detach_local)


def worst_case_batch(encoder: nn.Module, critic: nn.Module, x: torch.Tensor, attack: AttackConfig, mi: MIConfig,
                     *, generator: torch.Generator | None = None) -> torch.Tensor:
    """X' ≈ argmin over the ε-ball of Î(X'; g(X')) for a fixed critic: (B, C, H, W) → (B, C, H, W), detached.

    Models are put in eval mode for the attack and restored afterwards; parameter gradients are not touched.
    """
    from rmi_fast.attacks import pgd

    if not attack.active:
        return x.detach()

    def objective(x_adv: torch.Tensor) -> torch.Tensor:  # PGD maximises: −Î, so the MI goes down
        return -mi_estimate(encoder, critic, x_adv, mi, detach_local=not attack.through_input_branch)

    return pgd(objective, x, eps=attack.eps, alpha=attack.alpha, steps=attack.steps, norm="Linf",
               random_start=attack.random_start, restarts=attack.restarts, clamp=(0.0, 1.0), use_best=True,
               models=(encoder, critic), generator=generator)
