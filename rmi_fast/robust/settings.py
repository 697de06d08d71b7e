"""Per-dataset settings of the protocol: the data's shape and the paper's attack (from :data:`data.DATASETS`), plus
the schedule of each stage (epochs, learning rates), chosen so the full protocol fits the hardware it targets."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .data import DATASETS, DataShape


@dataclass(frozen=True)
class ProtocolSettings(DataShape):
    encoder_epochs: int = 100
    encoder_lr: float = 1e-4          # Adam 1e-4: the paper
    critic_width: int | None = None   # None: the architecture's default (2048; 128 for 8×8 images)
    estimation_epochs: int = 20
    estimation_lr: float = 1e-3
    head_epochs: int = 50
    head_lr: float = 1e-3
    threads: int | None = None        # CPU threads; None = all cores. 1 for 8×8 images: their ops are too small for
                                      # intra-op parallelism to pay, and on a busy machine extra threads stall it.


#: Stage schedules. Paper-sized datasets train as long as the paper's released code (100 encoder epochs); the
#: built-in 8×8 digits (1.4k training images) are sized so `rmi-fast reproduce --dataset digits` takes minutes on a
#: 2-core CPU.
_SCHEDULES = {
    # Adam 1e-3 rather than the paper's 1e-4: with ~11 steps per epoch, 1e-4 would need hundreds of epochs.
    "digits": dict(encoder_epochs=20, encoder_lr=1e-3, estimation_epochs=5, estimation_lr=1e-3, head_epochs=20,
                   head_lr=3e-3, threads=1),
}


def dataset_settings(name: str, **overrides) -> ProtocolSettings:
    """The protocol settings of ``name`` (a key of :data:`rmi_fast.robust.data.DATASETS`); keyword arguments
    replace fields (None values are ignored, so unset CLI flags keep the defaults)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    info = DATASETS[name]
    # the data's shape and attack, as the data module states them; then the stage schedule
    base = {f.name: getattr(info, f.name) for f in fields(DataShape)}
    settings = ProtocolSettings(**base, **_SCHEDULES.get(name, {}))
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
