"""What the benchmark scripts share: a median wall time, the process's peak memory, and the sample
mammogram."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

SAMPLE = Path("data") / "mammograms" / "dmv_1_L_CC.png"  # inside the shared folder


def find_image(given: Path | None) -> tuple[Path | None, str]:
    """The sample mammogram's path and how it was found, or (None, why not): --image, then
    $PERCEPTCORE_SHARED, then shared/ beside the checkout, wherever it is cloned."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"--image {given}: no such file")
        return given, "--image"
    candidates = []
    if os.environ.get("PERCEPTCORE_SHARED"):
        candidates.append((Path(os.environ["PERCEPTCORE_SHARED"]) / SAMPLE, "$PERCEPTCORE_SHARED"))
    # benchmarks/ -> the repository -> its parent, which holds shared/ beside the checkout.
    candidates.append((Path(__file__).resolve().parents[2] / "shared" / SAMPLE, "shared/ beside the repository"))
    for path, how in candidates:
        if path.is_file():
            return path, how
    return None, "not found at " + ", ".join(str(path) for path, _ in candidates)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def median_seconds(call, repeat: int, warm_up: bool = True) -> float:
    """The median of `repeat` timed calls, after one untimed call (first-call allocations and
    kernel selection) unless warm_up is False."""
    if warm_up:
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
