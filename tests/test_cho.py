"""The channelized-Hotelling reader (`cho_reader`): its channels, its template against an
independent computation, its performance and its sensitivity to low-pass filtering on
synthetic breast images, its readers' calls and its checkpoints."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import scipy.stats
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.perturbation import ImageBatch
from perceptcore.plugins import load_registry
from perceptcore.runner import CaseImages, ViewImage
from perceptcore.spec import structure
from perceptcore_plugins.models import cho
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass

MODEL = cho.ChoReader()
SIZE, SPACING, MAX = 128, 0.1, 4095.0


# --------------------------------------------------------------------------- synthetic images

def power_law_texture(rng, size: int, beta: float = 3.0) -> np.ndarray:
    """Unit-sd texture with power spectrum ~ 1/f^beta, like breast parenchyma."""
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    frequency[0, 0] = np.inf
    texture = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * frequency ** (-beta / 2)).real
    return (texture - texture.mean()) / texture.std()


def breast_image(rng, kind: str):
    """A half-ellipse breast on the left edge, 0 outside; `kind`: none, specks (a cluster of 8
    bright specks 0.08 mm in sd: high frequency) or blob (a 1.2 mm radius mass with a projected
    ellipsoid profile: low frequency). Returns float32 pixels and the ROI box (or none)."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    breast = ((rows - SIZE / 2) / (0.48 * SIZE)) ** 2 + (cols / (0.9 * SIZE)) ** 2 <= 1
    image = 2000 + 300 * power_law_texture(rng, SIZE) + 30 * rng.standard_normal((SIZE, SIZE))
    boxes = ()
    if kind != "none":
        inside = np.argwhere(breast & (rows >= 20) & (rows < SIZE - 20) & (cols >= 12) & (cols < 0.6 * SIZE))
        r, c = inside[rng.integers(len(inside))]
        if kind == "specks":
            half = 12
            for _ in range(8):
                y, x = r + rng.uniform(-half + 3, half - 3), c + rng.uniform(-half + 3, half - 3)
                image += 400 * np.exp(-((rows - y) ** 2 + (cols - x) ** 2) / (2 * 0.8**2))
        else:
            half = 15
            image += 600 * np.sqrt(np.clip(1 - ((rows - r) ** 2 + (cols - c) ** 2) / 12**2, 0, None))
        boxes = ((int(r - half), int(c - half), int(r + half), int(c + half)),)
    return np.where(breast, np.clip(image, 1, MAX), 0).astype(np.float32), boxes


def make_cases(seed: int, kinds: list, prefix: str) -> list:
    rng = np.random.default_rng(seed)
    cases = []
    for i, kind in enumerate(kinds):
        pixels, boxes = breast_image(rng, kind)
        cases.append(CaseImages(f"{prefix}{i}", (ViewImage("CC", "left", torch.from_numpy(pixels), SPACING, MAX, boxes),)))
    return cases


def lowpass(cases: list, millimetres: float) -> list:
    """The bundled gaussian_lowpass perturbation at a wavelength, with its default (published) options."""
    perturbation = GaussianLowpass()
    out = []
    for case in cases:
        views = []
        for view in case.images:
            batch = ImageBatch(view.pixels[None], torch.tensor([view.spacing_mm]), view.max_value)
            pixels = perturbation.perturb(batch, millimetres, perturbation.Options(), torch.Generator())[0]
            views.append(ViewImage(view.view, view.laterality, pixels, view.spacing_mm, view.max_value))
        out.append(CaseImages(case.case, tuple(views)))
    return out


def auc(scores, positive) -> float:
    positive = np.asarray(positive, dtype=bool)
    u = scipy.stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
    return u / (positive.sum() * (~positive).sum())


