"""Encoder training: standard infomax and worst-case MI maximisation (eq. 5.4 of Zhu, Zhang & Evans, β = 1).

    infomax:     max_{g, T}  Î_T(X; g(X))                    on clean batches
    worst-case:  max_{g, T}  min_{X' ∈ B_ε(X)} Î_T(X'; g(X'))  the inner min by PGD (Algorithm 1), only X' is used

The encoder g and both critic branches are trained together with Adam (1e-4 in the paper). Runs checkpoint the
models, the optimiser, the attack's RNG state and the step count; the batch order of every epoch is a function of
(seed, epoch) alone, so a run resumed from a checkpoint produces the same parameters as an uninterrupted one.

Data-parallel (e.g. under ``torchrun``, with an initialised torch.distributed process group): every rank takes its
shard of each global batch of ``batch_size``, the encoder and critic are wrapped in DistributedDataParallel, and the
bound (in the attack and in the update) runs against the negatives of the whole global batch (``gather=True``), so
each step is the single-process step on the whole batch, up to floating point. Rank 0 alone writes checkpoints and
shows progress; every rank resumes from the same file.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rmi_fast.checks import check_bool, check_instance, check_int

from .checkpoint import load_checkpoint, restoring, save_checkpoint
from .critics import Critic, CriticConfig
from .models import Encoder, EncoderConfig
from .utils import (check_images, check_schedule, data_fingerprint, epoch_order, make_generator, progress,
                    resolve_device, seeded, steps_per_epoch)
from .worst_case import AttackConfig, MIConfig, global_mean, mi_estimate, worst_case_batch

MODES = ("infomax", "worst-case")
CHECKPOINT_KIND = "rmi_fast.robust.encoder"


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Everything that determines an encoder training run (stored in its checkpoints as a plain dict)."""

    mode: str
    encoder: EncoderConfig
    critic: CriticConfig
    attack: AttackConfig
    mi: MIConfig = field(default_factory=MIConfig)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    seed: int = 0
    dataset: str | None = None  # the data it was trained on (informational; None for ad-hoc tensors)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        for name, cls in (("encoder", EncoderConfig), ("critic", CriticConfig), ("attack", AttackConfig),
                          ("mi", MIConfig)):
            check_instance(name, getattr(self, name), cls)
        check_instance("dataset", self.dataset, (str, type(None)))
        if self.critic.rep_dim != self.encoder.dim:
            raise ValueError(f"critic.rep_dim ({self.critic.rep_dim}) must equal encoder.dim ({self.encoder.dim})")
        check_schedule(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderTrainConfig:
        d = dict(d)
        return cls(encoder=EncoderConfig(**d.pop("encoder")), critic=CriticConfig(**d.pop("critic")),
                   attack=AttackConfig(**d.pop("attack")), mi=MIConfig(**d.pop("mi")), **d)


@dataclass
class EncoderRun:
    """The result of :func:`train_encoder`: models in eval mode, the per-step training MI, and whether the run
    reached its last step (False after ``stop_after``)."""

    config: EncoderTrainConfig
    encoder: Encoder
    critic: Critic
    history: list[float]
    step: int
    finished: bool


def build_models(config: EncoderTrainConfig, device: torch.device) -> tuple[Encoder, Critic]:
    """Fresh encoder and critic, initialised from ``config.seed`` (independently of the global RNG)."""
    with seeded(config.seed):
        encoder = Encoder(config.encoder)
        critic = Critic(config.critic)
    return encoder.to(device), critic.to(device)


def make_optimizer(encoder: nn.Module, critic: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([*encoder.parameters(), *critic.parameters()], lr=lr)


def train_step(encoder: Encoder, critic: Critic, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               config: EncoderTrainConfig, generator: torch.Generator | None = None, *, gather=False) -> torch.Tensor:
    """One update on the batch x (B, C, H, W): the worst-case batch for mode "worst-case" (Algorithm 1 against the
    current critic), the clean one for "infomax"; then an ascent step on Î. Returns the batch's Î (0-d, detached).

    gather: data-parallel: x is this rank's shard, encoder and critic are DistributedDataParallel wrappers (their
    gradient averaging makes the update the whole batch's) and the returned Î is the whole batch's.
    """
    if config.mode == "worst-case":  # the attack touches no parameter gradients: the bare modules, no DDP hooks
        x = worst_case_batch(_unwrap(encoder), _unwrap(critic), x, config.attack, config.mi, generator=generator,
                             gather=gather)
    encoder.train()
    critic.train()
    optimizer.zero_grad(set_to_none=True)
    mi = mi_estimate(encoder, critic, x, config.mi, gather=gather)
    (-mi).backward()
    optimizer.step()
    return global_mean(mi.detach(), gather) if gather else mi.detach()


def train_encoder(config: EncoderTrainConfig, images: torch.Tensor, *, device: str | torch.device = "cpu",
                  checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0, resume: bool = True,
                  stop_after: int | None = None, show_progress: bool = False,
                  distributed: bool | None = None) -> EncoderRun:
    """Train an encoder and its critic on ``images`` (N, C, H, W) in [0, 1].

    checkpoint: file written after every ``checkpoint_every`` steps (0: at the end of each epoch) and at the end;
        with ``resume`` an existing file of the same config is continued from its step.
    stop_after: stop once this many steps are done (an interruption, for tests and time-boxed runs).
    distributed: data-parallel over the ranks of the default process group (see the module docstring); None → when
        torch.distributed is initialised with more than one rank. Every rank must call this with the same arguments;
        the global batch ``batch_size`` must be divisible by the number of ranks.
    Batches are full (a short last batch is dropped: the bound depends on B); an epoch has N // batch_size steps.
    """
    check_instance("config", config, EncoderTrainConfig)
    check_instance("checkpoint", checkpoint, (str, os.PathLike, type(None)))
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 0)
    if stop_after is not None:
        check_int("stop_after", stop_after, 0)
    check_bool("resume", resume)
    check_bool("show_progress", show_progress)
    device = resolve_device(device)
    check_images(images, config.encoder, at_least=2)
    n = images.shape[0]
    batch = min(config.batch_size, n)
    rank, world = _data_parallel(distributed)
    if batch % world:
        raise ValueError(f"the global batch of {batch} images (batch_size={config.batch_size}, {n} images) does not "
                         f"split evenly over {world} data-parallel ranks: use a batch_size divisible by {world}")
    shard = batch // world
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    per_epoch = steps_per_epoch(n, batch)
    total = config.epochs * per_epoch
    every = checkpoint_every or per_epoch
    encoder, critic = build_models(config, device)
    optimizer = make_optimizer(encoder, critic, config.lr)
    generator = make_generator(config.seed, device)
    step, history = 0, []
    data = data_fingerprint(images) if checkpoint is not None else None
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        step, history = _restore(checkpoint, config, data, encoder, critic, optimizer, generator)
    models = (encoder, critic)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        models = tuple(DistributedDataParallel(m, device_ids=ids) for m in models)
    images = images.to(device)
    main = rank == 0
    bar = progress(total=total, desc=f"train {config.mode} encoder", enabled=show_progress and main)
    bar.update(step)
    while step < total and (stop_after is None or step < stop_after):
        epoch, k = divmod(step, per_epoch)
        idx = epoch_order(n, config.seed, epoch)[k * batch:(k + 1) * batch]
        idx = idx[rank * shard:(rank + 1) * shard].to(device)
        mi = train_step(*models, optimizer, images[idx], config, generator, gather=world > 1)
        history.append(float(mi))
        step += 1
        bar.update(1)
        bar.set_postfix(mi=f"{history[-1]:.3f}", refresh=False)
        if checkpoint is not None and (step % every == 0 or step == total):
            if main:
                _save(checkpoint, config, data, encoder, critic, optimizer, generator, step, total, history)
            if world > 1:  # the file is complete before any rank goes on (and, at the end, returns)
                dist.barrier()
    bar.close()
    encoder.eval()
    critic.eval()
    return EncoderRun(config, encoder, critic, history, step, step >= total)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                 allow_unfinished: bool = False) -> tuple[Encoder, EncoderTrainConfig]:
    """The encoder of an encoder checkpoint (eval mode, on ``device``) and the config it was trained with. A run
    stopped before its last step is refused unless ``allow_unfinished``: its encoder is not the one the config
    describes."""
    check_bool("allow_unfinished", allow_unfinished)
    payload = load_checkpoint(path, CHECKPOINT_KIND)
    with restoring(path, CHECKPOINT_KIND):
        config = EncoderTrainConfig.from_dict(payload["config"])
        step, total = int(payload["step"]), int(payload["total_steps"])
        encoder = Encoder(config.encoder)
        encoder.load_state_dict(payload["encoder"])
    if step < total and not allow_unfinished:
        raise ValueError(f"{path} holds an unfinished run (step {step} of {total}): train-encoder with the same "
                         "settings resumes it to the end (or load it with allow_unfinished=True)")
    return encoder.to(resolve_device(device)).eval(), config


