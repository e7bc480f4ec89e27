"""A convolutional stem for the from-scratch ViT (``model.vision.stem: conv``), after Xiao et al. 2021, "Early
Convolutions Help Transformers See Better": 3×3 stride-2 convolutions with ReLU, halving the resolution
log2(patch_size) times, then a 1×1 convolution to the ViT's width. It replaces the patch embedding (one
linear map per non-overlapping patch) with the same token grid, each token computed from an overlapping
window, so an object's outline counts the same wherever the patch borders cut it."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvStem(nn.Module):
    """``(N, 3, S, S) -> (N, hidden, S/patch, S/patch)``, like the patch embedding it replaces."""

    def __init__(self, patch_size: int, hidden_size: int):
        super().__init__()
        steps = int(math.log2(patch_size))
        if 2**steps != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch_size, got {patch_size}")
        layers: list[nn.Module] = []
        channels = 3
        for i in range(steps):
            out = max(16, hidden_size // 2 ** (steps - 1 - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(channels, hidden_size, 1))
        self.convs = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight: transformers reads the input dtype from the patch embedding's."""
        return self.convs[0].weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.convs(pixel_values)
