"""Ideal (hard cut-off) low-pass filter of the robustness paper (seed 002: R = 2.0 cycles/mm).

Keeps the frequencies at distance D <= R_img from the centre of the shifted spectrum and
zeroes the rest; R_img = R * min(H, W) * pixel spacing (mm), with the same centre and
conversion as `gaussian_lowpass`. The severity R is in cycles per mm on the breast (option
``unit: mm`` takes a wavelength w, R = 1/w); 0 means unperturbed (the input unchanged).
Options `unit` (default "cycles_per_mm") and `rescale` ("minmax", published style, or
"preserve") as for `gaussian_lowpass`. Complementary to `ideal_highpass` at the same R.
"""

from __future__ import annotations

from perceptcore.plugins import hookimpl

from ._frequency import IdealFilter


class IdealLowpass(IdealFilter):
    name = "ideal_lowpass"
    keep_low = True


@hookimpl
def perceptcore_register_perturbations(register):
    register(IdealLowpass())
