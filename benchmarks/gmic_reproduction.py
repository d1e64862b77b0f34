"""Time the whole GMIC reproduction: `perceptcore run examples/perception_comparison/gmic.yaml`.

Runs the real command (start-up, loading, every fit, every table, figures, report) with
the torch backend and prints the wall time and peak memory of each repetition.

    python benchmarks/gmic_reproduction.py [DATA_DIR] [--repeat N]

DATA_DIR is the published data folder (default: ../shared/data/perception_comparison/published).
"""

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=str(ROOT.parent / "shared/data/perception_comparison/published"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (Path(args.data_dir) / "exam_info.csv").exists():
        sys.exit(f"no published data folder at {args.data_dir}")
    seconds = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "perceptcore.cli", "run", str(ROOT / "examples/perception_comparison/gmic.yaml"),
                       "--set", f"data_dir={args.data_dir}", "--set", "model.backend=torch", "--out", f"{tmp}/run"]
            started = time.perf_counter()
            subprocess.run(command, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - started)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"run {i + 1}: {seconds[-1]:.1f} s wall, peak memory so far {peak_mb:.0f} MB", flush=True)
    print(f"GMIC reproduction (torch backend, {len(seconds)} runs): median {statistics.median(seconds):.1f} s, "
          f"min {min(seconds):.1f} s")


if __name__ == "__main__":
    main()
