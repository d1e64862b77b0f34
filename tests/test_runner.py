"""The prediction runner: images -> perturbation (whole image and ROI regions) -> model -> the
tidy tables the analyses read; cached, resumable after being killed, deterministic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from imaging import SEVERITIES, write_imaging_study
from perceptcore.cli import main
from perceptcore.perturbation import ImageBatch, restrict
from perceptcore_plugins.models.small_cnn import Options, SmallCnn
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass

TABLES = ("predictive_confidence", "class_separability", "class_separability_observed", "roi_separability",
          "simpsons_paradox")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imaging")
    spec = write_imaging_study(folder)
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 0
    return folder


def test_a_study_can_start_from_images(finished):
    out = finished / "out"
    for name in TABLES:
        assert (out / f"{name}.csv").exists()
    cnn = pd.read_csv(out / "predictions" / "cnn.csv", dtype={"severity": str})
    assert list(cnn.columns) == ["reader", "severity", "case", "prediction"]
    assert len(cnn) == 2 * len(SEVERITIES) * 24
    assert set(cnn.reader) == {"cnn_seed0", "cnn_seed1"}
    roi = pd.read_csv(out / "predictions" / "cnn_roi.csv")
    assert set(roi.region) == {"roi_interior", "roi_exterior"} and len(roi) == 2 * 2 * len(SEVERITIES) * 24
    confidence = pd.read_csv(out / "predictive_confidence.csv")
    assert set(confidence.observer) == {"radiologists", "cnn"}


def test_predictions_equal_a_direct_computation(finished):
    """Perturb, restrict and predict one case by hand; the runner's tables must hold the same numbers."""
    table = pd.read_csv(finished / "out" / "predictions" / "cnn.csv", dtype={"severity": str})
    roi = pd.read_csv(finished / "out" / "predictions" / "cnn_roi.csv", dtype={"severity": str})
    manifest = pd.read_csv(finished / "manifest.csv", keep_default_na=False)
    model = SmallCnn()
    loaded = model.load(finished / "cnn_seed1.pt", Options(input_size=32), "cpu")
    filter_ = GaussianLowpass()
    row = manifest[manifest.case == "c03"].iloc[0]
    pixels = torch.from_numpy(np.load(finished / row.file).astype(np.float32))
    inside = torch.zeros(pixels.shape, dtype=torch.bool)
    r0, c0, r1, c1 = map(int, row.roi_boxes.split())
    inside[r0:r1, c0:c1] = True
    for severity in SEVERITIES:
        batch = ImageBatch(pixels[None], torch.tensor([0.1]), 4095.0)
        whole = filter_.perturb(batch, float(severity), filter_.Options(), torch.Generator())[0]
        for region in ("entire_image", "roi_interior", "roi_exterior"):
            image = restrict(pixels, whole, region, inside)
            case = type("Case", (), {"images": (type("View", (), {"pixels": image, "max_value": 4095.0})(),)})()
            with torch.no_grad():
                expected = model.predict(loaded, [case])[0]
            source = table if region == "entire_image" else roi[roi.region == region]
            got = source[(source.case == "c03") & (source.reader == "cnn_seed1") & (source.severity == severity)]
            assert got.prediction.item() == pytest.approx(expected, abs=1e-6), (severity, region)


def _cli(spec, out, *overrides):
    command = [sys.executable, "-m", "perceptcore.cli", "run", str(spec), "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    return command


def test_killed_midway_then_rerun_gives_identical_tables(tmp_path, finished):
    spec = write_imaging_study(tmp_path / "study", size=192, batch_size=1)
    cache = tmp_path / "study" / ".perceptcore-cache" / "cnn"
    process = subprocess.Popen(_cli(spec, tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cache.glob("*.npz"))) < 3:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list(cache.glob("*.npz")))
    assert 0 < done_before < 48, "the run was not interrupted midway"
    assert not (tmp_path / "killed").exists()

    resumed = subprocess.run(_cli(spec, tmp_path / "resumed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"48 work units, {done_before} already in the cache" in resumed.stderr

    fresh = subprocess.run(_cli(spec, tmp_path / "fresh", f"runner.cache={tmp_path / 'other-cache'}"),
                           capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    assert "48 work units, 0 already in the cache" in fresh.stderr
    for name in ("predictions/cnn.csv", "predictions/cnn_roi.csv", *(f"{t}.csv" for t in TABLES)):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_parallel_workers_give_the_same_predictions(tmp_path, finished):
    spec = write_imaging_study(tmp_path / "study", workers=2)
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 0
    for name in ("cnn.csv", "cnn_roi.csv"):
        assert (tmp_path / "out" / "predictions" / name).read_bytes() == \
            (finished / "out" / "predictions" / name).read_bytes()


def test_validate_counts_the_work_without_doing_it(tmp_path, capsys):
    spec = write_imaging_study(tmp_path / "study")
    assert main(["validate", str(spec)]) == 0
    assert "the run will compute 432 predictions in 12 work units" in capsys.readouterr().out
    assert not (tmp_path / "study" / ".perceptcore-cache").exists()


@pytest.mark.parametrize("overrides, fragments", [
    (["observers[1].model=small_cnm"], ["observers[1].model: unknown model 'small_cnm'; did you mean 'small_cnn'?"]),
    (["observers[1].checkpoints=[missing.pt]"], ["observers[1].checkpoints[0]: file not found"]),
    (["observers[1].options.input_size=30"], ["observers[1].options: input_size must be a multiple of 16"]),
    (["observers[1].options.depth=3"], ["observers[1].options.depth: unknown key 'depth'"]),
    (["perturbation.name=gaussian"], ["perturbation.name: unknown perturbation 'gaussian'"]),
    (["perturbation.regions=[roi_interior]"], ["perturbation.regions: include entire_image"]),
    (["severities.levels=[0, mild]"], ["severities.levels[1]: severity 'mild' is not a number >= 0"]),
])
def test_runner_input_errors(tmp_path, capsys, overrides, fragments):
    spec = write_imaging_study(tmp_path / "study")
    args = ["run", str(spec), "--out", str(tmp_path / "out")]
    for override in overrides:
        args += ["--set", override]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path, capsys):
    spec = write_imaging_study(tmp_path / "study")
    marker = tmp_path / "ran"
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "study" / "cnn_seed0.pt").write_bytes(pickle.dumps(Exploit()))
    code = main(["run", str(spec), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "cnn_seed0.pt: not a small_cnn checkpoint" in err, err
    assert not marker.exists()


def test_partial_files_of_killed_writers_are_swept_and_live_ones_kept(tmp_path):
    from perceptcore.runner import sweep_partials

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # that process has exited
    (tmp_path / "obs" / "units").mkdir(parents=True)
    stale = tmp_path / "obs" / "units" / f"abc.{dead}.partial"
    live = tmp_path / "obs" / "units" / f"def.{os.getpid()}.partial"
    kept = tmp_path / "obs" / "units" / "ghi.npz"
    for path in (stale, live, kept):
        path.write_bytes(b"x")
    sweep_partials(tmp_path)
    assert not stale.exists() and live.exists() and kept.exists()
