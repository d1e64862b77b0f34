"""Frequency grid, severity conversion and the filtering pass shared by the Fourier filters.

Conventions (those of the published Gaussian low-pass filter):

- The spectrum is the 2-D DFT over the last two dims. In the *shifted* spectrum (fftshift)
  the zero frequency sits at row floor(H/2), column floor(W/2) — the published centre
  (floor(W/2), floor(H/2)) in (x, y) — and D(u, v) is the Euclidean distance from it in
  frequency-index units.
- A severity is a frequency in cycles per mm on the breast (D0 or R), or a wavelength w mm
  (D0 = 1/w). With alpha = min(H, W) pixels and beta = the pixel spacing in mm, the radius in
  frequency-index units is D0_img = D0 * alpha * beta.

Why the fast path is exact. fftshift is a permutation that moves unshifted index j to
(j + floor(N/2)) mod N, so the shifted-spectrum distance of unshifted index j along one axis
is k(j) = ((j + floor(N/2)) mod N) - floor(N/2); multiplying the shifted spectrum by the mask
and shifting back is the same as multiplying the unshifted spectrum by M(k(j_row), k(j_col)),
with no shift at all. Each mask here depends only on k_row² + k_col², and k(N - j) = -k(j)
except at an even N's Nyquist index, where the two coincide; so M is Hermitian-symmetric like
the spectrum of a real image, the filtered spectrum stays Hermitian and its inverse DFT is
real. The real part of the full inverse DFT therefore equals irfft2 of the half spectrum
(columns 0..floor(W/2)) times the mask's matching half, which is what `filtered` computes.

Separable masks. A mask that is an outer product M(k_row, k_col) = g_row(k_row) g_col(k_col) of
two 1-D masks (the Gaussian's) filters each axis on its own: irfft2(rfft2(x) * M) is the circular
convolution of every row with the inverse DFT of g_col over the W columns, then of every column
with that of g_row (each 1-D mask is symmetric, k(N - j) = -k(j), so both kernels are real). On
CPU such a filter (`FourierFilter.separable`) runs as those two 1-D convolutions with
ducc0.fft.convolve_axis, which transforms, multiplies and transforms back each line while it is
in cache: no half-spectrum array, no 2-D mask, no separate masking and scaling passes.

Masks are cached per (H, W, radius, device, dtype) (8 each; a 3328 x 2560 float32 half mask
is 17 MB), squared-distance grids per (H, W, device) (2), and how many leading half-spectrum
columns each mask leaves nonzero (64; on CPU the column transforms skip the rest).
"""

from __future__ import annotations

import math
from functools import lru_cache

import attrs
import ducc0
import numpy as np
import scipy.fft
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.perturbation import ImageBatch, working_dtype

from ._common import check_severity, one_of

UNITS = ("mm", "cycles_per_mm")
RESCALES = ("minmax", "preserve")


def unit_option(default: str):
    """An attrs field for the severity unit: "mm" (a wavelength w, D0 = 1/w) or "cycles_per_mm"."""
    return attrs.field(default=default, validator=one_of(*UNITS))


def rescale_option():
    """An attrs field for the output intensities: "minmax" (published, the default) or "preserve"."""
    return attrs.field(default="minmax", validator=one_of(*RESCALES))


def cycles_per_mm(severity: float, unit: str) -> float:
    """The severity (> 0) as a frequency in cycles per mm on the breast."""
    return 1.0 / severity if unit == "mm" else float(severity)


def index_radius(frequency_cycles_per_mm: float, shape: tuple[int, int], spacing_mm: float) -> float:
    """D0_img = D0 * min(H, W) * spacing: the radius in frequency-index units of an H x W image."""
    return frequency_cycles_per_mm * min(shape) * spacing_mm


