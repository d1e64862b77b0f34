"""The DMV model plugin: architecture against the fact sheet, checkpoints, cases, TTA, training."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.runner import CaseImages, ViewImage
from perceptcore.spec import structure
from perceptcore_plugins.models import _mammography, _patch_classifier, dmv

PLUGIN = dmv.Dmv()
SMALL = dict(cc_size=(64, 48), mlo_size=(72, 44), augmentations=2, max_crop_noise=(4, 4), max_crop_size_noise=4,
             crop_iterations=3, crop_buffer=4)


# --------------------------------------------------------------------------- architecture

def test_parameter_counts_match_the_published_model():
    image_only = dmv.DmvNetwork(dmv.Options())
    with_heatmaps = dmv.DmvNetwork(dmv.Options(channels=3))
    assert sum(p.numel() for p in image_only.parameters()) == 6_132_592
    assert sum(p.numel() for p in with_heatmaps.parameters()) == 6_135_728
    assert sum(p.numel() for p in image_only.four_view_resnet.cc.parameters()) == 2_799_536
    assert image_only.four_view_resnet.l_cc is image_only.four_view_resnet.cc
    assert image_only.four_view_resnet.r_mlo is image_only.four_view_resnet.mlo


@pytest.mark.parametrize("size, shapes", [
    ((2677, 1942), [(16, 1336, 968), (16, 667, 483), (16, 667, 483), (32, 334, 242), (64, 167, 121),
                    (128, 84, 61), (256, 42, 31)]),
    ((2974, 1748), [(16, 1484, 871), (16, 741, 435), (16, 741, 435), (32, 371, 218), (64, 186, 109),
                    (128, 93, 55), (256, 47, 28)]),
])
def test_intermediate_shapes_at_full_resolution(size, shapes):
    with torch.device("meta"):
        column = dmv.DmvNetwork(dmv.Options()).four_view_resnet.cc
        seen = []
        modules = [column.first_conv, column.first_pool, *(stage[-1] for stage in column.layer_list)]
        for module in modules:
            module.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
        out = column(torch.empty(1, 1, *size))
    assert seen == shapes
    assert tuple(out.shape[1:]) == shapes[-1]


def test_heads_give_log_probabilities_of_four_rows():
    torch.manual_seed(0)
    network = dmv.DmvNetwork(dmv.Options(**SMALL)).eval()
    views = {slot: torch.randn(2, 1, *(SMALL["mlo_size"] if "MLO" in slot else SMALL["cc_size"])) for slot in dmv.SLOTS}
    out = network(views)
    assert out["CC"].shape == out["MLO"].shape == (2, 4, 2)
    assert torch.allclose(out["CC"].exp().sum(-1), torch.ones(2, 4))
    # [left, right] concatenation order: swapping the views changes the output
    swapped = dict(views, **{"L-CC": views["R-CC"], "R-CC": views["L-CC"]})
    assert not torch.allclose(network(swapped)["CC"], out["CC"])


def test_input_noise_only_in_train_mode():
    network = dmv.DmvNetwork(dmv.Options(**SMALL))
    seen = []
    network.four_view_resnet.cc.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.zeros(2, 1, 64, 48)
    views = {slot: x if "CC" in slot else torch.zeros(2, 1, 72, 44) for slot in dmv.SLOTS}
    network.eval()
    network(views)
    assert all(torch.equal(s, x) for s in seen)
    seen.clear()
    network.train()
    network(views)
    assert float(seen[0].std()) == pytest.approx(0.01, rel=0.1)


# --------------------------------------------------------------------------- checkpoints

def stage_keys(prefix: str, channels: int) -> dict:
    """One ResNet-22 column's 110 keys and shapes, written out from the fact sheet (§2.2, §2.7)."""
    keys = {f"{prefix}first_conv.weight": (16, channels, 7, 7)}
    widths = [16, 16, 32, 64, 128, 256]
    for s in range(5):
        cin, cout = widths[s], widths[s + 1]
        for b in range(2):
            block = f"{prefix}layer_list.{s}.{b}."
            first_in = cin if b == 0 else cout
            for bn, width in (("bn1", first_in), ("bn2", cout)):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    keys[f"{block}{bn}.{name}"] = (width,)
            keys[f"{block}conv1.weight"] = (cout, first_in, 3, 3)
            keys[f"{block}conv2.weight"] = (cout, cout, 3, 3)
            if b == 0:
                keys[f"{block}downsample.0.weight"] = (cout, cin, 1, 1)
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}final_bn.{name}"] = (256,)
    return keys


