"""Ideal (hard cut-off) high-pass filter of the robustness paper (seed 002: R = 2.0 cycles/mm).

Zeroes the frequencies at distance D <= R_img from the centre of the shifted spectrum (the
DC term included) and keeps the rest; R_img = R * min(H, W) * pixel spacing (mm), as for
`gaussian_lowpass`. The severity R is in cycles per mm on the breast (option ``unit: mm``
takes a wavelength w, R = 1/w); 0 means unperturbed (the input unchanged). Options `unit`
(default "cycles_per_mm") and `rescale`; with "preserve" the output has mean about 0, so the
clip to [0, max_value] removes its negative half — use "minmax" (the default) to view it.
Complementary to `ideal_lowpass` at the same R: their unclipped outputs sum to the image.
"""

from __future__ import annotations

from perceptcore.plugins import hookimpl

from ._frequency import IdealFilter


class IdealHighpass(IdealFilter):
    name = "ideal_highpass"
    keep_low = False


@hookimpl
def perceptcore_register_perturbations(register):
    register(IdealHighpass())
