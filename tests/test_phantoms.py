"""The mammography phantom generator: its files load with the core's readers and the bundled
subgroups, and its images have the physics the demo study relies on — a 1/f^beta texture,
calcifications that a 1 mm Gaussian low-pass removes and masses that it keeps, and lesion
classes an observer can tell apart."""

from __future__ import annotations

import filecmp
from pathlib import Path

import attrs
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from perceptcore.errors import PerceptcoreError
from perceptcore.images import load_manifest, read_image
from perceptcore.perturbation import ImageBatch
from perceptcore.plugins import load_registry
from perceptcore.spec import structure
from perceptcore.stats import auc
from perceptcore_plugins.datasets.mammography_phantoms import (
    KINDS,
    MammographyPhantoms,
    Options,
    plan_case,
    plan_set,
    render_view,
)
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass

SEED = 7
# Enough cases per class for the separability check, few enough to generate in about a second.
SMALL = dict(test_malignant_calcification=16, test_malignant_soft_tissue=16, test_benign_calcification=16,
             test_benign_soft_tissue=16, test_normal=8, train_malignant_calcification=3,
             train_malignant_soft_tissue=3, train_benign_calcification=3, train_benign_soft_tissue=3,
             train_normal=2)
TINY = {key: (1 if value else 0) for key, value in SMALL.items()}


def generate(folder: Path, seed: int = SEED, **options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    MammographyPhantoms().generate(Options(**options), folder, seed, lambda message: None)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("phantoms"), **SMALL)


def images_of(folder: Path) -> list[tuple]:
    """(manifest record, pixels) of every image of a set."""
    manifest = load_manifest(folder / "manifest.csv", "images")
    return [(record, read_image(record, "images").pixels) for record in manifest]


# --------------------------------------------------------------------------- plugin and options

def test_registered_as_a_dataset_with_checked_options():
    generator = load_registry().get("dataset", "mammography_phantoms", "dataset.name")
    assert isinstance(generator, MammographyPhantoms)
    assert structure(generator.Options, {}, "dataset.options") == Options()
    options = structure(generator.Options, {"views": ["CC", "MLO"], "beta": 2.5}, "dataset.options")
    assert options.views == ("CC", "MLO") and options.beta == 2.5
    with pytest.raises(PerceptcoreError, match="views must be distinct items of CC, MLO"):
        structure(generator.Options, {"views": ["CC", "ML"]}, "dataset.options")
    with pytest.raises(PerceptcoreError, match="width x pixel_spacing_mm is 20 mm"):
        structure(generator.Options, {"width": 200}, "dataset.options")
    with pytest.raises(PerceptcoreError, match="test_normal must be >= 0"):
        structure(generator.Options, {"test_normal": -1}, "dataset.options")


# --------------------------------------------------------------------------- files

def test_cases_per_kind_and_the_files_they_need(dataset):
    for which, folder in (("test", dataset), ("train", dataset / "train")):
        cases = pd.read_csv(folder / "cases.csv", keep_default_na=False)
        assert list(cases.columns) == ["case", "label", "calcification", "mass", "asymmetry",
                                       "architectural_distortion", "biopsied", "lesion"]
        calcified = cases.calcification == 1
        counted = {
            "malignant_calcification": ((cases.label == "malignant") & calcified).sum(),
            "malignant_soft_tissue": ((cases.label == "malignant") & ~calcified).sum(),
            "benign_calcification": ((cases.label == "benign") & calcified).sum(),
            "benign_soft_tissue": ((cases.label == "benign") & ~calcified).sum(),
            "normal": (cases.label == "normal").sum(),
        }
        assert counted == {kind: SMALL[f"{which}_{kind}"] for kind in KINDS}
        findings = cases[["calcification", "mass", "asymmetry", "architectural_distortion"]].sum(axis=1)
        assert (findings == (cases.label != "normal")).all()  # exactly one finding per lesion, none in normals
        assert (cases.biopsied == np.where(cases.label == "normal", "no", "yes")).all()
        malignant_soft = cases[(cases.label == "malignant") & ~calcified].lesion
        benign_soft = cases[(cases.label == "benign") & ~calcified].lesion
        assert set(malignant_soft) <= {"spiculated_mass", "architectural_distortion"}
        assert set(benign_soft) <= {"circumscribed_mass", "focal_asymmetry"}
        assert cases.case.str.fullmatch(rf"{which}\d{{4}}").all() and cases.case.is_unique

        manifest = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
        assert list(manifest.columns) == ["case", "view", "laterality", "file", "pixel_spacing_mm", "bits",
                                          "roi_boxes"]
        assert list(manifest.case) == list(cases.case) and (manifest.view == "CC").all()
        assert (manifest.bits == 12).all() and (manifest.pixel_spacing_mm == 0.1).all()
        has_roi = manifest.roi_boxes != ""
        assert (has_roi == (cases.label != "normal").to_numpy()).all()
        assert all((folder / file).is_file() for file in manifest.file)
    test_ids = set(pd.read_csv(dataset / "cases.csv").case)
    assert test_ids.isdisjoint(pd.read_csv(dataset / "train" / "cases.csv").case)


