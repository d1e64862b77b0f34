"""DMV: the view-wise deep multi-view breast cancer classifier (Wu et al., architectures.md §2).

Network: four views (L-CC, R-CC, L-MLO, R-MLO) pass through two ResNet-22 columns, `cc` and
`mlo` (left and right share a column), each global-average-pooled to 256 features. Per angle,
[left, right] (512) -> `fc1` Linear 512->512 + ReLU -> `output_layer.fc_layer` Linear 512->8,
reshaped to (4, 2) and log-softmaxed; rows left_benign, right_benign, left_malignant,
right_malignant, column 1 the positive class. Probabilities (not logits) are averaged over CC
and MLO and then over the test-time-augmentation windows. Gaussian input noise (sd 0.01) is
added in train mode only. `channels: 1` is the image-only model (6,132,592 parameters),
`channels: 3` the image-and-heatmaps model (6,135,728).

Preprocessing is the published one (`_mammography`): orientation flip, background crop,
optimal centre and window of `cc_size` / `mlo_size`, standardisation. With `augmentations: n`
(published: 10) each view is cut n times with random position and size noise and the n
predictions are averaged; `augmentations: 0` uses the deterministic window. The windows of a
case come from a NumPy generator seeded with (`seed`, the case id), so a case's prediction
does not depend on which other cases share its batch or their order.

Cases: a case's images are put into the four slots by laterality and view (a view starting
with "MLO", any case, is MLO; anything else CC); two images in one slot are an error. A
missing slot is a blank (zero, i.e. already standardised) window. perceptcore's case is
usually one breast, so DMV then sees a blank contralateral breast — unlike the published,
exam-level use with all four views — and the case's P(positive) is the `output` row
(malignant or benign) of that breast's laterality. A case holding both breasts gets the
larger of the two breasts' probabilities.

Checkpoints: `{"model": state_dict}` as published (other top-level keys ignored), read with
`torch.load(..., weights_only=True)`. The state dict holds the ResNet keys six times
(`four_view_resnet.{cc,mlo,l_cc,l_mlo,r_cc,r_mlo}.*`, the published module registering its two
columns under six names); `cc`/`mlo` are used and the l_/r_ copies, when present, must equal
them. Every other key must match exactly in name and shape (missing or extra
`num_batches_tracked` are tolerated). `checkpoint` writes all six copies, so published loaders
and `load` both read it.

Heatmaps: the image-and-heatmaps variant (`channels: 3`) takes [standardised image, benign
heatmap, malignant heatmap] per view. The heatmaps come from the published patch classifier
(`_patch_classifier`, §2.8; its bare state dict is `patch_checkpoint`, e.g. the published
`sample_patch_model.p`), computed once per image on the flipped, cropped image, then cut with
exactly the image's window (same padding, noise and bicubic resize) and not standardised.
`network` and `load` load the patch classifier along with the model; it is frozen (never part
of the DMV state dict or its checkpoint), so training computes the heatmaps under no_grad.
Without `patch_checkpoint`, `channels: 3` networks build and load but predicting or training
raises an error saying the patch classifier is needed.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional  # the spec reader understands typing.Union, not PEP 604 unions

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

from . import _mammography, _patch_classifier
from ._resnet import ResNet22

SLOTS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
ROWS = {("benign", "left"): 0, ("benign", "right"): 1, ("malignant", "left"): 2, ("malignant", "right"): 3}
COPIES = {"l_cc": "cc", "r_cc": "cc", "l_mlo": "mlo", "r_mlo": "mlo"}
INPUT_NOISE_SD = 0.01
MIN_SIZE = 11  # the smallest window the 7x7/2 stem and 3x3/2 pool leave a feature map for


def _pair(value) -> tuple:
    """Two whole numbers (the spec gives tuples as text)."""
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(items) != 2:
        raise ValueError(f"expected two whole numbers, got {list(items)!r}")
    try:
        return tuple(int(str(item).strip()) for item in items)
    except ValueError:
        raise ValueError(f"expected two whole numbers, got {list(items)!r}") from None


def _window_size(instance, attribute, value):
    if min(value) < MIN_SIZE:
        raise ValueError(f"{attribute.name} must be at least {MIN_SIZE} x {MIN_SIZE}, got {value[0]} x {value[1]}")


def _non_negative(instance, attribute, value):
    values = value if isinstance(value, tuple) else (value,)
    if any(v < 0 for v in values):
        raise ValueError(f"{attribute.name} must not be negative, got {value!r}")


def _heatmaps_only(instance, attribute, value):
    if value is not None and instance.channels != 3:
        raise ValueError("patch_checkpoint is only used by the image-and-heatmaps model (channels: 3)")


@attrs.frozen
class Options:
    channels: int = attrs.field(default=1, validator=attrs.validators.in_((1, 3)))
    cc_size: tuple = attrs.field(default=(2677, 1942), converter=_pair, validator=_window_size)
    mlo_size: tuple = attrs.field(default=(2974, 1748), converter=_pair, validator=_window_size)
    augmentations: int = attrs.field(default=10, validator=_non_negative)
    max_crop_noise: tuple = attrs.field(default=(100, 100), converter=_pair, validator=_non_negative)
    max_crop_size_noise: int = attrs.field(default=100, validator=_non_negative)
    horizontal_flip: bool = False
    output: str = attrs.field(default="malignant", validator=attrs.validators.in_(("malignant", "benign")))
    crop_iterations: int = attrs.field(default=100, validator=_non_negative)
    crop_buffer: int = attrs.field(default=50, validator=_non_negative)
    seed: int = attrs.field(default=0, validator=_non_negative)
    # A file: perceptcore resolves it against the spec's data_dir and keys its cache by its contents.
    patch_checkpoint: Optional[str] = attrs.field(default=None, converter=attrs.converters.optional(str),
                                                  validator=_heatmaps_only, metadata={"file": True})


class Heatmapper:
    """The frozen patch classifier, kept off the DMV module tree (a plain object, not an
    nn.Module attribute) so that it never enters DMV's state dict, parameters or checkpoint."""

    def __init__(self, network: nn.Module, seed: int):
        self.network, self.seed = network, seed

    def __call__(self, cropped: torch.Tensor) -> torch.Tensor:
        """(2, h, w) [benign, malignant] heatmaps, the order of DMV's channels 1 and 2."""
        malignant, benign = _patch_classifier.heatmaps(self.network, cropped, self.seed)
        return torch.stack([benign, malignant])