def make_worst_case_step(dataset: str = "cifar10", batch_size: int = 128, backend: str = "auto",
                         device: str | torch.device = "cpu", seed: int = 0) -> Callable[[], torch.Tensor]:
    """A zero-argument callable performing one worst-case-MI training step (PGD with the dataset's paper settings,
    then an Adam update) of the paper's encoder and critic on fixed synthetic data of the dataset's shape.

    For benchmarks: ``backend`` selects the MI bound's implementation ("auto" = fused, "torch" = eager on
    materialised score matrices); everything else is identical. The callable returns the step's Î (0-d tensor).
    """
    from .settings import dataset_settings

    s = dataset_settings(dataset)
    check_int("batch_size", batch_size, 2)  # the bound needs negatives
    device = resolve_device(device)
    config = default_train_config(dataset, "worst-case", mi=MIConfig(backend=backend), batch_size=batch_size,
                                  seed=seed)
    encoder, critic = build_models(config, device)
    optimizer = make_optimizer(encoder, critic, config.lr)
    x = torch.rand(batch_size, s.channels, s.image_size, s.image_size,
                   generator=torch.Generator().manual_seed(seed)).to(device)
    generator = make_generator(seed, device)
    return lambda: train_step(encoder, critic, optimizer, x, config, generator)


