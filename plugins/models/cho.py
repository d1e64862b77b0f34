"""Simulated human readers: channelized Hotelling observers (CHO) that search the breast.

A reader is a linear observer working on a few channel responses of the image (Barrett &
Myers, *Foundations of Image Science*, ch. 13-14). Its templates are fitted in closed form
and then scanned over the whole breast, because in screening the lesion's location is
unknown; the largest response is what the reader "sees" (a scanning observer). Internal noise
and a decision threshold, both drawn per reader, turn it into binary calls: one simulated
radiologist per checkpoint.

Channels. Laguerre-Gauss (LG) functions of orders 0 .. `orders` - 1 at each width a of
`widths_mm`,

    u_n(r) = sqrt(2) / a * exp(-pi r^2 / a^2) * L_n(2 pi r^2 / a^2),

orthonormal over the plane for one width. LG rather than Gabor channels: lesions have no
preferred orientation, and LG channels are rotationally symmetric, few and orthonormal (a
well-conditioned covariance from a modest training set); for rotationally symmetric signals
they come close to the Hotelling observer (efficient channels). One LG set only reaches
frequencies up to about 1/a, so there are two by default: a narrow set (a = 0.3 mm) for
microcalcification specks and a wide set (a = 2 mm) for masses and other soft-tissue lesions.
A low-pass filter takes away most of what the narrow set responds to and little of what the
wide one does, as for radiologists. Each set is sampled on a patch just large enough for its
functions to vanish (`patch_radius_px`), so the patch size follows from the options.

Images. The scan area is the breast (pixels above `breast_threshold` x max_value) minus a
strip of `edge_mm` along the skin line and the image border. Grey levels are standardised
over it (so a min-max rescaling changes nothing) and continued smoothly beyond it (see
`prepared`), so that neither the skin line nor a filter's wrap-around at the chest wall looks
like a lesion. A channel response is the integral of u_n times the image in mm^2, so templates
apply at any pixel spacing.

Fitting (`fit`, closed form; it may use the ROI boxes, predicting never does). Each LG set
gets its own template, because a point that shows a lesion at one scale is arbitrary at the
other (radiologists, too, search for calcifications and for masses separately):

- a box's point for a set: the maximum within the box of the set's centre-surround response
  u_0 + u_1 (its most conspicuous spot at that scale). Not the box's centre: in a calcification
  cluster the specks lie at random places, the centre usually between them, where the mean
  signal is a faint smooth blob.
- background samples: the channel responses at the points of `background_boxes` boxes per
  negative image, each at a random place in the breast with the size of a random ROI box;
  so both classes are sampled at their most lesion-like spot, which is what the scan's
  maximum picks.
- signal samples: the channel responses at the points of the positive cases' ROI boxes, each
  box going to the set at whose scale it stands out most (its conspicuity in sds above the
  background boxes' mean); a set that fewer than 2 boxes chose learns from every box.
- template: w = S^-1 (mean signal - mean background), S the average of the two classes'
  covariances plus `ridge` x (their mean channel variance) on the diagonal, which keeps S
  well conditioned when some channels barely vary.

An image's statistic for a set is the maximum of its scanned template over the scan area; a
case's statistic (`statistics`) is, over its images and the sets, the largest such maximum in
units of the set's sd above its mean on the training normals (see `normal_negatives`).

Readers. The seed draws the background boxes and the reader's traits: an internal-noise sd (a
fraction, uniform in `internal_noise`, of the statistic's sd over the training normals) and a
false-positive rate (uniform in `false_positive_rate`); the threshold gives that expected rate
on the training normals, noise included. A call is 1 when statistic + noise > threshold. The
noise is drawn from a generator seeded by (reader seed, case id, SHA-256 of the case's
perturbed pixels): the same images get the same call in any batch or order, and each severity
an independent draw.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path

import attrs
import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.optimize
import scipy.special
import scipy.stats
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

FORMAT = "cho_reader/1"


def _floats(values) -> tuple:
    """Spec lists arrive as tuples of text, Python callers give numbers."""
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"expected a list of numbers, got {values!r}") from None


def _widths(instance, attribute, value):
    if not value or any(not math.isfinite(v) or v <= 0 for v in value) or list(value) != sorted(set(value)):
        raise ValueError(f"{attribute.name} must be increasing widths > 0 mm, got {list(value)}")


def _interval(low: float, high: float):
    """[a, b] with low <= a <= b <= high."""
    def validate(instance, attribute, value):
        if len(value) != 2 or not low <= value[0] <= value[1] <= high:
            raise ValueError(f"{attribute.name} must be [low, high] with {low:g} <= low <= high <= {high:g}, "
                             f"got {list(value)}")
    return validate


def _at_least(minimum, below=math.inf):
    def validate(instance, attribute, value):
        if not minimum <= value < below:  # also rejects NaN
            bound = "" if below == math.inf else f" and < {below:g}"
            raise ValueError(f"{attribute.name} must be >= {minimum:g}{bound}, got {value}")
    return validate


@attrs.frozen
class Options:
    # LG width a of each channel set (mm), increasing: narrow for calcification specks, wide for masses.
    widths_mm: tuple = attrs.field(default=(0.3, 2.0), converter=_floats, validator=_widths)
    # LG orders 0 .. orders - 1 per set; u_0 + u_1 locates the training points.
    orders: int = attrs.field(default=5, validator=_at_least(2))
    # The breast: pixels above this fraction of max_value, not merely > 0 (a filtered image's
    # background is a few grey levels above 0).
    breast_threshold: float = attrs.field(default=0.02, validator=_at_least(0, 1))
    # Not scanned: this close to the skin line or the image border.
    edge_mm: float = attrs.field(default=1.0, validator=_at_least(0))
    # Added to the covariance's diagonal, relative to its mean diagonal.
    ridge: float = attrs.field(default=1e-3, validator=_at_least(0))
    # Random background boxes per negative training image.
    background_boxes: int = attrs.field(default=4, validator=_at_least(1))
    # Internal-noise sd as a fraction of the statistic's sd on the training normals: [low, high], drawn per reader.
    internal_noise: tuple = attrs.field(default=(0.2, 0.6), converter=_floats, validator=_interval(0, 10))
    # False-positive rate (1 - specificity) on the training normals: [low, high], drawn per reader.
    false_positive_rate: tuple = attrs.field(default=(0.05, 0.2), converter=_floats, validator=_interval(0, 1))


# --------------------------------------------------------------------------- channels

def patch_radius_px(width_mm: float, orders: int, spacing_mm: float) -> int:
    """Half-width of an LG set's patches: beyond it exp(-x/2) L_n(x) is below about 1e-5 of its
    peak for every order n < orders, so truncation leaves the set orthonormal to about 1e-6."""
    x_max = 4 * orders + 20  # x = 2 pi r^2 / a^2; L_n has its last zero below 4n + 2
    return math.ceil(width_mm * math.sqrt(x_max / (2 * math.pi)) / spacing_mm)


@lru_cache(maxsize=16)
def laguerre_gauss(width_mm: float, orders: int, spacing_mm: float) -> np.ndarray:
    """u_0 .. u_{orders-1} of width a sampled at pixel centres around the patch centre, times the
    pixel side, then symmetrically orthonormalised: (orders, P, P), orthonormal vectors.

    Well sampled (a >= about 4.5 pixels for 5 orders), the sampled functions are orthonormal
    to 1e-5 already and orthonormalising changes them by as little. Narrower, the highest
    orders' rings are finer than the pixels and the samples are not orthonormal; the closest
    orthonormal set spanning them (Loewdin: (C C^T)^(-1/2) C) keeps everything the channels
    can tell apart and a well-conditioned covariance.
    """
    radius = patch_radius_px(width_mm, orders, spacing_mm)
    offsets = np.arange(-radius, radius + 1) * spacing_mm
    x = 2 * math.pi * (offsets[:, None] ** 2 + offsets[None, :] ** 2) / width_mm**2
    envelope = math.sqrt(2) / width_mm * np.exp(-x / 2)
    sampled = np.stack([envelope * scipy.special.eval_laguerre(n, x) for n in range(orders)]) * spacing_mm
    flat = sampled.reshape(orders, -1)
    values, vectors = np.linalg.eigh(flat @ flat.T)
    if values.min() < 1e-6 * values.max():
        raise PerceptcoreError(f"LG channels of width {width_mm:g} mm are too fine for {spacing_mm:g} mm pixels: "
                               f"their {orders} orders cannot be told apart; use a larger width or fewer orders",
                               "cho_reader.options.widths_mm")
    channels = ((vectors / np.sqrt(values)) @ vectors.T @ flat).reshape(sampled.shape)
    channels.flags.writeable = False  # cached and shared
    return channels


def channel_sets(options: Options, spacing_mm: float) -> list[np.ndarray]:
    """Each LG set's channels, (orders, P, P), P depending on the width."""
    return [laguerre_gauss(float(a), options.orders, float(spacing_mm)) for a in options.widths_mm]