class FourViewResNet(nn.Module):
    """Two columns registered under six names, like the published module, so that
    `state_dict()` has the published six copies while the parameters are shared."""

    def __init__(self, channels: int):
        super().__init__()
        self.cc = ResNet22(in_channels=channels, first_padding=0)
        self.mlo = ResNet22(in_channels=channels, first_padding=0)
        self.l_cc, self.l_mlo, self.r_cc, self.r_mlo = self.cc, self.mlo, self.cc, self.mlo


class OutputLayer(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.fc_layer = nn.Linear(features, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc_layer(x).view(-1, 4, 2), dim=-1)


class DmvNetwork(nn.Module):
    def __init__(self, options: Options):
        super().__init__()
        self.options = options
        self.heatmapper: Heatmapper | None = None  # set by the plugin for channels: 3
        self.four_view_resnet = FourViewResNet(options.channels)
        self.fc1_cc = nn.Linear(512, 512)
        self.fc1_mlo = nn.Linear(512, 512)
        self.output_layer_cc = OutputLayer(512)
        self.output_layer_mlo = OutputLayer(512)

    def forward(self, views: dict) -> dict:
        """{slot: (N, C, H, W)} for the four SLOTS -> {"CC", "MLO": (N, 4, 2) log-probabilities}."""
        pooled = {}
        for slot in SLOTS:
            x = views[slot]
            if self.training:
                x = x + INPUT_NOISE_SD * torch.randn_like(x)
            column = self.four_view_resnet.mlo if slot.endswith("MLO") else self.four_view_resnet.cc
            pooled[slot] = column(x).mean(dim=(2, 3))
        cc = F.relu(self.fc1_cc(torch.cat([pooled["L-CC"], pooled["R-CC"]], dim=1)))
        mlo = F.relu(self.fc1_mlo(torch.cat([pooled["L-MLO"], pooled["R-MLO"]], dim=1)))
        return {"CC": self.output_layer_cc(cc), "MLO": self.output_layer_mlo(mlo)}


def breast_probabilities(log_probabilities: dict) -> torch.Tensor:
    """(N, 4): P(positive) per row, the mean of the CC and MLO probabilities."""
    return (log_probabilities["CC"][..., 1].exp() + log_probabilities["MLO"][..., 1].exp()) / 2


# --------------------------------------------------------------------------- cases

def arrange(case) -> dict:
    """{slot: ViewImage} of a case; two images in one slot are an error naming the case."""
    slots = {}
    for image in case.images:
        side = image.laterality.lower()
        if side not in ("left", "right"):
            raise PerceptcoreError(f"case {case.case!r}: laterality must be left or right, got {image.laterality!r}",
                                   "images.manifest")
        slot = f"{side[0].upper()}-{_mammography.view_kind(image.view)}"
        if slot in slots:
            raise PerceptcoreError(f"case {case.case!r} has two {slot} images ({slots[slot].view!r} and "
                                   f"{image.view!r}); DMV takes one image per breast and view", "images.manifest")
        # Windows are cut on the CPU (blank slots and heatmaps are CPU tensors); predict and loss move
        # the finished windows to the network's device.
        slots[slot] = image if image.pixels.device.type == "cpu" else attrs.evolve(image, pixels=image.pixels.cpu())
    if not slots:
        raise PerceptcoreError(f"case {case.case!r} has no images", "images.manifest")
    return slots


def case_generator(seed: int, case_id: str) -> np.random.Generator:
    """The case's own window generator: the same for the same (seed, case) in any batch."""
    digest = int.from_bytes(hashlib.sha256(str(case_id).encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def _size(options: Options, slot: str) -> tuple:
    return options.mlo_size if slot.endswith("MLO") else options.cc_size


def locate_slots(slots: dict, options: Options) -> dict:
    """The deterministic preprocessing of each present slot, done once per image."""
    return {slot: _mammography.locate(image.pixels, image.laterality, slot[2:], _size(options, slot),
                                      options.horizontal_flip, options.crop_iterations, options.crop_buffer)
            for slot, image in slots.items()}


def cut_with_heatmaps(located: _mammography.Located, maps: torch.Tensor, generator: np.random.Generator | None,
                      max_crop_noise: tuple, max_crop_size_noise: int) -> torch.Tensor:
    """(3, H, W): the standardised image window (as `_mammography.cut`, drawing the same numbers
    from `generator`) and the (2, h, w) heatmaps `maps` cut with the same window, zero padding
    and resize, not standardised."""
    if generator is None:
        max_crop_noise, max_crop_size_noise = (0, 0), 0
    shape, size = tuple(located.cropped.shape), located.size
    placement = _mammography.place_window(shape, located.center, located.view, size, max_crop_noise,
                                          max_crop_size_noise)
    window = placement.window
    if generator is not None:
        padded_shape = placement.padded_shape(shape)
        if max_crop_noise[0] > 0 or max_crop_noise[1] > 0:
            window = _mammography.add_position_noise(window, padded_shape, max_crop_noise, generator)
        if max_crop_size_noise > 0:
            window = _mammography.add_size_noise(window, padded_shape, size, max_crop_size_noise, generator)
    image = _mammography.standardise(_mammography.extract(located.cropped, placement, window, size))
    return torch.stack([image] + [_mammography.extract(m, placement, window, size) for m in maps])


def windows(located: dict, options: Options, generator: np.random.Generator | None, maps: dict | None = None) -> dict:
    """{slot: (C, H, W)} windows of the four slots, blank where the case has no image;
    views are cut in SLOTS order so the generator's draws follow a fixed order. With `maps`
    ({slot: (2, h, w)} benign and malignant heatmaps of the cropped images) C = 3."""
    result = {}
    for slot in SLOTS:
        if slot not in located:
            result[slot] = torch.zeros((options.channels, *_size(options, slot)), dtype=torch.float32)
        elif maps is not None:
            result[slot] = cut_with_heatmaps(located[slot], maps[slot], generator, options.max_crop_noise,
                                             options.max_crop_size_noise)
        else:
            result[slot] = _mammography.cut(located[slot], generator, options.max_crop_noise,
                                            options.max_crop_size_noise).image[None]
    return result


def slot_heatmaps(network: DmvNetwork, located: dict, what: str) -> dict | None:
    """{slot: (2, h, w)} heatmaps of each located image for channels: 3 (None for channels: 1)."""
    if network.options.channels == 1:
        return None
    if network.heatmapper is None:
        raise PerceptcoreError(
            f"cannot {what} with channels: 3 without a patch_checkpoint — the image-and-heatmaps model needs the "
            "benign and malignant heatmaps of the patch classifier (DenseNet-121, architectures.md §2.8); set "
            "patch_checkpoint to its state dict (e.g. the published sample_patch_model.p) or use channels: 1",
            "observers.options.patch_checkpoint")
    return {slot: network.heatmapper(item.cropped) for slot, item in located.items()}


def _rows(slots: dict, output: str) -> list:
    """The `output` rows of the breasts a case shows."""
    return [ROWS[(output, "left" if side == "L" else "right")] for side in sorted({slot[0] for slot in slots})]


def _case_value(probabilities: torch.Tensor, slots: dict, output: str) -> torch.Tensor:
    """The case's P(positive): its breasts' `output` rows, the larger when both are present."""
    return probabilities[_rows(slots, output)].max()


# --------------------------------------------------------------------------- checkpoints

def _check_state(state: dict, network: DmvNetwork, where: str) -> dict:
    """The checkpoint's state dict checked against the network's; returns a full state dict."""
    expected = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not str(k).endswith("num_batches_tracked")}
    for key in given:
        if key not in expected:
            raise PerceptcoreError(f"unexpected key {key!r} in the checkpoint's state dict", where)
        if not isinstance(given[key], torch.Tensor):
            raise PerceptcoreError(f"{key!r} is not a tensor", where)
    copy_prefixes = tuple(f"four_view_resnet.{copy}." for copy in COPIES)
    present_copies = {copy for copy in COPIES if any(k.startswith(f"four_view_resnet.{copy}.") for k in given)}
    for key, value in expected.items():
        copy = key.split(".")[1] if key.startswith(copy_prefixes) else None
        if copy is not None and copy not in present_copies:
            continue
        if key not in given:
            raise PerceptcoreError(f"missing key {key!r} in the checkpoint's state dict", where)
        if tuple(given[key].shape) != tuple(value.shape):
            raise PerceptcoreError(f"{key!r} has shape {list(given[key].shape)}, expected {list(value.shape)}", where)
    for key in expected:
        if key.startswith(copy_prefixes) and key.split(".")[1] in present_copies:
            copy = key.split(".")[1]
            original = key.replace(f"four_view_resnet.{copy}.", f"four_view_resnet.{COPIES[copy]}.", 1)
            if not torch.equal(given[key], given[original]):
                raise PerceptcoreError(f"{key!r} differs from {original!r}: the left and right columns of an angle "
                                       "must share their weights", where)
    full = dict(network.state_dict())
    for key in expected:
        source = key
        if key.startswith(copy_prefixes):
            copy = key.split(".")[1]
            source = key.replace(f"four_view_resnet.{copy}.", f"four_view_resnet.{COPIES[copy]}.", 1)
        full[key] = given[source]
    return full


# --------------------------------------------------------------------------- the plugin

class Dmv:
    name = "dmv"
    Options = Options

    def network(self, options: Options) -> DmvNetwork:
        return self._with_heatmapper(DmvNetwork(options), "cpu")

    @staticmethod
    def _with_heatmapper(network: DmvNetwork, device: str) -> DmvNetwork:
        options = network.options
        if options.channels == 3 and options.patch_checkpoint is not None:
            patch_network = _patch_classifier.load_patch_classifier(
                Path(options.patch_checkpoint), "observers.options.patch_checkpoint", device)
            network.heatmapper = Heatmapper(patch_network, options.seed)
        return network

    def load(self, checkpoint: Path, options: Options, device: str) -> DmvNetwork:
        where = f"observers.checkpoints ({checkpoint})"
        try:
            raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a file torch reads without unpickling arbitrary objects
            raise PerceptcoreError(f"not a weights-only torch checkpoint ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})", where) from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise PerceptcoreError("expected a dict with the state dict under 'model', as the published DMV "
                                   "checkpoints", where)
        network = DmvNetwork(options)
        network.load_state_dict(_check_state(raw["model"], network, where))
        return self._with_heatmapper(network.to(device).eval(), device)

    def checkpoint(self, network: DmvNetwork) -> dict:
        return {"model": {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}}

    def predict(self, loaded: DmvNetwork, cases: list) -> np.ndarray:
        options = loaded.options
        loaded.eval()
        device = next(loaded.parameters()).device
        values = []
        for case in cases:
            slots = arrange(case)
            located = locate_slots(slots, options)
            maps = slot_heatmaps(loaded, located, "predict")
            generator = case_generator(options.seed, case.case) if options.augmentations else None
            total = torch.zeros(4, dtype=torch.float64)
            for _ in range(max(options.augmentations, 1)):
                inputs = {slot: x[None].to(device) for slot, x in windows(located, options, generator, maps).items()}
                total += breast_probabilities(loaded(inputs))[0].double().cpu()
            values.append(float(_case_value(total / max(options.augmentations, 1), slots, options.output)))
        return np.clip(np.asarray(values, dtype=float), 0.0, 1.0)

    def loss(self, network: DmvNetwork, cases: list, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of each case's P(positive), one random training window per view
        (position and size noise) drawn from torch's global RNG, plus the input noise of train mode.
        With channels: 3 the frozen patch classifier's heatmaps are computed under no_grad."""
        options = network.options
        device = next(network.parameters()).device
        generator = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        arranged, batch = [], {slot: [] for slot in SLOTS}
        for case in cases:
            slots = arrange(case)
            arranged.append(slots)
            located = locate_slots(slots, options)
            maps = slot_heatmaps(network, located, "train")
            for slot, x in windows(located, options, generator, maps).items():
                batch[slot].append(x)
        output = network({slot: torch.stack(xs).to(device) for slot, xs in batch.items()})
        # P(positive) and P(negative) of a row from log-probabilities, for a stable cross-entropy:
        # mean of exp over CC and MLO = exp(logsumexp - log 2); column 0 is log(1 - p) of each angle.
        both = torch.stack([output["CC"], output["MLO"]])  # (2, N, 4, 2)
        log_mean = torch.logsumexp(both, dim=0) - math.log(2.0)  # (N, 4, 2): log P(neg), log P(pos)
        losses = []
        for i, slots in enumerate(arranged):
            row = max(_rows(slots, options.output), key=lambda r: float(log_mean[i, r, 1].detach()))  # the case's value is its likelier breast
            y = labels[i].to(log_mean.dtype)
            losses.append(-(y * log_mean[i, row, 1] + (1 - y) * log_mean[i, row, 0]))
        return torch.stack(losses).mean()


@hookimpl
def perceptcore_register_models(register):
    register(Dmv())
