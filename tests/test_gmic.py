"""GMIC plugin: architecture against the fact sheet (architectures.md §1), ROI retrieval against a
brute-force search, published-layout checkpoints, training, prediction and explanations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.runner import CaseImages, ViewImage
from perceptcore_plugins.models import gmic
from perceptcore_plugins.models._resnet import ResNet18, ResNet22

PLUGIN = gmic.Gmic()
SMALL = gmic.Options(input_size=(256, 192), crop_size=32, num_crops=2, train_crop_noise=8, train_crop_size_noise=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are small: with other processes on the 2 cores, a second torch thread
    spins at barriers and makes every forward pass several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- architecture

def test_parameter_counts_match_the_fact_sheet():
    network = gmic.GmicNetwork(gmic.Options())
    parts = {"ds_net": 2_799_536, "left_postprocess_net": 512, "dn_resnet": 11_176_512, "mil_attn_V": 65_536,
             "mil_attn_U": 65_536, "mil_attn_w": 128, "classifier_linear": 1_024, "fusion_dnn": 1_538}
    assert {name: count(getattr(network, name)) for name in parts} == parts
    assert count(network) == 14_110_322
    assert count(ResNet22(in_channels=1, first_padding=0)) == 2_799_536
    assert count(ResNet18()) == 11_176_512


def output_shapes(module: torch.nn.Module, inputs: torch.Tensor, names: list[str]) -> dict:
    shapes = {}
    hooks = [module.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))) for name in names]
    with torch.no_grad():
        module(inputs)
    for hook in hooks:
        hook.remove()
    return shapes


def test_full_resolution_shapes_on_the_meta_device():
    with torch.device("meta"):
        network = gmic.GmicNetwork(gmic.Options())
        image = torch.empty(1, 1, 2944, 1920)
        crops = torch.empty(6, 3, 256, 256)
    stages = [f"layer_list.{s}.1" for s in range(5)]  # the last block of each stage
    assert output_shapes(network.ds_net, image, ["first_conv", "first_pool", *stages, "final_bn"]) == {
        "first_conv": (16, 1472, 960), "first_pool": (16, 735, 479),
        "layer_list.0.1": (16, 735, 479), "layer_list.1.1": (32, 368, 240), "layer_list.2.1": (64, 184, 120),
        "layer_list.3.1": (128, 92, 60), "layer_list.4.1": (256, 46, 30), "final_bn": (256, 46, 30)}
    with torch.no_grad():
        assert network.left_postprocess_net(network.ds_net(image)).shape == (1, 2, 46, 30)
    layers = ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert output_shapes(network.dn_resnet, crops, layers) == {
        "maxpool": (64, 64, 64), "layer1": (64, 64, 64), "layer2": (128, 32, 32), "layer3": (256, 16, 16),
        "layer4": (512, 8, 8)}
    # The ROI geometry at full size: 4 x 4 windows on the 46 x 30 grid, 64 px per cell.
    assert gmic.cam_patch_size((46, 30), (2944, 1920), 256) == (4, 4)
    corners = torch.tensor([[[42, 26], [1, 2]]])
    assert gmic.cells_to_pixels(corners, (46, 30), (2944, 1920)).tolist() == [[[2688, 1664], [64, 128]]]


def test_top_t_mean_averages_the_largest_cells():
    maps = torch.rand(3, 2, 46, 30, generator=torch.Generator().manual_seed(1))
    expected = np.sort(maps.flatten(2).numpy(), axis=2)[:, :, -28:].mean(axis=2)  # round(46 * 30 * 0.02) = 28
    np.testing.assert_allclose(gmic.top_t_mean(maps, 0.02).numpy(), expected, rtol=1e-6)


def brute_force_rois(saliency: np.ndarray, patch: tuple, count: int) -> list:
    """Greedy search written out: every window position, row-major, strict improvement only."""
    ph, pw = patch
    low = saliency.min(axis=(1, 2), keepdims=True)
    high = saliency.max(axis=(1, 2), keepdims=True)
    combined = ((saliency - low) / (high - low)).sum(axis=0)
    corners = []
    for _ in range(count):
        best, best_at = -np.inf, None
        for row in range(combined.shape[0] - ph + 1):
            for col in range(combined.shape[1] - pw + 1):
                value = combined[row:row + ph, col:col + pw].mean()
                if value > best:
                    best, best_at = value, (row, col)
        corners.append(best_at)
        combined[best_at[0]:best_at[0] + ph, best_at[1]:best_at[1] + pw] = 0
    return corners


@pytest.mark.parametrize("shape, patch, count", [((13, 11), (3, 2), 5), ((46, 30), (4, 4), 6), ((4, 3), (1, 1), 2)])
def test_roi_retrieval_matches_a_brute_force_search(shape, patch, count):
    generator = np.random.default_rng(7)
    saliency = generator.uniform(0.2, 0.9, size=(3, 2, *shape))
    corners = gmic.retrieve_rois(torch.tensor(saliency), patch, count)
    assert corners.shape == (3, count, 2)
    for image in range(3):
        assert [tuple(c) for c in corners[image].tolist()] == brute_force_rois(saliency[image].copy(), patch, count)


def test_roi_retrieval_lets_windows_overlap_but_not_repeat():
    saliency = torch.zeros(1, 2, 6, 6)
    saliency[0, :, 1:3, 1:3] = 1.0  # one bright 2 x 2 block, plus a lesser cell right of it
    saliency[0, :, 1, 3] = 0.8
    corners = gmic.retrieve_rois(saliency, (2, 2), 2)[0].tolist()
    assert corners[0] == [1, 1]
    assert corners[1] == [0, 2]  # covers the 0.8 cell plus zeroed cells of the first window; first row-major


def test_crops_past_the_edge_are_filled_with_the_image_minimum():
    image = torch.arange(20.0).view(1, 4, 5) - 3
    patches = gmic.crop_patches(image, torch.tensor([[[0, 0], [3, 4]]]), 2)
    assert patches[0, 0].tolist() == [[-3, -2], [2, 3]]
    assert patches[0, 1].tolist() == [[16, -3], [-3, -3]]


def test_outputs_follow_the_fact_sheet_formulas():
    torch.manual_seed(4)
    network = gmic.GmicNetwork(SMALL).eval()
    images = torch.randn(2, 1, 256, 192)
    with torch.no_grad():
        out = network(images)
        features = network.ds_net(images)
        saliency = torch.sigmoid(torch.nn.functional.conv2d(features, network.left_postprocess_net.gn_conv_last.weight))
        crops = torch.stack([torch.stack([images[n, 0, r:r + 32, c:c + 32] for r, c in out.patch_locations[n].tolist()])
                             for n in range(2)])
        h = network.dn_resnet(crops.reshape(4, 1, 32, 32).repeat(1, 3, 1, 1)).mean(dim=(2, 3)).view(2, 2, 512)
        V, U, w = (network.mil_attn_V.weight, network.mil_attn_U.weight, network.mil_attn_w.weight)
        scores = (torch.sigmoid(h @ U.T) * torch.tanh(h @ V.T)) @ w.T
        attention = torch.softmax(scores[..., 0], dim=1)
        z = (attention[..., None] * h).sum(dim=1)
        global_first = torch.cat([features.flatten(2).max(dim=2).values, z], dim=1)
        fusion = torch.sigmoid(global_first @ network.fusion_dnn.weight.T + network.fusion_dnn.bias)
        local = torch.sigmoid(z @ network.classifier_linear.weight.T)
    torch.testing.assert_close(out.saliency, saliency)
    torch.testing.assert_close(out.attention, attention)
    torch.testing.assert_close(out.y_fusion, fusion)
    torch.testing.assert_close(out.y_local, local)
    torch.testing.assert_close(out.y_global, saliency.flatten(2).max(dim=2).values)  # 4 x 3 cells: top 1


# --------------------------------------------------------------------------- options

def test_options_validate_and_convert():
    assert gmic.Options(input_size=["512", "384"]).input_size == (512, 384)
    with pytest.raises(ValueError, match="crop_size"):
        gmic.Options(input_size=(128, 96), crop_size=256)
    with pytest.raises(ValueError, match="input_size"):
        gmic.Options(input_size=(2944,))
    with pytest.raises(ValueError, match="output"):
        gmic.Options(output="cancer")
    with pytest.raises(ValueError, match="percent_t"):
        gmic.Options(percent_t=0)


# --------------------------------------------------------------------------- checkpoints

def published_key_shapes() -> dict:
    """The published GMIC state-dict layout, from the fact sheet's naming rules (§1.9)."""
    shapes = {"ds_net.first_conv.weight": (16, 1, 7, 7)}

    def bn(prefix, channels):
        shapes.update({f"{prefix}.{t}": (channels,) for t in ("weight", "bias", "running_mean", "running_var")})

    previous = 16
    for stage, width in enumerate((16, 32, 64, 128, 256)):
        for block in range(2):
            into = previous if block == 0 else width
            prefix = f"ds_net.layer_list.{stage}.{block}"
            bn(f"{prefix}.bn1", into)
            shapes[f"{prefix}.conv1.weight"] = (width, into, 3, 3)
            bn(f"{prefix}.bn2", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
        shapes[f"ds_net.layer_list.{stage}.0.downsample.0.weight"] = (width, previous, 1, 1)
        previous = width
    bn("ds_net.final_bn", 256)
    shapes["left_postprocess_net.gn_conv_last.weight"] = (2, 256, 1, 1)
    shapes["dn_resnet.conv1.weight"] = (64, 3, 7, 7)
    bn("dn_resnet.bn1", 64)
    previous = 64
    for layer, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            into = previous if block == 0 else width
            prefix = f"dn_resnet.layer{layer}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, into, 3, 3)
            bn(f"{prefix}.bn1", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{prefix}.bn2", width)
        if layer > 1:
            shapes[f"dn_resnet.layer{layer}.0.downsample.0.weight"] = (width, previous, 1, 1)
            bn(f"dn_resnet.layer{layer}.0.downsample.1", width)
        previous = width
    shapes.update({"mil_attn_V.weight": (128, 512), "mil_attn_U.weight": (128, 512), "mil_attn_w.weight": (1, 128),
                   "classifier_linear.weight": (2, 512), "fusion_dnn.weight": (2, 768), "fusion_dnn.bias": (2,)})
    return shapes


def published_checkpoint(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.rand(shape, generator=generator) + 0.5 for key, shape in published_key_shapes().items()}
    state["shared_rep_filter.weight"] = torch.rand(3, 5, generator=generator)  # unused extra, shape unknown
    return state


def realistic_published_checkpoint(seed: int = 0) -> dict:
    """A published-layout state dict with trained-looking values: convolutions and linear maps
    drawn with variance 1/fan-in, batch-norm statistics and affine terms away from 0/1, so that
    no output saturates (published_checkpoint's all-positive weights overflow through 20 layers)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_key_shapes().items():
        channels = shape[0]
        if key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = torch.rand(shape, generator=generator) * 0.2 - 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) * 1.5 + 0.5
        elif len(shape) == 1:  # BN weight
            state[key] = torch.rand(channels, generator=generator) + 0.5
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=generator) * (1 / fan_in) ** 0.5
    state["shared_rep_filter.weight"] = torch.rand(3, 5, generator=generator)
    return state


def nyu_gmic():
    """tests/nyu_gmic.py, the transcription of NYU's published forward pass (also the benchmark's yardstick)."""
    spec = importlib.util.spec_from_file_location("nyu_gmic", Path(__file__).with_name("nyu_gmic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options, cam, batch", [
    (gmic.Options(), (46, 30), 1),  # the published size: 6 crops of 256 px, 4 x 4 cells each
    # The published code needs a window of at least one cell, so 64 px crops here.
    (attrs.evolve(SMALL, crop_size=64, num_crops=3, percent_t=0.1), (4, 3), 2),
])
def test_forward_is_bit_identical_to_nyus_published_code(tmp_path, options, cam, batch):
    """A published-layout checkpoint loaded into ours and into the transcription of NYU's code
    gives the same bits in every output, on the prediction path (inference mode: the
    channels-last and separable max-pool path) and on the autograd path (default layout)."""
    nyu = nyu_gmic()
    state = realistic_published_checkpoint()
    path = tmp_path / "sample_model_1.p"
    torch.save(state, path)
    ours = PLUGIN.load(path, options, "cpu")
    theirs = nyu.NyuGmic(nyu.published_parameters(cam_size=cam, crop_shape=(options.crop_size,) * 2,
                                                  K=options.num_crops, percent_t=options.percent_t)).eval()
    result = theirs.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["shared_rep_filter.weight"] and not result.missing_keys
    images = torch.randn(batch, 1, *options.input_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_fusion = theirs(images)
    assert ((y_fusion > 0.01) & (y_fusion < 0.99)).all()  # nothing saturated: every bit counts
    expected = {"y_fusion": y_fusion, "saliency": theirs.saliency_map, "y_global": theirs.y_global,
                "y_local": theirs.y_local, "attention": theirs.patch_attns,
                "patch_locations": torch.from_numpy(theirs.patch_locations).to(torch.long)}
    with torch.inference_mode():
        fast = ours(images)
    plain = ours(images)  # autograd records: the training-time path
    for output in (fast, plain):
        for name, value in expected.items():
            assert torch.equal(getattr(output, name), value), name


def test_the_fast_resnet22_path_is_bit_identical_for_dmv_too():
    """DMV's columns (3 input channels, stem padding 0) at its CC window size: the prediction
    path (which does take the channels-last layout) against the autograd path; and in training
    mode no_grad changes nothing (batch statistics)."""
    torch.manual_seed(2)
    column = ResNet22(in_channels=3, first_padding=0).eval()
    with torch.no_grad():
        for module in column.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(1, 3, 2677, 1942, generator=torch.Generator().manual_seed(3))
    layouts = []
    hook = column.layer_list[0][0].conv1.register_forward_hook(
        lambda _m, args, _out: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.inference_mode():
        fast = column(images)
    assert layouts == [True] and fast.is_contiguous()
    assert torch.equal(fast, column(images).detach())
    hook.remove()
    small = images[:, :, :300, :200].repeat(2, 1, 1, 1)
    column.train()
    with torch.no_grad():
        without_graph = column(small)
    assert torch.equal(without_graph, column(small).detach())


def test_published_layout_checkpoint_loads(tmp_path):
    state = published_checkpoint()
    assert len(state) == 218
    path = tmp_path / "sample_model_1.p"
    torch.save(state, path)
    network = PLUGIN.load(path, gmic.Options(), "cpu")
    assert not network.training
    loaded = network.state_dict()
    for key, value in state.items():
        if key != "shared_rep_filter.weight":
            assert torch.equal(loaded[key], value), key


def test_checkpoint_of_a_network_round_trips(tmp_path):
    torch.manual_seed(3)
    network = PLUGIN.network(SMALL)
    path = tmp_path / "trained.pt"
    torch.save(PLUGIN.checkpoint(network), path)
    loaded = PLUGIN.load(path, SMALL, "cpu")
    assert type(loaded) is type(network)
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("dn_resnet.layer3.0.downsample.0.weight", torch.zeros(256, 64, 1, 1)),
     "'dn_resnet.layer3.0.downsample.0.weight' has shape [256, 64, 1, 1] in the checkpoint, GMIC expects [256, 128, 1, 1]"),
    (lambda s: s.pop("mil_attn_w.weight"), "missing key 'mil_attn_w.weight' (shape [1, 128])"),
    (lambda s: s.__setitem__("mil_attn_w.bias", torch.zeros(1)), "unexpected key 'mil_attn_w.bias'"),
])
def test_a_wrong_checkpoint_fails_naming_the_key(tmp_path, edit, message):
    state = published_checkpoint()
    edit(state)
    path = tmp_path / "bad.p"
    torch.save(state, path)
    with pytest.raises(PerceptcoreError) as error:
        PLUGIN.load(path, gmic.Options(), "cpu")
    assert message in error.value.message
    assert error.value.where == "observers.checkpoints"


def test_a_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "object.p"
    torch.save({"model": ValueError("not a tensor")}, path)
    with pytest.raises(PerceptcoreError, match="not a readable torch checkpoint"):
        PLUGIN.load(path, gmic.Options(), "cpu")


# --------------------------------------------------------------------------- images end to end

def breast_image(generator: np.random.Generator, laterality: str, lesion: bool) -> torch.Tensor:
    """A 400 x 300 'mammogram': a half-ellipse of textured tissue on the chest-wall side, on zero
    background, with a bright blob when `lesion`."""
    rows, cols = np.mgrid[0:400, 0:300]
    inside = ((rows - 200) / 190.0) ** 2 + (cols / 270.0) ** 2 < 1
    pixels = np.where(inside, generator.uniform(800, 1200, size=inside.shape), 0.0)
    if lesion:
        candidates = np.argwhere(inside & (cols > 20) & (cols < 200) & (np.abs(rows - 200) < 120))
        row, col = candidates[generator.integers(len(candidates))]
        pixels += 4000 * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * 16.0**2)) * inside
    if laterality == "right":  # R views face left in their native orientation
        pixels = pixels[:, ::-1]
    return torch.tensor(pixels.copy(), dtype=torch.float32)


def synthetic_cases(count: int, seed: int, views=("CC",)) -> tuple[list, torch.Tensor]:
    generator = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    cases = []
    for index, label in enumerate(labels):
        laterality = ("left", "right")[generator.integers(2)]
        images = tuple(ViewImage(view, laterality, breast_image(generator, laterality, bool(label)), 0.1, 4095.0)
                       for view in views)
        cases.append(CaseImages(f"case{index}", images))
    return cases, torch.tensor(labels, dtype=torch.float32)


def test_small_gmic_trains_and_its_loss_falls():
    cases, labels = synthetic_cases(8, seed=0)
    torch.manual_seed(0)
    network = PLUGIN.network(SMALL)
    network.train()
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)

    def fixed_loss():
        torch.manual_seed(123)  # the same augmentation draws before and after training
        with torch.no_grad():
            return float(PLUGIN.loss(network, cases, labels))

    before = fixed_loss()
    torch.manual_seed(1)
    for _ in range(12):
        optimiser.zero_grad()
        loss = PLUGIN.loss(network, cases, labels)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        optimiser.step()
    after = fixed_loss()
    assert after < 0.85 * before, (before, after)  # 0.59-0.72 over five initialisations


def test_predict_is_a_deterministic_probability_per_case_averaging_images():
    cases, _ = synthetic_cases(3, seed=1, views=("CC", "mlo oblique"))
    torch.manual_seed(0)
    network = PLUGIN.network(SMALL).eval()
    with torch.no_grad():
        first = PLUGIN.predict(network, cases)
        second = PLUGIN.predict(network, cases)
    assert first.shape == (3,)
    assert np.all((first >= 0) & (first <= 1))
    np.testing.assert_array_equal(first, second)
    explained = PLUGIN.explain(network, cases)
    per_image = np.array([e.probabilities[1] for e in explained]).reshape(3, 2)
    np.testing.assert_allclose(first, per_image.mean(axis=1), rtol=1e-6)

    benign = gmic.GmicNetwork(attrs.evolve(SMALL, output="benign"))
    benign.load_state_dict(network.state_dict())
    with torch.no_grad():
        benign_prediction = PLUGIN.predict(benign.eval(), cases)
    per_image = np.array([e.probabilities[0] for e in explained]).reshape(3, 2)
    np.testing.assert_allclose(benign_prediction, per_image.mean(axis=1), rtol=1e-6)


def test_a_mirrored_right_view_predicts_like_the_left_view():
    generator = np.random.default_rng(5)
    pixels = breast_image(generator, "left", lesion=True)
    left = CaseImages("l", (ViewImage("CC", "left", pixels, 0.1, 4095.0),))
    right = CaseImages("r", (ViewImage("CC", "right", pixels.flip(1), 0.1, 4095.0),))
    torch.manual_seed(0)
    network = PLUGIN.network(SMALL).eval()
    with torch.no_grad():
        predictions = PLUGIN.predict(network, [left, right])
    np.testing.assert_allclose(predictions[0], predictions[1], rtol=1e-6)


def test_explain_gives_maps_patches_attention_and_probabilities_per_image():
    cases, _ = synthetic_cases(2, seed=2, views=("CC", "MLO"))
    torch.manual_seed(0)
    network = PLUGIN.network(SMALL).eval()
    explained = PLUGIN.explain(network, cases)
    assert [(e.case, e.view) for e in explained] == [("case0", "CC"), ("case0", "MLO"), ("case1", "CC"), ("case1", "MLO")]
    cam = (4, 3)  # the feature map of a 256 x 192 input
    scale = np.array([256 / cam[0], 192 / cam[1]])
    for e in explained:
        assert e.image.shape == (256, 192)
        assert abs(float(e.image.mean())) < 1e-4 and abs(float(e.image.std()) - 1) < 1e-2  # standardised
        assert e.saliency.shape == (2, *cam) and np.all((e.saliency > 0) & (e.saliency < 1))
        assert e.patch_locations.shape == (2, 2) and e.patch_locations.dtype == np.int64
        assert np.all(e.patch_locations % scale == 0)
        assert np.all(e.patch_locations >= 0) and np.all(e.patch_locations < (256, 192))
        assert e.attention.shape == (2,) and abs(e.attention.sum() - 1) < 1e-6
        assert e.probabilities.shape == (2,) and np.all((e.probabilities > 0) & (e.probabilities < 1))
        assert len(e.window) == 4


def test_an_image_without_a_known_laterality_is_an_error():
    case = CaseImages("x", (ViewImage("CC", "both", torch.ones(64, 48), 0.1, 1.0),))
    network = PLUGIN.network(SMALL).eval()
    with pytest.raises(PerceptcoreError, match="laterality must be 'left' or 'right', got 'both'"):
        PLUGIN.predict(network, [case])
