"""The encoder g and the downstream heads of Zhu, Zhang & Evans (ICML 2020).

Paper encoder (32×32 and 28×28 inputs): three 4×4 stride-2 convolutions with 64, 128, 256 channels, then fully
connected layers of 1024 and 64 units; the 64-d output is the representation. Heads: a linear map 64→10 and an MLP
64→200→10. Configurations are frozen dataclasses of plain values, so checkpoints can carry them as dicts.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rmi_fast.checks import check_int

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
        check_conv_config(self, ("in_channels", "image_size", "kernel", "stride", "hidden", "dim"))

    def to_dict(self) -> dict:
        return asdict(self)


def feature_map_size(size: int, layers: int, kernel: int, stride: int) -> int:
    """Side of the feature map after ``layers`` convolutions with padding (kernel − stride) // 2."""
    pad = (kernel - stride) // 2
    for _ in range(layers):
        size = (size + 2 * pad - kernel) // stride + 1
    return size


def check_conv_config(config, sizes: tuple[str, ...]) -> None:
    """What the encoder's and the critic's configs share: the fields ``sizes`` are positive integers,
    ``conv_channels`` a non-empty sequence of them (stored as a tuple), and the convolutions leave at least one
    location of the image."""
    owner = type(config).__name__
    for name in sizes:
        check_int(f"{owner}.{name}", getattr(config, name), 1)
    channels = config.conv_channels
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Iterable):
        raise TypeError(f"{owner}.conv_channels must be a sequence of positive integers, got {channels!r}")
    channels = tuple(check_int(f"{owner}.conv_channels[{i}]", c, 1) for i, c in enumerate(channels))
    if not channels:
        raise ValueError(f"{owner}.conv_channels must hold at least one convolution's channels, got ()")
    object.__setattr__(config, "conv_channels", channels)
    if feature_map_size(config.image_size, len(channels), config.kernel, config.stride) < 1:
        raise ValueError(f"{owner}: {len(channels)} convolutions of kernel {config.kernel}, stride {config.stride} "
                         f"leave nothing of a {config.image_size}×{config.image_size} image")


def check_batch(x: torch.Tensor, config, name: str = "x") -> None:
    """x must be a (B, C, H, W) tensor of the config's channels and image size (shape only: free on any device)."""
    want = (config.in_channels, config.image_size, config.image_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, {want[0]}, {want[1]}, {want[2]}) batch of images, got {got}")


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
        check_batch(x, self.config)
        return self.mlp(self.features(x))


def make_head(kind: str, dim: int = 64, num_classes: int = 10, hidden: int = 200) -> nn.Module:
    """Downstream classifier on the representation: "linear" (dim→classes) or "mlp" (dim→hidden→classes)."""
    check_int("dim", dim, 1)
    check_int("num_classes", num_classes, 2)
    check_int("hidden", hidden, 1)
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