def published_state(channels: int = 1, copies=("l_cc", "l_mlo", "r_cc", "r_mlo"), batches_tracked=False,
                    seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for column in ("cc", "mlo"):
        for key, shape in stage_keys(f"four_view_resnet.{column}.", channels).items():
            value = torch.randn(shape, generator=generator) * 0.05
            state[key] = value.abs() + 0.5 if key.endswith("running_var") else value
    assert len(state) == 220
    for copy in copies:
        source = "cc" if copy.endswith("_cc") else "mlo"
        for key in list(stage_keys(f"four_view_resnet.{source}.", channels)):
            state[key.replace(f".{source}.", f".{copy}.", 1)] = state[key].clone()
    for angle in ("cc", "mlo"):
        state[f"fc1_{angle}.weight"] = torch.randn(512, 512, generator=generator) * 0.03
        state[f"fc1_{angle}.bias"] = torch.randn(512, generator=generator) * 0.03
        state[f"output_layer_{angle}.fc_layer.weight"] = torch.randn(8, 512, generator=generator) * 0.03
        state[f"output_layer_{angle}.fc_layer.bias"] = torch.randn(8, generator=generator) * 0.03
    if batches_tracked:
        for key in [k for k in state if k.endswith("running_mean")]:
            state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(7)
    return state


def save(tmp_path, state, name="dmv.p", **extra):
    path = tmp_path / name
    torch.save({"model": state, **extra}, path)
    return path


def test_a_checkpoint_with_the_published_layout_loads(tmp_path):
    state = published_state()
    assert len(state) == 6 * 110 + 8
    path = save(tmp_path, state, epoch=3, optimizer={"lr": 1e-5})
    network = PLUGIN.load(path, dmv.Options(), "cpu")
    assert not network.training
    loaded = network.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # with num_batches_tracked, and with only the cc/mlo copies
    PLUGIN.load(save(tmp_path, published_state(batches_tracked=True), "nbt.p"), dmv.Options(), "cpu")
    bare = PLUGIN.load(save(tmp_path, published_state(copies=()), "bare.p"), dmv.Options(), "cpu")
    assert torch.equal(bare.four_view_resnet.l_mlo.final_bn.weight, state["four_view_resnet.mlo.final_bn.weight"])


def test_image_and_heatmaps_checkpoint_loads_with_three_channels(tmp_path):
    path = save(tmp_path, published_state(channels=3))
    network = PLUGIN.load(path, dmv.Options(channels=3), "cpu")
    assert network.four_view_resnet.cc.first_conv.weight.shape == (16, 3, 7, 7)
    with pytest.raises(PerceptcoreError, match=r"first_conv.weight' has shape \[16, 3, 7, 7\], expected \[16, 1, 7, 7\]"):
        PLUGIN.load(path, dmv.Options(channels=1), "cpu")


def test_a_misshaped_tensor_fails_naming_the_key_and_both_shapes(tmp_path):
    state = published_state()
    state["fc1_mlo.weight"] = torch.zeros(512, 256)
    with pytest.raises(PerceptcoreError, match=r"'fc1_mlo.weight' has shape \[512, 256\], expected \[512, 512\]"):
        PLUGIN.load(save(tmp_path, state), dmv.Options(), "cpu")


def test_disagreeing_copies_fail_naming_the_key(tmp_path):
    state = published_state()
    state["four_view_resnet.l_cc.layer_list.2.1.conv2.weight"] += 1e-3
    with pytest.raises(PerceptcoreError, match=r"'four_view_resnet.l_cc.layer_list.2.1.conv2.weight' differs from "
                                               r"'four_view_resnet.cc.layer_list.2.1.conv2.weight'"):
        PLUGIN.load(save(tmp_path, state), dmv.Options(), "cpu")


def test_missing_and_unexpected_keys_fail_naming_the_key(tmp_path):
    state = published_state()
    del state["output_layer_cc.fc_layer.bias"]
    with pytest.raises(PerceptcoreError, match=r"missing key 'output_layer_cc.fc_layer.bias'"):
        PLUGIN.load(save(tmp_path, state, "a.p"), dmv.Options(), "cpu")
    state = published_state()
    del state["four_view_resnet.r_mlo.final_bn.bias"]  # a copy that is present must be complete
    with pytest.raises(PerceptcoreError, match=r"missing key 'four_view_resnet.r_mlo.final_bn.bias'"):
        PLUGIN.load(save(tmp_path, state, "b.p"), dmv.Options(), "cpu")
    state = published_state()
    state["fc2_cc.weight"] = torch.zeros(3)
    with pytest.raises(PerceptcoreError, match=r"unexpected key 'fc2_cc.weight'"):
        PLUGIN.load(save(tmp_path, state, "c.p"), dmv.Options(), "cpu")


def test_a_checkpoint_that_is_not_dmv_fails_clearly(tmp_path):
    bare = tmp_path / "bare.p"
    torch.save(published_state(), bare)
    with pytest.raises(PerceptcoreError, match="state dict under 'model'"):
        PLUGIN.load(bare, dmv.Options(), "cpu")
    junk = tmp_path / "junk.p"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptcoreError, match="not a weights-only torch checkpoint"):
        PLUGIN.load(junk, dmv.Options(), "cpu")