def default_train_config(dataset: str, mode: str, **overrides) -> EncoderTrainConfig:
    """The paper's training configuration for ``dataset`` (architecture, attack, Adam 1e-4, batch 128);
    keyword arguments replace fields (e.g. ``epochs=5``, ``mi=MIConfig("jsd")``, ``attack=...``)."""
    from .critics import critic_config_for
    from .models import encoder_config_for
    from .settings import dataset_settings

    s = dataset_settings(dataset)
    enc = encoder_config_for(s.channels, s.image_size)
    fields = dict(mode=mode, dataset=dataset, encoder=enc, critic=critic_config_for(s.channels, s.image_size, enc.dim),
                  attack=AttackConfig(eps=s.eps, alpha=s.alpha, steps=s.steps), epochs=s.encoder_epochs,
                  lr=s.encoder_lr, batch_size=s.batch_size)
    fields.update(overrides)
    return EncoderTrainConfig(**fields)


# ---------------------------------------------------------------------------------------------------- internals

def _data_parallel(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of the data-parallel run: (0, 1) for a single process."""
    if distributed is not None:
        check_bool("distributed", distributed)
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised and dist.get_world_size() > 1
    if not distributed:
        return 0, 1
    if not initialised:
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group (e.g. launch with "
                           "torchrun and call torch.distributed.init_process_group)")
    return dist.get_rank(), dist.get_world_size()


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


#: What a run that may not resume a checkpoint can do instead.
_ELSEWHERE = "use another checkpoint path, or start over with resume=False (on the command line: --restart)"


def _save(path, config, data, encoder, critic, optimizer, generator, step, total, history) -> None:
    save_checkpoint(path, {
        "config": config.to_dict(),
        "data": data,
        "encoder": encoder.state_dict(),
        "critic": critic.state_dict(),
        "optimizer": optimizer.state_dict(),
        "attack_rng": generator.get_state(),
        "step": step,
        "total_steps": total,
        "history": torch.tensor(history, dtype=torch.float64),
    }, CHECKPOINT_KIND)


def _restore(path, config, data, encoder, critic, optimizer, generator) -> tuple[int, list[float]]:
    payload = load_checkpoint(path, CHECKPOINT_KIND)
    if "data" not in payload:
        raise ValueError(f"{path} holds no digest of the images it was trained on (an rmi_fast older than that "
                         f"record), so this run cannot be checked to go on over the same ones; {_ELSEWHERE}")
    with restoring(path, CHECKPOINT_KIND):
        saved = EncoderTrainConfig.from_dict(payload["config"])
        saved_data = payload["data"]
        step, history, saved_total = payload["step"], payload["history"], payload["total_steps"]
        if not (isinstance(step, int) and isinstance(saved_total, int) and 0 <= step <= saved_total
                and isinstance(history, torch.Tensor) and history.shape == (step,)):
            raise ValueError(f"step {step!r} of {saved_total!r} with a history of shape "
                             f"{tuple(getattr(history, 'shape', ()))}: they must agree")
    if saved != config:
        raise ValueError(f"{path} holds a run with a different config; {_ELSEWHERE} (saved: {saved}, requested: "
                         f"{config})")
    if saved_data != data:  # same config, other data: its steps would stand for other samples, epochs and batches
        raise ValueError(f"{path} holds a run over other images ({saved_data}) than these ({data}); {_ELSEWHERE}")
    with restoring(path, CHECKPOINT_KIND):
        encoder.load_state_dict(payload["encoder"])
        critic.load_state_dict(payload["critic"])
        optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["attack_rng"])
    return step, history.tolist()
