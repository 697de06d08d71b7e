"""Downstream classification on a frozen encoder: heads trained standard or PGD-adversarially, evaluated under the
paper's PGD and stronger attacks (more steps with restarts, APGD), with a gradient-masking check.

Robust head training is Madry et al.'s min-max restricted to the head h:  min_h E max_{‖x'−x‖∞≤ε} CE(h(g(x')), y),
the inner max by per-sample PGD from a random start (the gradient flows through the frozen encoder to the input).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from rmi_fast.attacks import apgd, gradient_masking_check, pgd
from rmi_fast.checks import check_bool, check_instance, check_int, check_real, check_values

from .checkpoint import load_checkpoint, restoring, save_checkpoint
from .models import HEADS, Classifier, Encoder, EncoderConfig, make_head
from .utils import (check_images, check_labels, check_schedule, check_seed, epoch_order, make_generator, minibatches,
                    progress, resolve_device, seeded, steps_per_epoch)

HEAD_TRAINING = ("standard", "robust")
CHECKPOINT_KIND = "rmi_fast.robust.classifier"
ATTACK_KINDS = ("pgd", "apgd")


@dataclass(frozen=True)
class EvalAttack:
    """One ℓ∞ attack on per-sample cross-entropy: kind "pgd" (sign steps of ``alpha``) or "apgd" (adaptive step).
    ``tier``: its strength for the gradient-masking check (no attack may be beaten by one of a lower tier; attacks of
    one tier are peers, of which either may leave a sample or two more correct than the other)."""

    name: str
    kind: str
    eps: float
    steps: int
    alpha: float = 0.0
    restarts: int = 1
    random_start: bool = False
    tier: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"attack name must be a non-empty string, got {self.name!r}")
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"attack kind must be one of {list(ATTACK_KINDS)}, got {self.kind!r}")
        check_real("eps", self.eps)
        check_int("steps", self.steps, 0)
        check_real("alpha", self.alpha, positive=self.kind == "pgd")
        check_int("restarts", self.restarts, 1)
        check_bool("random_start", self.random_start)
        check_int("tier", self.tier, 0)

    def run(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator | None = None, *, success_first: bool = True) -> torch.Tensor:
        """x (B, C, H, W), y (B,) → adversarial x (B, C, H, W), each sample's objective maximised in its own ε-ball:
        :func:`attack_objective` (an evaluation: any misclassified iterate counts), or with ``success_first=False``
        the cross-entropy itself (adversarial training, which maximises the loss, as Madry et al.)."""
        def loss_fn(x_adv):
            logits = model(x_adv)
            return attack_objective(logits, y) if success_first else F.cross_entropy(logits, y, reduction="none")

        if self.kind == "apgd":
            return apgd(loss_fn, x, eps=self.eps, steps=self.steps, restarts=self.restarts, models=(model,),
                        generator=generator)
        return pgd(loss_fn, x, eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=self.random_start,
                   restarts=self.restarts, per_sample=True, models=(model,), generator=generator)


def attack_objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (B,), plus ln K (K classes) where the point is misclassified.

    So a sample's best iterate (and restart) is a misclassified one whenever it has one, as in AutoAttack, even where
    a correctly classified iterate has the higher CE: a misclassified point's objective exceeds ln K, which bounds the
    CE of every correct one (its true-class probability is the largest, so at least 1/K). The indicator is constant
    almost everywhere: the gradient is CE's.
    """
    missed = logits.argmax(1) != y
    return F.cross_entropy(logits, y, reduction="none") + missed * math.log(logits.shape[1])


def attack_suite(eps: float, alpha: float, steps: int) -> list[EvalAttack]:
    """The paper's PGD, then two stronger attacks, peers of each other (tier 1): PGD with 4× the steps (step
    2.5ε/steps, Madry et al.'s rule) and 5 random restarts, and APGD with 4× the steps."""
    check_int("steps", steps, 1)
    strong = 4 * steps
    return [
        EvalAttack("pgd", "pgd", eps, steps, alpha),
        EvalAttack(f"pgd-{strong}x5", "pgd", eps, strong, 2.5 * eps / strong, restarts=5, random_start=True, tier=1),
        EvalAttack(f"apgd-{strong}", "apgd", eps, strong, tier=1),
    ]


