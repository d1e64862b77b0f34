"""Synthetic mammography phantoms: the demo study's images and cases, generated from a seed.

Files written into the dataset folder
    ``cases.csv``: the test cases, one row per breast: ``case``, ``label`` (malignant / benign
    / normal), ``calcification``, ``mass``, ``asymmetry``, ``architectural_distortion`` (0/1),
    ``biopsied`` (yes for malignant and benign, no for normal) and ``lesion`` (what was drawn:
    calcification_cluster, spiculated_mass, architectural_distortion, circumscribed_mass,
    focal_asymmetry or none). The bundled `breast_lesions` subgroups read it as it is:
    calcification clusters are `microcalcifications`, the other lesions
    `soft_tissue_lesions`, normals `nonbiopsied`.
    ``manifest.csv``: the test images in the manifest format of `perceptcore.images`:
    ``case``, ``view``, ``laterality`` (left/right), ``file``, ``pixel_spacing_mm``, ``bits``
    (12) and ``roi_boxes`` (a half-open box "row0 col0 row1 col1" around the lesion; empty
    for normals).
    ``images/<case>_<view>.npy``: uint16 2-D arrays with values 0..4095.
    ``train/cases.csv``, ``train/manifest.csv``, ``train/images/``: the training set in the
    same formats, paths relative to ``train/``: other cases (ids ``trainNNNN``; the test
    cases are ``testNNNN``) from the same distribution.

    Images are ``.npy`` rather than 16-bit PNG: exact uint16 without a codec, quicker to
    write and read than PNG's zlib, checked from the header alone by `load_manifest`, and
    loaded with ``allow_pickle=False``.

Cases
    A case is a breast: laterality left or right with probability 1/2, one image per view in
    ``views`` (CC by default; MLO too when asked), one lesion or none. The kinds' counts are
    options per set; their order in a set is shuffled, so an id says nothing about its label.

Breast (all lengths in mm, so a lesion keeps its physical size at any pixel spacing)
    A half-ellipse on the chest wall, which is the left image edge for left breasts and the
    right edge for right breasts (a left breast faces right, as on a viewing station): right
    images are the mirror image of the same construction. At the default 256 x 256 pixels of
    0.1 mm the breast is small (about 22 mm deep); lesions have realistic sizes, so their
    spatial frequencies — what a low-pass filter acts on — are those of real ones. MLO views
    add the pectoral muscle, a brighter triangle in the upper chest-wall corner. Inside the
    breast the grey level is

        t(d) * (tissue_level + texture_sd * T) + pectoral + lesion + N(0, noise_sd^2)

    rounded and clipped to 1..4095; outside it is exactly 0 (so the breast is the nonzero pixels). T is a power-law texture with
    power spectrum ~ 1/f^beta (white noise shaped in the Fourier domain, unit sd). t(d) is
    the projected thickness of a compressed breast whose uncompressed rim is a half-circle:
    with d the distance to the skin line and w = depth / 6, t = sqrt(1 - (1 - min(d/w, 1))^2),
    so the grey level falls smoothly to 0 at the skin.

Lesions and the rules separating malignant from benign
    Calcification clusters (high-frequency signal): each speck is a calcium ellipsoid whose
    projected thickness adds ``calcification_contrast`` grey levels per 0.3 mm of path.
    - malignant: 10-20 specks, fine (0.12-0.25 mm across), pleomorphic (elongated up to 3:1,
      density varying +-40 %), in a linear/segmental run 0.25-0.4 mm per speck long;
    - benign: 3-6 specks, coarser (0.25-0.35 mm) and alike (+-10 % in size and density),
      round, scattered over a disc 1.2-2.5 mm in radius.
    Soft-tissue lesions (low-frequency signal); peak grey levels are the contrast options:
    - malignant: a spiculated mass (probability 0.7: an irregular core 1.5-2.5 mm in radius
      with 8-14 thin tapering spicules 0.8-1.6 core radii long, at 0.6 of ``mass_contrast``)
      or an architectural distortion (0.3: 10-16 spicules 2.5-4.5 mm long radiating from a
      point, no central mass, ``distortion_contrast``);
    - benign: a circumscribed oval mass (0.6: semi-axes 1.5-3 mm, smooth sharp margin,
      ``mass_contrast``) or a focal asymmetry (0.4: a diffuse density without margins, 3-5
      mm long semi-axis, ``asymmetry_contrast``).
    So spicules (radiating thin lines) mark every malignant soft-tissue lesion and no benign
    one. Masses have the projected-ellipsoid profile sqrt(1 - rho^2), the asymmetry
    (1 - rho^2)^2. Spicules are Gaussian ridges (0.3-0.5 mm wide at the base) that combine
    with the core by maximum, not sum, so a distortion has no bright centre. Each pixel is
    the mean of 4 x 4 (calcifications) or 2 x 2 (soft tissue) sub-samples.

    A lesion lies wholly inside the breast and the image, 0.5 mm clear of the skin line and
    the edges. Its ROI box is the bounding box of the pixels to which it adds at least 0.25
    grey levels, widened by 0.5 mm on each side (clipped to the image).

Randomness
    Everything derives from ``np.random.SeedSequence(seed, spawn_key=...)``: the order of the
    kinds in each set from key (set,), each case from (set, case), split into independent
    streams for its lesion and, per view, anatomy, lesion placement and noise — so an image
    rendered without its lesion has exactly the same background (`render_view`).
"""

