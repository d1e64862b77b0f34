"""The run folder: never lost, never stranded, never shared by two runs, byte-identical between
identical runs apart from timings.json; and `validate` writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import stat
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from imaging import write_imaging_study
from perceptcore.cli import main
from perceptcore.run import claim_out_dir, release_out_dir
from synthetic import write_study

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo" / "demo.yaml"


def run(spec, out, *overrides):
    args = ["run", str(spec), "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    return main(args)


def cli(*args):
    return [sys.executable, "-m", "perceptcore.cli", *map(str, args)]


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot(folder: Path) -> dict:
    """Every entry under folder with its size and modification time."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"), roi=True)


def test_identical_runs_are_byte_identical_except_timings(study, tmp_path):
    settings = ("outputs.report=true", "outputs.figures=[png, svg]")
    assert run(study, tmp_path / "a", *settings) == 0
    assert run(study, tmp_path / "b", *settings) == 0
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert sorted(a) == sorted(b) and "posterior/radiologists_split.nc" in a and "fig5_roi.svg" in a
    differ = [name for name in a if a[name] != b[name]]
    assert differ in ([], ["timings.json"]), differ
    timings = json.loads(a["timings.json"])
    assert timings["seconds"] > 0 and len(timings["fits"]) == 4 and all("seconds" in f for f in timings["fits"])
    assert "seconds" not in pd.read_csv(tmp_path / "a" / "fit_diagnostics.csv").columns
    assert "seconds" not in json.loads(a["run.json"]) and "timings.json" in json.loads(a["run.json"])["outputs"]


def test_the_run_folder_follows_the_umask(study, tmp_path):
    """It used to be created owner-only (tempfile.mkdtemp's 0700), whatever the user's umask."""
    old = os.umask(0o022)
    try:
        assert run(study, tmp_path / "run") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755


@pytest.mark.parametrize("where", ["under_a_file", "long_name", "read_only"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(study, tmp_path, capsys, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif where == "long_name":
        out = tmp_path / ("r" * 1000)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "locked").mkdir(mode=0o555)
        out = tmp_path / "locked" / "run"
    before = snapshot(tmp_path)
    assert run(study, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and len(err.strip().splitlines()) == 1 and len(err) < 400, err
    assert "fitting" not in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_validate_checks_the_default_out_folder(study, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["validate", str(study), "--set", f"outputs.dir={tmp_path / 'file' / 'runs'}"]) == 1
    assert "is under" in capsys.readouterr().err


def test_a_second_run_into_a_locked_out_is_refused(study, tmp_path):
    out = tmp_path / "run"
    claim_out_dir(out)  # as a run writing it does
    try:
        second = subprocess.run(cli("run", study, "--out", out), capture_output=True, text=True, timeout=300)
    finally:
        release_out_dir(out)
    assert second.returncode == 1, second.stderr
    assert f"another perceptcore run (process {os.getpid()}) is writing this folder" in second.stderr
    assert "fitting" not in second.stderr and not out.exists()
    assert run(study, out) == 0  # released: the next run goes ahead


def test_an_interrupted_swap_and_stale_staging_are_recovered(study, tmp_path):
    out = tmp_path / "run"
    assert run(study, out) == 0
    old = files_of(out)
    # Killed between renaming the old run away and the new one into place, and a killed write phase:
    out.rename(tmp_path / ".run.previous")
    (tmp_path / ".run.staging.abcd1234").mkdir()
    (tmp_path / ".run.staging.abcd1234" / "half.csv").write_text("half")
    claim_out_dir(out)  # what every run does first
    release_out_dir(out)
    assert files_of(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # Killed after the new run was in place, while deleting the old one:
    shutil.copytree(out, tmp_path / ".run.previous")
    (tmp_path / ".run.previous" / "run.json").unlink()
    assert run(study, out, "model.seed=1") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((out / "run.json").read_text())["seed"] == 1


def _children(pid: int) -> set:
    """Live descendants of pid (by the parent pid in /proc/*/stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_killed_run_leaves_no_worker_processes(tmp_path):
    spec = write_imaging_study(tmp_path / "study", size=192, batch_size=1, workers=2)
    cache = tmp_path / "study" / ".perceptcore-cache" / "cnn"
    process = subprocess.Popen(cli("run", spec, "--out", tmp_path / "out"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    workers = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(cache.glob("*.npz")):  # the workers are computing
            time.sleep(0.01)
        workers = _children(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert len(workers) >= 2, "the run had no worker processes to leave behind"
        deadline = time.monotonic() + 30  # a bound for a hang, not a timing assertion
        while time.monotonic() < deadline and any(map(_alive, workers)):
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "orphaned workers still run"
    finally:
        for pid in workers:  # only what this test started, should the assertion fail
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
    assert not (tmp_path / "out").exists()


def test_validate_leaves_the_working_folder_and_cache_unchanged(tmp_path, monkeypatch, capsys):
    """A spec that generates its data: validate generates nothing. A spec that ran: validate writes nothing."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    assert main(["validate", str(DEMO), "--set", f"runner.cache={cache}"]) == 0
    assert "the run will generate dataset 'mammography_phantoms'" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []

    spec = write_imaging_study(tmp_path / "study")
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 0
    for image in (tmp_path / "study" / "images").iterdir():  # new modification times: digests are recomputed
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    before = snapshot(tmp_path)
    assert main(["validate", str(spec)]) == 0
    assert snapshot(tmp_path) == before


def test_a_run_that_fails_leaves_nothing_beside_out(study, tmp_path, capsys):
    assert run(study, tmp_path / "out", f"cases.file={tmp_path / 'missing.csv'}") == 1
    assert "missing.csv" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no lock file, no staging folder