# --------------------------------------------------------------------------- images

def scan_area(pixels: np.ndarray, max_value: float, options: Options, spacing_mm: float) -> np.ndarray:
    """Where the template is scanned: the breast (pixels above `breast_threshold` x max_value; the whole
    image if none is) without the pixels within `edge_mm` (along rows and columns) of the skin
    line or of the image border; the breast itself if that leaves nothing."""
    tissue = pixels > options.breast_threshold * max_value
    if not tissue.any():
        tissue = np.ones_like(tissue)
    edge_px = round(options.edge_mm / spacing_mm)
    # The image border counts as an edge too: an FFT filter wraps the far side's background onto
    # the chest wall, darkening a strip there.
    area = scipy.ndimage.minimum_filter(tissue, size=2 * edge_px + 1, mode="constant", cval=False)
    return area if area.any() else tissue


def prepared(pixels: np.ndarray, area: np.ndarray, options: Options, spacing_mm: float) -> np.ndarray:
    """float32: the scan area's grey levels standardised (minus their mean, over their sd), so that a
    grey-level rescaling (such as a low-pass filter's min-max) changes nothing; outside the scan
    area a smooth continuation of it, so that neither the background, nor a blurred skin line, nor
    the chest-wall border is an edge the channels respond to. The continuation starts as the
    nearest scan-area pixel's value (no step at the narrowest channels' scale) and fades, over
    the narrowest LG width, into the scan area's local mean over twice the widest LG width
    (no stripes at the widest channels' scale)."""
    values = pixels[area]
    spread = values.std()
    standard = ((pixels - values.mean()) / (spread if spread > 0 else 1.0)).astype(np.float32)
    if area.all():
        return standard
    inside = np.where(area, standard, np.float32(0))
    size = 2 * round(max(options.widths_mm) / spacing_mm) + 1
    weight = scipy.ndimage.uniform_filter(area.astype(np.float32), size, mode="constant")
    local = scipy.ndimage.uniform_filter(inside, size, mode="constant") / np.maximum(weight, np.float32(1e-3))
    # Chessboard distances (3x faster than Euclidean ones, and as good for a fading continuation).
    distance, nearest = scipy.ndimage.distance_transform_cdt(~area, metric="chessboard", return_indices=True)
    fade = np.exp(distance * np.float32(-spacing_mm / min(options.widths_mm)))
    return np.where(area, standard, fade * standard[tuple(nearest)] + (1 - fade) * local)


