"""GMIC-ResNet-18 (globally-aware multiple instance classifier) as a model plugin.

The network follows NYU's published GMIC (architectures.md §1) closely enough that the published
checkpoints `sample_model_{1..5}.p` load unchanged:

- global network: pre-activation ResNet-22 (stem padding 3) giving h_g, 256 x 46 x 30 at 2944 x 1920;
- saliency maps: 1x1 conv 256 -> 2 without bias, sigmoid (channel 0 benign, 1 malignant);
  y_global = mean of each map's top t% cells;
- ROI retrieval: the two maps, each min-max normalised, are summed; K times, the window of the
  crop's size on the map grid (4 x 4 cells at full size) with the largest mean is picked and its
  cells zeroed; the upper-left corners are scaled to the input (multiples of 64 px at full size);
- local network: ResNet-18 on each crop of the standardised input (replicated to 3 channels),
  spatially averaged to 512-d;
- gated-attention MIL (no biases) over the K crops gives z; y_local = sigmoid(classifier_linear(z));
- y_fusion = sigmoid(fusion_dnn([spatial max of h_g, z])), the prediction.

Every size (saliency grid, window on the grid, grid-to-pixel scale) is derived from the feature
map actually produced, so small configurations work too. Two guards only matter for them: a
window covers at least one grid cell and top-t% keeps at least one cell (at full size the
published values, 4 x 4 and 28 cells, are unchanged); crops reaching past the input are filled
with the image's minimum, as published.

Each image is predicted on its own, after the published preprocessing (`_mammography.prepare`:
all views turned to face right, background crop, optimal-centre window of `input_size` without
noise, per-image standardisation). A case (a breast) gets the mean over its images of the chosen
column of y_fusion (malignant by default, benign with `output: benign`).

Training (`network`, `loss`, `checkpoint`) is our own choice, since the published repositories
contain no training code: the loss is the BCE of y_fusion's chosen column plus, as auxiliary terms
after the GMIC paper, the BCE of y_global's and y_local's same column and `saliency_penalty`
times the L1 norm of that class's saliency map. With one label per case only the chosen class's
outputs are supervised. Each image takes its case's label, and its window is drawn with the
published position/size noise (`train_crop_noise`, `train_crop_size_noise`) from a generator
seeded from torch's global RNG.

Checkpoints are bare state dicts as published; `shared_rep_filter.*` and `num_batches_tracked`
are ignored, every other key is checked by name and shape.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

from . import _mammography
from ._resnet import ResNet18, ResNet22

CLASSES = ("benign", "malignant")
_CHECKPOINTS = "observers.checkpoints"


def _size_pair(value) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"input_size must be two whole numbers (rows, columns), got {value!r}")
    try:
        rows, columns = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be two whole numbers (rows, columns), got {value!r}") from None
    return rows, columns


def _positive(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _non_negative(instance, attribute, value):
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _fraction(instance, attribute, value):
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


@attrs.frozen
class Options:
    input_size: tuple = attrs.field(default=(2944, 1920), converter=_size_pair)
    crop_size: int = attrs.field(default=256, validator=_positive)  # ROI patch side, input pixels
    num_crops: int = attrs.field(default=6, validator=_positive)  # K
    percent_t: float = attrs.field(default=0.02, validator=_fraction)  # 0.02/0.03/0.03/0.05/0.10 for models 1-5
    output: str = attrs.field(default="malignant", validator=attrs.validators.in_(CLASSES))
    horizontal_flip: bool = False  # the exam's flag: True when the L views are the mirrored ones
    saliency_penalty: float = attrs.field(default=1e-4, validator=_non_negative)  # training only
    train_crop_noise: int = attrs.field(default=100, validator=_non_negative)  # training only, px
    train_crop_size_noise: int = attrs.field(default=100, validator=_non_negative)  # training only, px

    def __attrs_post_init__(self):
        if min(self.input_size) < 32:
            raise ValueError(f"input_size must be at least 32 x 32, got {self.input_size}")
        if self.crop_size > min(self.input_size):
            raise ValueError(f"crop_size {self.crop_size} does not fit in input_size {self.input_size}")


# --------------------------------------------------------------------------- network parts

def top_t_mean(saliency: torch.Tensor, percent_t: float) -> torch.Tensor:
    """(N, C, h, w) -> (N, C): mean of each map's largest round(h*w*t) cells (at least one)."""
    n, c, h, w = saliency.shape
    count = max(1, int(round(h * w * percent_t)))
    return saliency.flatten(2).topk(count, dim=2).values.mean(dim=2)