TRAIN_KINDS = ["none", "specks", "none", "blob"] * 24
TEST_KINDS = np.array(["none", "specks", "none", "blob"] * 30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train = make_cases(1, TRAIN_KINDS, "train")
    labels = np.array([kind != "none" for kind in TRAIN_KINDS], dtype=int)
    folder = tmp_path_factory.mktemp("cho")
    paths = {}
    for seed in (7, 8):
        paths[seed] = folder / f"reader{seed}.pt"
        torch.save(MODEL.fit(train, labels, cho.Options(), seed), paths[seed])
    test = make_cases(2, list(TEST_KINDS), "test")
    return {"train": train, "labels": labels, "paths": paths, "test": test,
            "readers": {seed: MODEL.load(path, cho.Options(), "cpu") for seed, path in paths.items()}}


# --------------------------------------------------------------------------- channels and template

def test_channels_are_orthonormal_laguerre_gauss_functions():
    # Independent of the plugin's scipy Laguerre polynomials: numpy's Laguerre series.
    width, orders = 2.0, 5
    channels = cho.laguerre_gauss(width, orders, SPACING)
    radius = channels.shape[-1] // 2
    r2 = ((np.mgrid[-radius:radius + 1, -radius:radius + 1] * SPACING) ** 2).sum(axis=0)
    x = 2 * math.pi * r2 / width**2
    for n in range(orders):
        analytic = math.sqrt(2) / width * np.exp(-x / 2) * np.polynomial.laguerre.lagval(x, np.eye(orders)[n])
        np.testing.assert_allclose(channels[n], analytic * SPACING, atol=1e-6 * np.abs(analytic * SPACING).max())
    for width in (0.3, 0.5, 2.0):  # 0.3 mm: the finest rings are below the pixel size, orthonormalised
        flat = cho.laguerre_gauss(width, orders, SPACING).reshape(orders, -1)
        np.testing.assert_allclose(flat @ flat.T, np.eye(orders), atol=1e-10)
    with pytest.raises(PerceptcoreError, match="too fine for 0.1 mm pixels"):
        cho.laguerre_gauss(0.02, orders, SPACING)


def test_narrow_channels_carry_the_high_frequencies_and_wide_ones_the_low():
    def share_above(channels, cycles_per_mm):
        power = np.abs(np.fft.fft2(channels, s=(512, 512))) ** 2
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(512, SPACING), np.fft.fftfreq(512, SPACING), indexing="ij"))
        return power[:, f > cycles_per_mm].sum() / power.sum()

    narrow, wide = cho.channel_sets(cho.Options(), SPACING)
    assert share_above(narrow, 1.0) > 0.5  # detail finer than 1 mm: what a 1 mm low-pass removes
    assert share_above(wide, 1.0) < 0.01


def test_hotelling_template_equals_a_direct_solve():
    rng = np.random.default_rng(0)
    signal = rng.normal(1.0, 1.0, (40, 4)) @ rng.normal(size=(4, 4))
    background = rng.normal(0.0, 1.0, (70, 4)) @ rng.normal(size=(4, 4))

    def scatter(samples):
        centred = samples - samples.mean(axis=0)
        return centred.T @ centred / (len(samples) - 1)

    covariance = (scatter(signal) + scatter(background)) / 2
    covariance += 0.01 * np.trace(covariance) / 4 * np.eye(4)
    expected = np.linalg.lstsq(covariance, signal.mean(axis=0) - background.mean(axis=0), rcond=None)[0]
    np.testing.assert_allclose(cho.hotelling_template(signal, background, 0.01), expected, rtol=1e-10)


def test_fitted_templates_are_the_hotelling_templates_of_the_channel_outputs(data):
    options = cho.Options()
    signal, background = cho.training_samples(data["train"], data["labels"], options,
                                              np.random.default_rng([7, 0]))
    fitted = data["readers"][7].templates
    for s in range(2):
        covariance = (np.cov(signal[s].T) + np.cov(background[s].T)) / 2
        covariance += options.ridge * np.trace(covariance) / options.orders * np.eye(options.orders)
        expected = np.linalg.lstsq(covariance, signal[s].mean(0) - background[s].mean(0), rcond=None)[0]
        np.testing.assert_allclose(fitted[s], expected, rtol=1e-9)
    # Each lesion taught the set of its scale: about half the boxes each.
    assert 15 <= len(signal[0]) <= 33 and 15 <= len(signal[1]) <= 33


def test_scanning_by_fft_equals_the_direct_sum_and_responses_at_points():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((40, 36)).astype(np.float32)
    channels = cho.laguerre_gauss(0.5, 3, SPACING)
    maps = cho.correlate(image, channels, SPACING)
    radius = channels.shape[-1] // 2
    padded = np.pad(image.astype(np.float64), radius)
    for r, c in [(0, 0), (5, 30), (39, 35), (20, 17)]:
        direct = (padded[r:r + 2 * radius + 1, c:c + 2 * radius + 1] * channels).sum(axis=(1, 2)) * SPACING
        np.testing.assert_allclose(maps[:, r, c], direct, atol=1e-5)
        np.testing.assert_allclose(cho.responses_at(image, channels, [(r, c)], SPACING)[0], direct, atol=1e-12)


# --------------------------------------------------------------------------- as an observer