def signed_index(n: int, length: int, device) -> torch.Tensor:
    """k(j) = ((j + floor(n/2)) mod n) - floor(n/2) for j < length: the shifted-spectrum offset."""
    j = torch.arange(length, dtype=torch.float64, device=device)
    return torch.remainder(j + n // 2, n) - n // 2


@lru_cache(maxsize=2)
def squared_distance(height: int, width: int, device: torch.device) -> torch.Tensor:
    """D² over the half spectrum of rfft2, (H, floor(W/2) + 1) float64 (exact integers)."""
    rows = signed_index(height, height, device)
    cols = signed_index(width, width // 2 + 1, device)
    return rows[:, None] ** 2 + cols[None, :] ** 2


class FourierFilter:
    """A mask on the centred spectrum; subclasses give `name`, `severity_unit`, `Options` and `mask`.

    `mask(height, width, radius, device, dtype)` returns the half-spectrum mask (cache it); the
    severity is converted with the options' `unit` to a radius in frequency-index units per image.
    Severity 0 means unperturbed and returns the input unchanged, whatever the unit.
    """

    def mask(self, height: int, width: int, radius: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def separable(self, height: int, width: int, radius: float, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray] | None:
        """For a mask that is an outer product of 1-D masks, the (row, column) spatial kernels of
        `separable_kernels` (length H and W, NumPy arrays of `dtype`, cached); None otherwise."""
        return None

    def radii(self, batch: ImageBatch, severity: float, unit: str) -> list[float]:
        frequency = cycles_per_mm(severity, unit)
        shape = tuple(batch.pixels.shape[-2:])
        spacings = [float(s) for s in batch.spacing_mm.reshape(-1).tolist()]
        if any(not math.isfinite(s) or s <= 0 for s in spacings):
            raise PerceptcoreError(f"pixel spacing must be > 0 mm, got {spacings}", f"perturbation {self.name!r}")
        if len(spacings) == 1:
            spacings = spacings * batch.pixels.shape[0]
        if len(spacings) != batch.pixels.shape[0]:
            raise PerceptcoreError(f"{len(spacings)} pixel spacings for {batch.pixels.shape[0]} images",
                                   f"perturbation {self.name!r}")
        return [index_radius(frequency, shape, s) for s in spacings]

    def filtered(self, batch: ImageBatch, severity: float, options) -> torch.Tensor:
        """The real part of the filtered image: unclipped, unrescaled, in the working precision."""
        pixels = batch.pixels
        height, width = pixels.shape[-2:]
        dtype = working_dtype(pixels.dtype)
        radii = self.radii(batch, severity, options.unit)
        if pixels.device.type == "cpu":
            kernels = [self.separable(height, width, r, dtype) for r in radii]
            if kernels and all(k is not None for k in kernels):
                return apply_separable_ducc(pixels.detach().to(dtype), kernels)
        masks = {r: self.mask(height, width, r, pixels.device, dtype) for r in set(radii)}
        mask = masks[radii[0]] if len(masks) == 1 else torch.stack([masks[r] for r in radii])
        columns = None
        if pixels.device.type == "cpu":
            columns = max(nonzero_columns(self.mask, height, width, r, pixels.device, dtype) for r in masks)
        return apply_half_mask(pixels.detach().to(dtype), mask, columns)

    def perturb(self, batch: ImageBatch, severity: float, options, generator: torch.Generator) -> torch.Tensor:
        severity = check_severity(self.name, severity)
        if severity == 0:
            return batch.pixels.clone()
        out = self.filtered(batch, severity, options)
        return finish(out, options.rescale, batch.max_value).to(batch.pixels.dtype)


def apply_half_mask(pixels: torch.Tensor, mask: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """irfft2(rfft2(pixels) * mask) over the last two dims; `mask` is (H, W//2 + 1) or (B, H, W//2 + 1).

    CPU tensors go through scipy.fft (pocketfft, threaded with torch's thread count), which on
    CPU is 2-3x faster here than torch.fft's inverse real transform; other devices use
    torch.fft. Both compute the same transforms; the result is a new tensor. `columns`, if
    given, says the mask is 0 in every column from that one on (`nonzero_columns`).
    """
    if pixels.device.type == "cpu":
        return apply_half_mask_scipy(pixels, mask, columns)
    return apply_half_mask_torch(pixels, mask)


def apply_half_mask_scipy(pixels: torch.Tensor, mask: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """Bit for bit ``scipy.fft.irfft2(scipy.fft.rfft2(x) * mask, s=(H, W))``, with less work.

    rfft2 is the row transform followed by the column transform, so spelling it out changes
    nothing; but every call of rfft2/irfft2 allocates its result (34 MB for a 3328 x 2560
    mammogram, page faults included) and irfft2 also copies its input, so here the column
    transforms run in place on the one spectrum array. irfft2 scales by 1/(H W) once, as a
    float32 (float64 for float64 data) multiply of its output by that factor rounded from a
    long double, not 1/H and 1/W on the way: `_inverse_scale` repeats exactly that.

    Columns of the half spectrum where the mask is 0 in every row (a narrow Gaussian's or an
    ideal low-pass's outer columns) come out of the masked column transforms as zeros whatever
    they held, so their transforms are skipped and they are set to 0; each remaining column is
    transformed exactly as it would be with the others.
    """
    height, width = pixels.shape[-2:]
    workers = max(torch.get_num_threads(), 1)
    spectrum = scipy.fft.rfft(pixels.numpy(), axis=-1, workers=workers)
    columns = spectrum.shape[-1] if columns is None else columns
    kept = spectrum[..., :columns]  # a view: the column transforms below work in place on it
    _into(kept, scipy.fft.fft(kept, axis=-2, overwrite_x=True, workers=workers))
    kept *= mask.numpy()[..., :columns]
    _into(kept, scipy.fft.ifft(kept, axis=-2, norm="forward", overwrite_x=True, workers=workers))
    spectrum[..., columns:] = 0
    out = scipy.fft.irfft(spectrum, n=width, axis=-1, norm="forward", workers=workers)
    out *= _inverse_scale(height * width, out.dtype)
    return torch.from_numpy(out)


def separable_kernels(row_mask: torch.Tensor, column_mask: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The real spatial kernels (inverse DFTs) of two full-length 1-D masks over the unshifted
    indices 0..N-1, computed in float64 and rounded to `dtype` once.

    The 1-D masks must be symmetric (m(j) = m(N - j)), as a function of k(j)² is, so the kernels
    are real; the 1/N of each inverse DFT is in the kernel, so the filter needs no other scaling.
    """
    numpy_dtype = np.float64 if dtype == torch.float64 else np.float32
    return tuple(np.ascontiguousarray(scipy.fft.ifft(m.detach().cpu().to(torch.float64).numpy()).real,
                                      dtype=numpy_dtype)
                 for m in (row_mask, column_mask))


def apply_separable_ducc(pixels: torch.Tensor, kernels: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """irfft2(rfft2(pixels) * (g_row ⊗ g_col)) of each (H, W) image of a (B, H, W) CPU tensor, as
    a circular convolution of its rows with the column kernel and then of its columns with the
    row kernel (`kernels[b]`, from `separable_kernels`); a new tensor.

    ducc0.fft.convolve_axis does each line's real FFT, the product with the kernel's transform and
    the inverse FFT in one go, threaded with torch's thread count; the second convolution runs in
    place. The result is not bit for bit scipy's irfft2 (other transforms, other rounding) but
    within rounding of the exact filter: rounding a kernel to `dtype` moves an output by at most
    u * sum|kernel| * max|x| (u = 2^-24 in float32), and sum|kernel| is g(0) = 1 for a narrow
    Gaussian (no negative tap) and near 1 for a wide one (nearly a unit impulse); the FFTs add
    the usual O(u log N). Measured within 14 u * max|x| of a float64 irfft2(rfft2(x) * mask).
    """
    threads = max(torch.get_num_threads(), 1)
    source = pixels.numpy()
    out = np.empty_like(source)
    same = all(k[0] is kernels[0][0] and k[1] is kernels[0][1] for k in kernels)
    for index, (rows, columns) in enumerate(kernels[:1] if same else kernels):
        src, dst = (source, out) if same else (source[index], out[index])
        ducc0.fft.convolve_axis(src, dst, dst.ndim - 1, columns, nthreads=threads)
        ducc0.fft.convolve_axis(dst, dst, dst.ndim - 2, rows, nthreads=threads)
    return torch.from_numpy(out)


def _into(view: np.ndarray, result: np.ndarray) -> None:
    """scipy.fft writes an overwrite_x transform into its input when it can (returning another array
    object over the same memory); copy it there otherwise."""
    if not np.may_share_memory(result, view):
        view[...] = result


@lru_cache(maxsize=64)
def nonzero_columns(make_mask, height: int, width: int, radius: float, device, dtype) -> int:
    """1 + the last column of make_mask(height, width, radius, device, dtype) holding a nonzero value.

    Cached (an int per mask), since the masks themselves are cached and this scans one.
    """
    mask = make_mask(height, width, radius, device, dtype)
    nonzero = mask.reshape(-1, mask.shape[-1]).ne(0).any(dim=0).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def _inverse_scale(size: int, dtype) -> np.generic:
    """pocketfft's backward normalisation factor: 1/size in long double, rounded to `dtype`."""
    return np.dtype(dtype).type(np.longdouble(1) / np.longdouble(size))


def apply_half_mask_torch(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    spectrum = torch.fft.rfft2(pixels)
    spectrum.mul_(mask)
    return torch.fft.irfft2(spectrum, s=(height, width))


def finish(values: torch.Tensor, rescale: str, max_value: float) -> torch.Tensor:
    """Map a filtered image back to grey levels, in place.

    minmax (published): per image, (x - min) / (max - min) * max_value, then truncated toward
    zero like NumPy's ``astype(np.uint16)`` (the values lie in [0, max_value], so this is floor);
    a constant image becomes 0. preserve: the values as they are, clipped to [0, max_value]
    (not rounded).
    """
    if rescale == "preserve":
        return values.clamp_(0, max_value)
    for image in values:  # (H, W) views
        # aminmax over a whole tensor is a fast vectorised reduction; with dim= over (1, H*W) it
        # takes a slow path (about 10x slower on a mammogram). Same values either way: min/max are exact.
        low, high = torch.aminmax(image)
        span = torch.where(high > low, high - low, torch.ones_like(high))  # constant image: all 0
        # Divide first, as published: x - low lies in [0, span] (rounding is monotonic), so the
        # quotient lies in [0, 1], the maximum maps to exactly max_value and no clamp is needed.
        image.sub_(low).div_(span).mul_(max_value)
        _trunc_(image)
    return values


def _trunc_(values: torch.Tensor) -> None:
    """values.trunc_(); on CPU through NumPy, whose vectorised trunc is about 10x faster than
    torch's there (the result is the same: truncation is exact)."""
    if values.device.type == "cpu":
        array = values.numpy()
        np.trunc(array, out=array)
    else:
        values.trunc_()


@lru_cache(maxsize=8)
def ideal_lowpass_mask(height: int, width: int, radius: float, device: torch.device,
                       dtype: torch.dtype, keep_low: bool = True) -> torch.Tensor:
    """1 where D <= radius (keep_low) or D > radius (not keep_low), else 0; half spectrum.

    The two masks are complementary, so an ideal low-pass and high-pass at the same radius sum
    to the original image (before clipping or rescaling).
    """
    inside = squared_distance(height, width, device) <= radius * radius
    return (inside if keep_low else ~inside).to(dtype)


class IdealFilter(FourierFilter):
    """A hard cut-off at R (cycles/mm on the breast by default): `keep_low` keeps the frequencies at
    or inside it (low-pass), otherwise those strictly outside (high-pass)."""

    severity_unit = "cycles_per_mm"
    keep_low: bool

    @attrs.frozen
    class Options:
        unit: str = unit_option("cycles_per_mm")
        rescale: str = rescale_option()

    def mask(self, height, width, radius, device, dtype):
        return ideal_lowpass_mask(height, width, radius, device, dtype, keep_low=self.keep_low)