def test_manifests_load_with_the_image_reader(dataset):
    for folder in (dataset, dataset / "train"):
        manifest = load_manifest(folder / "manifest.csv", "images")
        cases = pd.read_csv(folder / "cases.csv").set_index("case")
        assert manifest.cases == list(cases.index)
        for record in manifest:
            image = read_image(record, "images")
            assert image.pixels.dtype == np.uint16 and image.pixels.shape == (256, 256)
            assert image.bits == 12 and image.max_value == 4095 and image.pixel_spacing_mm == 0.1
            assert record.has_roi == (cases.label[record.case] != "normal")
            # np.load without pickles reads them too
            assert np.array_equal(np.load(record.file, allow_pickle=False), image.pixels)


def test_breast_lesions_reads_the_cases_as_written(dataset):
    subgroups = load_registry().get("subgroups", "breast_lesions", "subgroups.definition")
    cases = pd.read_csv(dataset / "cases.csv", keep_default_na=False)
    assigned = subgroups.assign(cases, {}, "subgroups.options")
    expected = np.where(cases.label == "normal", "nonbiopsied",
                        np.where(cases.lesion == "calcification_cluster", "microcalcifications",
                                 "soft_tissue_lesions"))
    assert list(assigned) == list(expected)
    assert set(assigned) == {"nonbiopsied", "microcalcifications", "soft_tissue_lesions"}


def test_twelve_bit_images_background_zero_and_laterality(dataset):
    lateralities = set()
    for record, pixels in images_of(dataset):
        assert pixels.max() <= 4095
        chest_wall, far_edge = (0, -1) if record.laterality == "left" else (-1, 0)
        assert not pixels[:, far_edge].any()  # a left breast faces right: background on the right
        assert (pixels[:, chest_wall] > 0).mean() > 0.6  # and lies on the chest wall on the left
        # The background (0) is all one region reaching the far edge: no zero inside the breast.
        background, _ = ndimage.label(pixels == 0)
        assert np.unique(background[pixels == 0]).size == 1
        assert (pixels > 0).mean() > 0.4
        lateralities.add(record.laterality)
    assert lateralities == {"left", "right"}


def test_right_images_mirror_left_ones():
    options = Options()
    plan = plan_case("x", "benign_soft_tissue", np.random.SeedSequence(3), options)
    left = render_view(attrs.evolve(plan, laterality="left"), "CC", options)
    right = render_view(attrs.evolve(plan, laterality="right"), "CC", options)
    assert np.array_equal(right.pixels, left.pixels[:, ::-1])
    row0, col0, row1, col1 = left.box
    assert right.box == (row0, 256 - col1, row1, 256 - col0)


