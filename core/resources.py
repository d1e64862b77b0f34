"""What a run may use of the machine, and what it reports about its use: the thread budget of its
worker processes, its progress lines, and its wall, CPU and per-stage seconds (timings.json).

The thread budget: a run uses at most the cores available to it — `PERCEPTCORE_CORES` if set,
else the cores the process may run on (its CPU affinity: `taskset`, a container's cpuset), never
more. `workers` processes (`runner.workers` for predictions, `model.workers` for fits, at most
one per core) each run max(1, cores // workers) torch threads; work in the main process (training,
predictions with one worker) runs `cores` threads. Threads beyond the cores do not add speed: on
a machine with other load they wait for each other, and a run became 15 times slower.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import resource
import threading
import time
from typing import Callable

from .errors import PerceptcoreError


def available_cores() -> int:
    """The cores this run may use: PERCEPTCORE_CORES, capped at the cores the process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS, Windows)
        cores = os.cpu_count() or 1
    setting = os.environ.get("PERCEPTCORE_CORES", "").strip()
    if setting:
        if not (setting.isdigit() and int(setting) > 0):
            raise PerceptcoreError(f"must be a whole number of cores, at least 1; got {setting[:20]!r}",
                                   "PERCEPTCORE_CORES")
        cores = min(cores, int(setting))
    return max(1, cores)


def budget(workers: int | None) -> tuple[int, int]:
    """(processes, torch threads per process) for `workers` processes (None: one per core)."""
    cores = available_cores()
    processes = max(1, min(workers or cores, cores))
    return processes, max(1, cores // processes)


def set_threads(threads: int) -> None:
    """Torch's (and through it OpenMP's and MKL's) intra-op threads, and its inter-op threads where
    torch still allows it (only before a process's first parallel work)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already fixed in this process: the intra-op threads do the work anyway
        pass


def worker_pool(processes: int, threads: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of `processes` workers of `threads` torch threads each (from `budget`), that exit with
    the run. spawn: a forked child would inherit the parent's torch thread pool in an unusable state."""
    return concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=(os.getpid(), threads))


def _start_worker(parent: int, threads: int) -> None:
    exit_with_parent(parent)
    set_threads(threads)


def exit_with_parent(parent: int) -> None:
    """Initializer of worker processes (initargs: the parent's pid, taken in the parent, so a parent
    killed while the worker starts is noticed too): exit as soon as that process is gone.

    A SIGKILLed run cannot stop its workers; without this they would keep computing as orphans."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class StageProgress:
    """Progress of one stage's work units: a line at least every `every` seconds while the work runs
    (a background thread, so a long unit leaves no silent gap), and the time left from the cost of the
    units completed so far: (seconds per completed unit) x (units left), counted down between
    completions. Use as a context manager; call `done()` as each unit completes."""

    def __init__(self, progress: Callable[[str], None], what: str, total: int, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.progress, self.what, self.total, self.every, self.clock = progress, what, total, every, clock
        self.completed = 0
        self.started = self.last = clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def done(self, n: int = 1) -> None:
        with self._lock:
            self.completed += n
            self.last = self.clock()
        self.print()

    def outside_units(self, seconds: float) -> None:
        """Leave `seconds` of preparation (a severity's training images) out of the units' cost: counted
        in the first unit, it made the first estimates several times too long."""
        with self._lock:
            self.started += seconds

    def seconds_left(self) -> float | None:
        """None until a unit has completed: there is nothing to estimate from before."""
        with self._lock:
            if not self.completed:
                return None
            per_unit = (self.last - self.started) / self.completed
            return max(0.0, per_unit * (self.total - self.completed) - (self.clock() - self.last))

    def print(self) -> None:
        left = self.seconds_left()
        filled = round(20 * self.completed / max(self.total, 1))
        estimate = "estimating the time left" if left is None else f"about {left:.0f} s left"
        self.progress(f"{self.what} [{'#' * filled}{'.' * (20 - filled)}] {self.completed}/{self.total}, {estimate}")

    def __enter__(self):
        def tick():
            while not self._stop.wait(self.every):
                self.print()

        self._thread = threading.Thread(target=tick, daemon=True, name="progress")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> tuple[float, float]:
    """(this process's, its finished children's) user + system CPU seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


class RunClock:
    """Wall, CPU and per-stage seconds of one run, for timings.json. The command starts it before any
    work (data generation, training and predictions happen before the results are written); stages do
    not overlap: a stage entered inside another (a fit asked for by an analysis) is counted only once,
    as its own."""

    def __init__(self):
        self.started = None

    def start(self) -> None:
        self.started = self._since = time.perf_counter()
        self.cpu = cpu_seconds()
        self.stages: dict = {}
        self._stack: list = []

    def _credit(self) -> None:
        now = time.perf_counter()
        if self._stack:
            self.stages[self._stack[-1]] = self.stages.get(self._stack[-1], 0.0) + now - self._since
        self._since = now

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.started is None:  # not in a run (validate, a library call): nothing to time
            yield
            return
        self._credit()
        self._stack.append(name)
        try:
            yield
        finally:
            self._credit()
            self._stack.pop()

    def elapsed(self) -> float | None:
        return None if self.started is None else time.perf_counter() - self.started

    def timings(self) -> dict:
        own, children = cpu_seconds()
        return {"seconds": round(self.elapsed(), 1),
                "cpu_seconds": {"process": round(own - self.cpu[0], 2), "children": round(children - self.cpu[1], 2)},
                "stages": {name: round(seconds, 1) for name, seconds in self.stages.items()}}


CLOCK = RunClock()  # the run of this process (one at a time: write_run holds --out's lock)


def stage(name: str):
    """Count the enclosed work as stage `name` of the current run (no-op outside a run)."""
    return CLOCK.stage(name)
