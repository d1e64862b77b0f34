"""DMV's patch classifier (DenseNet-121, TF SAME padding) and heatmaps against architectures.md §2.8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from perceptcore.errors import PerceptcoreError
from perceptcore_plugins.models import _patch_classifier as pc

WHERE = "observers.options.patch_checkpoint"


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return pc.PatchDenseNet().eval()


# --------------------------------------------------------------------------- architecture

def test_same_padding_follows_the_fact_sheet():
    assert pc.same_padding(256, 7, 2) == (2, 3)  # conv0: 2/3 instead of 3/3
    assert pc.same_padding(128, 3, 2) == (0, 1)  # pool0: 0/1 instead of 1/1
    assert pc.same_padding(64, 3, 1) == (1, 1)
    assert pc.same_padding(64, 1, 1) == (0, 0)
    assert pc.same_padding(127, 3, 2) == (1, 1)  # odd size: k - (n mod s)
    assert pc.same_padding(255, 7, 2) == (3, 3)


def test_keys_and_parameter_count_match_torchvision_densenet121(network):
    state = {k: tuple(v.shape) for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 606
    assert state["features.conv0.weight"] == (64, 3, 7, 7)
    assert state["features.norm0.running_var"] == (64,)
    assert state["features.denseblock1.denselayer1.conv1.weight"] == (128, 64, 1, 1)
    assert state["features.denseblock1.denselayer1.conv2.weight"] == (32, 128, 3, 3)
    assert state["features.denseblock4.denselayer16.norm1.weight"] == (992,)
    assert state["features.transition1.conv.weight"] == (128, 256, 1, 1)
    assert state["features.norm5.weight"] == (1024,)
    assert state["classifier.weight"] == (4, 1024) and state["classifier.bias"] == (4,)
    # torchvision's densenet121 has 7,978,856 parameters with 1000 classes; 4 classes remove 1024 * 996 + 996
    assert sum(p.numel() for p in network.parameters()) == 7_978_856 - 1024 * 996 - 996


def test_shapes_on_a_256_patch_match_the_fact_sheet(network):
    shapes = {}
    for name, module in network.features.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        logits = network(torch.randn(1, 3, 256, 256))
    assert logits.shape == (1, 4)
    assert {k: v for k, v in shapes.items() if not k.startswith(("norm", "relu"))} == {
        "conv0": (64, 128, 128), "pool0": (64, 64, 64), "denseblock1": (256, 64, 64), "transition1": (128, 32, 32),
        "denseblock2": (512, 32, 32), "transition2": (256, 16, 16), "denseblock3": (1024, 16, 16),
        "transition3": (512, 8, 8), "denseblock4": (1024, 8, 8)}


def test_stem_pads_asymmetrically_like_tensorflow(network):
    x = torch.randn(2, 3, 256, 256)
    conv0, pool0 = network.features.conv0, network.features.pool0
    with torch.no_grad():
        expected_conv = F.conv2d(F.pad(x, (2, 3, 2, 3)), conv0.weight, stride=2)
        assert torch.allclose(conv0(x), expected_conv, atol=1e-5)
        y = torch.relu(torch.randn(2, 4, 128, 128))
        assert torch.equal(pool0(y), F.max_pool2d(F.pad(y, (0, 1, 0, 1)), 3, 2))
        layer = network.features.denseblock1.denselayer1.conv2
        z = torch.randn(1, 128, 64, 64)
        assert torch.allclose(layer(z), F.conv2d(z, layer.weight, padding=1), atol=1e-5)
        # non-square inputs get each axis's own pads
        w = torch.randn(1, 3, 255, 256)
        assert torch.allclose(conv0(w), F.conv2d(F.pad(w, (2, 3, 3, 3)), conv0.weight, stride=2), atol=1e-5)


# --------------------------------------------------------------------------- checkpoints

def test_the_published_bare_state_dict_loads_strictly(tmp_path, network):
    path = tmp_path / "patch.p"
    torch.save(network.state_dict(), path)
    loaded = pc.load_patch_classifier(path, WHERE)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x), network(x))
    assert not loaded.training


def test_old_style_key_spelling_loads(tmp_path, network):
    old = {k.replace("norm1.", "norm.1.").replace("conv1.", "conv.1.").replace("norm2.", "norm.2.")
           .replace("conv2.", "conv.2.") if ".denselayer" in k else k: v
           for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock2.denselayer3.norm.2.running_mean" in old
    path = tmp_path / "old.p"
    torch.save(old, path)
    loaded = pc.load_patch_classifier(path, WHERE)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), network.state_dict().values())
               if a.dtype != torch.int64)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("features.norm5.bias"), "missing key 'features.norm5.bias'"),
    (lambda s: s.__setitem__("features.extra.weight", torch.zeros(1)), "unexpected key 'features.extra.weight'"),
    (lambda s: s.__setitem__("classifier.weight", torch.zeros(2, 1024)),
     r"'classifier.weight' has shape \[2, 1024\], expected \[4, 1024\]"),
])
def test_a_mismatching_state_dict_fails_naming_the_key(tmp_path, network, change, message):
    state = dict(network.state_dict())
    change(state)
    path = tmp_path / "bad.p"
    torch.save(state, path)
    with pytest.raises(PerceptcoreError, match=message) as error:
        pc.load_patch_classifier(path, WHERE)
    assert error.value.where == WHERE


def test_unreadable_or_wrapped_files_fail_clearly(tmp_path, network):
    with pytest.raises(PerceptcoreError, match="cannot read the patch classifier"):
        pc.load_patch_classifier(tmp_path / "absent.p", WHERE)
    (tmp_path / "text.p").write_text("not a checkpoint")
    with pytest.raises(PerceptcoreError, match="cannot read the patch classifier"):
        pc.load_patch_classifier(tmp_path / "text.p", WHERE)
    torch.save({"model": network.state_dict()}, tmp_path / "wrapped.p")
    with pytest.raises(PerceptcoreError, match="not a bare DenseNet-121 state dict"):
        pc.load_patch_classifier(tmp_path / "wrapped.p", WHERE)


# --------------------------------------------------------------------------- sliding window

def test_strides_of_the_fact_sheet_example():
    starts = pc.patch_starts(3000, np.random.default_rng(0))
    strides = np.diff(starts)
    assert len(starts) == 41 and starts[0] == 0 and starts[-1] + 256 == 3000
    assert (strides == 69).sum() == 24 and (strides == 68).sum() == 16


def test_strides_exact_and_degenerate_lengths():
    assert list(pc.patch_starts(256 + 3 * 70, np.random.default_rng(0))) == [0, 70, 140, 210]
    assert list(pc.patch_starts(256, np.random.default_rng(0))) == [0]
    assert list(pc.patch_starts(257, np.random.default_rng(0))) == [0, 1]
    for length in range(256, 900, 7):
        starts = pc.patch_starts(length, np.random.default_rng(length))
        assert starts[-1] + 256 == length and np.all(np.diff(starts) <= 70) and np.all(np.diff(starts) > 0)
        assert len(starts) == (length - 256) // 70 + 1 + ((length - 256) % 70 != 0)


def test_which_strides_are_shorter_is_random_but_seeded():
    a = pc.patch_starts(3000, np.random.default_rng(0))
    assert np.array_equal(a, pc.patch_starts(3000, np.random.default_rng(0)))
    assert not np.array_equal(a, pc.patch_starts(3000, np.random.default_rng(1)))


# --------------------------------------------------------------------------- heatmaps

class PixelStub(nn.Module):
    """A stand-in network whose logits depend on the patch's content and position in the image."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        assert x.shape[1:] == (3, 256, 256) and torch.equal(x[:, 0], x[:, 2])
        return self.scale * torch.stack([x.mean(dim=(1, 2, 3)) * 5, x[:, 1, 0, 0], x[:, 0, -1, -1] * 0.5,
                                         x[:, 2, 100, 37]], dim=1)