def test_checkpoint_writes_the_published_layout_and_load_reads_it(tmp_path):
    torch.manual_seed(1)
    network = PLUGIN.network(dmv.Options(**SMALL))
    contents = PLUGIN.checkpoint(network)
    assert list(contents) == ["model"]
    assert len(contents["model"]) == 794  # 6 x 131 ResNet keys (num_batches_tracked included) + 8 head keys
    assert {k for k in contents["model"] if not k.endswith("num_batches_tracked")} == set(published_state())
    path = tmp_path / "trained.p"
    torch.save(contents, path)
    loaded = PLUGIN.load(path, dmv.Options(**SMALL), "cpu")
    cases = [case("a", "left", 1, 0), case("b", "right", 0, 1)]
    network.eval()
    with torch.no_grad():
        assert np.array_equal(PLUGIN.predict(loaded, cases), PLUGIN.predict(network, cases))


# --------------------------------------------------------------------------- cases

def breast(height, width, positive, generator, side="left"):
    """A synthetic breast (half-ellipse at the chest wall) with texture; positives carry a bright blob."""
    rows, cols = np.mgrid[0:height, 0:width]
    inside = ((rows - height / 2) / (0.45 * height)) ** 2 + (cols / (0.8 * width)) ** 2 < 1
    image = inside * (1000.0 + generator.normal(0, 60, (height, width)))
    if positive:
        cy, cx = generator.uniform(0.35 * height, 0.65 * height), generator.uniform(0.15 * width, 0.45 * width)
        image += inside * 1500.0 * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * 5.0 ** 2))
    image = np.clip(image, 0, 4095).astype(np.float32)
    return torch.from_numpy(image[:, ::-1].copy() if side == "right" else image)


def case(name, side, positive, seed, views=("CC", "MLO")):
    generator = np.random.default_rng(seed)
    return CaseImages(name, tuple(ViewImage(view, side, breast(80, 60, positive, generator, side), 0.1, 4095.0)
                                  for view in views))


def test_views_go_to_their_slots_and_missing_slots_are_blank():
    two = CaseImages("x", (ViewImage("mlo_rotated", "right", torch.ones(5, 5), 0.1, 1.0),
                           ViewImage("CC", "left", torch.ones(5, 5), 0.1, 1.0)))
    assert sorted(dmv.arrange(two)) == ["L-CC", "R-MLO"]
    options = dmv.Options(**SMALL)
    located = dmv.locate_slots(dmv.arrange(case("y", "left", 0, 0)), options)
    windows = dmv.windows(located, options, None)
    assert list(windows) == list(dmv.SLOTS)
    assert torch.equal(windows["R-CC"], torch.zeros(1, 64, 48))
    assert torch.equal(windows["R-MLO"], torch.zeros(1, 72, 44))
    assert windows["L-MLO"].shape == (1, 72, 44) and float(windows["L-MLO"].std()) > 0.5