from __future__ import annotations

import math
import numbers
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import pandas as pd
import scipy.fft

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

BITS = 12
MAX_VALUE = 2**BITS - 1
VIEWS = ("CC", "MLO")
KINDS = ("malignant_calcification", "malignant_soft_tissue", "benign_calcification", "benign_soft_tissue", "normal")
SETS = ("test", "train")
FINDINGS = ("calcification", "mass", "asymmetry", "architectural_distortion")
CASE_COLUMNS = ("case", "label", *FINDINGS, "biopsied", "lesion")
MANIFEST_COLUMNS = ("case", "view", "laterality", "file", "pixel_spacing_mm", "bits", "roi_boxes")
ROI_MARGIN_MM = 0.5
MIN_SIDE_MM = 24.0  # the largest lesion reaches 6.25 mm from its centre and must fit inside the breast


def _positive(instance, attribute, value):
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _non_negative(instance, attribute, value):
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _views(instance, attribute, value):
    if not value or any(view not in VIEWS for view in value) or len(set(value)) != len(value):
        raise ValueError(f"views must be distinct items of {', '.join(VIEWS)}, got {list(value)}")


@attrs.frozen
class Options:
    """Image size and physics (grey levels of the 0..4095 range), and the cases per kind of each set."""

    height: int = attrs.field(default=256, validator=_positive)  # pixels
    width: int = attrs.field(default=256, validator=_positive)
    pixel_spacing_mm: float = attrs.field(default=0.1, validator=_positive)
    views: tuple = attrs.field(default=("CC",), validator=_views)  # per breast: CC and/or MLO
    beta: float = attrs.field(default=3.0, validator=_positive)  # texture power spectrum ~ 1/f^beta
    tissue_level: float = attrs.field(default=1600.0, validator=_positive)  # mean of the breast interior
    texture_sd: float = attrs.field(default=200.0, validator=_non_negative)  # sd of the texture there
    noise_sd: float = attrs.field(default=10.0, validator=_non_negative)  # white (quantum) noise
    calcification_contrast: float = attrs.field(default=600.0, validator=_non_negative)  # per 0.3 mm of calcium
    mass_contrast: float = attrs.field(default=250.0, validator=_non_negative)  # peak, mass centre
    asymmetry_contrast: float = attrs.field(default=150.0, validator=_non_negative)  # peak
    distortion_contrast: float = attrs.field(default=200.0, validator=_non_negative)  # spicule base
    test_malignant_calcification: int = attrs.field(default=40, validator=_non_negative)
    test_malignant_soft_tissue: int = attrs.field(default=40, validator=_non_negative)
    test_benign_calcification: int = attrs.field(default=40, validator=_non_negative)
    test_benign_soft_tissue: int = attrs.field(default=40, validator=_non_negative)
    test_normal: int = attrs.field(default=80, validator=_non_negative)
    train_malignant_calcification: int = attrs.field(default=60, validator=_non_negative)
    train_malignant_soft_tissue: int = attrs.field(default=60, validator=_non_negative)
    train_benign_calcification: int = attrs.field(default=60, validator=_non_negative)
    train_benign_soft_tissue: int = attrs.field(default=60, validator=_non_negative)
    train_normal: int = attrs.field(default=120, validator=_non_negative)

    def __attrs_post_init__(self):
        for side in ("height", "width"):
            extent = getattr(self, side) * self.pixel_spacing_mm
            if extent < MIN_SIDE_MM:
                raise ValueError(f"{side} x pixel_spacing_mm is {extent:g} mm; the phantoms need at least "
                                 f"{MIN_SIDE_MM:g} mm so that every lesion fits inside the breast")

    def counts(self, which: str) -> dict[str, int]:
        """Cases per kind of the test or train set."""
        return {kind: getattr(self, f"{which}_{kind}") for kind in KINDS}


