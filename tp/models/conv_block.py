"""A small convolutional network, registered as family ``conv_example``.

Each block widens C channels to 2C, applies a GELU, narrows back to C and adds the residual,
the convolutional counterpart of a transformer MLP. ``tp.apply(model, mesh)`` shards conv1 on
its output channels and conv2 on its input channels (registry.toml), which costs one
all-reduce per block in the forward and one in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    """``x + conv2(gelu(conv1(x)))`` with conv1: C -> 2C and conv2: 2C -> C, 3x3, same size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.conv2 = nn.Conv2d(2 * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(x)))


class ConvNet(nn.Module):
    """A stem convolution, a stack of ``ConvBlock`` and a classifier head.

    Example::
        >>> model = ConvNet(in_channels=3, channels=8, num_blocks=2, num_classes=10)
        >>> model(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, channels: int = 8, num_blocks: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(channels) for _ in range(num_blocks))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(-2, -1)))
