"""The benchmark's model: a small CNN made of the layer types the exact per-sample transform supports."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SmallCNN", "build_model"]


class SmallCNN(nn.Module):
    """Conv2d → BatchNorm2d → ReLU, three times, then global average pooling and a Linear head.

    In eval mode BatchNorm2d is a per-channel affine map, so interpolating its weights and running statistics is
    the same operation as for CLIP's LayerNorm affine parameters.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_model(width: int = 16, num_classes: int = 10, seed: int = 0) -> SmallCNN:
    """A freshly initialized model; the seed fixes the initialization."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(width=width, num_classes=num_classes)