def test_two_images_in_one_slot_fail_naming_the_case():
    duplicate = CaseImages("case-17", (ViewImage("CC", "left", torch.ones(5, 5), 0.1, 1.0),
                                       ViewImage("cc", "left", torch.ones(5, 5), 0.1, 1.0)))
    with pytest.raises(PerceptcoreError, match=r"case 'case-17' has two L-CC images"):
        dmv.arrange(duplicate)


def fixed_output_network(options, positive_logits):
    """A network whose every output row is a known constant: zero weights, chosen biases."""
    network = dmv.DmvNetwork(options).eval()
    with torch.no_grad():
        for angle, logits in zip(("cc", "mlo"), positive_logits):
            layer = getattr(network, f"output_layer_{angle}").fc_layer
            layer.weight.zero_()
            layer.bias.copy_(torch.stack([torch.zeros(4), torch.tensor(logits)], dim=1).reshape(8))
    return network


def test_a_case_takes_its_breasts_row_and_the_larger_of_two_breasts():
    options = dmv.Options(**{**SMALL, "augmentations": 0})
    cc_logits, mlo_logits = [-2.0, -1.0, 0.5, 1.5], [-1.0, 0.0, -0.5, 2.5]
    network = fixed_output_network(options, (cc_logits, mlo_logits))
    rows = (torch.sigmoid(torch.tensor(cc_logits)) + torch.sigmoid(torch.tensor(mlo_logits))).double().numpy() / 2
    left, right = case("l", "left", 0, 1), case("r", "right", 0, 2)
    both = CaseImages("lr", left.images + right.images)
    with torch.no_grad():
        values = PLUGIN.predict(network, [left, right, both])
    assert np.allclose(values, [rows[2], rows[3], max(rows[2], rows[3])], atol=1e-6)
    benign = fixed_output_network(attrs.evolve(options, output="benign"), (cc_logits, mlo_logits))
    with torch.no_grad():
        assert np.allclose(PLUGIN.predict(benign, [left, right]), [rows[0], rows[1]], atol=1e-6)


def test_three_channels_without_a_patch_checkpoint_explain_what_is_missing():
    network = dmv.DmvNetwork(dmv.Options(**SMALL, channels=3)).eval()
    with pytest.raises(PerceptcoreError, match="without a patch_checkpoint .* needs the benign and malignant "
                                               "heatmaps of the patch classifier") as error:
        PLUGIN.predict(network, [case("a", "left", 0, 0)])
    assert error.value.where == "observers.options.patch_checkpoint"
    with pytest.raises(PerceptcoreError, match="cannot train with channels: 3 without a patch_checkpoint"):
        PLUGIN.loss(network.train(), [case("a", "left", 0, 0)], torch.ones(1))


@pytest.fixture(scope="module")
def patch_checkpoint(tmp_path_factory):
    """A randomly initialised patch classifier, saved as the published bare state dict."""
    torch.manual_seed(11)
    network = _patch_classifier.PatchDenseNet()
    with torch.no_grad():
        network.classifier.weight.mul_(50)  # spread the softmax so the heatmaps differ across the image
    path = tmp_path_factory.mktemp("patch") / "patch.p"
    torch.save(network.state_dict(), path)
    return str(path)


def test_a_bad_patch_checkpoint_fails_at_its_option(tmp_path):
    options = dmv.Options(**SMALL, channels=3, patch_checkpoint=str(tmp_path / "absent.p"))
    with pytest.raises(PerceptcoreError, match="cannot read the patch classifier") as error:
        PLUGIN.network(options)
    assert error.value.where == "observers.options.patch_checkpoint"
    with pytest.raises(PerceptcoreError) as error:
        PLUGIN.load(save(tmp_path, published_state(channels=3)), options, "cpu")
    assert error.value.where == "observers.options.patch_checkpoint"
    with pytest.raises(ValueError, match="only used by the image-and-heatmaps model"):
        dmv.Options(patch_checkpoint="patch.p")


