"""ResNet backbones of the NYU mammography models (shared: GMIC uses both, DMV uses ResNet22).

`ResNet22` is the pre-activation ("V2") ResNet-22 of GMIC's global network and of DMV's view
columns; `ResNet18` is the post-activation torchvision-layout ResNet-18 of GMIC's local network.
Attribute names are chosen so that `state_dict()` keys equal the published checkpoints' keys
(architectures.md §1.3, §1.6, §1.9, §2.2).

Speed without changing a bit of the outputs (benchmarks/gmic_forward.py, tests/test_gmic.py):
- ReLUs and residual adds work in place on tensors nothing else reads afterwards, as in the
  published code and torchvision; autograd accepts this, so training uses the same code.
- In eval mode on the CPU without autograd (prediction), tensor layouts are chosen for speed
  where the result stays bit-identical:
  - ResNet-22's stem convolution and max-pool run on a oneDNN (`to_mkldnn`) tensor: the same
    kernel as in the default layout (same sums, same bits), minus the reorder of its
    16 x 1472 x 960 output back to the default layout, which the stock max-pool then reads slowly;
    only the pooled map, four times smaller, is reordered.
  - The layers whose convolutions read at most 16 channels (ResNet-22's first stage, 735 x 479
    for GMIC, and ResNet-18's stem and max-pool) run in channels-last layout: oneDNN's
    channels-last kernels are 2-4x faster there and, with at most 16 input channels (or a 1x1
    kernel), sum in the same order as the default layout; wider 3x3 convolutions sum in another
    order, so the tensors return to the default layout before them. tests/test_gmic.py checks
    the bits against the published code and against the autograd path.
  In training mode or with autograd (gradients through an eval network) nothing but the
  in-place operations changes, so losses and gradients are what they were.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_CHANNELS_LAST = torch.channels_last
# Input channels up to which oneDNN's channels-last 3x3 convolution sums like the default layout.
_NARROW = 16


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _layout_free(x: torch.Tensor, module: nn.Module) -> bool:
    """True when the layout may be chosen for speed: on the CPU, in eval mode (batch statistics
    would be reduced in another order) and with no graph being recorded."""
    return x.device.type == "cpu" and not module.training and not torch.is_grad_enabled()


def _onednn(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    usable = x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    return x.to_mkldnn() if usable and _layout_free(x, module) else x


def _channels_last(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return x.contiguous(memory_format=_CHANNELS_LAST) if _layout_free(x, module) else x


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """Back to the default layout. Each image of a channels-last tensor is an (H*W, C) matrix;
    copying its transpose uses copy_'s blocked 2-D transpose, several times faster than the
    generic 4-D permuting copy of `contiguous()`."""
    if x.is_contiguous():
        return x
    if not x.is_contiguous(memory_format=_CHANNELS_LAST):
        return x.contiguous()
    n, c, h, w = x.shape
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device)
    for image, source in zip(out, x):
        image.view(c, h * w).copy_(source.permute(1, 2, 0).reshape(h * w, c).t())
    return out


def _narrow_input(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The input in a layout in which `conv` gives the default layout's exact result."""
    return x if conv.in_channels <= _NARROW or conv.kernel_size == (1, 1) else _channels_first(x)


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
        activated = F.relu(self.bn1(x), inplace=True)  # BN's backward needs its input, not its output
        residual = x if self.downsample is None else self.downsample(activated)
        out = self.conv1(_narrow_input(activated, self.conv1))
        out = F.relu(self.bn2(out), inplace=True)
        out = self.conv2(_narrow_input(out, self.conv2))
        if out.is_contiguous() and not residual.is_contiguous():
            residual = _channels_first(residual)  # a same-layout add is several times faster
        out += residual  # conv's backward does not need its output
        return out


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
        x = self.first_pool(self.first_conv(_onednn(x, self)))
        x = _channels_last(x.to_dense() if x.is_mkldnn else x, self)  # stage 0 has 16 channels
        for stage in self.layer_list:
            for block in stage:
                x = block(x)
        return F.relu(self.final_bn(_channels_first(x)), inplace=True)


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
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += residual  # BN's backward needs its input, not its output
        return F.relu(out, inplace=True)


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
        if self.conv1.in_channels > 1 and self.conv1.in_channels <= _NARROW:
            x = _channels_last(x, self)  # the stem and its max-pool; layer 1 reads 64 channels
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.layer4(self.layer3(self.layer2(self.layer1(_channels_first(x)))))