def cam_patch_size(cam_size: tuple, input_size: tuple, crop_size: int) -> tuple:
    """The crop's extent on the saliency grid: round(crop * cells / pixels) per axis, within [1, cells]."""
    return tuple(min(cells, max(1, int(round(crop_size * cells / pixels))))
                 for cells, pixels in zip(cam_size, input_size))


def retrieve_rois(saliency: torch.Tensor, patch_size: tuple, count: int) -> torch.Tensor:
    """Greedy ROI retrieval on the saliency grid: (N, C, h, w) -> upper-left cells (N, count, 2) as (row, col).

    The class maps are min-max normalised per image and summed; each round takes the window of
    `patch_size` with the largest mean (first in row-major order on ties) and zeroes its cells, so
    later windows may overlap it but gain nothing from the overlap."""
    maps = saliency.detach().flatten(2)
    low = maps.min(dim=2, keepdim=True).values
    span = maps.max(dim=2, keepdim=True).values - low
    # A constant map divides 0 by 0 in the published code; here it contributes zeros instead.
    combined = ((maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny)).sum(dim=1)
    n, _, h, w = saliency.shape
    combined = combined.view(n, 1, h, w)
    rows, cols = (torch.arange(size, device=saliency.device) for size in (h, w))
    pooled_width = w - patch_size[1] + 1
    corners = []
    for _ in range(count):
        best = F.avg_pool2d(combined, patch_size, stride=1).flatten(1).argmax(dim=1)
        row, col = best // pooled_width, best % pooled_width
        in_rows = (rows[None] >= row[:, None]) & (rows[None] < row[:, None] + patch_size[0])
        in_cols = (cols[None] >= col[:, None]) & (cols[None] < col[:, None] + patch_size[1])
        picked = in_rows[:, :, None] & in_cols[:, None, :]
        combined = combined * (~picked)[:, None]
        corners.append(torch.stack([row, col], dim=1))
    return torch.stack(corners, dim=1)


def cells_to_pixels(corners: torch.Tensor, cam_size: tuple, input_size: tuple) -> torch.Tensor:
    """Grid cells -> input pixels: round(cell / cells * pixels) per axis (x64 at full size)."""
    cells = torch.tensor(cam_size, dtype=torch.float64, device=corners.device)
    pixels = torch.tensor(input_size, dtype=torch.float64, device=corners.device)
    return torch.round(corners.to(torch.float64) / cells * pixels).to(torch.long)


def crop_patches(images: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) images and (N, K, 2) upper-left pixels -> (N, K, size, size); any part past the
    bottom/right edge is filled with the image's minimum."""
    n, height, width = images.shape
    patches = images.new_empty((n, corners.shape[1], size, size))
    for image, image_corners, out in zip(images, corners.tolist(), patches):
        for (r, c), patch in zip(image_corners, out):
            inside = image[r:r + size, c:c + size]
            if inside.shape != patch.shape:  # the part past the edge takes the image's minimum
                patch.fill_(image.min())
            patch[:inside.shape[0], :inside.shape[1]] = inside
    return patches


@attrs.frozen(eq=False)
class GmicOutput:
    fusion_logits: torch.Tensor  # (N, 2)
    local_logits: torch.Tensor  # (N, 2)
    y_global: torch.Tensor  # (N, 2), probabilities
    saliency: torch.Tensor  # (N, 2, h, w), probabilities
    patch_locations: torch.Tensor  # (N, K, 2) upper-left (row, col) in input pixels
    attention: torch.Tensor  # (N, K)

    @property
    def y_fusion(self) -> torch.Tensor:
        return torch.sigmoid(self.fusion_logits)

    @property
    def y_local(self) -> torch.Tensor:
        return torch.sigmoid(self.local_logits)


class SaliencyHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gn_conv_last = nn.Conv2d(channels, len(CLASSES), 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gn_conv_last(features))