def test_heatmap_channels_are_cut_with_the_image_window_and_not_standardised(patch_checkpoint):
    options = dmv.Options(**SMALL, channels=3, patch_checkpoint=patch_checkpoint)
    located = dmv.locate_slots(dmv.arrange(case("h", "right", 1, 5)), options)["R-MLO"]
    maps = torch.rand(2, *located.cropped.shape, generator=torch.Generator().manual_seed(0)) + 5.0
    for seed in (None, 1, 2, 3):
        generator = None if seed is None else np.random.default_rng(seed)
        window = dmv.cut_with_heatmaps(located, maps, generator, options.max_crop_noise, options.max_crop_size_noise)
        generator = None if seed is None else np.random.default_rng(seed)
        image = _mammography.cut(located, generator, options.max_crop_noise, options.max_crop_size_noise)
        assert window.shape == (3, 72, 44)
        assert torch.equal(window[0], image.image)
        # independently: the heatmaps zero-padded far around, the window sliced, resized when noisy
        top, bottom, left, right = image.window
        margin = 100
        padded = torch.nn.functional.pad(maps, (margin, margin, margin, margin))
        region = padded[:, top + margin:bottom + margin, left + margin:right + margin]
        if region.shape[1:] != (72, 44):
            region = torch.nn.functional.interpolate(region[None], size=(72, 44), mode="bicubic",
                                                     align_corners=False)[0]
        assert torch.allclose(window[1:], region, atol=1e-5)
        assert float(window[1:].max()) > 4.0  # not standardised


def test_three_channel_prediction_feeds_benign_then_malignant_heatmaps(patch_checkpoint, monkeypatch):
    options = dmv.Options(**{**SMALL, "augmentations": 1}, channels=3, patch_checkpoint=patch_checkpoint)
    torch.manual_seed(5)
    network = PLUGIN.network(options).eval()
    one = case("p", "left", 1, 3)
    located = dmv.locate_slots(dmv.arrange(one), options)
    computed = {slot: _patch_classifier.heatmaps(network.heatmapper.network, item.cropped, options.seed)
                for slot, item in located.items()}
    maps = {slot: torch.stack([m[1], m[0]]) for slot, m in computed.items()}  # [benign, malignant]
    assert all(not torch.allclose(m[0], m[1], atol=1e-3) for m in computed.values())  # swapping them matters
    with torch.no_grad():
        inputs = {slot: x[None] for slot, x in
                  dmv.windows(located, options, dmv.case_generator(options.seed, "p"), maps).items()}
        output = network(inputs)
        expected = float((output["CC"][0, 2, 1].exp() + output["MLO"][0, 2, 1].exp()) / 2)
        value = PLUGIN.predict(network, [one])[0]
    assert value == pytest.approx(expected, abs=1e-7)
    swapped = {slot: m.flip(0) for slot, m in maps.items()}
    with torch.no_grad():
        inputs = {slot: x[None] for slot, x in
                  dmv.windows(located, options, dmv.case_generator(options.seed, "p"), swapped).items()}
        output = network(inputs)
    assert float((output["CC"][0, 2, 1].exp() + output["MLO"][0, 2, 1].exp()) / 2) != pytest.approx(value, abs=1e-7)


