"""The bundled perturbations: the published Gaussian low-pass filter against an independent
NumPy implementation on real mammograms, the robustness paper's filters, noise and patch
shuffling, their shared properties, region restriction, and the matched-noise baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.perturbation import (
    REGIONS,
    ImageBatch,
    expected_noise_norm,
    matched_noise,
    matched_noise_sd,
    perturbation_norms,
    restrict,
    roi_mask,
)
from perceptcore.plugins import load_registry
from perceptcore_plugins.perturbations import _frequency
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass, gaussian_mask
from perceptcore_plugins.perturbations.gaussian_noise import GaussianNoise
from perceptcore_plugins.perturbations.ideal_highpass import IdealHighpass
from perceptcore_plugins.perturbations.ideal_lowpass import IdealLowpass
from perceptcore_plugins.perturbations.patch_shuffle import PatchShuffle

MAMMOGRAMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mammograms"
PUBLISHED_MM = (0, 0.17, 0.22, 0.33, 0.5, 0.67, 1, 2, 4)
SPACING_MM = 0.1  # the files record no spacing; every real-image test states this one

# Each perturbation at a severity that changes the image.
CASES = {
    "gaussian_lowpass": (GaussianLowpass(), 0.5),
    "ideal_lowpass": (IdealLowpass(), 2.0),
    "ideal_highpass": (IdealHighpass(), 2.0),
    "gaussian_noise": (GaussianNoise(), 300.0),
    "patch_shuffle": (PatchShuffle(), 4),
}
RANDOM = {"gaussian_noise", "patch_shuffle"}
FILTERS = ("gaussian_lowpass", "ideal_lowpass", "ideal_highpass")


# --------------------------------------------------------------------------- helpers

def read_png(name: str) -> np.ndarray:
    """A 16-bit PNG as uint16 (Pillow mode I;16)."""
    from PIL import Image

    path = MAMMOGRAMS / name
    if not path.is_file():
        pytest.skip(f"sample mammograms not available at {MAMMOGRAMS}")
    with Image.open(path) as image:
        assert image.mode == "I;16", image.mode
        return np.array(image, dtype=np.uint16)


def to_12_bit(image: np.ndarray) -> np.ndarray:
    """A full-range 16-bit image on the published 12-bit scale: round(x * 4095 / 65535)."""
    return np.round(image.astype(np.float64) * (4095 / 65535)).astype(np.uint16)


def batch_of(pixels, spacing=SPACING_MM, max_value=4095.0, dtype=torch.float32) -> ImageBatch:
    pixels = torch.as_tensor(np.asarray(pixels, dtype=np.float64)).to(dtype)
    if pixels.ndim == 2:
        pixels = pixels[None]
    spacing = torch.as_tensor(spacing, dtype=torch.float64).reshape(-1).expand(pixels.shape[0]).clone()
    return ImageBatch(pixels, spacing, float(max_value))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(name, batch, severity=None, seed=0, **options):
    perturbation, default = CASES[name]
    severity = default if severity is None else severity
    return perturbation.perturb(batch, severity, perturbation.Options(**options), generator(seed))


def random_image(shape=(3, 96, 80), seed=0, low=0.0, high=4095.0, dtype=torch.float32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.uniform(low, high, size=shape)).to(dtype)


def centred_squared_distance(height: int, width: int) -> np.ndarray:
    """D² from the published centre (x, y) = (floor(W/2), floor(H/2)) of the shifted spectrum."""
    v = np.arange(height) - height // 2
    u = np.arange(width) - width // 2
    return v[:, None] ** 2 + u[None, :] ** 2


def reference_filter(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The straightforward published computation, unrounded: fftshift(fft2), mask, ifftshift, ifft2, real part.

    The spectrum is scaled by 1/sqrt(H W) before and after as published (norm="ortho" both ways).
    """
    spectrum = np.fft.fftshift(np.fft.fft2(image.astype(np.float64), norm="ortho"))
    return np.fft.ifft2(np.fft.ifftshift(spectrum * mask), norm="ortho").real