def test_roi_boxes_contain_every_lesion_pixel(dataset):
    options = Options(**SMALL)
    manifest = load_manifest(dataset / "manifest.csv", "images")
    for plan, record in zip(plan_set("test", options, SEED), manifest):
        assert plan.case == record.case
        if plan.lesion is None:
            assert not record.has_roi
            continue
        with_lesion = render_view(plan, "CC", options)
        without = render_view(plan, "CC", options, with_lesion=False)
        assert np.array_equal(with_lesion.pixels, np.load(record.file))
        assert record.roi_boxes == (with_lesion.box,)
        changed = with_lesion.pixels != without.pixels
        assert changed.any()
        inside = np.zeros(changed.shape, dtype=bool)
        row0, col0, row1, col1 = with_lesion.box
        inside[row0:row1, col0:col1] = True
        assert not (changed & ~inside).any()
        assert not ((with_lesion.lesion > 0) & ~inside).any()
        breast = without.pixels > 0
        assert breast[with_lesion.lesion > 0].all()  # lesions lie inside the breast


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = generate(tmp_path / "a", **TINY)
    again = generate(tmp_path / "b", **TINY)
    other = generate(tmp_path / "c", seed=SEED + 1, **TINY)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 2 * (2 + 5)  # cases.csv, manifest.csv and an image per case, per set
    for file in files:
        assert filecmp.cmp(first / file, again / file, shallow=False), file
    assert not any(np.array_equal(np.load(first / f), np.load(other / f)) for f in files if f.suffix == ".npy")


def test_mlo_views_leave_cc_images_unchanged(tmp_path):
    cc = generate(tmp_path / "cc", **TINY)
    both = generate(tmp_path / "both", views=("CC", "MLO"), **TINY)
    manifest = pd.read_csv(both / "manifest.csv", keep_default_na=False)
    assert list(manifest.view) == ["CC", "MLO"] * 5
    assert (manifest.groupby("case").laterality.nunique() == 1).all()
    assert ((manifest.roi_boxes != "").groupby(manifest.case).nunique() == 1).all()  # a lesion shows in both
    for file in manifest.file[manifest.view == "CC"]:
        assert filecmp.cmp(cc / file, both / file, shallow=False)
    for file in manifest.file[manifest.view == "MLO"]:
        assert not np.array_equal(np.load(both / file), np.load(both / file.replace("MLO", "CC")))


# --------------------------------------------------------------------------- physics