# --------------------------------------------------------------------------- lesions

@attrs.frozen
class Speck:
    y: float  # mm from the cluster centre
    x: float
    half_long: float  # semi-axes in mm; the depth semi-axis equals half_short
    half_short: float
    angle: float
    density: float


@attrs.frozen
class Spicule:
    angle: float
    start: float  # mm from the centre
    length: float
    width: float  # FWHM at the base, mm
    amplitude: float  # grey levels at the base


@attrs.frozen
class Lesion:
    """One lesion's shape, in mm around its centre; rendered by `lesion_signal`."""

    kind: str  # calcification_cluster | spiculated_mass | architectural_distortion | circumscribed_mass | focal_asymmetry
    specks: tuple = ()
    radius: float = 0.0  # mass core / oval long semi-axis / asymmetry long semi-axis
    aspect: float = 1.0  # short / long semi-axis
    angle: float = 0.0
    harmonics: tuple = ()  # (order, relative amplitude, phase) modulating a spiculated core's radius
    spicules: tuple = ()
    amplitude: float = 0.0  # peak grey levels of the core / oval / asymmetry

    @property
    def extent(self) -> float:
        """mm from the centre beyond which the lesion adds nothing."""
        reach = [self.radius * (1 + sum(abs(a) for _, a, _ in self.harmonics))]
        reach += [s.start + s.length + s.width for s in self.spicules]
        reach += [math.hypot(s.y, s.x) + s.half_long for s in self.specks]
        return max(reach)

    @property
    def finding(self) -> str:
        if self.kind == "calcification_cluster":
            return "calcification"
        if self.kind == "focal_asymmetry":
            return "asymmetry"
        if self.kind == "architectural_distortion":
            return "architectural_distortion"
        return "mass"


def _malignant_calcifications(rng: np.random.Generator, options: Options) -> Lesion:
    count = int(rng.integers(10, 21))
    length, angle = count * rng.uniform(0.25, 0.4), rng.uniform(0, np.pi)  # mm: a linear/segmental run
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([np.cos(angle), -np.sin(angle)])

    def speck():
        diameter, elongation = rng.uniform(0.12, 0.25), rng.uniform(1.0, 3.0)
        y, x = rng.uniform(-0.5, 0.5) * length * direction + rng.normal(0, 0.3) * normal
        return Speck(float(y), float(x), diameter / 2 * elongation, diameter / 2,
                     float(rng.uniform(0, np.pi)), float(rng.uniform(0.6, 1.4)))

    return Lesion("calcification_cluster", specks=_scatter(count, speck))


def _benign_calcifications(rng: np.random.Generator, options: Options) -> Lesion:
    count, radius, diameter = int(rng.integers(3, 7)), rng.uniform(1.2, 2.5), rng.uniform(0.25, 0.35)

    def speck():
        r, theta = radius * math.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        half = diameter / 2 * rng.uniform(0.9, 1.1)
        return Speck(r * math.sin(theta), r * math.cos(theta), half * rng.uniform(1.0, 1.15), half,
                     float(rng.uniform(0, np.pi)), float(rng.uniform(0.9, 1.1)))

    return Lesion("calcification_cluster", specks=_scatter(count, speck))