def reference_filtered(image: np.ndarray, wavelengths_mm, spacing_mm: float):
    """The published filter's real part at each wavelength (mm > 0), float64, before the rescale.

    The forward transform is shared by the wavelengths; the mask is exp(-D² / (2 D0²)) with
    D0 = (1 / w) * min(H, W) * spacing.
    """
    height, width = image.shape
    spectrum = np.fft.fftshift(np.fft.fft2(image.astype(np.float64), norm="ortho"))
    d2 = centred_squared_distance(height, width)
    for wavelength in wavelengths_mm:
        d0 = (1 / wavelength) * min(height, width) * spacing_mm
        yield np.fft.ifft2(np.fft.ifftshift(spectrum * np.exp(-d2 / (2 * d0 ** 2))), norm="ortho").real


def published_rescale(filtered: np.ndarray, max_value: float) -> np.ndarray:
    """The published min-max rescale to [0, max_value], float64, before the uint16 cast."""
    return (filtered - filtered.min()) / (filtered.max() - filtered.min()) * max_value


def reference_gaussian_lowpass(image: np.ndarray, wavelengths_mm, spacing_mm: float, max_value: float = 4095):
    """The published filter at each wavelength (mm): uint16 images, min-max rescaled to [0, max_value].

    0 mm means unperturbed (the image itself).
    """
    filtered = reference_filtered(image, [w for w in wavelengths_mm if w != 0], spacing_mm)
    for wavelength in wavelengths_mm:
        if wavelength == 0:
            yield image.astype(np.uint16)
        else:  # the published cast: truncation toward zero
            yield published_rescale(next(filtered), max_value).astype(np.uint16)


# --------------------------------------------------------------------------- acceptance: the published filter

# Grey levels on the 0-4095 scale (1.2e-6 of it): how far float32 FFTs of a full mammogram may be from
# the float64 published computation. Measured at most 2.2e-3 on the sample mammograms.
FLOAT32_TOLERANCE = 5e-3


@pytest.mark.parametrize("name", ["gmic_0_L-CC.png", "dmv_1_L_CC.png"])
def test_gaussian_lowpass_matches_published_algorithm_on_mammograms(name):
    """Within float32 rounding of the published float64 filter at every published severity, at full
    size, 0.1 mm per pixel.

    The filtered image (before the rescale) is within FLOAT32_TOLERANCE grey levels of the float64 one.
    After the published min-max rescale and truncation a pixel may differ from the published uint16
    image only where the published value before truncation lies within FLOAT32_TOLERANCE of an integer
    (the two computations then truncate on either side of it), and then by 1. gmic_* hold 12-bit
    values; dmv_* are converted to the 12-bit scale first (round(x * 4095 / 65535)), so both run the
    published [0, 4095] pipeline. float32 pixels, as the runner holds them.
    """
    image = read_png(name)
    if name.startswith("dmv_"):
        image = to_12_bit(image)
    assert image.max() <= 4095
    batch = batch_of(image)
    perturbation = GaussianLowpass()
    out = perturbation.perturb(batch, 0, perturbation.Options(), generator())
    assert np.array_equal(out[0].numpy(), image)
    wavelengths = [w for w in PUBLISHED_MM if w != 0]
    for wavelength, filtered in zip(wavelengths, reference_filtered(image, wavelengths, SPACING_MM)):
        ours = perturbation.filtered(batch, wavelength, perturbation.Options())[0].numpy()
        assert np.abs(ours - filtered).max() <= FLOAT32_TOLERANCE, (wavelength, np.abs(ours - filtered).max())
        got = perturbation.perturb(batch, wavelength, perturbation.Options(), generator())[0].numpy().astype(np.int64)
        rescaled = published_rescale(filtered, 4095)
        expected = rescaled.astype(np.uint16).astype(np.int64)
        differs = got != expected
        assert np.abs(got - expected).max() <= 1, wavelength
        near_integer = np.abs(rescaled - np.round(rescaled))
        assert near_integer[differs].max(initial=0) <= FLOAT32_TOLERANCE, wavelength
        assert differs.mean() < 1e-3, (wavelength, differs.mean())
        assert got.min() == 0 and got.max() == 4095