@dataclass(frozen=True)
class HeadConfig:
    """head: "linear" | "mlp"; training: "standard" | "robust" (PGD with ``attack``, random start); Adam."""

    head: str = "mlp"
    training: str = "standard"
    attack: EvalAttack | None = None
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 200
    seed: int = 0

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {self.head!r}")
        if self.training not in HEAD_TRAINING:
            raise ValueError(f"head training must be one of {list(HEAD_TRAINING)}, got {self.training!r}")
        check_instance("attack", self.attack, (EvalAttack, type(None)))
        if self.training == "robust" and self.attack is None:
            raise ValueError("robust head training needs an attack")
        check_schedule(self)
        check_int("hidden", self.hidden, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        d = dict(d)
        attack = d.pop("attack", None)
        return cls(attack=None if attack is None else EvalAttack(**attack), **d)


def train_head(encoder: Encoder, images: torch.Tensor, labels: torch.Tensor, config: HeadConfig, *,
               num_classes: int, device: str | torch.device = "cpu", show_progress: bool = False) -> Classifier:
    """Train a head on the frozen ``encoder``: images (N, C, H, W) in [0, 1], labels (N,) int64 → head ∘ g (eval)."""
    check_instance("encoder", encoder, Encoder)
    check_instance("config", config, HeadConfig)
    check_bool("show_progress", show_progress)
    check_images(images, encoder.config)
    check_labels(labels, images.shape[0], num_classes)
    device = resolve_device(device)
    with seeded(config.seed):
        head = make_head(config.head, encoder.config.dim, num_classes, config.hidden)
    model = Classifier(encoder, head).to(device)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=config.lr)
    generator = make_generator(config.seed, device)
    images, labels = images.to(device), labels.to(device)
    n = images.shape[0]
    batch = min(config.batch_size, n)
    bar = progress(total=config.epochs * steps_per_epoch(n, batch), enabled=show_progress,
                   desc=f"train {config.training} {config.head} head")
    for epoch in range(config.epochs):
        for idx in minibatches(n, batch, order=epoch_order(n, config.seed, epoch), drop_last=True):
            idx = idx.to(device)
            x, y = images[idx], labels[idx]
            if config.training == "robust":
                x = config.attack.run(model, x, y, generator, success_first=False)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def evaluate_classifier(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        attacks: list[EvalAttack], *, batch_size: int = 256, device: str | torch.device = "cpu",
                        seed: int = 0) -> dict:
    """Natural accuracy and adversarial accuracy under each attack (fractions), plus:

    worst: the fraction of samples that every attack fails on (per-sample worst case over the attacks);
    masking_warnings: :func:`rmi_fast.attacks.gradient_masking_check` on [natural, attacks] with their tiers.
    """
    if isinstance(model, Classifier):
        check_images(images, model.encoder.config)
    elif not isinstance(images, torch.Tensor):  # any other module's forward checks the rest of its input
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    n = images.shape[0]
    if n < 1:
        raise ValueError("images: need at least one image to evaluate on, got none")
    check_labels(labels, n, None)  # the upper end once the model's outputs show its number of classes
    _check_attack_list(attacks)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_seed(seed)
    device = resolve_device(device)
    model.eval()
    generator = make_generator(seed, device)
    correct = {"natural": []}
    correct.update({a.name: [] for a in attacks})
    for idx in minibatches(images.shape[0], batch_size):
        x, y = images[idx].to(device), labels[idx].to(device)
        with torch.no_grad():
            logits = model(x)
        classes = logits.shape[-1]
        check_values((y < classes).all(), f"labels must lie in [0, {classes}): the model has {classes} outputs")
        correct["natural"].append(logits.argmax(1) == y)
        for a in attacks:
            x_adv = a.run(model, x, y, generator)
            with torch.no_grad():
                correct[a.name].append(model(x_adv).argmax(1) == y)
    hits = {k: torch.cat(v) for k, v in correct.items()}
    acc = {k: v.float().mean().item() for k, v in hits.items()}
    robust_all = torch.stack([hits[a.name] for a in attacks]).all(0) if attacks else hits["natural"]
    return {
        "natural": acc["natural"],
        "attacks": {a.name: acc[a.name] for a in attacks},
        "worst": robust_all.float().mean().item(),
        "masking_warnings": gradient_masking_check([("natural", acc["natural"])]
                                                   + [(a.name, acc[a.name]) for a in attacks],
                                                   tiers={a.name: a.tier for a in attacks}),
    }


def _check_attack_list(attacks) -> None:
    """A list of EvalAttack with distinct names, none of them "natural" (the results are keyed by name, and the clean
    accuracy is "natural")."""
    if not isinstance(attacks, (list, tuple)):
        raise TypeError(f"attacks must be a list of EvalAttack, got {type(attacks).__name__}")
    names = set()
    for i, attack in enumerate(attacks):
        check_instance(f"attacks[{i}]", attack, EvalAttack)
        clean = attack.name.lower() == "natural"
        if clean or attack.name in names:
            reason = "is the clean accuracy's" if clean else "is taken by an earlier one"
            raise ValueError(f"attacks[{i}]: the name {attack.name!r} {reason}: each attack needs a name of its own")
        names.add(attack.name)


def save_classifier(path, model: Classifier, config: HeadConfig, *, dataset: str, num_classes: int) -> None:
    """A self-contained checkpoint of head ∘ g: both state dicts, the encoder's architecture and the head config."""
    save_checkpoint(path, {"dataset": dataset, "num_classes": num_classes, "head_config": config.to_dict(),
                           "encoder_config": model.encoder.config.to_dict(),
                           "encoder": model.encoder.state_dict(), "head": model.head.state_dict()}, CHECKPOINT_KIND)


def load_classifier(path, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """(head ∘ g in eval mode on ``device``, {"dataset", "num_classes", "head_config"}) from :func:`save_classifier`."""
    payload = load_checkpoint(path, CHECKPOINT_KIND)
    with restoring(path, CHECKPOINT_KIND):
        config = HeadConfig.from_dict(payload["head_config"])
        encoder = Encoder(EncoderConfig(**payload["encoder_config"]))
        encoder.load_state_dict(payload["encoder"])
        num_classes = check_int("num_classes", payload["num_classes"], 2)
        head = make_head(config.head, encoder.config.dim, num_classes, config.hidden)
        head.load_state_dict(payload["head"])
        meta = {"dataset": payload["dataset"], "num_classes": num_classes, "head_config": config}
    return Classifier(encoder, head).to(resolve_device(device)).eval(), meta
