"""CPU time and peak memory of one GMIC forward pass at the published 2944 x 1920 input.

    python benchmarks/gmic_forward.py [--repeat 3] [--threads N] [--image PATH]

Two paths, each measured in its own fresh subprocess:
- "forward": the bare network on a standardised 1 x 1 x 2944 x 1920 tensor (global ResNet-22,
  saliency maps, ROI retrieval, six 256 x 256 crops through ResNet-18, attention, fusion);
- "predict": `Gmic().predict` on one case holding one mammogram (the 3328 x 2560 DMV sample by
  default, else a synthetic breast of that size), i.e. the published preprocessing (flip,
  background crop, optimal centre, window, standardisation) plus the forward pass. Its
  preprocessing alone is timed too.
The weights are a fresh initialisation (time and memory do not depend on their values). Each
timing is the median of `--repeat` calls after one warm-up call, under torch.no_grad().
Peak memory is the child's peak resident set size (ru_maxrss) minus that of an idle child that
imported torch and the plugin, i.e. what the work itself added.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _measure import median_seconds, peak_rss_mib

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mammograms" / "dmv_1_L_CC.png"


def mammogram(path: Path):
    import numpy as np
    import torch

    if path.is_file():
        from PIL import Image

        with Image.open(path) as image:
            return torch.tensor(np.array(image, dtype=np.float32)), path.name
    rows, cols = np.mgrid[0:3328, 0:2560]
    inside = ((rows - 1664) / 1500.0) ** 2 + (cols / 2100.0) ** 2 < 1
    pixels = np.where(inside, np.random.default_rng(0).uniform(800, 1200, inside.shape), 0).astype(np.float32)
    return torch.tensor(pixels), "synthetic 3328 x 2560 breast"


def child(mode: str, repeat: int, threads: int, image_path: Path) -> dict:
    import torch

    from perceptcore.runner import CaseImages, ViewImage
    from perceptcore_plugins.models import gmic

    torch.set_num_threads(threads)
    result = {"mode": mode, "threads": torch.get_num_threads()}
    if mode == "idle":
        result["peak_rss_mib"] = peak_rss_mib()
        return result
    plugin, options = gmic.Gmic(), gmic.Options()
    torch.manual_seed(0)
    network = plugin.network(options).eval()
    with torch.no_grad():
        if mode == "forward":
            images = torch.randn(1, 1, *options.input_size)
            result["seconds"] = median_seconds(lambda: network(images), repeat)
        else:
            pixels, result["image"] = mammogram(image_path)
            case = CaseImages("bench", (ViewImage("CC", "left", pixels, 0.1, float(pixels.max())),))
            result["image_shape"] = list(pixels.shape)
            result["preprocess_seconds"] = median_seconds(lambda: gmic.prepare_view(case.images[0], options), repeat)
            result["seconds"] = median_seconds(lambda: plugin.predict(network, [case]), repeat)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_child(mode: str, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--repeat", str(args.repeat),
               "--threads", str(args.threads), "--image", str(args.image)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per path, after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--child", choices=("idle", "forward", "predict"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat, args.threads, args.image)))
        return

    print(f"GMIC forward at 2944 x 1920 on CPU: torch {torch.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    idle = run_child("idle", args)
    forward = run_child("forward", args)
    predict = run_child("predict", args)
    print(f"idle child (torch + plugin imported): peak RSS {idle['peak_rss_mib']:.0f} MiB")
    print(f"bare network forward:      {forward['seconds']:.2f} s/image = {1 / forward['seconds']:.2f} images/s, "
          f"peak memory {forward['peak_rss_mib'] - idle['peak_rss_mib']:.0f} MiB above idle")
    print(f"predict ({predict['image']}, {predict['image_shape'][0]} x {predict['image_shape'][1]}): "
          f"{predict['seconds']:.2f} s/image = {1 / predict['seconds']:.2f} images/s "
          f"(preprocessing {predict['preprocess_seconds']:.2f} s), "
          f"peak memory {predict['peak_rss_mib'] - idle['peak_rss_mib']:.0f} MiB above idle")
    print(f"load average {os.getloadavg()[0]:.1f} at end (other processes slow the timings)")


if __name__ == "__main__":
    main()