def test_gaussian_lowpass_matches_published_algorithm_on_16_bit_scale():
    """A full-range 16-bit mammogram with max_value 65535: the same algorithm rescaled to [0, 65535]."""
    image = read_png("dmv_1_R_CC.png")
    batch = batch_of(image, max_value=65535)
    wavelengths = (0.33, 2)
    for wavelength, expected in zip(wavelengths, reference_gaussian_lowpass(image, wavelengths, SPACING_MM, 65535)):
        got = GaussianLowpass().perturb(batch, wavelength, GaussianLowpass.Options(), generator())[0].numpy()
        assert np.abs(got.astype(np.int64) - expected.astype(np.int64)).max() <= 1


@pytest.mark.parametrize("height,width", [(8, 8), (8, 9), (9, 8), (7, 11), (10, 6), (33, 64)])
@pytest.mark.parametrize("wavelength", [0.17, 0.5, 4.0])
def test_rfft_path_equals_fftshift_implementation(height, width, wavelength):
    """The fast path (rfft2 on the unshifted spectrum, half mask) is the shifted full-spectrum filter.

    Odd and even sizes in both dims, in float64, before any rescaling; and the full inverse DFT's
    imaginary part is zero (the masked spectrum is Hermitian), so taking the real part loses nothing.
    """
    image = random_image((height, width), seed=height * 100 + width, dtype=torch.float64)[None]
    spacing = 0.25
    batch = batch_of(image[0].numpy(), spacing=spacing, dtype=torch.float64)
    d0 = (1 / wavelength) * min(height, width) * spacing
    mask = np.exp(-centred_squared_distance(height, width) / (2 * d0 ** 2))
    expected = reference_filter(image[0].numpy(), mask)
    got = GaussianLowpass().filtered(batch, wavelength, GaussianLowpass.Options(rescale="preserve"))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=0, atol=1e-9)

    spectrum = np.fft.fftshift(np.fft.fft2(image[0].numpy()))
    assert np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum * mask)).imag).max() < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_fft_path_equals_scipy_path(dtype):
    """CPU images use scipy.fft, other devices torch.fft: the two give the same filter."""
    pixels = random_image((3, 45, 38), dtype=dtype)
    mask = gaussian_mask(45, 38, 6.0, torch.device("cpu"), dtype)
    scipy_path = _frequency.apply_half_mask_scipy(pixels, mask)
    torch_path = _frequency.apply_half_mask_torch(pixels, mask)
    assert scipy_path.dtype == torch_path.dtype == dtype
    tolerance = 1e-9 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(scipy_path, torch_path, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 7, 11), (2, 45, 38), (1, 64, 201), (1, 333, 256)])
@pytest.mark.parametrize("severity", [0.17, 0.5, 2.0, 8.0])
def test_cpu_gaussian_is_rfft2_irfft2_to_rounding(severity, shape, dtype):
    """On CPU the separable Gaussian (row then column convolutions, ducc0) is irfft2(rfft2(x) * mask)
    computed in float64, to rounding in the working precision.

    Tolerance 64 u max|x| (u = 2^-24 in float32, 2^-53 in float64; 0.016 grey levels at 4095 in
    float32): the kernels are rounded once (at most u sum|kernel| max|x| per axis, sum|kernel| <= 1.12
    here) and the four 1-D FFTs add O(u log N) each; measured at most 14 u max|x| on these cases. Not
    bit for bit scipy's irfft2 in float32: other transforms round differently."""
    batch = batch_of(random_image(shape, seed=shape[-1]), spacing=0.5, dtype=dtype)
    height, width = shape[-2:]
    radius = min(height, width) * 0.5 / severity
    mask = gaussian_mask(height, width, radius, torch.device("cpu"), torch.float64).numpy()
    x = batch.pixels.numpy().astype(np.float64)
    expected = scipy.fft.irfft2(scipy.fft.rfft2(x) * mask, s=(height, width))
    got = GaussianLowpass().filtered(batch, severity, GaussianLowpass.Options())
    unit = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -53
    assert got.dtype == dtype
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=64 * unit * np.abs(x).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 7, 11), (2, 45, 38), (1, 64, 201)])
@pytest.mark.parametrize("name,severity", [("gaussian_lowpass", 0.17), ("gaussian_lowpass", 8.0),
                                           ("ideal_lowpass", 2.0), ("ideal_highpass", 2.0)])
