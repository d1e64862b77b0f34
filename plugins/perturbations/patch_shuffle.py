"""Patch shuffling (robustness paper, seed 002: 64 patches, 8 per side).

The severity n is the number of patches per side. The image's top-left
(n * floor(H/n)) x (n * floor(W/n)) area is cut into n x n equal patches of
floor(H/n) x floor(W/n) pixels (square when H = W, "square-ish" otherwise), and their
positions are permuted uniformly at random. The remainder — the bottom H mod n rows and the
right W mod n columns — stays in place, untouched, so the shape is kept and the output is a
permutation of the input's pixels. n = 1 (one patch) and n = 0 (the "unperturbed" severity)
return the input unchanged; n must be a whole number no larger than min(H, W).

Deterministic given the generator: image b's permutation is the b-th draw
``torch.randperm(n * n, generator=generator)`` (on the generator's device), so a batch is
shuffled exactly as its images would be one at a time. No options.
"""

from __future__ import annotations

import attrs
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.perturbation import ImageBatch
from perceptcore.plugins import hookimpl

from ._common import check_severity


class PatchShuffle:
    name = "patch_shuffle"
    severity_unit = "patches_per_side"

    @attrs.frozen
    class Options:
        pass

    def perturb(self, batch: ImageBatch, severity: float, options, generator: torch.Generator) -> torch.Tensor:
        pixels = batch.pixels
        height, width = pixels.shape[-2:]
        severity = check_severity(self.name, severity)
        n = int(severity)
        if n != severity or n > min(height, width):
            raise PerceptcoreError(
                f"severity is the number of patches per side: a whole number from 0 to min(H, W) = "
                f"{min(height, width)}, got {severity!r}",
                f"perturbation {self.name!r}",
            )
        out = pixels.clone()
        if n <= 1:
            return out
        ph, pw = height // n, width // n
        batch_size = pixels.shape[0]
        # (B, n*ph, n*pw) -> (B, n*n, ph, pw), patch index = row-major position in the grid.
        patches = (pixels[:, : n * ph, : n * pw]
                   .reshape(batch_size, n, ph, n, pw).permute(0, 1, 3, 2, 4).reshape(batch_size, n * n, ph, pw))
        order = torch.stack([torch.randperm(n * n, generator=generator, device=generator.device)
                             for _ in range(batch_size)]).to(pixels.device)
        shuffled = torch.take_along_dim(patches, order[:, :, None, None], dim=1)
        out[:, : n * ph, : n * pw] = (shuffled.reshape(batch_size, n, n, ph, pw)
                                      .permute(0, 1, 3, 2, 4).reshape(batch_size, n * ph, n * pw))
        return out


@hookimpl
def perceptcore_register_perturbations(register):
    register(PatchShuffle())