def test_detects_specks_and_blobs_and_a_1mm_lowpass_hurts_specks_much_more(data):
    reader, test = data["readers"][7], data["test"]
    normal = TEST_KINDS == "none"
    aucs = {}
    for millimetres, cases in ((0, test), (1.0, lowpass(test, 1.0))):
        statistic = cho.statistics(reader, cases)
        calls = MODEL.predict(reader, cases)
        for kind in ("specks", "blob"):
            chosen = normal | (TEST_KINDS == kind)
            aucs[kind, millimetres] = auc(statistic[chosen], TEST_KINDS[chosen] == kind)
            aucs[kind, millimetres, "calls"] = auc(calls[chosen], TEST_KINDS[chosen] == kind)
    assert aucs["specks", 0] > 0.85 and aucs["blob", 0] > 0.8, aucs
    assert aucs["specks", 0, "calls"] > 0.65 and aucs["blob", 0, "calls"] > 0.65, aucs
    speck_loss, blob_loss = aucs["specks", 0] - aucs["specks", 1.0], aucs["blob", 0] - aucs["blob", 1.0]
    assert speck_loss > 0.3 and blob_loss < 0.1, aucs


def test_readers_differ_in_threshold_noise_and_calls(data):
    checkpoints = {seed: torch.load(path, weights_only=True) for seed, path in data["paths"].items()}
    assert checkpoints[7]["threshold"] != checkpoints[8]["threshold"]
    assert checkpoints[7]["noise_sd"] != checkpoints[8]["noise_sd"]
    options = cho.Options()
    for contents in checkpoints.values():
        assert options.false_positive_rate[0] <= contents["false_positive_rate"] <= options.false_positive_rate[1]
        assert options.internal_noise[0] <= contents["noise_fraction"] <= options.internal_noise[1]
    calls = {seed: MODEL.predict(reader, data["test"]) for seed, reader in data["readers"].items()}
    assert set(np.unique(calls[7])) <= {0.0, 1.0}
    assert 0 < (calls[7] != calls[8]).sum() < len(calls[7]) / 2  # different readers, same task


def test_threshold_gives_the_drawn_false_positive_rate_with_noise():
    negatives = np.random.default_rng(4).normal(size=50)
    threshold = cho.threshold_for(negatives, 0.4, 0.1)
    assert np.mean(1 - scipy.stats.norm.cdf(threshold, loc=negatives, scale=0.4)) == pytest.approx(0.1, abs=1e-9)
    assert cho.threshold_for(negatives, 0.0, 0.1) == pytest.approx(np.quantile(negatives, 0.9))


def test_calls_are_deterministic_whatever_the_batch_or_order(data):
    reader, cases = data["readers"][7], data["test"][:24]
    calls = MODEL.predict(reader, cases)
    shuffled = np.random.default_rng(5).permutation(len(cases))
    np.testing.assert_array_equal(MODEL.predict(reader, [cases[i] for i in shuffled]), calls[shuffled])
    in_pieces = np.concatenate([MODEL.predict(reader, cases[i:i + 5]) for i in range(0, len(cases), 5)])
    np.testing.assert_array_equal(in_pieces, calls)
    # The noise depends on the pixels shown: another severity, another independent draw.
    noise = np.array([cho.internal_noise(reader, case) for case in cases])
    blurred = np.array([cho.internal_noise(reader, case) for case in lowpass(cases, 0.5)])
    assert np.all(noise != blurred) and abs(np.corrcoef(noise, blurred)[0, 1]) < 0.5
    assert np.std(noise) == pytest.approx(reader.noise_sd, rel=0.5)


def test_a_case_with_several_views_takes_its_most_suspicious_view(data):
    reader, cases = data["readers"][7], data["test"][:4]
    single = cho.statistics(reader, cases)
    both = CaseImages("two_views", (cases[0].images[0], cases[1].images[0]))
    assert cho.statistics(reader, [both])[0] == pytest.approx(max(single[0], single[1]), rel=1e-12)


def test_predicting_ignores_the_roi_boxes(data):
    reader, cases = data["readers"][7], data["test"][:16]
    assert any(view.roi_boxes for case in cases for view in case.images)
    bare = [CaseImages(case.case, tuple(ViewImage(v.view, v.laterality, v.pixels, v.spacing_mm, v.max_value)
                                        for v in case.images)) for case in cases]
    np.testing.assert_array_equal(cho.statistics(reader, bare), cho.statistics(reader, cases))
    np.testing.assert_array_equal(MODEL.predict(reader, bare), MODEL.predict(reader, cases))


# --------------------------------------------------------------------------- checkpoints and options