def test_cpu_path_is_bitwise_scipy_rfft2_irfft2(name, severity, shape, dtype, monkeypatch):
    """On CPU the half-spectrum filter is exactly scipy.fft.irfft2(rfft2(x) * mask): the in-place column
    transforms, the skipped all-zero mask columns (narrow Gaussian, ideal low-pass) and the scaling change
    no bit. On CPU the Gaussian takes the separable path (tested above); here it is made to take this one,
    which it still takes on other devices."""
    monkeypatch.setattr(type(CASES[name][0]), "separable", lambda self, *args: None)
    perturbation, _ = CASES[name]
    batch = batch_of(random_image(shape, seed=shape[-1]), spacing=0.5, dtype=dtype)
    height, width = shape[-2:]
    radius = severity * min(height, width) * 0.5 if name.startswith("ideal") else min(height, width) * 0.5 / severity
    mask = perturbation.mask(height, width, radius, torch.device("cpu"), dtype).numpy()
    x = batch.pixels.numpy()
    expected = scipy.fft.irfft2(scipy.fft.rfft2(x, workers=torch.get_num_threads()) * mask, s=(height, width),
                                workers=torch.get_num_threads())
    got = perturbation.filtered(batch, severity, perturbation.Options())
    assert got.dtype == dtype and torch.equal(got, torch.from_numpy(expected))


