"""A small CNN that labels digit images: the judge behind `eval/class_acc` and FD-digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 16  # every image is resized to 16x16 grayscale before classification


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, 1, 16, 16) in [0, 1] (grayscale, bilinear, antialiased)."""
    x = images.float().mean(dim=-1, keepdim=True) / 255.0  # (B, H, W, 1)
    x = x.permute(0, 3, 1, 2)  # (B, 1, H, W)
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


class DigitsClassifier(nn.Module):
    """conv-conv-pool-conv-pool -> 128-d features -> 10 logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 16, 16) -> (B, 128)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 8, 8)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 16, 16) -> (B, classes)
        return self.head(self.features(x))
