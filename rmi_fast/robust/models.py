"""The encoder g and the downstream heads of Zhu, Zhang & Evans (ICML 2020).

Paper encoder (32×32 and 28×28 inputs): three 4×4 stride-2 convolutions with 64, 128, 256 channels, then fully
connected layers of 1024 and 64 units; the 64-d output is the representation. Heads: a linear map 64→10 and an MLP
64→200→10. Configurations are frozen dataclasses of plain values, so checkpoints can carry them as dicts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

HEADS = ("linear", "mlp")


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the encoder g: (B, C, H, W) images → (B, dim) representations.

    Each entry of ``conv_channels`` is a ``kernel``×``kernel`` convolution with stride ``stride`` and padding
    (kernel − stride)/2 rounded down, followed by a ReLU; then a ReLU MLP of ``hidden`` units and a linear map to
    ``dim``.
    """

    in_channels: int = 3
    image_size: int = 32
    conv_channels: tuple[int, ...] = (64, 128, 256)
    kernel: int = 4
    stride: int = 2
    hidden: int = 1024
    dim: int = 64

    def __post_init__(self):
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        for name in ("in_channels", "image_size", "kernel", "stride", "hidden", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderConfig.{name} must be a positive integer, got {value!r}")
        if not self.conv_channels or min(self.conv_channels) < 1:
            raise ValueError(f"EncoderConfig.conv_channels must be a non-empty tuple of positive integers, "
                             f"got {self.conv_channels!r}")
        if feature_map_size(self.image_size, len(self.conv_channels), self.kernel, self.stride) < 1:
            raise ValueError(f"{len(self.conv_channels)} convolutions of kernel {self.kernel}, stride {self.stride} "
                             f"leave nothing of a {self.image_size}×{self.image_size} image")

    def to_dict(self) -> dict:
        return asdict(self)


def feature_map_size(size: int, layers: int, kernel: int, stride: int) -> int:
    """Side of the feature map after ``layers`` convolutions with padding (kernel − stride) // 2."""
    pad = (kernel - stride) // 2
    for _ in range(layers):
        size = (size + 2 * pad - kernel) // stride + 1
    return size


def conv_stack(in_channels: int, channels: tuple[int, ...], kernel: int, stride: int) -> nn.Sequential:
    """Convolution + ReLU layers; padding (kernel − stride) // 2 halves the side at kernel 4, stride 2."""
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(in_channels, out, kernel, stride, padding=(kernel - stride) // 2), nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


def encoder_config_for(channels: int, image_size: int) -> EncoderConfig:
    """The paper's encoder for 28×28 and 32×32 images; a scaled-down variant for small images.

    For 8×8 images (scikit-learn's digits) a third stride-2 convolution would reduce the map to a single pixel, and
    the paper's widths (a 4096→1024 layer on 64 input pixels, ~5M parameters for 1.4k training images) would only
    overfit and slow the CPU run. The variant keeps the paper's shape — 4×4 stride-2 convolutions doubling the
    channels, two fully connected layers, the same 64-d representation — with two convolutions (8×8 → 4×4 → 2×2;
    32 and 64 channels) and a 256-unit hidden layer.
    """
    if image_size >= 16:
        return EncoderConfig(in_channels=channels, image_size=image_size)
    return EncoderConfig(in_channels=channels, image_size=image_size, conv_channels=(32, 64), hidden=256)


class Encoder(nn.Module):
    """g: (B, C, H, W) in [0, 1] → (B, dim)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.features = conv_stack(config.in_channels, config.conv_channels, config.kernel, config.stride)
        side = feature_map_size(config.image_size, len(config.conv_channels), config.kernel, config.stride)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.conv_channels[-1] * side * side, config.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden, config.dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(x))


def make_head(kind: str, dim: int = 64, num_classes: int = 10, hidden: int = 200) -> nn.Module:
    """Downstream classifier on the representation: "linear" (dim→classes) or "mlp" (dim→hidden→classes)."""
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    raise ValueError(f"head must be one of {list(HEADS)}, got {kind!r}")


class Classifier(nn.Module):
    """head ∘ g with a frozen encoder: (B, C, H, W) → (B, classes) logits. Gradients still reach the input."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the encoder stays in eval mode
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