class GmicNetwork(nn.Module):
    """Attribute names (and their order) give the published checkpoints' state-dict keys."""

    def __init__(self, options: Options):
        super().__init__()
        self.options = options
        self.ds_net = ResNet22(in_channels=1, first_padding=3)
        self.left_postprocess_net = SaliencyHead(self.ds_net.out_channels)
        self.dn_resnet = ResNet18(in_channels=3)
        local, hidden = self.dn_resnet.out_channels, 128
        self.mil_attn_V = nn.Linear(local, hidden, bias=False)
        self.mil_attn_U = nn.Linear(local, hidden, bias=False)
        self.mil_attn_w = nn.Linear(hidden, 1, bias=False)
        self.classifier_linear = nn.Linear(local, len(CLASSES), bias=False)
        self.fusion_dnn = nn.Linear(self.ds_net.out_channels + local, len(CLASSES))

    def forward(self, images: torch.Tensor) -> GmicOutput:
        """Standardised images (N, 1, H, W) -> every output of GMIC."""
        features = self.ds_net(images)
        saliency = self.left_postprocess_net(features)
        cam_size, input_size = tuple(saliency.shape[2:]), tuple(images.shape[2:])
        patch = cam_patch_size(cam_size, input_size, self.options.crop_size)
        corners = cells_to_pixels(retrieve_rois(saliency, patch, self.options.num_crops), cam_size, input_size)
        crops = crop_patches(images[:, 0], corners, self.options.crop_size)
        n, k, size, _ = crops.shape
        crop_features = self.dn_resnet(crops.reshape(n * k, 1, size, size).expand(-1, 3, -1, -1))
        # Rows, then columns, as published: one mean over both sums in another order, which
        # changes the last bit on some sizes and CPUs.
        crop_features = crop_features.mean(dim=2).mean(dim=2).view(n, k, -1)
        gate = torch.sigmoid(self.mil_attn_U(crop_features)) * torch.tanh(self.mil_attn_V(crop_features))
        attention = torch.softmax(self.mil_attn_w(gate).squeeze(2), dim=1)
        z = (attention[:, :, None] * crop_features).sum(dim=1)
        global_vector = features.amax(dim=(2, 3))
        return GmicOutput(
            fusion_logits=self.fusion_dnn(torch.cat([global_vector, z], dim=1)),
            local_logits=self.classifier_linear(z),
            y_global=top_t_mean(saliency, self.options.percent_t),
            saliency=saliency,
            patch_locations=corners,
            attention=attention,
        )


# --------------------------------------------------------------------------- checkpoints

def _ignored(key: str) -> bool:
    return key.startswith("shared_rep_filter.") or key.endswith("num_batches_tracked")


def load_state(network: GmicNetwork, state, source: str) -> None:
    """Strictly check a published-layout state dict (bar the ignored keys) and load it."""
    if not isinstance(state, dict):
        raise PerceptcoreError(f"{source}: expected a state dict (tensor names to tensors), got {type(state).__name__}",
                               _CHECKPOINTS)
    expected = {k: v for k, v in network.state_dict().items() if not _ignored(k)}
    given = {k: v for k, v in state.items() if not _ignored(str(k))}
    for key in expected:
        if key not in given:
            raise PerceptcoreError(f"{source}: missing key {key!r} (shape {list(expected[key].shape)})", _CHECKPOINTS)
    for key, value in given.items():
        if key not in expected:
            raise PerceptcoreError(f"{source}: unexpected key {key!r} (not part of GMIC)", _CHECKPOINTS)
        if not isinstance(value, torch.Tensor):
            raise PerceptcoreError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor", _CHECKPOINTS)
        if value.shape != expected[key].shape:
            raise PerceptcoreError(f"{source}: key {key!r} has shape {list(value.shape)} in the checkpoint, "
                                   f"GMIC expects {list(expected[key].shape)}", _CHECKPOINTS)
    result = network.load_state_dict(given, strict=False)
    assert not result.unexpected_keys and all(_ignored(k) for k in result.missing_keys), result


# --------------------------------------------------------------------------- preprocessing

def prepare_view(image, options: Options, generator: np.random.Generator | None = None):
    """One ViewImage -> `_mammography.Prepared` (window of input_size, standardised). Without a
    generator the window is deterministic (no noise, no noise margins), as in GMIC's inference."""
    try:
        return _mammography.prepare(
            image.pixels.to(torch.float32), image.laterality, image.view, options.input_size,
            horizontal_flip=options.horizontal_flip, generator=generator,
            max_crop_noise=(options.train_crop_noise, options.train_crop_noise),
            max_crop_size_noise=options.train_crop_size_noise,
        )
    except ValueError as exc:  # e.g. a laterality other than left/right
        raise PerceptcoreError(f"{image.view} image: {exc}", "images") from None


def _device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def _images(cases: list):
    """(index of the case, case, image) for every image of every case."""
    for index, case in enumerate(cases):
        if not case.images:
            raise PerceptcoreError(f"case {case.case!r} has no images", "images")
        yield from ((index, case, image) for image in case.images)


