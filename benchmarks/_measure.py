"""What the benchmark scripts share: a median wall time and the process's peak memory."""

from __future__ import annotations

import resource
import statistics
import time


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