def brute_force(image: np.ndarray, rows, cols, pixels) -> np.ndarray:
    """Per pixel: the mean of softmax columns 0 and 1 over every patch covering it."""
    return brute_force_standardised((image - image.mean()) / max(image.std(), 1e-5), rows, cols, pixels)


def brute_force_standardised(standard: np.ndarray, rows, cols, pixels) -> np.ndarray:
    probabilities = {}
    for r in rows:
        for c in cols:
            patch = standard[r:r + 256, c:c + 256]
            logits = np.array([patch.mean() * 5, patch[0, 0], patch[-1, -1] * 0.5, patch[100, 37]])
            e = np.exp(logits - logits.max())
            probabilities[r, c] = e / e.sum()
    result = []
    for y, x in pixels:
        covering = [p for (r, c), p in probabilities.items() if r <= y < r + 256 and c <= x < c + 256]
        result.append(np.mean(covering, axis=0)[:2])
    return np.array(result)


def test_heatmaps_average_the_covering_patches_probabilities():
    generator = np.random.default_rng(7)
    image = generator.gamma(2.0, 300.0, size=(400, 330)).astype(np.float32)
    maps = pc.heatmaps(PixelStub(), torch.from_numpy(image), seed=3, batch=5)
    assert maps.shape == (2, 400, 330) and maps.dtype == torch.float32
    seeded = np.random.default_rng(3)
    rows, cols = pc.patch_starts(400, seeded), pc.patch_starts(330, seeded)
    assert list(rows) == [0, 48, 96, 144] and list(cols) == [0, 37, 74]
    pixels = [(0, 0), (399, 329), (47, 36), (48, 37), (255, 255), (256, 300), (150, 80), (399, 0), (0, 329)]
    pixels += [tuple(p) for p in generator.integers(0, (400, 330), size=(40, 2))]
    expected = brute_force(image.astype(np.float64), rows, cols, pixels)
    got = np.array([[float(maps[0, y, x]), float(maps[1, y, x])] for y, x in pixels])
    assert np.allclose(got, expected, atol=1e-5)  # column 0 -> malignant (first), column 1 -> benign
    assert float(maps[0].std()) > 1e-3
    assert torch.equal(maps, pc.heatmaps(PixelStub(), torch.from_numpy(image), seed=3, batch=100))


def test_an_axis_shorter_than_a_patch_is_padded_and_cropped_back():
    image = np.random.default_rng(1).uniform(0, 1000, size=(300, 200)).astype(np.float32)
    maps = pc.heatmaps(PixelStub(), torch.from_numpy(image), seed=0)
    assert maps.shape == (2, 300, 200)
    standard = (image - image.mean()) / image.std()
    padded = np.pad(standard.astype(np.float64), ((0, 0), (0, 56)))  # zero: the standardised mean
    expected = brute_force_standardised(padded, [0, 44], [0], [(0, 0), (299, 199), (50, 150)])
    got = np.array([[float(maps[0, y, x]), float(maps[1, y, x])] for y, x in [(0, 0), (299, 199), (50, 150)]])
    assert np.allclose(got, expected, atol=1e-5)

