"""Model definitions (no torchvision needed) and a registry by name.

Every model takes images in [0, 1] of shape [B, C, H, W] and normalises them
inside (per-channel ``(x - mean) / std`` buffers), so attacks and defences
work in pixel space.  Outputs are logits [B, num_classes].
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected 'bn', 'gn' or 'none', got {norm!r}")


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; the default for 28x28 inputs.

    conv3x3(in->w) - norm - ReLU - maxpool2 - conv3x3(w->2w) - norm - ReLU - maxpool2
    - flatten - linear(2w*(H/4)*(W/4) -> hidden) - ReLU - linear(hidden -> classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, norm: str = "none",
                 width: int = 16, hidden: int = 128, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"), _norm_layer(norm, width),
            nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=norm == "none"), _norm_layer(norm, 2 * width),
            nn.ReLU(inplace=True), nn.MaxPool2d(2))
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, hidden),
                                        nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.n2 = _norm_layer(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The seed's CIFAR ResNet-18: 3x3 stride-1 stem, four stages of two basic blocks
    (64, 128, 256, 512 channels), global average pooling, linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, norm: str = "bn",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        del image_size  # global pooling makes the network size-agnostic
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
                                  _norm_layer(norm, 64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(self.normalize(x)))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "cnn": (SmallCNN, "none"),
    "resnet18": (ResNet18, "bn"),
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, norm: str = "auto",
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Instantiate a registered model.

    Args:
        name: one of ``MODELS`` ("cnn", "resnet18").
        in_channels, num_classes, image_size: input channels, output classes, input side length.
        norm: "bn", "gn", "none", or "auto" (the model's default: none for cnn, bn for resnet18).
        mean, std: per-channel input statistics used by the built-in normalisation
            (``in_channels`` values each, std > 0; default 0.5, mapping [0, 1] to [-1, 1]).

    Raises:
        ValueError: naming the argument (``model`` for an unknown name) and what was expected.
    """
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    if norm not in ("auto", "bn", "gn", "none"):
        raise ValueError(f"norm: expected 'auto', 'bn', 'gn' or 'none', got {norm!r}")
    for arg, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != in_channels:
            raise ValueError(f"{arg}: expected {in_channels} values (one per input channel), got {len(value)}")
    if std is not None and min(std) <= 0:
        raise ValueError(f"std: expected positive values, got {list(std)}")
    if name == "cnn" and image_size % 4:
        raise ValueError(f"image_size: the cnn model needs a multiple of 4, got {image_size}")
    cls, default_norm = MODELS[name]
    return cls(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
               norm=default_norm if norm == "auto" else norm, mean=mean, std=std)