def test_nonzero_columns_of_half_masks():
    """The count of leading half-spectrum columns with a nonzero mask value: all of them where the mask
    is nonzero everywhere, fewer for a narrow Gaussian (float32 exp underflows to 0), R + 1 for an ideal
    low-pass of radius R (columns 0..R reach D <= R on row 0)."""
    cpu = torch.device("cpu")
    height, width, radius = 64, 201, 3.0
    columns = np.arange(width // 2 + 1)
    underflow = (np.exp(-columns.astype(np.float64) ** 2 / (2 * radius ** 2)).astype(np.float32) > 0).sum()
    gaussian = GaussianLowpass().mask
    assert _frequency.nonzero_columns(gaussian, height, width, radius, cpu, torch.float32) == underflow < width // 2 + 1
    assert _frequency.nonzero_columns(gaussian, height, width, 40.0, cpu, torch.float32) == width // 2 + 1
    assert _frequency.nonzero_columns(IdealLowpass().mask, height, width, 7.5, cpu, torch.float32) == 8
    assert _frequency.nonzero_columns(IdealHighpass().mask, height, width, 7.5, cpu, torch.float32) == width // 2 + 1


def test_minmax_rescales_each_image_of_a_batch_on_its_own():
    images = np.stack([np.full((40, 30), 700.0), random_image((40, 30), seed=4).numpy()])
    p = GaussianLowpass()
    out = p.perturb(batch_of(images), 1.0, p.Options(), generator())
    assert torch.equal(out[0], torch.zeros(40, 30))  # a constant image
    single = p.perturb(batch_of(images[1:]), 1.0, p.Options(), generator())[0]
    assert torch.equal(out[1], single) and out[1].min() == 0 and out[1].max() == 4095


@pytest.mark.parametrize("height,width", [(8, 9), (9, 8), (16, 16), (31, 20)])
@pytest.mark.parametrize("name", ["ideal_lowpass", "ideal_highpass"])
def test_ideal_filters_equal_fftshift_implementation(name, height, width):
    perturbation, _ = CASES[name]
    spacing, cutoff = 0.5, 0.3  # cycles/mm -> radius 0.15 * min(H, W)
    image = random_image((1, height, width), seed=3, dtype=torch.float64)[0].numpy()
    radius = cutoff * min(height, width) * spacing
    low = centred_squared_distance(height, width) <= radius ** 2
    expected = reference_filter(image, low if name == "ideal_lowpass" else ~low)
    got = perturbation.filtered(batch_of(image, spacing=spacing, dtype=torch.float64), cutoff,
                                perturbation.Options(rescale="preserve"))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- Gaussian low-pass options

@pytest.mark.parametrize("wavelength", [0.25, 0.5, 2.0, 0.33])
@pytest.mark.parametrize("rescale", ["minmax", "preserve"])
def test_wavelength_and_cycles_per_mm_agree(wavelength, rescale):
    batch = batch_of(random_image((2, 64, 50)))
    p = GaussianLowpass()
    by_wavelength = p.perturb(batch, wavelength, p.Options(unit="mm", rescale=rescale), generator())
    by_frequency = p.perturb(batch, 1 / wavelength, p.Options(unit="cycles_per_mm", rescale=rescale), generator())
    if rescale == "preserve":
        torch.testing.assert_close(by_wavelength, by_frequency, rtol=0, atol=1e-3)
    else:
        assert (by_wavelength - by_frequency).abs().max() <= 1


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("unit", ["mm", "cycles_per_mm"])
def test_severity_zero_is_identity(name, unit):
    batch = batch_of(random_image())
    perturbation, _ = CASES[name]
    options = perturbation.Options(unit=unit) if name in FILTERS else perturbation.Options()
    out = perturbation.perturb(batch, 0, options, generator())
    assert torch.equal(out, batch.pixels)
    assert out.data_ptr() != batch.pixels.data_ptr()  # a copy: callers may write into it


def test_preserve_keeps_mean_and_range():
    """With preserve the filter keeps the DC term (mean) and the original scale: no rescaling."""
    smooth = torch.nn.functional.avg_pool2d(random_image((2, 1, 128, 96), low=1000, high=3000,
                                                         dtype=torch.float64), 5, 1, 2)[:, 0]
    batch = batch_of(smooth.numpy(), dtype=torch.float64)
    p = GaussianLowpass()
    for wavelength in (0.17, 0.5, 2.0, 4.0):
        out = p.perturb(batch, wavelength, p.Options(rescale="preserve"), generator())
        torch.testing.assert_close(out.mean(dim=(1, 2)), smooth.mean(dim=(1, 2)), rtol=0, atol=1e-9)
        assert out.min() >= smooth.min() - 1e-9 and out.max() <= smooth.max() + 1e-9
        minmax = p.perturb(batch, wavelength, p.Options(), generator())
        assert minmax.amin(dim=(1, 2)).eq(0).all() and minmax.amax(dim=(1, 2)).eq(4095).all()


def test_preserve_on_a_mammogram_stays_in_range_and_keeps_mean():
    image = read_png("gmic_0_R-CC.png")
    batch = batch_of(image)
    out = GaussianLowpass().perturb(batch, 1, GaussianLowpass.Options(rescale="preserve"), generator())
    assert out.min() >= 0 and out.max() <= 4095
    assert abs(out.double().mean() - float(image.mean())) < 0.05 * 4095 / 100  # within 0.05% of full scale


def test_minmax_output_is_integer_valued_and_constant_image_is_zero():
    p = GaussianLowpass()
    out = p.perturb(batch_of(random_image()), 1.0, p.Options(), generator())
    assert torch.equal(out, out.trunc())
    constant = p.perturb(batch_of(np.full((1, 16, 16), 700.0)), 1.0, p.Options(), generator())
    assert torch.equal(constant, torch.zeros_like(constant))


def test_bad_options_and_severities_are_rejected():
    with pytest.raises(ValueError, match="unit"):
        GaussianLowpass.Options(unit="inch")
    with pytest.raises(ValueError, match="rescale"):
        IdealLowpass.Options(rescale="stretch")
    with pytest.raises(TypeError, match="clip"):
        GaussianNoise.Options(clip="yes")
    batch = batch_of(random_image())
    for name in CASES:
        with pytest.raises(PerceptcoreError, match="severity"):
            run(name, batch, severity=-1)
        with pytest.raises(PerceptcoreError, match="severity"):
            run(name, batch, severity=float("nan"))
    with pytest.raises(PerceptcoreError, match="whole number"):
        run("patch_shuffle", batch, severity=2.5)
    with pytest.raises(PerceptcoreError, match="whole number"):
        run("patch_shuffle", batch, severity=81)
    with pytest.raises(PerceptcoreError, match="spacing"):
        run("gaussian_lowpass", batch_of(random_image(), spacing=0.0))


# --------------------------------------------------------------------------- ideal filters

def test_ideal_lowpass_plus_highpass_is_the_original():
    """Before clipping and rescaling (the `filtered` result), the two complementary masks sum to 1."""
    image = read_png("gmic_0_L-MLO.png") if (MAMMOGRAMS / "gmic_0_L-MLO.png").is_file() else None
    pixels = random_image((2, 300, 217), dtype=torch.float64) if image is None else batch_of(image).pixels.double()
    batch = ImageBatch(pixels, torch.full((pixels.shape[0],), SPACING_MM, dtype=torch.float64), 4095.0)
    for cutoff in (0.5, 2.0, 4.0):
        low = IdealLowpass().filtered(batch, cutoff, IdealLowpass.Options(rescale="preserve"))
        high = IdealHighpass().filtered(batch, cutoff, IdealHighpass.Options(rescale="preserve"))
        torch.testing.assert_close(low + high, pixels, rtol=0, atol=1e-8)
        assert high.mean().abs() < 1e-8  # the DC term went to the low-pass


@pytest.mark.parametrize("height,width", [(64, 48), (63, 47)])
def test_ideal_cutoff_radius_is_respected_in_the_spectrum(height, width):
    spacing, cutoff = 0.1, 2.0  # the published R; radius 0.2 * min(H, W) frequency indices
    pixels = random_image((1, height, width), dtype=torch.float64)
    batch = ImageBatch(pixels, torch.tensor([spacing], dtype=torch.float64), 4095.0)
    radius = cutoff * min(height, width) * spacing
    inside = centred_squared_distance(height, width) <= radius ** 2
    original = np.fft.fftshift(np.fft.fft2(pixels[0].numpy()))
    for perturbation, kept in ((IdealLowpass(), inside), (IdealHighpass(), ~inside)):
        out = perturbation.filtered(batch, cutoff, perturbation.Options(rescale="preserve"))[0].numpy()
        spectrum = np.fft.fftshift(np.fft.fft2(out))
        scale = np.abs(original).max()
        assert np.abs(spectrum[~kept]).max() < 1e-10 * scale
        np.testing.assert_allclose(spectrum[kept], original[kept], rtol=0, atol=1e-10 * scale)
        assert 0 < kept.sum() < kept.size


# --------------------------------------------------------------------------- noise and patches

def test_gaussian_noise_sd_and_clipping():
    flat = batch_of(np.full((2, 400, 300), 2000.0))
    out = run("gaussian_noise", flat, severity=100.0)
    delta = (out - flat.pixels).double()
    assert abs(float(delta.std()) / 100 - 1) < 0.01
    assert abs(float(delta.mean())) < 1.0
    strong = run("gaussian_noise", flat, severity=1600.0)  # the published sd: clipped at both ends
    assert strong.min() == 0 and strong.max() == 4095
    raw = run("gaussian_noise", flat, severity=1600.0, clip=False)
    assert raw.min() < 0 and raw.max() > 4095
    assert abs(float((raw - flat.pixels).double().std()) / 1600 - 1) < 0.01


def test_patch_shuffle_permutes_patches_and_keeps_remainder_strips():
    height, width, n = 37, 50, 8  # patches of 4 x 6; 5 remainder rows and 2 remainder columns
    pixels = torch.arange(2 * height * width, dtype=torch.float64).reshape(2, height, width)
    batch = ImageBatch(pixels, torch.tensor([0.1, 0.1]), 65535.0)
    out = run("patch_shuffle", batch, severity=n)
    for b in range(2):
        assert torch.equal(out[b].flatten().sort().values, pixels[b].flatten().sort().values)
        assert torch.equal(out[b, n * 4:, :], pixels[b, n * 4:, :])
        assert torch.equal(out[b, :, n * 6:], pixels[b, :, n * 6:])
        patches_in = {pixels[b, r:r + 4, c:c + 6].numpy().tobytes() for r in range(0, 32, 4) for c in range(0, 48, 6)}
        patches_out = {out[b, r:r + 4, c:c + 6].numpy().tobytes() for r in range(0, 32, 4) for c in range(0, 48, 6)}
        assert patches_in == patches_out and len(patches_out) == n * n
        assert not torch.equal(out[b], pixels[b])
    assert torch.equal(run("patch_shuffle", batch, severity=1), pixels)


def test_published_patch_shuffle_on_a_mammogram():
    image = read_png("gmic_0_R-MLO.png")  # 2650 x 1006: remainder of 2 rows and 6 columns at n = 8
    batch = batch_of(image)
    out = run("patch_shuffle", batch, severity=8)
    assert torch.equal(out.flatten().sort().values, batch.pixels.flatten().sort().values)
    assert torch.equal(out[:, 2648:], batch.pixels[:, 2648:]) and torch.equal(out[:, :, 1000:], batch.pixels[:, :, 1000:])


# --------------------------------------------------------------------------- every perturbation

@pytest.mark.parametrize("name", sorted(CASES))
def test_deterministic_given_generator(name):
    batch = batch_of(random_image())
    first, again, other = run(name, batch, seed=1), run(name, batch, seed=1), run(name, batch, seed=2)
    assert torch.equal(first, again)
    assert torch.equal(first, other) != (name in RANDOM)
    assert not torch.equal(first, batch.pixels)


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_shape_dtype_and_device_are_kept(name, dtype, device):
    batch = batch_of(random_image((2, 41, 57)), dtype=dtype)
    batch = ImageBatch(batch.pixels.to(device), batch.spacing_mm, batch.max_value)
    out = run(name, batch)
    assert out.shape == batch.pixels.shape and out.dtype == dtype and out.device == batch.pixels.device


@pytest.mark.parametrize("name", sorted(CASES))
def test_batch_equals_images_one_at_a_time(name):
    """A batch gives what its images give perturbed one by one with the same generator in turn."""
    pixels = random_image((3, 60, 44))
    spacing = torch.tensor([0.1, 0.05, 0.1], dtype=torch.float64)  # per-image spacing
    perturbation, severity = CASES[name]
    whole = perturbation.perturb(ImageBatch(pixels, spacing, 4095.0), severity, perturbation.Options(), generator(5))
    shared = generator(5)
    single = torch.cat([perturbation.perturb(ImageBatch(pixels[i:i + 1], spacing[i:i + 1], 4095.0), severity,
                                             perturbation.Options(), shared) for i in range(3)])
    assert torch.equal(whole, single)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("max_value", [4095.0, 65535.0])
def test_12_and_16_bit_images(name, max_value):
    batch = batch_of(random_image((2, 64, 64), high=max_value), max_value=max_value)
    severity = {"gaussian_noise": 1600 * max_value / 4095}.get(name)
    out = run(name, batch, severity=severity)
    assert out.min() >= 0 and out.max() <= max_value
    if name in FILTERS:  # min-max rescaled to the images' own range
        assert out.amax(dim=(1, 2)).eq(max_value).all()


# --------------------------------------------------------------------------- region restriction

def regions(height, width):
    """ROIs as boxes (touching, crossing and beyond the border, overlapping) and as binary masks."""
    rng = np.random.default_rng(11)
    blob = torch.as_tensor(rng.random((height, width)) < 0.3)
    per_image = torch.as_tensor(rng.random((2, height, width)) < 0.5)
    return {
        "box_inside": roi_mask((height, width), [(5, 7, 20, 30)]),
        "boxes_on_and_over_border": roi_mask((height, width), [(-4, -3, 10, 12), (height - 6, width - 9, height + 5, width + 2),
                                                               (0, 20, height, 25)]),
        "overlapping_boxes": roi_mask((height, width), [(10, 10, 30, 30), (20, 20, 40, 40)]),
        "binary_mask": roi_mask((height, width), mask=blob),
        "mask_and_box": roi_mask((height, width), [(0, 0, 8, width)], mask=blob),
        "per_image_masks": per_image,
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_interior_and_exterior_restrictions_compose_the_whole_image(name):
    height, width = 48, 64
    original = random_image((2, height, width))
    batch = batch_of(original.numpy())
    whole = run(name, batch, seed=3)
    for label, inside in regions(height, width).items():
        assert inside.any() and not inside.all(), label
        interior = restrict(original, run(name, batch, seed=3), "roi_interior", inside)
        exterior = restrict(original, run(name, batch, seed=3), "roi_exterior", inside)
        inside_b = inside.expand(original.shape)
        assert torch.equal(torch.where(inside_b, interior, exterior), whole), label
        assert torch.equal(interior[~inside_b], original[~inside_b]), label
        assert torch.equal(exterior[inside_b], original[inside_b]), label
        assert torch.equal(restrict(original, whole, "entire_image", None), whole)
    assert REGIONS == ("entire_image", "roi_interior", "roi_exterior")


def test_boxes_are_half_open_and_clipped_to_the_image():
    inside = roi_mask((10, 12), [(-3, -3, 2, 4), (8, 10, 30, 30), (-9, -9, -1, -1)])
    assert inside.sum() == 2 * 4 + 2 * 2
    assert inside[1, 3] and not inside[2, 3] and not inside[1, 4] and inside[9, 11] and not inside[7, 11]


# --------------------------------------------------------------------------- the matched-noise baseline

def test_matched_noise_sd_formula():
    original = torch.zeros(2, 30, 40, dtype=torch.float64)
    perturbed = original.clone()
    perturbed[0] += 3.0
    perturbed[1] += 5.0
    n = 30 * 40
    expected = (3.0 * n ** 0.5 + 5.0 * n ** 0.5) / 2 / expected_noise_norm(n)
    assert matched_noise_sd(original, perturbed) == pytest.approx(expected, rel=1e-12)
    assert expected_noise_norm(n) == pytest.approx((n - 0.5) ** 0.5, rel=1e-6)
    torch.testing.assert_close(perturbation_norms(original, perturbed), torch.tensor([3.0, 5.0], dtype=torch.float64) * n ** 0.5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matched_noise_matches_average_norm_on_mammograms(name):
    """Full-size mammograms (two 12-bit CC views cropped to a common 2023 x 801): the baseline's
    average L2 norm is the perturbation's within 1%; it is deterministic and not clipped."""
    images = [read_png("gmic_0_L-CC.png"), read_png("gmic_0_R-CC.png")[:2023]]
    batch = batch_of(np.stack(images))
    perturbed = run(name, batch, severity={"gaussian_noise": 1600.0, "patch_shuffle": 8}.get(name))
    baseline = matched_noise(batch, perturbed, generator(9))
    target = perturbation_norms(batch.pixels, perturbed).mean()
    got = perturbation_norms(batch.pixels, baseline).mean()
    assert abs(float(got / target) - 1) < 0.01, (float(got), float(target))
    assert torch.equal(baseline, matched_noise(batch, perturbed, generator(9)))
    assert baseline.dtype == batch.pixels.dtype and baseline.shape == batch.pixels.shape
    assert baseline.min() < 0  # not clipped: the zero background gets all of its noise


# --------------------------------------------------------------------------- registration

def test_bundled_perturbations_are_registered():
    registry = load_registry()
    for name in CASES:
        perturbation = registry.get("perturbation", name, "test")
        assert perturbation.name == name and isinstance(perturbation.severity_unit, str)
        perturbation.Options()  # every option has a default
