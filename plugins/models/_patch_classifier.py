"""DMV's patch classifier and its benign/malignant heatmaps (architectures.md §2.8).

Network: DenseNet-121 in torchvision's layout (growth 32, bottleneck 4 x growth, blocks
(6, 12, 24, 16), 2 x 2 average-pooling transitions, `classifier` Linear 1024 -> 4), so the
published bare state dict (`sample_patch_model.p`, 606 keys besides `num_batches_tracked`)
loads unchanged; the old torchvision spelling `denselayerN.norm.1` / `conv.1` is accepted too.
Every convolution and the stem max-pool use TensorFlow "SAME" padding, computed from the
input size in the forward pass (total k - s, or k - (n mod s) when s does not divide n; the
larger half at the bottom/right); the transition average pools use none. The published code
gets the same result by wrapping the modules after loading; building it into the forward keeps
the state-dict names fixed. (The published wrapper hands its pads to `F.pad` height-first,
which only works because patches are square; here each axis gets its own pads.)

Heatmaps: the flipped, cropped image standardised over the whole image, cut into 256 x 256
patches (replicated to 3 channels) on a sliding grid with stride 70 shrunk so that the last
patch ends at the border (`patch_starts`); each pixel's heatmap value is the mean softmax
probability over the patches covering it. Softmax column 0 is the malignant heatmap,
column 1 the benign one. The published code picks the one-pixel-shorter strides with Python's
`random` seeded once per run, so its heatmaps depend on the order images are processed in;
here a NumPy generator seeded with `seed` per image (rows first, then columns) picks them, so
an image's heatmaps depend only on the image and the seed. An axis shorter than a patch (not
handled by the published code) is zero-padded at the bottom/right to 256 — zero being the
standardised image's mean — and the heatmap cropped back.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from perceptcore.errors import PerceptcoreError

from . import _mammography

PATCH = 256
STRIDE = 70
BATCH = 100
CLASSES = 4
MALIGNANT, BENIGN = 0, 1
BLOCKS = (6, 12, 24, 16)
GROWTH = 32
BOTTLENECK = 4
STEM = 64


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" (before, after) padding of one axis; the larger half goes after."""
    total = max(0, kernel - (stride if size % stride == 0 else size % stride))
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple, stride: tuple) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x


class SameConv2d(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_pad_same(x, self.kernel_size, self.stride))


