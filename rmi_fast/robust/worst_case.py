"""Worst-case mutual information (Algorithm 1 of Zhu, Zhang & Evans).

    I_worst(g) = min over X' with ‖X'_i − X_i‖∞ ≤ ε (and X' ∈ [0, 1])  of  Î(X'; g(X'))

where Î is the critic's batch-level bound. The inner minimum is found by PGD-ℓ∞ on the whole batch at once: sign
steps of size α on −Î, projection to the ε-ball around the clean batch and to [0, 1], models in eval mode, no
random start by default, the best (lowest-MI) iterate kept.

Data-parallel (``gather``): each rank perturbs its shard of the global batch and the bound runs against the negatives
of every rank. The objective's value is the whole batch's (the mean over ranks, so every rank keeps the same best
iterate), and the gradient reaching a rank's shard is W × the whole-batch gradient (rmi_fast.distributed): a positive
factor, so the sign steps are the single-process ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rmi_fast import backends
from rmi_fast.checks import check_bool, check_int, check_real

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
        if self.bound == "infonce" and self.diagonal == "zero":
            raise ValueError("diagonal='zero' applies to the dv and jsd estimators, not infonce")
        if self.backend != "auto" and self.backend not in backends.names():
            raise ValueError(f"backend must be 'auto' or one of {backends.names()}, got {self.backend!r}")

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
        check_real("eps", self.eps)
        check_real("alpha", self.alpha, positive=True)
        check_int("steps", self.steps, 0)
        check_int("restarts", self.restarts, 1)
        check_bool("random_start", self.random_start)
        check_bool("through_input_branch", self.through_input_branch)

    @property
    def active(self) -> bool:
        return self.eps > 0 and self.steps > 0

    def to_dict(self) -> dict:
        return asdict(self)


def mi_estimate(encoder: nn.Module, critic: nn.Module, x: torch.Tensor, mi: MIConfig, *,
                detach_local: bool = False, gather=False) -> torch.Tensor:
    """Î(X; g(X)) on a batch: x (B, C, H, W) → 0-d tensor (nats for dv/infonce).

    gather: True (or a ProcessGroup): x is this rank's shard and the negatives are the rows of every rank; the value
    is this rank's anchors' part (the mean over ranks is the whole batch's Î), see ``rmi_fast.mi_bound``.
    """
    kwargs = dict(gather=gather) if gather else {}
    return critic(x, encoder(x), bound=mi.bound, diagonal=mi.diagonal, backend=mi.backend, detach_local=detach_local,
                  **kwargs)


def global_mean(value: torch.Tensor, gather) -> torch.Tensor:
    """The mean over ranks of a per-rank value, keeping the value's own gradient (a straight-through all-reduce)."""
    import torch.distributed as dist

    from rmi_fast.distributed import process_group

    group, _, world = process_group(gather)
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return value + (total / world - value.detach())


def worst_case_batch(encoder: nn.Module, critic: nn.Module, x: torch.Tensor, attack: AttackConfig, mi: MIConfig,
                     *, generator: torch.Generator | None = None, gather=False) -> torch.Tensor:
    """X' ≈ argmin over the ε-ball of Î(X'; g(X')) for a fixed critic: (B, C, H, W) → (B, C, H, W), detached.

    Models are put in eval mode for the attack and restored afterwards; parameter gradients are not touched.
    gather: x is this rank's shard of a data-parallel batch and the attack minimises the whole batch's bound (see
    the module docstring; pass the unwrapped modules, not DistributedDataParallel). Random starts then draw from a
    per-rank generator seeded from ``generator``, so they are not those of a single-process run.
    """
    from rmi_fast.attacks import pgd

    if not attack.active:
        return x.detach()
    if gather and generator is not None and (attack.random_start or attack.restarts > 1):
        generator = _rank_generator(generator, gather)

    def objective(x_adv: torch.Tensor) -> torch.Tensor:  # PGD maximises: −Î, so the MI goes down
        value = -mi_estimate(encoder, critic, x_adv, mi, detach_local=not attack.through_input_branch, gather=gather)
        return global_mean(value, gather) if gather else value

    return pgd(objective, x, eps=attack.eps, alpha=attack.alpha, steps=attack.steps, norm="Linf",
               random_start=attack.random_start, restarts=attack.restarts, clamp=(0.0, 1.0), use_best=True,
               models=(encoder, critic), generator=generator)


def _rank_generator(generator: torch.Generator, gather) -> torch.Generator:
    """A generator for this rank's random starts, seeded from the shared ``generator`` (which advances the same way
    on every rank) and the rank."""
    from rmi_fast.distributed import process_group

    _, rank, _ = process_group(gather)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=generator.device).manual_seed((seed * 1_000_003 + rank) % 2 ** 63)