def _scatter(count: int, speck: Callable[[], "Speck"]) -> tuple:
    """`count` specks from `speck()`, redrawing any that would touch one already placed.

    The regions are sized so that this takes a few draws per speck; the cap only guards
    against an endless loop (a cluster would then have fewer specks).
    """
    specks: list[Speck] = []
    for _ in range(100 * count):
        if len(specks) == count:
            break
        candidate = speck()
        if _apart(candidate, specks):
            specks.append(candidate)
    return tuple(specks)


def _apart(candidate: Speck, specks: list[Speck]) -> bool:
    """Specks do not touch: at least 0.15 mm between their outlines (as circles of the long axis)."""
    return all(math.hypot(candidate.y - s.y, candidate.x - s.x) >= candidate.half_long + s.half_long + 0.15
               for s in specks)


def _spicules(rng: np.random.Generator, count: int, start: float, length: Callable[[], float],
              amplitude: float) -> tuple:
    """`count` spicules at roughly even angles (jittered by up to 0.3 of the spacing)."""
    angles = (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * 2 * np.pi / count + rng.uniform(0, 2 * np.pi)
    return tuple(Spicule(float(a), float(start), float(length()), float(rng.uniform(0.3, 0.5)),
                         float(amplitude * rng.uniform(0.8, 1.0))) for a in angles)


def _malignant_soft_tissue(rng: np.random.Generator, options: Options) -> Lesion:
    if rng.uniform() < 0.7:
        radius = rng.uniform(1.5, 2.5)
        harmonics = tuple((order, float(rng.uniform(0.03, 0.08)), float(rng.uniform(0, 2 * np.pi)))
                          for order in range(3, 7))
        spicules = _spicules(rng, int(rng.integers(8, 15)), 0.7 * radius,
                             lambda: radius * rng.uniform(0.8, 1.6), 0.6 * options.mass_contrast)
        return Lesion("spiculated_mass", radius=float(radius), harmonics=harmonics, spicules=spicules,
                      amplitude=float(options.mass_contrast * rng.uniform(0.8, 1.2)))
    spicules = _spicules(rng, int(rng.integers(10, 17)), 0.0, lambda: rng.uniform(2.5, 4.5),
                         options.distortion_contrast)
    return Lesion("architectural_distortion", spicules=spicules)


def _benign_soft_tissue(rng: np.random.Generator, options: Options) -> Lesion:
    if rng.uniform() < 0.6:
        return Lesion("circumscribed_mass", radius=float(rng.uniform(1.5, 3.0)), aspect=float(rng.uniform(0.65, 1.0)),
                      angle=float(rng.uniform(0, np.pi)),
                      amplitude=float(options.mass_contrast * rng.uniform(0.8, 1.2)))
    return Lesion("focal_asymmetry", radius=float(rng.uniform(3.0, 5.0)), aspect=float(rng.uniform(0.6, 0.9)),
                  angle=float(rng.uniform(0, np.pi)),
                  amplitude=float(options.asymmetry_contrast * rng.uniform(0.8, 1.2)))


LESION_MAKERS = {
    "malignant_calcification": _malignant_calcifications,
    "benign_calcification": _benign_calcifications,
    "malignant_soft_tissue": _malignant_soft_tissue,
    "benign_soft_tissue": _benign_soft_tissue,
}


def _rotated(y, x, angle):
    """Coordinates along (u) and across (v) a direction at `angle` (radians from the x axis)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return x * cos + y * sin, -x * sin + y * cos


def _evaluate(lesion: Lesion, rows: np.ndarray, cols: np.ndarray, options: Options) -> np.ndarray:
    """The lesion's grey levels on the grid rows x cols (mm from its centre, both increasing).

    Each part (speck, core, spicule) is computed only inside its own bounding box.
    """
    signal = np.zeros((rows.size, cols.size))

    def window(y0, y1, x0, x1):
        r = slice(np.searchsorted(rows, y0), np.searchsorted(rows, y1, "right"))
        c = slice(np.searchsorted(cols, x0), np.searchsorted(cols, x1, "right"))
        return (r, c), rows[r][:, None], cols[c][None, :]

    per_path_mm = options.calcification_contrast / 0.3
    for s in lesion.specks:  # projected thickness of a calcium ellipsoid, depth semi-axis = half_short
        where, y, x = window(s.y - s.half_long, s.y + s.half_long, s.x - s.half_long, s.x + s.half_long)
        u, v = _rotated(y - s.y, x - s.x, s.angle)
        inside = 1 - (u / s.half_long) ** 2 - (v / s.half_short) ** 2
        signal[where] += per_path_mm * s.density * 2 * s.half_short * np.sqrt(np.clip(inside, 0, None))
    if lesion.radius > 0:
        reach = lesion.radius * (1 + sum(abs(a) for _, a, _ in lesion.harmonics))
        where, y, x = window(-reach, reach, -reach, reach)
        u, v = _rotated(y, x, lesion.angle)
        if lesion.harmonics:
            theta = np.arctan2(v, u)
            edge = lesion.radius * (1 + sum(a * np.cos(k * theta + p) for k, a, p in lesion.harmonics))
            rho2 = (u**2 + v**2) / edge**2
        else:
            rho2 = (u / lesion.radius) ** 2 + (v / (lesion.radius * lesion.aspect)) ** 2
        inside = np.clip(1 - rho2, 0, None)
        signal[where] = lesion.amplitude * (inside**2 if lesion.kind == "focal_asymmetry" else np.sqrt(inside))
    for s in lesion.spicules:  # a Gaussian ridge tapering in width and height to its tip
        ends_y = [s.start * math.sin(s.angle), (s.start + s.length) * math.sin(s.angle)]
        ends_x = [s.start * math.cos(s.angle), (s.start + s.length) * math.cos(s.angle)]
        where, y, x = window(min(ends_y) - 2 * s.width, max(ends_y) + 2 * s.width,
                             min(ends_x) - 2 * s.width, max(ends_x) + 2 * s.width)
        u, v = _rotated(y, x, s.angle)
        along = (u - s.start) / s.length
        on = (along >= 0) & (along <= 1)
        along = np.clip(along, 0, 1)
        sigma = s.width * (1 - 0.7 * along) / (2 * math.sqrt(2 * math.log(2)))
        ridge = np.where(on, s.amplitude * (1 - along) * np.exp(-0.5 * (v / sigma) ** 2), 0.0)
        np.maximum(signal[where], ridge, out=signal[where])
    return signal


def lesion_signal(lesion: Lesion, center: tuple[float, float], shape: tuple[int, int],
                  options: Options) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(signal, box): the lesion's grey levels added to an image of `shape`, centred at pixel
    coordinates `center` (row, col); each pixel is the mean of sub-samples on a regular grid
    (4 x 4 for calcifications, whose specks are about a pixel across; 2 x 2 for the smooth
    soft-tissue lesions), and values below 0.25 grey levels are set to 0. box is the
    half-open bounding box of the nonzero pixels."""
    spacing = options.pixel_spacing_mm
    subsamples = 4 if lesion.specks else 2
    reach = int(math.ceil(lesion.extent / spacing)) + 2
    row0, col0 = max(int(center[0]) - reach, 0), max(int(center[1]) - reach, 0)
    row1, col1 = min(int(center[0]) + reach + 1, shape[0]), min(int(center[1]) + reach + 1, shape[1])
    offsets = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    rows = ((np.arange(row0, row1)[:, None] + offsets).ravel() - center[0]) * spacing
    cols = ((np.arange(col0, col1)[:, None] + offsets).ravel() - center[1]) * spacing
    fine = _evaluate(lesion, rows, cols, options)
    patch = fine.reshape(row1 - row0, subsamples, col1 - col0, subsamples).mean(axis=(1, 3))
    patch[patch < 0.25] = 0.0
    signal = np.zeros(shape, dtype=np.float32)
    signal[row0:row1, col0:col1] = patch
    nonzero_rows, nonzero_cols = np.nonzero(patch)
    if nonzero_rows.size == 0:  # a zero contrast option: the ROI still marks where the lesion is
        return signal, (row0, col0, row1, col1)
    box = (row0 + int(nonzero_rows.min()), col0 + int(nonzero_cols.min()),
           row0 + int(nonzero_rows.max()) + 1, col0 + int(nonzero_cols.max()) + 1)
    return signal, box


# --------------------------------------------------------------------------- breast

def power_law_texture(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> np.ndarray:
    """Zero-mean, unit-sd noise with power spectrum ~ 1/f^beta (white noise shaped by f^(-beta/2))."""
    spectrum = scipy.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    spectrum *= _power_law_filter(shape, beta)
    texture = scipy.fft.irfft2(spectrum, s=shape, overwrite_x=True)
    texture /= texture.std()
    return texture


@lru_cache(maxsize=4)
def _power_law_filter(shape: tuple[int, int], beta: float) -> np.ndarray:
    f2 = np.fft.fftfreq(shape[0])[:, None] ** 2 + np.fft.rfftfreq(shape[1])[None, :] ** 2
    f2[0, 0] = np.inf  # no mean
    return (f2 ** (-beta / 4)).astype(np.float32)


@attrs.frozen(eq=False)
class Anatomy:
    """A breast in the canonical orientation (chest wall on column 0)."""

    mask: np.ndarray  # bool, inside the breast
    skin_mm: np.ndarray  # distance to the skin line (the image edges are not skin); <= 0 outside
    thickness: np.ndarray  # t(d), 0..1
    pectoral: np.ndarray | None  # grey levels added by the pectoral muscle (MLO only)
    texture: np.ndarray  # unit-sd power-law texture


def breast_anatomy(rng: np.random.Generator, view: str, options: Options) -> Anatomy:
    """The breast outline, thickness, pectoral muscle and texture of one view.

    The distance to the skin is the first-order distance to the outline,
    (1 - s) / |grad s| with s = 1 on it: exact on the ellipse's axes and for the pectoral
    muscle's straight edge, and within a small fraction of a mm inside the rim where the
    thickness falls off (an exact distance transform would cost as much as everything else).
    """
    height, width, spacing = options.height, options.width, options.pixel_spacing_mm
    depth = rng.uniform(0.78, 0.92) * width * spacing
    half_height = rng.uniform(0.40, 0.46 if view == "CC" else 0.44) * height * spacing
    centre = (0.5 if view == "CC" else 0.56) * height + rng.uniform(-0.03, 0.03) * height
    skew = rng.uniform(-0.1, 0.1)  # the nipple points a little up or down
    y = ((np.arange(height) - centre) * spacing).astype(np.float32)[:, None]
    x = ((np.arange(width) + 0.5) * spacing).astype(np.float32)[None, :]
    across = (y - skew * x) / half_height**2
    radius = np.sqrt(across * (y - skew * x) + (x / depth) ** 2)  # s: 1 on the outline
    slope = -skew * across + x / depth**2
    gradient = np.sqrt(across * across + slope * slope)  # |grad s| * s
    with np.errstate(divide="ignore", invalid="ignore"):
        skin = np.where(gradient > 0, (1 - radius) * radius / gradient, np.inf)
    pectoral = None
    if view == "MLO":
        muscle_width, muscle_height = rng.uniform(0.25, 0.4) * depth, rng.uniform(0.5, 0.8) * height * spacing
        top = ((np.arange(height) + 0.5) * spacing).astype(np.float32)[:, None]
        muscle = (1 - x / muscle_width - top / muscle_height) / math.hypot(1 / muscle_width, 1 / muscle_height)
        # A smooth maximum rounds the notch where muscle and breast outlines meet.
        skin = _smooth_max(skin, muscle, 1.0)
        pectoral = 0.35 * options.tissue_level * np.clip(muscle, 0, 1)  # rises over 1 mm from its edge
    mask = skin > 0
    rim = depth / 6  # half the thickness of a compressed breast about 6 times deeper than thick
    fraction = 1 - np.clip(skin * (1 / rim), 0, 1)
    thickness = np.sqrt(1 - fraction * fraction)
    thickness[~mask] = 0
    if pectoral is not None:
        pectoral[~mask] = 0
    return Anatomy(mask, skin, thickness, pectoral, power_law_texture(rng, (height, width), options.beta))


def _smooth_max(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """(a + b + sqrt((a - b)^2 + scale^2)) / 2: >= max(a, b), within scale/2 of it, smooth where a ~ b."""
    difference = a - b
    with np.errstate(invalid="ignore"):  # inf - inf deep inside: the maximum is inf anyway
        smooth = (a + b + np.sqrt(difference * difference + scale * scale)) / 2
    return np.where(np.isfinite(smooth), smooth, np.maximum(a, b))


# --------------------------------------------------------------------------- cases and views

@attrs.frozen
class CasePlan:
    case: str
    kind: str
    laterality: str
    lesion: Lesion | None
    seeds: np.random.SeedSequence  # the case's stream; views draw from its children


def plan_case(case: str, kind: str, seeds: np.random.SeedSequence, options: Options) -> CasePlan:
    """A case of `kind` (one of KINDS): its laterality and lesion, from `seeds`."""
    rng = np.random.default_rng(_child(seeds, 0))
    laterality = "left" if rng.uniform() < 0.5 else "right"
    lesion = LESION_MAKERS[kind](rng, options) if kind != "normal" else None
    return CasePlan(case, kind, laterality, lesion, seeds)


@attrs.frozen(eq=False)
class RenderedView:
    pixels: np.ndarray  # uint16 (H, W), the breast in its displayed orientation
    box: tuple | None  # half-open (row0, col0, row1, col1) ROI, displayed orientation; None for normals
    lesion: np.ndarray  # float grey levels of the lesion alone, displayed orientation


def render_view(plan: CasePlan, view: str, options: Options, with_lesion: bool = True) -> RenderedView:
    """One view of a case; without its lesion the image is otherwise identical (same streams)."""
    # Child 0 drew the lesion (plan_case); each view has three streams of its own, keyed by the
    # view's name so that a CC image does not depend on whether MLO images are made too.
    view_seeds = _child(plan.seeds, 1 + VIEWS.index(view))
    anatomy_rng, place_rng, noise_rng = (np.random.default_rng(_child(view_seeds, i)) for i in range(3))
    anatomy = breast_anatomy(anatomy_rng, view, options)
    shape = anatomy.mask.shape
    image = anatomy.texture  # float32, ours to change in place
    image *= options.texture_sd
    image += options.tissue_level
    image *= anatomy.thickness
    if anatomy.pectoral is not None:
        image += anatomy.pectoral
    lesion, box = np.zeros(shape, dtype=np.float32), None
    if plan.lesion is not None:
        center = _place(anatomy, plan.lesion.extent + ROI_MARGIN_MM, place_rng, options)
        lesion, box = lesion_signal(plan.lesion, center, shape, options)
        margin = int(round(ROI_MARGIN_MM / options.pixel_spacing_mm))
        box = (max(box[0] - margin, 0), max(box[1] - margin, 0),
               min(box[2] + margin, shape[0]), min(box[3] + margin, shape[1]))
        if with_lesion:
            image += lesion
    noise = noise_rng.standard_normal(shape, dtype=np.float32)
    noise *= options.noise_sd
    image += noise
    np.clip(image, 1, MAX_VALUE, out=image)  # 0 is the background's alone
    np.rint(image, out=image)
    image[~anatomy.mask] = 0
    pixels = image.astype(np.uint16)
    if plan.laterality == "right":  # the mirror image: chest wall on the right edge
        pixels, lesion = np.ascontiguousarray(pixels[:, ::-1]), np.ascontiguousarray(lesion[:, ::-1])
        if box is not None:
            box = (box[0], shape[1] - box[3], box[2], shape[1] - box[1])
    return RenderedView(pixels, box, lesion)


def _child(seeds: np.random.SeedSequence, index: int) -> np.random.SeedSequence:
    """The index-th child stream of `seeds`, without the state `SeedSequence.spawn` keeps."""
    return np.random.SeedSequence(seeds.entropy, spawn_key=(*seeds.spawn_key, index))


def _place(anatomy: Anatomy, clearance_mm: float, rng: np.random.Generator,
           options: Options) -> tuple[float, float]:
    """A lesion centre (row, col) at least `clearance_mm` inside the skin line and the image edges.

    Candidates come from the first-order skin distance; each is then checked on the mask
    itself (a ring of that radius lies inside the breast, hence the disk: the breast has no
    holes), so an approximate distance can never put a lesion outside the breast.
    """
    spacing = options.pixel_spacing_mm
    height, width = anatomy.mask.shape
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    edges = np.minimum(np.minimum(rows + 0.5, height - 0.5 - rows), np.minimum(cols + 0.5, width - 0.5 - cols))
    radius = clearance_mm / spacing + 1  # pixels, with a pixel to spare for rounding the ring
    candidates = np.flatnonzero(np.minimum(anatomy.skin_mm / spacing, edges) >= radius)
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    for _ in range(100 if candidates.size else 0):
        row, col = divmod(int(candidates[rng.integers(candidates.size)]), width)
        row, col = row + rng.uniform(-0.5, 0.5), col + rng.uniform(-0.5, 0.5)
        ring_rows = np.rint(row + radius * np.sin(angles)).astype(int)
        ring_cols = np.rint(col + radius * np.cos(angles)).astype(int)
        inside = (ring_rows >= 0) & (ring_rows < height) & (ring_cols >= 0) & (ring_cols < width)
        if inside.all() and anatomy.mask[ring_rows, ring_cols].all():
            return row, col
    raise PerceptcoreError(f"no room for a lesion reaching {clearance_mm:.1f} mm from its centre in a "
                           f"{height}x{width} image at {spacing:g} mm; use larger images", "dataset.options")


def plan_set(which: str, options: Options, seed: int) -> list[CasePlan]:
    """The cases of the test or train set, kinds in random order, ids <set>0001, ..."""
    set_index = SETS.index(which)
    kinds = [kind for kind, n in options.counts(which).items() for _ in range(n)]
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(set_index,))).permutation(len(kinds))
    width = max(4, len(str(len(kinds))))
    return [plan_case(f"{which}{i + 1:0{width}d}", kinds[k], np.random.SeedSequence(seed, spawn_key=(set_index, i)),
                      options)
            for i, k in enumerate(order)]


def _case_row(plan: CasePlan) -> dict:
    label = plan.kind.split("_")[0]
    finding = plan.lesion.finding if plan.lesion is not None else None
    row = {"case": plan.case, "label": label}
    row.update({f: int(f == finding) for f in FINDINGS})
    row["biopsied"] = "no" if label == "normal" else "yes"
    row["lesion"] = plan.lesion.kind if plan.lesion is not None else "none"
    return row


def write_set(plans: list[CasePlan], folder: Path, options: Options, progress: Callable[[str], None],
              which: str) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for n, plan in enumerate(plans, 1):
        for view in options.views:
            rendered = render_view(plan, view, options)
            file = f"images/{plan.case}_{view}.npy"
            np.save(folder / file, rendered.pixels, allow_pickle=False)
            box = "" if rendered.box is None else " ".join(map(str, rendered.box))
            images.append({"case": plan.case, "view": view, "laterality": plan.laterality, "file": file,
                           "pixel_spacing_mm": options.pixel_spacing_mm, "bits": BITS, "roi_boxes": box})
        if n % 100 == 0:
            progress(f"mammography_phantoms: {which} set: {n}/{len(plans)} cases")
    pd.DataFrame([_case_row(p) for p in plans], columns=CASE_COLUMNS).to_csv(folder / "cases.csv", index=False)
    pd.DataFrame(images, columns=MANIFEST_COLUMNS).to_csv(folder / "manifest.csv", index=False)


class MammographyPhantoms:
    name = "mammography_phantoms"
    Options = Options

    def generate(self, options: Options, folder: Path, seed: int, progress: Callable[[str], None]) -> None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise PerceptcoreError(f"the seed must be a whole number >= 0, got {seed!r}", "study.seed")
        folder = Path(folder)
        start = time.perf_counter()
        for which, target in (("test", folder), ("train", folder / "train")):
            plans = plan_set(which, options, int(seed))
            write_set(plans, target, options, progress, which)
            progress(f"mammography_phantoms: {which} set: {len(plans)} cases, "
                     f"{len(plans) * len(options.views)} images")
        progress(f"mammography_phantoms: generated in {time.perf_counter() - start:.1f} s")


@hookimpl
def perceptcore_register_datasets(register):
    register(MammographyPhantoms())
