"""The encode-and-dot-product critic of Deep InfoMax (Hjelm et al. 2019) as used by Zhu, Zhang & Evans.

The critic T(x, z) scores an image x against a representation z = g(x) with two branches that share no parameters
with the encoder g:

    input branch           x (B, C, H, W) → convs → (B, c, h, w) → 1×1 residual block → local (G, B, E),  G = h·w
    representation branch  z (B, d)       → the same kind of block (an MLP)             → rep   (B, E)

    score u[ℓ, i, j] = scale · <rep_i, local_{ℓ, j}>       (pair (i, j) at location ℓ; positives i = j)

Every location ℓ is a group of the score tensor, so a bound on I(X; g(X)) is exactly
``rf.mi_bound(rep, local, bound, scale=scale)``: the 2-D representation side broadcast over the G groups, never
copied (design §1). The bound averages the per-location bounds, as local Deep InfoMax does.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

import rmi_fast as rf

from rmi_fast.checks import check_bool, check_real

from .models import check_batch, check_conv_config, conv_stack, feature_map_size

#: estimators the paper's system trains with (design §5); DV is the paper's choice.
ESTIMATORS = ("dv", "jsd", "infonce")


@dataclass(frozen=True)
class CriticConfig:
    """Architecture of the critic.

    in_channels, image_size: the images; rep_dim: the representation size d; conv_channels, kernel, stride: the
    input branch's convolutions (the paper's CIFAR-10 critic: 64, 128 channels, 4×4 stride 2 → an 8×8 grid of
    G = 64 locations); width: the embedding size E (2048 in the paper); scale: the score scale (None → 1/√E, which
    keeps the scores of LayerNorm-ed embeddings O(1) at initialisation).
    """

    in_channels: int = 3
    image_size: int = 32
    rep_dim: int = 64
    conv_channels: tuple[int, ...] = (64, 128)
    kernel: int = 4
    stride: int = 2
    width: int = 2048
    scale: float | None = None

    def __post_init__(self):
        check_conv_config(self, ("in_channels", "image_size", "rep_dim", "kernel", "stride", "width"))
        if self.scale is not None:
            check_real("CriticConfig.scale", self.scale, positive=True)

    @property
    def locations(self) -> int:
        """G: the number of spatial locations of the input branch."""
        return feature_map_size(self.image_size, len(self.conv_channels), self.kernel, self.stride) ** 2

    @property
    def score_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.width)

    def to_dict(self) -> dict:
        return asdict(self)


def critic_config_for(channels: int, image_size: int, rep_dim: int = 64, width: int | None = None) -> CriticConfig:
    """The paper's critic for 28×28 / 32×32 images (G = 7·7 or 8·8 locations, E = 2048).

    For 8×8 digits: the input branch is two 4×4 stride-2 convolutions of 32 and 64 channels, like the small
    encoder's (a 2×2 grid, G = 4 locations, each seeing about half the digit), and E = 128. The critic runs at
    every PGD step of every training step, so its cost sets the protocol's run time; at this width the whole
    digits protocol runs in minutes on two CPU cores while still separating infomax from worst-case encoders.
    """
    if image_size >= 16:
        return CriticConfig(channels, image_size, rep_dim, width=2048 if width is None else width)
    return CriticConfig(channels, image_size, rep_dim, conv_channels=(32, 64), width=128 if width is None else width)


class ResidualEmbedding(nn.Module):
    """Hjelm et al.'s 1×1 residual block on the last dimension: (..., n_in) → (..., width).

        out = LayerNorm( W_s·h + W_2·ReLU(W_1·h) )

    A linear shortcut plus a one-hidden-layer nonlinear branch; on a feature map it is a stack of 1×1 convolutions,
    applied to each location independently.
    """

    def __init__(self, n_in: int, width: int):
        super().__init__()
        self.nonlinear = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(inplace=True), nn.Linear(width, width))
        self.shortcut = nn.Linear(n_in, width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.nonlinear(h) + self.shortcut(h))


class Critic(nn.Module):
    """T(x, z): the two-branch encode-and-dot-product critic (see the module docstring)."""

    def __init__(self, config: CriticConfig):
        super().__init__()
        self.config = config
        self.features = conv_stack(config.in_channels, config.conv_channels, config.kernel, config.stride)
        self.local_block = ResidualEmbedding(config.conv_channels[-1], config.width)
        self.rep_block = ResidualEmbedding(config.rep_dim, config.width)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """Input branch: (B, C, H, W) → (G, B, E), one embedding per location (locations as groups)."""
        check_batch(x, self.config)
        f = self.features(x)  # (B, c, h, w)
        f = f.flatten(2).permute(2, 0, 1)  # (G, B, c)
        return self.local_block(f)

    def represent(self, z: torch.Tensor) -> torch.Tensor:
        """Representation branch: (B, d) → (B, E)."""
        return self.rep_block(z)

    def forward(self, x: torch.Tensor, z: torch.Tensor, *, bound: str = "dv", diagonal: str = "exclude",
                backend: str = "auto", detach_local: bool = False, reduction: str = "mean",
                gather=False) -> torch.Tensor:
        """The MI bound of the critic's scores on the pairs (x_i, z_i).

        x: (B, C, H, W) images; z: (B, d) their representations.
        bound: "dv" | "jsd" | "infonce"; diagonal: "exclude" or "zero" (the released code's DV, see rf.mi_bound).
        detach_local: stop gradients through the input branch (the released code's worst-case attack).
        reduction: "mean" → 0-d; "none" → (G, B) per-location, per-anchor terms.
        gather: data-parallel: the negatives are the pairs of every rank (see ``rf.mi_bound``).
        """
        if bound not in ESTIMATORS:
            raise ValueError(f"bound must be one of {list(ESTIMATORS)}, got {bound!r}")
        check_bool("detach_local", detach_local)
        local = self.local(x)  # checks x
        if x.shape[0] < 2 and gather is False:
            raise ValueError(f"x: the bound needs at least 2 images (the others' pairs are the negatives), got "
                             f"{x.shape[0]}")
        d = self.config.rep_dim
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape != (x.shape[0], d):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be ({x.shape[0]}, {d}): one {d}-d representation per image of x, got {got}")
        if detach_local:
            local = local.detach()
        rep = self.represent(z)
        # rep (B, E) is broadcast over the G location groups of local (G, B, E): u[ℓ, i, j] = scale·<rep_i, local_ℓj>
        return rf.mi_bound(rep, local, bound, scale=self.config.score_scale, reduction=reduction, backend=backend,
                           diagonal=diagonal, gather=gather)