def test_checkpoint_round_trips_through_torch_save(data, tmp_path):
    contents = torch.load(data["paths"][7], weights_only=True)
    assert set(contents) >= set(cho.CHECKPOINT_KEYS)
    again = MODEL.fit(data["train"], data["labels"], cho.Options(), 7)  # deterministic
    for key, value in contents.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key
        else:
            assert value == again[key], key
    reader = data["readers"][7]
    np.testing.assert_array_equal(reader.templates, contents["templates"].numpy())
    assert (reader.seed, reader.noise_sd, reader.threshold) == (contents["seed"], contents["noise_sd"], contents["threshold"])


def _saved(tmp_path, contents, name="bad.pt"):
    path = tmp_path / name
    torch.save(contents, path)
    return path


def test_corrupted_checkpoints_fail_with_a_clear_error(data, tmp_path):
    good = torch.load(data["paths"][7], weights_only=True)
    options = cho.Options()

    def load_error(path, opts=options):
        with pytest.raises(PerceptcoreError) as caught:
            MODEL.load(path, opts, "cpu")
        return caught.value

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data["paths"][7].read_bytes()[:200])
    assert "not a cho_reader checkpoint" in load_error(truncated).message

    class Evil:  # a pickle that would run code: weights_only refuses it
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    pickle.dump({"format": Evil()}, buffer, protocol=2)
    evil.write_bytes(buffer.getvalue())
    assert "not a cho_reader checkpoint" in load_error(evil).message

    missing = {k: v for k, v in good.items() if k != "negative_sd"}
    assert "key 'negative_sd' is missing" in load_error(_saved(tmp_path, missing)).message
    error = load_error(_saved(tmp_path, {**good, "templates": torch.zeros(2, 4, dtype=torch.float64)}))
    assert "key 'templates' must be a float tensor of shape (2, 5)" in error.message
    assert error.where == "observers.checkpoints"
    nan = good["negative_mean"].clone()
    nan[0] = float("nan")
    assert "key 'negative_mean' holds values that are not finite" in load_error(
        _saved(tmp_path, {**good, "negative_mean": nan})).message
    assert "key 'threshold' must be a finite number" in load_error(
        _saved(tmp_path, {**good, "threshold": "high"})).message
    assert "key 'format'" in load_error(_saved(tmp_path, {**good, "format": "small_cnn"})).message
    assert "not a dict" in load_error(_saved(tmp_path, [1, 2])).message
    error = load_error(data["paths"][7], cho.Options(widths_mm=(0.3, 3.0)))
    assert error.where == "observers.options" and "widths_mm [0.3, 2.0]" in error.message


def test_options_from_a_spec_are_checked():
    options = structure(cho.Options, {"widths_mm": ["0.4", "1.5", "3"], "false_positive_rate": ["0.1", "0.1"]},
                        "observers[0].options")
    assert options.widths_mm == (0.4, 1.5, 3.0) and options.false_positive_rate == (0.1, 0.1)
    for raw, message in [({"widths_mm": ["2", "0.3"]}, "widths_mm must be increasing"),
                         ({"widths_mm": ["wide"]}, "expected a list of numbers"),
                         ({"false_positive_rate": ["0.3", "0.1"]}, "false_positive_rate must be [low, high]"),
                         ({"internal_noise": ["0.1"]}, "internal_noise must be [low, high]"),
                         ({"orders": 1}, "orders must be >= 2"),
                         ({"breast_threshold": 1.5}, "breast_threshold must be >= 0 and < 1")]:
        with pytest.raises(PerceptcoreError, match=message.replace("[", r"\[")) as caught:
            structure(cho.Options, raw, "observers[0].options")
        assert caught.value.where == "observers[0].options"


def test_fit_needs_located_lesions_and_negatives(data):
    train, labels = data["train"], data["labels"]
    unboxed = [CaseImages(c.case, tuple(ViewImage(v.view, v.laterality, v.pixels, v.spacing_mm, v.max_value)
                                        for v in c.images)) for c in train]
    with pytest.raises(PerceptcoreError, match="at least 2 ROI boxes"):
        MODEL.fit(unboxed, labels, cho.Options(), 0)
    with pytest.raises(PerceptcoreError, match="one 0/1 label per case"):
        MODEL.fit(train, labels[:-1], cho.Options(), 0)
    positives = [c for c, y in zip(train, labels) if y == 1]
    with pytest.raises(PerceptcoreError, match="negative"):
        MODEL.fit(positives + train[:1], np.r_[np.ones(len(positives)), 0], cho.Options(), 0)


def test_registered_as_a_model_plugin():
    registry = load_registry()
    model = registry.get("model", "cho_reader", "observers[0].model")
    assert isinstance(model, cho.ChoReader) and hasattr(model, "fit")
