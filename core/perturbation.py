"""What a perturbation plugin must do, and what the core does around it.

A perturbation removes information from images at a graded severity. Plugins register
objects with `name`, `severity_unit`, `Options` and `perturb(...)` through the
`perceptcore_register_perturbations` hook. The core restricts any perturbation to a
region (ROI interior, ROI exterior, the entire image) by compositing, so plugins only
ever perturb whole images.

Region boundary: ROI boxes are given in pixel coordinates as half-open ranges
``[row0, row1) x [col0, col1)``; a pixel is inside the ROI when its index lies in a box
(or its mask value is true). The interior and the exterior therefore partition the
pixels: every pixel is perturbed under exactly one of `roi_interior` and `roi_exterior`.

The Gaussian-noise baseline of the robustness paper (noise whose expected L2 norm matches a
perturbation's average norm) is a core function, `matched_noise`, applied to any
perturbation's output; random draws for image b of a batch are the b-th draw from the
generator (`standard_normal`).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

import attrs
import torch

REGIONS = ("entire_image", "roi_interior", "roi_exterior")


@attrs.frozen
class ImageBatch:
    """Same-sized images perturbed together.

    pixels: (B, H, W) float tensor of grey levels (any device); spacing_mm: (B,) pixel
    spacing on the detector/breast in mm; max_value: the top of the images' grey-level
    range (4095 for 12-bit, 65535 for 16-bit).
    """

    pixels: torch.Tensor
    spacing_mm: torch.Tensor
    max_value: float


@runtime_checkable
class Perturbation(Protocol):
    """name; severity_unit (e.g. "mm"); Options, an attrs class of typed options (defaults for all);
    perturb(batch, severity, options, generator) -> (B, H, W) tensor; severity 0 means "unperturbed"."""

    name: str
    severity_unit: str
    Options: type

    def perturb(self, batch: ImageBatch, severity: float, options, generator: torch.Generator) -> torch.Tensor:
        """The perturbed pixels, same shape, dtype and device; deterministic given `generator`."""


def roi_mask(shape: tuple[int, int], boxes: Sequence[Sequence[int]] = (), mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (H, W) mask of the ROI from half-open boxes (row0, col0, row1, col1) and/or a binary mask."""
    inside = torch.zeros(shape, dtype=torch.bool) if mask is None else mask.to(torch.bool).clone()
    for row0, col0, row1, col1 in boxes:
        inside[max(row0, 0):max(row1, 0), max(col0, 0):max(col1, 0)] = True
    return inside


def restrict(original: torch.Tensor, perturbed: torch.Tensor, region: str, inside: torch.Tensor | None) -> torch.Tensor:
    """Keep the perturbation only in `region`: the perturbed pixels there, the original ones elsewhere.

    original, perturbed: (B, H, W); inside: (B, H, W) or (H, W) boolean ROI mask
    (required unless region is entire_image).
    """
    if region == "entire_image":
        return perturbed
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    if inside is None:
        raise ValueError(f"region {region!r} needs an ROI")
    keep = inside if region == "roi_interior" else ~inside
    return torch.where(keep.to(perturbed.device), perturbed, original)


# --------------------------------------------------------------------------- random draws and the noise baseline

def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision perturbations compute in: float64 for float64 images, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def standard_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) draws shaped like `like` (B, H, W), on its device, in its working precision.

    Image b's draws are the b-th (H, W) draw from `generator` (made on the generator's own
    device, then moved), so a batch gets exactly the noise its images would get perturbed
    one at a time with the same generator, and a CPU generator gives the same noise for CPU
    and CUDA images.
    """
    dtype = working_dtype(like.dtype)
    draws = [torch.randn(like.shape[-2:], generator=generator, device=generator.device, dtype=dtype)
             for _ in range(like.shape[0])]
    return torch.stack(draws).to(like.device)


def perturbation_norms(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """||perturbed_b - original_b||_2 per image: (B,) float64 on the CPU."""
    return torch.stack([
        torch.linalg.vector_norm(p.to(torch.float64) - o.to(torch.float64)).cpu()
        for o, p in zip(original, perturbed)
    ])


def expected_noise_norm(n_pixels: int) -> float:
    """E||z||_2 for z ~ N(0, I_n): the mean of a chi distribution, sqrt(2) Γ((n+1)/2) / Γ(n/2).

    Equal to sqrt(n) within a relative 1/(4n) (1e-8 for a mammogram), but exact.
    """
    return math.sqrt(2.0) * math.exp(math.lgamma((n_pixels + 1) / 2) - math.lgamma(n_pixels / 2))


def matched_noise_sd(original: torch.Tensor, perturbed: torch.Tensor) -> float:
    """The sd of the Gaussian-noise baseline matched to a perturbation (robustness paper, seed 002).

    sd = mean_b ||Δ_b||_2 / c(H W), Δ_b = perturbed_b - original_b, c(n) = expected_noise_norm(n)
    (≈ sqrt(H W)), so that the expected L2 norm of (unclipped) N(0, sd²) noise on an H x W image
    equals the batch's average perturbation norm. For a data set of several batches or image
    sizes, match the whole set: sd = Σ_i ||Δ_i|| / Σ_i c(n_i), from `perturbation_norms`.
    """
    n_pixels = original.shape[-2] * original.shape[-1]
    return float(perturbation_norms(original, perturbed).mean()) / expected_noise_norm(n_pixels)


def matched_noise(batch: ImageBatch, perturbed: torch.Tensor, generator: torch.Generator,
                  sd: float | None = None) -> torch.Tensor:
    """The Gaussian-noise baseline of a perturbation: batch.pixels + N(0, sd²) noise, not clipped.

    This is a core function rather than a perturbation plugin because it needs the output of
    another perturbation (a plugin would have to look up and run other plugins). A study
    perturbs a batch with the perturbation it tests, then calls
    ``matched_noise(batch, perturbed, generator)`` and predicts on both; region restriction
    applies to the baseline as to any perturbation (`restrict`).

    sd defaults to `matched_noise_sd(batch.pixels, perturbed)` (the batch's own average norm);
    pass a data-set-level sd to match over more images. The noise is deliberately not
    clipped to [0, max_value]: mammograms have large zero-valued backgrounds where clipping
    would discard about half of the noise, and the baseline's norm would no longer match.
    Same shape, dtype and device as the pixels; image b's noise is the b-th draw from
    `generator` (see `standard_normal`).
    """
    if sd is None:
        sd = matched_noise_sd(batch.pixels, perturbed)
    noise = standard_normal(batch.pixels, generator)
    return (batch.pixels.to(noise.dtype) + sd * noise).to(batch.pixels.dtype)


class NoiseBaseline:
    """Gaussian noise of sd `severity` grey levels, not clipped: the baseline of `matched_noise`,
    as a perturbation object so it runs wherever perturbations run (its sd comes from the
    perturbation it is matched to, so it is part of the core rather than a plugin)."""

    name = "noise_baseline"
    severity_unit = "grey levels"

    @attrs.frozen
    class Options:
        pass

    def perturb(self, batch: ImageBatch, severity: float, options, generator: torch.Generator) -> torch.Tensor:
        return matched_noise(batch, batch.pixels, generator, sd=severity)
