"""Additive Gaussian noise (robustness paper, seed 002: sd 1600 on the [0, 4095] scale).

perturbed = clip(pixels + N(0, sd²), 0, max_value) with sd = the severity in grey levels of
the images' own scale (for 16-bit images, 1600 on the 12-bit scale is 1600 * 65535 / 4095).
Severity 0 means unperturbed (the input unchanged, no draws). Deterministic given the
generator: image b's noise is the b-th (H, W) draw from it (`perceptcore.perturbation.standard_normal`),
so a batch gets the noise its images would get one at a time.

Options: clip (default true) — clip to [0, max_value]; false keeps the raw sum (whose norm is
then exactly that of the noise).
"""

from __future__ import annotations

import attrs
import torch

from perceptcore.perturbation import ImageBatch, standard_normal
from perceptcore.plugins import hookimpl

from ._common import check_severity


class GaussianNoise:
    name = "gaussian_noise"
    severity_unit = "grey_levels"

    @attrs.frozen
    class Options:
        clip: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    def perturb(self, batch: ImageBatch, severity: float, options, generator: torch.Generator) -> torch.Tensor:
        sd = check_severity(self.name, severity)
        if sd == 0:
            return batch.pixels.clone()
        noise = standard_normal(batch.pixels, generator)
        out = noise.mul_(sd).add_(batch.pixels)
        if options.clip:
            out.clamp_(0, batch.max_value)
        return out.to(batch.pixels.dtype)


@hookimpl
def perceptcore_register_perturbations(register):
    register(GaussianNoise())
