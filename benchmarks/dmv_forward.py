"""CPU cost of a DMV exam (four views at the published window sizes), image-only model.

    python benchmarks/dmv_forward.py [--repeat 3] [--threads N] [--augmentations 10]

Three measurements, each in its own fresh subprocess:
- "forward": the bare network on one exam of standardised windows (L-CC and R-CC 2677 x 1942,
  L-MLO and R-MLO 2974 x 1748), i.e. one test-time window per view;
- "predict, 1 window": `Dmv().predict` on one exam with `augmentations: 0` (the deterministic
  window): the published preprocessing of all four mammograms (flip, background crop, optimal
  centre, window, standardisation) plus the forward pass;
- "predict, N windows": the same with `augmentations: N` (published: 10 random windows per view,
  probabilities averaged), the cost per exam of the published test-time augmentation.
The exam's images are the two 3328 x 2560 DMV sample mammograms (L-CC, R-CC) from
../shared/data/mammograms, each used once more as the MLO view of its side (no MLO sample of
that size is shipped; the preprocessing treats them as MLO views), or synthetic breasts of that
size when the samples are absent. Weights are a fresh initialisation (time and memory do not
depend on their values). Timings are medians of `--repeat` calls after one warm-up call
(the N-window prediction: `--repeat-tta` calls, after the 1-window warm-up), under
torch.no_grad(). Peak memory is the child's peak resident set size minus that of an idle child
that only imported torch and the plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _measure import median_seconds, peak_rss_mib

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "mammograms"


def exam_images(folder: Path):
    """{(laterality, view): pixels} of one exam and a description of where they came from."""
    import numpy as np
    import torch

    pixels, source = {}, "DMV samples dmv_1_{L,R}_CC.png"
    for side, letter in (("left", "L"), ("right", "R")):
        path = folder / f"dmv_1_{letter}_CC.png"
        if path.is_file():
            from PIL import Image

            with Image.open(path) as image:
                values = np.array(image, dtype=np.float32)
        else:
            source = "synthetic 3328 x 2560 breasts"
            rows, cols = np.mgrid[0:3328, 0:2560]
            inside = ((rows - 1664) / 1400.0) ** 2 + (cols / 1300.0) ** 2 < 1
            values = np.where(inside, np.random.default_rng(0).uniform(2e4, 4e4, inside.shape), 0)
            values = values.astype(np.float32)[:, ::-1].copy() if side == "right" else values.astype(np.float32)
        for view in ("CC", "MLO"):
            pixels[(side, view)] = torch.from_numpy(values)
    return pixels, source


def child(mode: str, args) -> dict:
    import torch

    from perceptcore.runner import CaseImages, ViewImage
    from perceptcore_plugins.models import dmv

    torch.set_num_threads(args.threads)
    result = {"mode": mode, "threads": torch.get_num_threads()}
    if mode == "idle":
        result["peak_rss_mib"] = peak_rss_mib()
        return result
    plugin = dmv.Dmv()
    torch.manual_seed(0)
    with torch.no_grad():
        if mode == "forward":
            network = plugin.network(dmv.Options()).eval()
            views = {slot: torch.randn(1, 1, *(dmv.Options().mlo_size if slot.endswith("MLO") else
                                               dmv.Options().cc_size)) for slot in dmv.SLOTS}
            result["seconds"] = median_seconds(lambda: network(views), args.repeat)
        else:
            augmentations = int(mode.split("-")[1])
            network = plugin.network(dmv.Options(augmentations=augmentations)).eval()
            pixels, result["images"] = exam_images(args.samples)
            exam = CaseImages("exam", tuple(ViewImage(view, side, values, 0.1, 65535.0)
                                            for (side, view), values in pixels.items()))
            if augmentations == 0:
                result["seconds"] = median_seconds(lambda: plugin.predict(network, [exam]), args.repeat)
                options = network.options
                slots = dmv.arrange(exam)
                result["preprocess_seconds"] = median_seconds(
                    lambda: dmv.windows(dmv.locate_slots(slots, options), options, None), args.repeat)
            else:
                network.options = dmv.Options(augmentations=0)
                plugin.predict(network, [exam])  # warm-up with the deterministic window
                network.options = dmv.Options(augmentations=augmentations)
                result["seconds"] = median_seconds(lambda: plugin.predict(network, [exam]), args.repeat_tta,
                                                   warm_up=False)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_child(mode: str, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--repeat", str(args.repeat), "--repeat-tta",
               str(args.repeat_tta), "--threads", str(args.threads), "--samples", str(args.samples)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls of the 1-window paths, after a warm-up")
    parser.add_argument("--repeat-tta", type=int, default=1, help="timed calls of the N-window prediction")
    parser.add_argument("--augmentations", type=int, default=10, help="test-time windows per view (published: 10)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    print(f"DMV exam (2 x CC 2677 x 1942 + 2 x MLO 2974 x 1748), image-only, CPU: torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    idle = run_child("idle", args)
    rows = [("bare network forward, 1 window", run_child("forward", args)),
            ("predict, 1 window (augmentations 0)", run_child("predict-0", args)),
            (f"predict, {args.augmentations} windows (TTA)", run_child(f"predict-{args.augmentations}", args))]
    print(f"idle child (torch + plugin imported): peak RSS {idle['peak_rss_mib']:.0f} MiB")
    for label, result in rows:
        extra = f" (preprocessing {result['preprocess_seconds']:.2f} s)" if "preprocess_seconds" in result else ""
        print(f"{label:40s} {result['seconds']:7.2f} s/exam = {1 / result['seconds']:.3f} exams/s{extra}, "
              f"peak memory {result['peak_rss_mib'] - idle['peak_rss_mib']:.0f} MiB above idle")
    print(f"images: {rows[1][1].get('images')}; load average {os.getloadavg()[0]:.1f} at end "
          "(other processes slow the timings)")


if __name__ == "__main__":
    main()