def view_image(view, options: Options) -> tuple[np.ndarray, np.ndarray]:
    """(prepared image, scan area) of one ViewImage."""
    pixels = view.pixels.detach().cpu().numpy().astype(np.float64)
    area = scan_area(pixels, view.max_value, options, view.spacing_mm)
    return prepared(pixels, area, options, view.spacing_mm), area


def centred(kernels: list[np.ndarray]) -> np.ndarray:
    """Odd-sized square kernels of different sizes, zero-padded around their centres to one stack."""
    size = max(k.shape[-1] for k in kernels)
    return np.stack([np.pad(k, (size - k.shape[-1]) // 2) for k in kernels])


_SPECTRA: dict = {}  # kernel spectra by (kernels' digest, FFT shape): a reader scans many images


def _spectrum(kernels: np.ndarray, shape: tuple) -> np.ndarray:
    key = (hashlib.sha1(kernels.tobytes()).hexdigest(), kernels.shape, shape)
    if key not in _SPECTRA:
        if len(_SPECTRA) >= 8:
            _SPECTRA.pop(next(iter(_SPECTRA)))
        _SPECTRA[key] = scipy.fft.rfft2(kernels, s=shape, workers=max(torch.get_num_threads(), 1))
    return _SPECTRA[key]


def correlate(image: np.ndarray, kernels: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Response maps (K, H, W) of point-symmetric kernels (K, P, P), P odd: at each pixel, the sum
    of kernel x the image around it (0 beyond the image), times the pixel side (with unit-norm
    channel vectors: the integral of u times the image, in mm^2)."""
    height, width = image.shape
    radius = kernels.shape[-1] // 2
    shape = (scipy.fft.next_fast_len(height + 2 * radius, real=True),
             scipy.fft.next_fast_len(width + 2 * radius, real=True))
    workers = max(torch.get_num_threads(), 1)
    kernels = kernels.astype(image.dtype)
    spectrum = scipy.fft.rfft2(image, s=shape, workers=workers) * _spectrum(kernels, shape)
    full = scipy.fft.irfft2(spectrum, s=shape, workers=workers, overwrite_x=True)
    # Point-symmetric kernels: convolution = correlation; the 'same' part of the full convolution.
    return full[:, radius:radius + height, radius:radius + width] * spacing_mm


def responses_at(image: np.ndarray, channels: np.ndarray, points: list, spacing_mm: float) -> np.ndarray:
    """Channel responses (len(points), K) at pixels (row, col), as `correlate` computes them."""
    radius = channels.shape[-1] // 2
    padded = np.pad(image.astype(np.float64), radius)
    patches = np.stack([padded[r:r + 2 * radius + 1, c:c + 2 * radius + 1] for r, c in points])
    return np.einsum("npq,kpq->nk", patches, channels) * spacing_mm


def most_conspicuous(score: np.ndarray, area: np.ndarray, box) -> tuple[int, int] | None:
    """The scan-area pixel of a half-open box (row0, col0, row1, col1) where `score` is largest;
    None when the box misses the scan area."""
    row0, col0, row1, col1 = (int(v) for v in box)
    row0, col0 = max(row0, 0), max(col0, 0)
    inside = np.where(area[row0:row1, col0:col1], score[row0:row1, col0:col1], -np.inf)
    if inside.size == 0 or not np.isfinite(inside).any():
        return None
    r, c = np.unravel_index(np.argmax(inside), inside.shape)
    return row0 + int(r), col0 + int(c)


# --------------------------------------------------------------------------- the observer

def hotelling_template(signal: np.ndarray, background: np.ndarray, ridge: float) -> np.ndarray:
    """w = (S + ridge * mean(diag S) * I)^-1 (mean signal - mean background), S the average of the
    two classes' covariances; samples are rows of channel responses."""
    covariance = np.atleast_2d((np.cov(signal, rowvar=False) + np.cov(background, rowvar=False)) / 2)
    covariance = covariance + ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    return np.linalg.solve(covariance, signal.mean(axis=0) - background.mean(axis=0))


def training_samples(cases: list, labels: np.ndarray, options: Options, generator: np.random.Generator):
    """(signal, background): per LG set, arrays of channel responses (rows) at the set's most
    conspicuous point of each positive case's ROI box that stands out most at the set's scale
    (signal) and of each random box in a negative case's breast (background)."""
    sets = len(options.widths_mm)
    signal, signal_peaks, sizes = [[] for _ in range(sets)], [[] for _ in range(sets)], []
    negatives = []  # negative images wait for the signal boxes' sizes
    for case, label in zip(cases, labels):
        for view in case.images:
            if label == 1 and view.roi_boxes:
                image, area = view_image(view, options)
                sizes += add_samples(signal, signal_peaks, image, area, view.roi_boxes, view.spacing_mm, options)
            elif label == 0:
                negatives.append(view)
    if len(sizes) < 2:
        raise PerceptcoreError(f"fitting needs at least 2 ROI boxes inside the breast of positive cases; got "
                               f"{len(sizes)}", "cho_reader.fit")
    background, background_peaks = [[] for _ in range(sets)], [[] for _ in range(sets)]
    for view in negatives:
        image, area = view_image(view, options)
        rows, cols = np.nonzero(area)
        boxes = []
        for _ in range(options.background_boxes):
            height, width = sizes[generator.integers(len(sizes))]
            k = generator.integers(len(rows))
            top, left = rows[k] - height // 2, cols[k] - width // 2
            boxes.append((top, left, top + height, left + width))  # holds its centre, a scan-area pixel
        add_samples(background, background_peaks, image, area, boxes, view.spacing_mm, options)
    if len(background_peaks[0]) < 2:
        raise PerceptcoreError(f"fitting needs at least 2 negative images with a breast; got {len(negatives)} "
                               "negative images", "cho_reader.fit")
    # A lesion teaches the set at whose scale it stands out most from normal tissue: in units of
    # the sd above the mean of the background boxes' peaks. A set no lesion chose learns from all.
    peaks, reference = np.array(signal_peaks), np.array(background_peaks)
    spread = reference.std(axis=1, keepdims=True)
    scale = ((peaks - reference.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1.0)).argmax(axis=0)
    chosen = [np.array(rows)[scale == s] if (scale == s).sum() >= 2 else np.array(rows) for s, rows in enumerate(signal)]
    return chosen, [np.array(rows) for rows in background]


def add_samples(samples: list, peaks: list, image: np.ndarray, area: np.ndarray, boxes, spacing_mm: float,
                options) -> list:
    """Append, per LG set, the set's channel responses at its most conspicuous point of each box
    and the conspicuity there (boxes missing the scan area are skipped); returns the used
    boxes' (height, width)."""
    used = [box for box in boxes if area[max(box[0], 0):box[2], max(box[1], 0):box[3]].any()]
    if not used:
        return []
    sets = channel_sets(options, spacing_mm)
    # u_0 + u_1 is proportional to (2 - x) exp(-x/2): a bright-centre detector of zero mean.
    scores = correlate(image, centred([channels[0] + channels[1] for channels in sets]), spacing_mm)
    for s, (channels, score) in enumerate(zip(sets, scores)):
        points = [most_conspicuous(score, area, box) for box in used]
        samples[s] += list(responses_at(image, channels, points, spacing_mm))
        peaks[s] += [float(score[r, c]) for r, c in points]
    return [(box[2] - box[0], box[3] - box[1]) for box in used]


@attrs.frozen(eq=False)
class Reader:
    """A loaded CHO reader: a template per LG set, how each set's scan maximum is distributed
    over the training negatives, and the reader's traits."""

    options: Options
    templates: np.ndarray  # (sets, orders)
    negative_mean: np.ndarray  # (sets,)
    negative_sd: np.ndarray  # (sets,)
    seed: int
    noise_sd: float
    threshold: float


def scan_maxima(reader: Reader, view) -> np.ndarray:
    """Each set's scanned template's largest response over the breast: (sets,). No ROI box is used."""
    image, area = view_image(view, reader.options)
    channels = channel_sets(reader.options, view.spacing_mm)
    kernels = centred([np.tensordot(w, u, axes=1) for w, u in zip(reader.templates, channels)])  # sum_n w_n u_n
    return correlate(image, kernels, view.spacing_mm)[:, area].max(axis=1).astype(np.float64)


def case_maxima(reader: Reader, cases: list) -> np.ndarray:
    """(cases, sets): each set's scan maximum over all of a case's images."""
    return np.array([np.max([scan_maxima(reader, view) for view in case.images], axis=0) for case in cases])


def statistics(reader: Reader, cases: list) -> np.ndarray:
    """The continuous, noise-free test statistic per case: over its images and LG sets, the largest
    scan maximum in units of that set's sd above its mean on the training negatives. The reader's
    calls threshold it after adding internal noise; ROC analyses of the observer use it."""
    return ((case_maxima(reader, cases) - reader.negative_mean) / reader.negative_sd).max(axis=1)


def internal_noise(reader: Reader, case) -> float:
    """The reader's internal noise for this case as shown: seeded by (reader seed, case id, pixels)."""
    digest = hashlib.sha256(f"{reader.seed}|{case.case}|".encode())
    for view in case.images:
        pixels = np.ascontiguousarray(view.pixels.detach().cpu().numpy())
        digest.update(f"{pixels.shape}|{pixels.dtype}|".encode())
        digest.update(pixels.tobytes())
    generator = np.random.default_rng(int.from_bytes(digest.digest()[:16], "little"))
    return reader.noise_sd * float(generator.standard_normal())


def threshold_for(negatives: np.ndarray, noise_sd: float, false_positive_rate: float) -> float:
    """t with mean over negatives of P(statistic + N(0, noise_sd^2) > t) = false_positive_rate."""
    if noise_sd == 0 or false_positive_rate in (0.0, 1.0):
        return float(np.quantile(negatives, 1 - false_positive_rate))
    excess = lambda t: scipy.stats.norm.sf((t - negatives) / noise_sd).mean() - false_positive_rate  # noqa: E731
    low, high = negatives.min() - 10 * noise_sd, negatives.max() + 10 * noise_sd
    return float(scipy.optimize.brentq(excess, low, high, xtol=1e-12 * (high - low)))


def normal_negatives(cases: list, labels: np.ndarray) -> list:
    """Indices of the negative cases a reader's specificity refers to: those without an ROI box
    (normal breasts), or every negative case when fewer than 2 are normal. Negatives with a
    finding (a benign lesion) were biopsied because readers found them suspicious; calibrating on
    them would put the threshold above most malignant lesions."""
    negatives = [i for i, label in enumerate(labels) if label == 0]
    normal = [i for i in negatives if not any(view.roi_boxes for view in cases[i].images)]
    chosen = normal if len(normal) >= 2 else negatives
    if len(chosen) < 2:
        raise PerceptcoreError(f"fitting needs at least 2 negative cases; got {len(chosen)}", "cho_reader.fit")
    return chosen


class ChoReader:
    name = "cho_reader"
    Options = Options
    # Closed form in float64 NumPy: autocast would change nothing, and a reader's calls are thresholds
    # on small statistic differences that half precision would move, so asking for it is an error.
    mixed_precision = False

    def fit(self, cases: list, labels: np.ndarray, options: Options, seed: int) -> dict:
        """The checkpoint of one reader: templates fitted on these cases, traits drawn from `seed`."""
        labels = np.asarray(labels).astype(int).reshape(-1)
        if len(labels) != len(cases) or not np.isin(labels, (0, 1)).all():
            raise PerceptcoreError(f"need one 0/1 label per case: {len(labels)} labels for {len(cases)} cases",
                                   "cho_reader.fit")
        seed = int(seed)
        if seed < 0:
            raise PerceptcoreError(f"the seed must be >= 0, got {seed}", "cho_reader.fit")
        normals = [cases[i] for i in normal_negatives(cases, labels)]
        signal, background = training_samples(cases, labels, options, np.random.default_rng([seed, 0]))
        templates = np.stack([hotelling_template(s, b, options.ridge) for s, b in zip(signal, background)])
        traits = np.random.default_rng([seed, 1])
        noise_fraction = float(traits.uniform(*options.internal_noise))
        false_positive_rate = float(traits.uniform(*options.false_positive_rate))
        sets = len(templates)
        reader = Reader(options, templates, np.zeros(sets), np.ones(sets), seed, 0.0, 0.0)
        raw = case_maxima(reader, normals)
        spread = raw.std(axis=0, ddof=1)
        negative_mean, negative_sd = raw.mean(axis=0), np.where(spread > 0, spread, 1.0)
        negatives = ((raw - negative_mean) / negative_sd).max(axis=1)
        noise_sd = noise_fraction * float(negatives.std(ddof=1))
        return {"format": FORMAT, "widths_mm": list(options.widths_mm), "orders": options.orders,
                "templates": torch.from_numpy(templates), "negative_mean": torch.from_numpy(negative_mean),
                "negative_sd": torch.from_numpy(negative_sd), "seed": seed, "noise_sd": noise_sd,
                "threshold": threshold_for(negatives, noise_sd, false_positive_rate),
                "noise_fraction": noise_fraction, "false_positive_rate": false_positive_rate}

    def load(self, checkpoint: Path, options: Options, device: str) -> Reader:
        """The reader of a checkpoint `fit` wrote (it computes on the CPU whatever the device)."""
        where = "observers.checkpoints"
        try:
            contents = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, truncated, or a pickle of arbitrary objects
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise PerceptcoreError(f"{checkpoint}: not a cho_reader checkpoint ({type(exc).__name__}: {first})",
                                   where) from None
        if not isinstance(contents, dict):
            raise PerceptcoreError(f"{checkpoint}: not a cho_reader checkpoint (a {type(contents).__name__}, "
                                   "not a dict)", where)

        def fail(key, problem):
            raise PerceptcoreError(f"{checkpoint}: key {key!r} {problem}", where)

        for key in CHECKPOINT_KEYS:
            if key not in contents:
                fail(key, "is missing")
        if contents["format"] != FORMAT:
            fail("format", f"is {contents['format']!r}, expected {FORMAT!r}")
        if contents["widths_mm"] != list(options.widths_mm) or contents["orders"] != options.orders:
            raise PerceptcoreError(f"{checkpoint} was fitted with widths_mm {contents['widths_mm']} and orders "
                                   f"{contents['orders']}, but the options give {list(options.widths_mm)} and "
                                   f"{options.orders}", "observers.options")
        sets = len(options.widths_mm)
        arrays = {}
        for key, shape in {"templates": (sets, options.orders), "negative_mean": (sets,), "negative_sd": (sets,)}.items():
            value = contents[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
                fail(key, f"must be a float tensor of shape {shape}")
            arrays[key] = value.detach().to(torch.float64).numpy()
            if not np.isfinite(arrays[key]).all():
                fail(key, "holds values that are not finite")
        if not (arrays["negative_sd"] > 0).all():
            fail("negative_sd", "must be > 0")
        for key in ("noise_sd", "threshold"):
            value = contents[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(key, f"must be a finite number, got {value!r}")
        if contents["noise_sd"] < 0:
            fail("noise_sd", f"must be >= 0, got {contents['noise_sd']}")
        if isinstance(contents["seed"], bool) or not isinstance(contents["seed"], int):
            fail("seed", f"must be a whole number, got {contents['seed']!r}")
        return Reader(options, arrays["templates"], arrays["negative_mean"], arrays["negative_sd"],
                      contents["seed"], float(contents["noise_sd"]), float(contents["threshold"]))

    def predict(self, loaded: Reader, cases: list) -> np.ndarray:
        """Binary calls 0/1: statistic + the reader's internal noise > its threshold."""
        noisy = statistics(loaded, cases) + np.array([internal_noise(loaded, case) for case in cases])
        return (noisy > loaded.threshold).astype(float)


CHECKPOINT_KEYS = ("format", "widths_mm", "orders", "templates", "negative_mean", "negative_sd", "seed",
                   "noise_sd", "threshold")


@hookimpl
def perceptcore_register_models(register):
    register(ChoReader())
