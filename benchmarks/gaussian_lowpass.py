"""Throughput of the gaussian_lowpass perturbation against a straightforward NumPy implementation.

    python benchmarks/gaussian_lowpass.py [--batch 4] [--repeat 3] [--image PATH]

Image: the 3328 x 2560 DMV sample mammogram (converted to the published 12-bit scale), in a
batch of copies, 0.1 mm per pixel, at a few published severities. The NumPy reference is the
published algorithm written plainly, image by image: np.fft.fft2 + fftshift (complex128), the
Gaussian mask built for the call, ifftshift + ifft2, real part, min-max rescale to [0, 4095],
cast to uint16. The plugin runs on float32 pixels (as images are usually held) and on float64;
"cold" is its first call at a severity (mask built), "warm" the following calls (mask cached).
Both are timed in the same run; the speed-up is reference time / plugin warm time.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from perceptcore.perturbation import ImageBatch
from perceptcore_plugins.perturbations import gaussian_lowpass
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mammograms" / "dmv_1_L_CC.png"
SEVERITIES_MM = (0.17, 1.0, 4.0)
SPACING_MM = 0.1


def read_12_bit(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.array(image, dtype=np.uint16)
    return pixels if pixels.max() <= 4095 else np.round(pixels * (4095 / 65535)).astype(np.uint16)


def numpy_reference(image: np.ndarray, wavelength_mm: float, spacing_mm: float) -> np.ndarray:
    height, width = image.shape
    spectrum = np.fft.fftshift(np.fft.fft2(image.astype(np.float64)))
    v = np.arange(height) - height // 2
    u = np.arange(width) - width // 2
    d0 = (1 / wavelength_mm) * min(height, width) * spacing_mm
    mask = np.exp(-(v[:, None] ** 2 + u[None, :] ** 2) / (2 * d0 ** 2))
    out = np.fft.ifft2(np.fft.ifftshift(spectrum * mask)).real
    return ((out - out.min()) / (out.max() - out.min()) * 4095).astype(np.uint16)


def clear_caches() -> None:
    gaussian_lowpass.gaussian_mask.cache_clear()


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="copies of the image per batch")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per severity")
    parser.add_argument("--image", type=Path, default=IMAGE)
    args = parser.parse_args()

    image = read_12_bit(args.image)
    height, width = image.shape
    stack = np.stack([image] * args.batch)
    plugin = GaussianLowpass()
    options = GaussianLowpass.Options()
    print(f"{args.image.name}: {height} x {width}, batch {args.batch}, {SPACING_MM} mm/pixel; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    totals = {"numpy": 0.0, "float32": 0.0, "float64": 0.0}
    for wavelength in SEVERITIES_MM:
        reference = timed(lambda: [numpy_reference(im, wavelength, SPACING_MM) for im in stack], args.repeat)
        per_image = {"numpy": min(reference) / args.batch}
        line = [f"{wavelength:>5} mm: numpy {1000 * per_image['numpy']:.0f} ms/image"]
        for dtype in (torch.float32, torch.float64):
            batch = ImageBatch(torch.as_tensor(stack).to(dtype), torch.full((args.batch,), SPACING_MM), 4095.0)
            clear_caches()
            cold = timed(lambda: plugin.perturb(batch, wavelength, options, None), 1)[0]
            warm = timed(lambda: plugin.perturb(batch, wavelength, options, None), args.repeat)
            key = str(dtype).removeprefix("torch.")
            per_image[key] = min(warm) / args.batch
            line.append(f"{key} {1000 * per_image[key]:.0f} ms/image ({1 / per_image[key]:.1f} images/s, "
                        f"cold batch {1000 * cold:.0f} ms), speed-up {per_image['numpy'] / per_image[key]:.1f}x")
        for key, value in per_image.items():
            totals[key] += value
        print("; ".join(line))
    print(f"overall: numpy {len(SEVERITIES_MM) / totals['numpy']:.2f} images/s; "
          f"float32 {len(SEVERITIES_MM) / totals['float32']:.2f} images/s "
          f"(speed-up {totals['numpy'] / totals['float32']:.1f}x); "
          f"float64 {len(SEVERITIES_MM) / totals['float64']:.2f} images/s "
          f"(speed-up {totals['numpy'] / totals['float64']:.1f}x)")


if __name__ == "__main__":
    main()
