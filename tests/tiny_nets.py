"""Small networks shared by the attack and contract tests (not collected: no test_ prefix)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """conv3x3(1->4) - BatchNorm - ReLU - maxpool2 (``features``, [B, 64]) - linear(64 -> 10), for 1x8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 10)

    def features(self, x):
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))
