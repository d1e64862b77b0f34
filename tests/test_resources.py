"""What a run may use of the machine: threads x processes within the cores available to it (the
default follows the process's CPU affinity), and progress lines whose time left comes from the
completed units' cost and that keep coming while a unit runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from perceptcore.errors import PerceptcoreError

from perceptcore.resources import StageProgress, available_cores, budget, worker_pool


def measure(_):
    """Inside a worker: its torch threads and the cores it may run on, measured there."""
    import torch

    return torch.get_num_threads(), len(os.sched_getaffinity(0)), os.getpid()


@pytest.mark.parametrize("workers", [1, 2, 4, None])
def test_worker_threads_times_processes_stay_within_the_cores(workers):
    processes, threads = budget(workers)
    with worker_pool(processes, threads) as pool:
        measured = list(pool.map(measure, range(4 * processes)))
    for child_threads, child_cores, _ in measured:
        assert child_threads * processes <= child_cores
    assert processes * threads <= len(os.sched_getaffinity(0))


RESTRICTED = """
import json, os, sys
sys.path.insert(0, {tests!r})
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
from perceptcore.resources import available_cores, budget, worker_pool
from test_resources import measure
processes, threads = budget(None)
with worker_pool(*budget(2)) as pool:
    measured = list(pool.map(measure, range(4)))
print(json.dumps({{"cores": available_cores(), "default": [processes, threads], "two": list(budget(2)),
                  "measured": measured}}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and at least 2 cores to restrict")
def test_the_default_follows_a_restricted_cpu_affinity():
    code = RESTRICTED.format(tests=os.path.dirname(__file__))
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert result["cores"] == 1
    assert result["default"] == [1, 1] and result["two"] == [1, 1]  # one core: one process of one thread
    assert all(threads == 1 and cores == 1 for threads, cores, _ in result["measured"])


def test_the_cores_setting_narrows_the_budget(monkeypatch):
    monkeypatch.setenv("PERCEPTCORE_CORES", "1")
    assert available_cores() == 1 and budget(None) == (1, 1) and budget(3) == (1, 1)


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_cores_setting_is_an_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("PERCEPTCORE_CORES", value)
    with pytest.raises(PerceptcoreError, match="PERCEPTCORE_CORES"):
        available_cores()


def test_time_left_is_the_completed_units_cost_counted_down():
    now = [0.0]
    shown = StageProgress(lambda message: None, "predicting", total=5, clock=lambda: now[0])
    assert shown.seconds_left() is None  # nothing completed: nothing to estimate from
    now[0] = 20.0
    shown.done(2)  # 10 s per unit, 3 units left
    assert shown.seconds_left() == 30.0
    now[0] = 25.0  # a unit is running: the estimate counts down instead of standing still
    assert shown.seconds_left() == 25.0
    now[0] = 100.0
    assert shown.seconds_left() == 0.0
    preparing = StageProgress(lambda message: None, "training", total=4, clock=lambda: now[0])
    now[0] += 30.0
    preparing.outside_units(30.0)  # loading the images is not the first epoch's cost
    now[0] += 5.0
    preparing.done()
    assert preparing.seconds_left() == 15.0


def test_progress_lines_keep_coming_while_a_unit_runs():
    lines, enough = [], threading.Event()

    def progress(message):
        lines.append(message)
        if len(lines) >= 3:
            enough.set()

    with StageProgress(progress, "training cnn", total=4, every=0.01):
        assert enough.wait(60), "no line while the unit ran"  # no unit completes meanwhile
    assert all(line.startswith("training cnn [") and "0/4" in line for line in lines[:3])
