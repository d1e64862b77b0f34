"""Gaussian low-pass filter of the perception-comparison study, as published.

The image's shifted 2-D DFT is multiplied by M(u, v) = exp(-D(u, v)² / (2 D0_img²)), D being
the distance from the centre (floor(W/2), floor(H/2)) of the shifted spectrum in
frequency-index units, and the real part of the inverse DFT is kept. The severity is a
wavelength w in mm on the breast (D0 = 1/w cycles/mm; option ``unit: cycles_per_mm`` takes D0
directly); D0_img = D0 * min(H, W) * pixel spacing (mm). Severities 0, 0.17, 0.22, 0.33, 0.5,
0.67, 1, 2 and 4 mm were published; 0 means unperturbed (the input unchanged). Since D is
in frequency-index units, the filter's scale is D0 cycles/mm along the image's shorter side
and D0 * min(H, W) / max(H, W) along the longer one — as published, and reproduced here.

Options:
- unit: "mm" (wavelength, default) or "cycles_per_mm".
- rescale: "minmax" (published, default): per image, min-max rescaled to [0, max_value] and
  truncated to integers like ``astype(np.uint16)``; "preserve": the filtered intensities
  (the mean grey level is kept, since M = 1 at D = 0), clipped to [0, max_value].

Computed with rfft2/irfft2 on the unshifted spectrum and a cached half-spectrum mask, which is
exactly the published fftshift computation (see `_frequency`); on CPU, since the mask is an outer
product of two 1-D Gaussians, as a circular convolution of the rows and then of the columns with
their inverse DFTs (the same filter; `_frequency.apply_separable_ducc`). In float64 for float64
images, float32 otherwise (within 1 grey level of the float64 result on 12-bit mammograms).
"""

from __future__ import annotations

from functools import lru_cache

import attrs
import torch

from perceptcore.plugins import hookimpl

from ._frequency import FourierFilter, rescale_option, separable_kernels, signed_index, unit_option


def gaussian_1d(n: int, length: int, radius: float, device) -> torch.Tensor:
    """exp(-k(j)² / (2 radius²)) for j < length, float64: one factor of the separable mask."""
    return torch.exp(signed_index(n, length, device) ** 2 / (-2.0 * radius * radius))


@lru_cache(maxsize=8)
def gaussian_mask(height: int, width: int, radius: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """exp(-D² / (2 radius²)) over the half spectrum, computed in float64.

    D² = k_row² + k_col², so the mask is the outer product of two 1-D Gaussians (equal to the
    direct formula to rounding, about 1e-16 relative); cheap to build for a new image size.
    """
    rows = gaussian_1d(height, height, radius, device)
    cols = gaussian_1d(width, width // 2 + 1, radius, device)
    return (rows[:, None] * cols[None, :]).to(dtype)


@lru_cache(maxsize=8)
def gaussian_kernels(height: int, width: int, radius: float, dtype: torch.dtype):
    """The (row, column) spatial kernels of the separable mask (`_frequency.separable_kernels`):
    the inverse DFTs of the full-length 1-D Gaussians, a few KB each."""
    cpu = torch.device("cpu")
    return separable_kernels(gaussian_1d(height, height, radius, cpu), gaussian_1d(width, width, radius, cpu), dtype)


class GaussianLowpass(FourierFilter):
    name = "gaussian_lowpass"
    severity_unit = "mm"

    @attrs.frozen
    class Options:
        unit: str = unit_option("mm")
        rescale: str = rescale_option()

    def mask(self, height, width, radius, device, dtype):
        return gaussian_mask(height, width, radius, device, dtype)

    def separable(self, height, width, radius, dtype):
        return gaussian_kernels(height, width, radius, dtype)


@hookimpl
def perceptcore_register_perturbations(register):
    register(GaussianLowpass())