def test_three_channel_training_leaves_the_patch_classifier_frozen(patch_checkpoint):
    options = dmv.Options(**SMALL, channels=3, patch_checkpoint=patch_checkpoint)
    torch.manual_seed(0)
    network = PLUGIN.network(options).train()
    loss = PLUGIN.loss(network, [case("a", "left", 1, 1), case("b", "right", 0, 2)], torch.tensor([1.0, 0.0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert network.four_view_resnet.cc.first_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in network.heatmapper.network.parameters())
    assert not any(k.startswith("heatmapper") for k in PLUGIN.checkpoint(network)["model"])


# --------------------------------------------------------------------------- test-time augmentation

def test_tta_is_deterministic_and_independent_of_batch_composition():
    torch.manual_seed(3)
    network = PLUGIN.network(dmv.Options(**SMALL)).eval()
    cases = [case(f"c{i}", "left" if i % 2 else "right", i % 3 == 0, i) for i in range(4)]
    with torch.no_grad():
        together = PLUGIN.predict(network, cases)
        again = PLUGIN.predict(network, cases)
        reversed_subset = PLUGIN.predict(network, [cases[3], cases[1]])
    assert np.array_equal(together, again)
    assert np.array_equal(reversed_subset, together[[3, 1]])
    assert np.all((together > 0) & (together < 1))
    other_seed = attrs.evolve(network.options, seed=5)
    deterministic = attrs.evolve(network.options, augmentations=0)
    with torch.no_grad():
        network.options = other_seed
        reseeded = PLUGIN.predict(network, cases)
        network.options = deterministic
        plain = PLUGIN.predict(network, cases)
    assert not np.allclose(reseeded, together, rtol=0, atol=1e-9)  # the windows really are random
    assert not np.allclose(plain, together, rtol=0, atol=1e-9)


def test_tta_averages_the_windows_probabilities():
    torch.manual_seed(4)
    options = dmv.Options(**{**SMALL, "augmentations": 3})
    network = PLUGIN.network(options).eval()
    one = case("only", "right", 1, 9)
    slots = dmv.arrange(one)
    located = dmv.locate_slots(slots, options)
    generator = dmv.case_generator(options.seed, "only")
    expected = []
    with torch.no_grad():
        for _ in range(3):
            inputs = {slot: x[None] for slot, x in dmv.windows(located, options, generator).items()}
            output = network(inputs)
            expected.append(float((output["CC"][0, 3, 1].exp() + output["MLO"][0, 3, 1].exp()) / 2))
        value = PLUGIN.predict(network, [one])[0]
    assert value == pytest.approx(np.mean(expected), abs=1e-7)
    assert np.std(expected) > 0


# --------------------------------------------------------------------------- options and training

def test_options_from_a_spec():
    options = structure(dmv.Options, {"cc_size": ["128", "96"], "mlo_size": [128, 96], "augmentations": 2},
                        "observers[0].options")
    assert options.cc_size == (128, 96) and options.mlo_size == (128, 96)
    with pytest.raises(PerceptcoreError, match="cc_size must be at least 11 x 11"):
        structure(dmv.Options, {"cc_size": [8, 96]}, "observers[0].options")
    with pytest.raises(PerceptcoreError, match="expected two whole numbers"):
        structure(dmv.Options, {"mlo_size": [128]}, "observers[0].options")
    with pytest.raises(PerceptcoreError, match="'channels' must be in"):
        structure(dmv.Options, {"channels": 2}, "observers[0].options")
    heatmaps = structure(dmv.Options, {"channels": 3, "patch_checkpoint": "models/patch.p"}, "observers[0].options")
    assert heatmaps.patch_checkpoint == "models/patch.p"
    with pytest.raises(PerceptcoreError, match="only used by the image-and-heatmaps model"):
        structure(dmv.Options, {"patch_checkpoint": "models/patch.p"}, "observers[0].options")


def test_a_small_dmv_learns_bright_blobs():
    options = dmv.Options(**SMALL)
    torch.manual_seed(0)
    network = PLUGIN.network(options)
    cases = [case(f"t{i}", "left" if i % 4 < 2 else "right", i % 2, 100 + i) for i in range(8)]
    labels = torch.tensor([i % 2 for i in range(8)], dtype=torch.float32)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)

    def evaluation_loss():
        torch.manual_seed(123)  # the same windows and input noise before and after
        network.train()
        with torch.no_grad():
            return float(PLUGIN.loss(network, cases, labels))

    before = evaluation_loss()
    for _ in range(8):
        network.train()
        optimiser.zero_grad()
        loss = PLUGIN.loss(network, cases, labels)
        loss.backward()
        optimiser.step()
    after = evaluation_loss()
    assert before > 0.5 and after < 0.5 * before