class SameMaxPool2d(nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero padding, as the published wrapper (its input is post-ReLU, so zero never exceeds the max)
        return super().forward(_pad_same(x, (self.kernel_size,) * 2, (self.stride,) * 2))


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = SameConv2d(in_channels, BOTTLENECK * GROWTH, 1)
        self.norm2 = nn.BatchNorm2d(BOTTLENECK * GROWTH)
        self.relu2 = nn.ReLU()
        self.conv2 = SameConv2d(BOTTLENECK * GROWTH, GROWTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, in_channels: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_channels + i * GROWTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = SameConv2d(in_channels, out_channels, 1)
        self.pool = nn.AvgPool2d(2, stride=2)


class PatchDenseNet(nn.Module):
    """DenseNet-121 with SAME padding; (N, 3, 256, 256) -> (N, 4) logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", SameConv2d(3, STEM, 7, stride=2))
        self.features.add_module("norm0", nn.BatchNorm2d(STEM))
        self.features.add_module("relu0", nn.ReLU())
        self.features.add_module("pool0", SameMaxPool2d(3, stride=2))
        channels = STEM
        for i, layers in enumerate(BLOCKS):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(layers, channels))
            channels += layers * GROWTH
            if i < len(BLOCKS) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.features(x)).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- checkpoints

_OLD_STYLE = re.compile(r"(denselayer\d+\.)(norm|relu|conv)\.([12])\.")


def new_style(key: str) -> str:
    """torchvision's old `denselayerN.norm.1.weight` spelling -> `denselayerN.norm1.weight`."""
    return _OLD_STYLE.sub(r"\1\2\3.", key)


def load_patch_classifier(path: Path, where: str, device: str = "cpu") -> PatchDenseNet:
    """The published bare state dict, checked strictly (only `num_batches_tracked` may be missing
    or extra), in a network in eval mode."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, or not a file torch reads without unpickling arbitrary objects
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise PerceptcoreError(f"cannot read the patch classifier {str(path)!r} as a weights-only torch "
                               f"checkpoint ({type(exc).__name__}: {first_line})", where) from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise PerceptcoreError(f"{str(path)!r} is not a bare DenseNet-121 state dict of tensors", where)
    network = PatchDenseNet()
    state = network.state_dict()
    given = {new_style(str(k)): v for k, v in raw.items() if not str(k).endswith("num_batches_tracked")}
    for key, value in given.items():
        if key not in state:
            raise PerceptcoreError(f"unexpected key {key!r} in the patch classifier {str(path)!r}", where)
        if tuple(value.shape) != tuple(state[key].shape):
            raise PerceptcoreError(f"{key!r} has shape {list(value.shape)}, expected {list(state[key].shape)} "
                                   f"in the patch classifier {str(path)!r}", where)
    for key in state:
        if not key.endswith("num_batches_tracked") and key not in given:
            raise PerceptcoreError(f"missing key {key!r} in the patch classifier {str(path)!r}", where)
    state.update(given)
    network.load_state_dict(state)
    return network.to(device).eval()


# --------------------------------------------------------------------------- heatmaps

def patch_starts(length: int, generator: np.random.Generator, patch: int = PATCH, stride: int = STRIDE) -> np.ndarray:
    """First pixels of the patches along an axis of `length` (>= patch) pixels. With span =
    length - patch there are span // stride + 1 patches at `stride`; when that misses the
    border, one more patch is added and the span // stride + 1 strides shrink to end exactly
    there: each is stride - overlap // steps, and (overlap mod steps) of them, chosen at random,
    one pixel shorter (overlap = stride - span mod stride)."""
    span = length - patch
    if span % stride == 0:
        strides = np.full(span // stride, stride)
    else:
        steps = span // stride + 1
        overlap = stride - span % stride
        strides = np.full(steps, stride - overlap // steps)
        strides[generator.choice(steps, size=overlap % steps, replace=False)] -= 1
    return np.concatenate([[0], np.cumsum(strides)]).astype(np.int64)


def patch_probabilities(network: nn.Module, image: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                        batch: int = BATCH) -> torch.Tensor:
    """(len(rows), len(cols), 4) softmax probabilities of the patches at those starts of a
    standardised (h, w) image, each patch replicated to 3 channels."""
    device = next(network.parameters()).device
    corners = [(r, c) for r in rows for c in cols]
    out = []
    for first in range(0, len(corners), batch):
        patches = torch.stack([image[r:r + PATCH, c:c + PATCH] for r, c in corners[first:first + batch]])
        logits = network(patches[:, None].expand(-1, 3, -1, -1).to(device))
        out.append(F.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).reshape(len(rows), len(cols), -1)


def heatmaps(network: nn.Module, cropped: torch.Tensor, seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    """(2, h, w) float32 [malignant, benign] heatmaps of a flipped, cropped image (h, w) of grey
    levels: per pixel, the mean probability over the patches covering it."""
    height, width = cropped.shape
    image = _mammography.standardise(cropped.to(torch.float32))
    padded_h, padded_w = max(height, PATCH), max(width, PATCH)
    if (padded_h, padded_w) != (height, width):
        image = F.pad(image, (0, padded_w - width, 0, padded_h - height))
    generator = np.random.default_rng(seed)
    rows, cols = patch_starts(padded_h, generator), patch_starts(padded_w, generator)
    with torch.no_grad():
        probabilities = patch_probabilities(network, image, rows, cols, batch).double()
    total = torch.zeros(2, padded_h, padded_w, dtype=torch.float64)
    count = torch.zeros(padded_h, padded_w, dtype=torch.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            total[:, r:r + PATCH, c:c + PATCH] += probabilities[i, j, [MALIGNANT, BENIGN], None, None]
            count[r:r + PATCH, c:c + PATCH] += 1
    return (total / count)[:, :height, :width].to(torch.float32)