@attrs.frozen(eq=False)
class ImageExplanation:
    """What GMIC saw and concluded for one image, for figures (all arrays numpy)."""

    case: str
    view: str
    laterality: str
    image: np.ndarray  # (H, W) the standardised window the network saw, facing right
    window: tuple  # (top, bottom, left, right) of that window in the flipped, cropped image
    saliency: np.ndarray  # (2, h, w): benign, malignant
    patch_locations: np.ndarray  # (K, 2) upper-left (row, col) in window pixels, greedy order
    patch_size: int
    attention: np.ndarray  # (K,)
    probabilities: np.ndarray  # (2,) y_fusion: benign, malignant
    y_global: np.ndarray  # (2,)
    y_local: np.ndarray  # (2,)


# --------------------------------------------------------------------------- the plugin

class Gmic:
    name = "gmic"
    Options = Options

    def network(self, options: Options) -> GmicNetwork:
        return GmicNetwork(options)

    def checkpoint(self, network: GmicNetwork) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}

    def load(self, checkpoint: Path, options: Options, device: str) -> GmicNetwork:
        network = GmicNetwork(options)
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable, or a pickle holding more than tensors
            raise PerceptcoreError(f"{checkpoint}: not a readable torch checkpoint "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                                   _CHECKPOINTS) from None
        load_state(network, state, str(checkpoint))
        return network.to(device).eval()

    def _forward(self, network: GmicNetwork, image, generator=None):
        prepared = prepare_view(image, network.options, generator)
        return prepared, network(prepared.image.to(_device(network))[None, None])

    def predict(self, loaded: GmicNetwork, cases: list) -> np.ndarray:
        """Per case: the mean over its images of y_fusion's chosen column (one image per forward, as published)."""
        column = CLASSES.index(loaded.options.output)
        per_case = [[] for _ in cases]
        with torch.inference_mode():
            for index, _, image in _images(cases):
                _, output = self._forward(loaded, image)
                per_case[index].append(float(output.y_fusion[0, column]))
        return np.array([np.mean(probabilities) for probabilities in per_case])

    def explain(self, loaded: GmicNetwork, cases: list) -> list:
        """One ImageExplanation per image, cases in order, images in case order."""
        explanations = []
        with torch.inference_mode():
            for _, case, image in _images(cases):
                prepared, output = self._forward(loaded, image)
                explanations.append(ImageExplanation(
                    case=case.case, view=image.view, laterality=image.laterality,
                    image=prepared.image.cpu().numpy(), window=tuple(prepared.window),
                    saliency=output.saliency[0].cpu().numpy(),
                    patch_locations=output.patch_locations[0].cpu().numpy(),
                    patch_size=loaded.options.crop_size,
                    attention=output.attention[0].cpu().numpy(),
                    probabilities=output.y_fusion[0].cpu().numpy(),
                    y_global=output.y_global[0].cpu().numpy(),
                    y_local=output.y_local[0].cpu().numpy(),
                ))
        return explanations

    def loss(self, network: GmicNetwork, cases: list, labels: torch.Tensor) -> torch.Tensor:
        options = network.options
        column = CLASSES.index(options.output)
        labels = torch.as_tensor(labels, dtype=torch.float32)
        images, targets = [], []
        for index, _, image in _images(cases):
            seed = int(torch.randint(0, 2**62, ()))  # torch's global RNG drives all augmentation
            images.append(prepare_view(image, options, np.random.default_rng(seed)).image)
            targets.append(labels[index])
        device = _device(network)
        output = network(torch.stack(images).to(device)[:, None])
        targets = torch.stack(targets).to(device=device, dtype=torch.float32)
        epsilon = 1e-6  # y_global is a mean of sigmoids; keep its log finite
        # In float32 outside autocast (mixed precision): CUDA's autocast refuses binary_cross_entropy.
        with torch.autocast(device.type, enabled=False):
            y_global = output.y_global[:, column].float().clamp(epsilon, 1 - epsilon)
            return (F.binary_cross_entropy_with_logits(output.fusion_logits[:, column].float(), targets)
                    + F.binary_cross_entropy(y_global, targets)
                    + F.binary_cross_entropy_with_logits(output.local_logits[:, column].float(), targets)
                    + options.saliency_penalty * output.saliency[:, column].float().sum(dim=(1, 2)).mean())


@hookimpl
def perceptcore_register_models(register):
    register(Gmic())
