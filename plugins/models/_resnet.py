"""ResNet backbones of the NYU mammography models (shared: GMIC uses both, DMV uses ResNet22).

`ResNet22` is the pre-activation ("V2") ResNet-22 of GMIC's global network and of DMV's view
columns; `ResNet18` is the post-activation torchvision-layout ResNet-18 of GMIC's local network.
Attribute names are chosen so that `state_dict()` keys equal the published checkpoints' keys
(architectures.md §1.3, §1.6, §1.9, §2.2).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BasicBlockV2: BN-ReLU-conv twice; the shortcut conv (when present) sees the pre-activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut_conv: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # Sequential so the published key reads `downsample.0.weight`; no BN on this branch.
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
                           if shortcut_conv else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        residual = x if self.downsample is None else self.downsample(activated)
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class ResNet22(nn.Module):
    """Stem conv 7x7/2 (no BN/ReLU) -> max-pool 3x3/2 -> 5 stages x 2 pre-activation blocks
    (16-32-64-128-256 channels, strides 1,2,2,2,2) -> final BN -> ReLU.

    `first_padding` is 3 for GMIC and 0 for DMV; every stage's first block, stage 0 included,
    has a 1x1 shortcut conv, as published."""

    channels = (16, 32, 64, 128, 256)
    strides = (1, 2, 2, 2, 2)

    def __init__(self, in_channels: int = 1, first_padding: int = 0):
        super().__init__()
        self.first_conv = nn.Conv2d(in_channels, self.channels[0], 7, stride=2, padding=first_padding, bias=False)
        self.first_pool = nn.MaxPool2d(3, stride=2, padding=0)
        stages, previous = [], self.channels[0]
        for width, stride in zip(self.channels, self.strides):
            stages.append(nn.ModuleList([PreActBlock(previous, width, stride, shortcut_conv=True),
                                         PreActBlock(width, width, 1, shortcut_conv=False)]))
            previous = width
        self.layer_list = nn.ModuleList(stages)
        self.final_bn = nn.BatchNorm2d(previous)

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> feature map (N, 256, h, w) after the final BN and ReLU."""
        x = self.first_pool(self.first_conv(x))
        for stage in self.layer_list:
            for block in stage:
                x = block(x)
        return F.relu(self.final_bn(x))


class PostActBlock(nn.Module):
    """torchvision BasicBlock: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class ResNet18(nn.Module):
    """ResNet-18 V1 in torchvision's layout without `fc`: forward returns the layer-4 feature map
    (N, 512, h, w), e.g. 512x8x8 for a 256x256 crop."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 64, 1)
        self.layer2 = self._layer(64, 128, 2)
        self.layer3 = self._layer(128, 256, 2)
        self.layer4 = self._layer(256, 512, 2)

    @staticmethod
    def _layer(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(PostActBlock(in_channels, out_channels, stride),
                             PostActBlock(out_channels, out_channels, 1))

    @property
    def out_channels(self) -> int:
        return 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