def radial_power_slope(patch: np.ndarray) -> float:
    """Log-log slope of the radially averaged power spectrum of a square patch (Hann window),
    fitted over frequencies 4/N .. 1/4 cycles per pixel."""
    size = patch.shape[0]
    window = np.outer(np.hanning(size), np.hanning(size))
    power = np.abs(np.fft.fft2((patch - patch.mean()) * window)) ** 2
    k = np.fft.fftfreq(size) * size
    radius = np.rint(np.hypot(k[:, None], k[None, :])).astype(int)
    rings = np.arange(4, size // 4 + 1)
    mean_power = [power[radius == ring].mean() for ring in rings]
    return float(np.polyfit(np.log(rings), np.log(mean_power), 1)[0])


def interior_patch(pixels: np.ndarray, size: int, depth_mm: float, spacing: float = 0.1) -> np.ndarray:
    """A size x size patch whose pixels all lie at least depth_mm inside the skin line (the breast
    being the nonzero pixels), where the thickness no longer falls off."""
    inside = ndimage.distance_transform_edt(pixels > 0) * spacing >= depth_mm
    fits = ndimage.minimum_filter(inside, size=size, mode="constant") > 0
    row, col = np.argwhere(fits)[0] - size // 2
    return pixels[row:row + size, col:col + size].astype(float)


@pytest.mark.parametrize("beta", [3.0, 2.0])
def test_texture_power_spectrum_has_slope_minus_beta(beta):
    options = Options(beta=beta)
    slopes = []
    for i in range(24):  # one image's slope has an sd of about 0.2
        plan = plan_case("x", "normal", np.random.SeedSequence(i), options)
        # The rim where the thickness falls off is at most depth / 6 < 4 mm wide.
        slopes.append(radial_power_slope(interior_patch(render_view(plan, "CC", options).pixels, 80, 4.5)))
    assert abs(np.mean(slopes) + beta) < 0.2, slopes


def lesions_of(kind: str, lesion: str, count: int, options: Options) -> list:
    plans = (plan_case("x", kind, np.random.SeedSequence([100, i]), options) for i in range(10 * count))
    return [plan for plan in plans if plan.lesion.kind == lesion][:count]


def contrast_removed(plan, options: Options, severity_mm: float) -> float:
    """1 - contrast after / before low-pass filtering, the lesion's contrast being the mean over its
    parts (connected regions where it adds >= 10 % of its maximum: each speck, a mass) of the
    part's peak difference between the image with and without the lesion — the texture and
    noise, identical in both, cancel."""
    with_lesion, without = render_view(plan, "CC", options), render_view(plan, "CC", options, with_lesion=False)
    parts, count = ndimage.label(with_lesion.lesion >= 0.1 * with_lesion.lesion.max())
    index = np.arange(1, count + 1)
    filter_, filter_options = GaussianLowpass(), GaussianLowpass.Options(rescale="preserve")

    def lowpass(pixels):
        batch = ImageBatch(torch.from_numpy(pixels.astype(np.float32))[None], torch.tensor([0.1]), 4095.0)
        return filter_.perturb(batch, severity_mm, filter_options, torch.Generator()).numpy()[0].astype(float)

    before = ndimage.maximum(with_lesion.pixels.astype(float) - without.pixels, parts, index)
    after = ndimage.maximum(lowpass(with_lesion.pixels) - lowpass(without.pixels), parts, index)
    return 1 - np.mean(after) / np.mean(before)


def test_one_mm_lowpass_removes_calcifications_but_keeps_masses():
    options = Options()
    calcifications = [contrast_removed(plan, options, 1.0)
                      for kind in ("malignant_calcification", "benign_calcification")
                      for plan in lesions_of(kind, "calcification_cluster", 6, options)]
    masses = [contrast_removed(plan, options, 1.0)
              for kind, lesion in (("malignant_soft_tissue", "spiculated_mass"),
                                   ("benign_soft_tissue", "circumscribed_mass"))
              for plan in lesions_of(kind, lesion, 6, options)]
    assert np.mean(calcifications) > 0.7 and min(calcifications) > 0.6, calcifications
    assert np.mean(masses) < 0.1 and max(masses) < 0.25, masses


def speck_count(pixels: np.ndarray, box: tuple) -> int:
    """Bright specks in the ROI: local maxima of a difference of Gaussians (0.07 and 0.15 mm)
    above 4 robust sds of that filter over the breast outside the ROI."""
    image = pixels.astype(float)
    band = ndimage.gaussian_filter(image, 0.7) - ndimage.gaussian_filter(image, 1.5)
    row0, col0, row1, col1 = box
    background = ndimage.binary_erosion(pixels > 0, iterations=30)
    background[row0:row1, col0:col1] = False
    values = band[background]
    sd = 1.4826 * np.median(np.abs(values - np.median(values)))
    roi = band[row0:row1, col0:col1]
    return int(((roi == ndimage.maximum_filter(roi, 3)) & (roi > 4 * sd)).sum())


def spiculation(pixels: np.ndarray, box: tuple) -> float:
    """Thin radial lines around the ROI's centre: the sd of the image's profile along circles
    (0.45, 0.6 and 0.75 of the ROI's half-size) after removing its variation over 35 degrees."""
    image = ndimage.gaussian_filter(pixels.astype(float), 1.0)
    row0, col0, row1, col1 = box
    centre_row, centre_col, half = (row0 + row1 - 1) / 2, (col0 + col1 - 1) / 2, min(row1 - row0, col1 - col0) / 2
    angles = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    spread = []
    for fraction in (0.45, 0.6, 0.75):
        radius = fraction * half
        profile = ndimage.map_coordinates(image, [centre_row + radius * np.sin(angles),
                                                  centre_col + radius * np.cos(angles)], order=1)
        spread.append(np.std(profile - ndimage.uniform_filter1d(profile, 25, mode="wrap")))
    return float(np.mean(spread))


def test_an_observer_tells_malignant_from_benign_in_each_lesion_family(dataset):
    cases = pd.read_csv(dataset / "cases.csv", keep_default_na=False).set_index("case")
    scores = {}
    for record, pixels in images_of(dataset):
        label = cases.label[record.case]
        if label == "normal":
            continue
        calcification = cases.calcification[record.case] == 1
        statistic = speck_count if calcification else spiculation
        scores.setdefault((calcification, label), []).append(statistic(pixels, record.roi_boxes[0]))
    for calcification in (True, False):
        malignant, benign = np.array(scores[calcification, "malignant"]), np.array(scores[calcification, "benign"])
        assert len(malignant) == len(benign) == 16
        assert auc(malignant, benign) > 0.8, (calcification, malignant, benign)
