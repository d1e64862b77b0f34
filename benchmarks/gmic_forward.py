"""GMIC's forward pass against NYU's published code, side by side, at the published 2944 x 1920 input.

    python benchmarks/gmic_forward.py [--pairs 7] [--threads 2 1] [--image PATH] [--no-predict]

Reference: tests/nyu_gmic.py, a transcription of the published forward (nyukat/GMIC
src/modeling/gmic.py and modules.py: module tree, op order, in-place and not-in-place ReLUs, ROI
search and crop copying as published), run under torch.no_grad() as the published run_model.py
does. Ours: `GmicNetwork` (plugins/models/gmic.py) under torch.inference_mode(), as
`Gmic.predict` runs it. Both hold the same weights: a seeded fresh initialisation of ours, with
the batch-norm statistics and affine parameters drawn away from their initial 0/1 so that every
term of the arithmetic is exercised, loaded into the reference by name (the published layout).

Input: one 1 x 1 x 2944 x 1920 standardised window, as the published pipeline feeds it: the
3328 x 2560 DMV sample mammogram through our preprocessing (flip, background crop, optimal
centre, window, standardisation; the same as published at test time). The image is found, in
this order, at --image, at $PERCEPTCORE_SHARED/data/mammograms/dmv_1_L_CC.png, or in
shared/data/mammograms/ beside the repository (the folder that holds this checkout); without it
a synthetic breast-like image (fixed seed) is used. The first line printed says which.

Timing: for each --threads value, a fresh subprocess sets torch's thread count (the same for
both sides), makes one untimed call of each, then --pairs interleaved pairs (reference, ours,
reference, ours, ...). Printed: the median time of each and the median over pairs of
(reference time / our time), the speed-up, with its range. Agreement: every output of ours
(y_fusion, saliency maps, y_global, y_local, attention, patch locations) against the
reference's, as "bit-identical" or the largest absolute difference.

Memory: each side's forward (two calls, on a standard-normal 2944 x 1920 input) in its own
subprocess, with 2 threads or the first --threads value: the peak resident set size (ru_maxrss)
minus that of an idle subprocess that built the same networks and input.
"predict": `Gmic().predict` on one case holding the mammogram (our preprocessing plus the
forward pass), median of --pairs calls after one warm-up, preprocessing alone timed too.
Other processes on the machine slow both sides alike in an interleaved pair, so the ratio is
steadier than either time; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the reference transcription lives beside the tests

from _measure import find_image, median_seconds  # noqa: E402

SHAPE = (3328, 2560)


# --------------------------------------------------------------------------- inputs and weights


def mammogram(path: Path | None):
    """(H, W) float32 pixels: the PNG, or a synthetic breast on a zero background."""
    import numpy as np
    import torch

    if path is not None:
        from PIL import Image

        with Image.open(path) as image:
            return torch.tensor(np.array(image, dtype=np.float32))
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    inside = ((rows - SHAPE[0] / 2) / (0.45 * SHAPE[0])) ** 2 + (cols / (0.8 * SHAPE[1])) ** 2 < 1
    pixels = np.where(inside, np.random.default_rng(0).uniform(800, 1200, inside.shape), 0)
    return torch.tensor(pixels.astype(np.float32))


def case_of(pixels):
    from perceptcore.runner import CaseImages, ViewImage

    return CaseImages("bench", (ViewImage("CC", "left", pixels, 0.1, float(pixels.max())),))


def our_network():
    """Our GMIC with seeded weights; BN buffers and affine terms moved off their initial values."""
    import torch

    from perceptcore_plugins.models import gmic

    torch.manual_seed(0)
    network = gmic.GmicNetwork(gmic.Options())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(torch.rand(channels, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(channels, generator=generator) * 0.2 - 0.1)
    return network.eval()


def reference_network(state: dict):
    import nyu_gmic

    network = nyu_gmic.NyuGmic(nyu_gmic.published_parameters())
    network.load_state_dict(state)
    return network.eval()


def window(image_path: Path | None):
    """The standardised 1 x 1 x 2944 x 1920 input both sides see."""
    from perceptcore_plugins.models import gmic

    return gmic.prepare_view(case_of(mammogram(image_path)).images[0], gmic.Options()).image[None, None]


# --------------------------------------------------------------------------- children

def compare(threads: int, pairs: int, image_path: Path | None) -> dict:
    import torch

    torch.set_num_threads(threads)
    ours = our_network()
    theirs = reference_network(ours.state_dict())
    images = window(image_path)

    def run_theirs():
        with torch.no_grad():
            return theirs(images)

    def run_ours():
        with torch.inference_mode():
            return ours(images)

    run_theirs()
    output = run_ours()  # the untimed first call of each
    agreement = {}
    for name, mine, published in [
        ("y_fusion", output.y_fusion, theirs.y_fusion), ("saliency", output.saliency, theirs.saliency_map),
        ("y_global", output.y_global, theirs.y_global), ("y_local", output.y_local, theirs.y_local),
        ("attention", output.attention, theirs.patch_attns),
        ("patch_locations", output.patch_locations.to(torch.float64), torch.from_numpy(theirs.patch_locations)),
    ]:
        agreement[name] = "bit-identical" if torch.equal(mine, published) else f"{(mine - published).abs().max().item():.3g}"
    times = {"theirs": [], "ours": []}
    for _ in range(pairs):
        for name, call in (("theirs", run_theirs), ("ours", run_ours)):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "times": times, "agreement": agreement,
            "y_fusion": output.y_fusion[0].tolist()}


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory(side: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    ours = our_network()
    network = ours if side == "ours" else reference_network(ours.state_dict())
    # Not the mammogram: its preprocessing would set the high-water mark in every child, idle included.
    images = torch.randn(1, 1, 2944, 1920, generator=torch.Generator().manual_seed(0))
    if side != "idle":
        for _ in range(2):
            if side == "ours":
                with torch.inference_mode():
                    network(images)
            else:
                with torch.no_grad():
                    network(images)
    return {"peak_rss_mib": peak_rss_mib()}


def predict(threads: int, repeat: int, image_path: Path | None) -> dict:
    import torch

    from perceptcore_plugins.models import gmic

    torch.set_num_threads(threads)
    plugin, network = gmic.Gmic(), our_network()
    case = case_of(mammogram(image_path))

    return {"preprocess_seconds": median_seconds(lambda: gmic.prepare_view(case.images[0], network.options), repeat),
            "seconds": median_seconds(lambda: plugin.predict(network, [case]), repeat),
            "image_shape": list(case.images[0].pixels.shape)}


def run_child(args, *child) -> dict:
    command = [sys.executable, __file__, "--child", *map(str, child), "--pairs", str(args.pairs)]
    if args.image is not None:
        command += ["--image", str(args.image)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(f"child {' '.join(map(str, child))} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7, help="interleaved (reference, ours) pairs per thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch threads, the same on both sides")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--no-predict", action="store_true", help="skip the memory and predict measurements")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        path, _ = find_image(args.image)
        if kind == "compare":
            result = compare(int(rest[0]), args.pairs, path)
        elif kind == "memory":
            result = memory(rest[0], int(rest[1]))
        else:
            result = predict(int(rest[0]), args.pairs, path)
        print(json.dumps(result))
        return

    import torch

    path, how = find_image(args.image)
    print(f"input: {path} ({how})" if path else f"input: synthetic {SHAPE[0]} x {SHAPE[1]} breast (sample {how})")
    print(f"GMIC forward at 1 x 1 x 2944 x 1920, ours vs NYU's published code (transcribed): torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'threads':>7}  {'NYU (s)':>8}  {'ours (s)':>8}  {'speed-up':>8}  {'pair range':>11}")
    agreements = []
    for threads in args.threads:
        result = run_child(args, "compare", threads)
        theirs, ours = result["times"]["theirs"], result["times"]["ours"]
        ratios = sorted(t / o for t, o in zip(theirs, ours))
        print(f"{result['threads']:>7}  {statistics.median(theirs):>8.3f}  {statistics.median(ours):>8.3f}  "
              f"{statistics.median(ratios):>7.2f}x  {ratios[0]:>5.2f}-{ratios[-1]:.2f}")
        agreements.append((result["threads"], result["agreement"], result["y_fusion"]))
    for threads, agreement, y_fusion in agreements:
        print(f"outputs, {threads} thread(s): " + ", ".join(f"{name} {verdict}" for name, verdict in agreement.items())
              + f" (y_fusion {y_fusion[0]:.6f}, {y_fusion[1]:.6f})")
    if not args.no_predict:
        threads = 2 if 2 in args.threads else args.threads[0]
        idle = run_child(args, "memory", "idle", threads)["peak_rss_mib"]
        peaks = {side: run_child(args, "memory", side, threads)["peak_rss_mib"] - idle for side in ("theirs", "ours")}
        print(f"peak memory of a forward pass above an idle process ({threads} threads): "
              f"NYU {peaks['theirs']:.0f} MiB, ours {peaks['ours']:.0f} MiB")
        result = run_child(args, "predict", threads)
        print(f"predict (our preprocessing + forward, {result['image_shape'][0]} x {result['image_shape'][1]} image, "
              f"{threads} threads): {result['seconds']:.2f} s/image = {1 / result['seconds']:.2f} images/s "
              f"(preprocessing {result['preprocess_seconds']:.2f} s)")
    print(f"load average {os.getloadavg()[0]:.1f} at end (other processes slow both sides; the ratio is steadier)")


if __name__ == "__main__":
    main()
