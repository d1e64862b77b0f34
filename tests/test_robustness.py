"""The robustness study (paper 002) as a spec: AUC per model and perturbation and the difference
to a Gaussian-noise baseline matched to the perturbation's average L2 norm."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from imaging import write_imaging_study
from perceptcore.cli import main
from perceptcore.perturbation import ImageBatch
from perceptcore_plugins.models.small_cnn import Options, SmallCnn
from perceptcore_plugins.perturbations.ideal_lowpass import IdealLowpass

PERTURBATIONS = [
    {"name": "ideal_highpass", "severity": 2.0},
    {"name": "ideal_lowpass", "severity": 2.0},
    {"name": "gaussian_noise", "severity": 1600, "baseline": False},
    {"name": "patch_shuffle", "severity": 4},
]


def robustness_spec(folder, keep_perception=False):
    spec_path = write_imaging_study(folder)
    spec = yaml.safe_load(spec_path.read_text())
    spec["robustness"] = {"perturbations": PERTURBATIONS}
    if not keep_perception:
        for key in ("severities", "subgroups", "perturbation", "roi"):
            del spec[key]
        spec["observers"] = [o for o in spec["observers"] if "model" in o]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("robustness")
    spec = robustness_spec(folder)
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 0
    return folder


def pair_auc(pos, neg):
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auc_table_follows_from_the_predictions(finished):
    table = pd.read_csv(finished / "out" / "robustness_auc.csv")
    assert list(table.columns) == ["model", "perturbation", "auc", "auc_baseline", "auc_difference"]
    assert list(table.perturbation) == ["unperturbed", "ideal_highpass", "ideal_lowpass", "gaussian_noise",
                                        "patch_shuffle"]
    predictions = pd.read_csv(finished / "out" / "predictions" / "cnn_robustness.csv")
    labels = pd.read_csv(finished / "cases.csv").set_index("case")["label"]
    predictions["positive"] = predictions.case.map(labels) == "malignant"

    def expected(condition):
        rows = predictions[predictions.condition == condition]
        return np.mean([pair_auc(r.prediction[r.positive], r.prediction[~r.positive]) for _, r in rows.groupby("reader")])

    for row in table.itertuples():
        assert row.auc == pytest.approx(expected(row.perturbation), abs=1e-12)
        if row.perturbation in ("unperturbed", "gaussian_noise"):
            assert math.isnan(row.auc_baseline) and math.isnan(row.auc_difference)
        else:
            assert row.auc_baseline == pytest.approx(expected(f"{row.perturbation}:noise_baseline"), abs=1e-12)
            assert row.auc_difference == pytest.approx(row.auc - row.auc_baseline, abs=1e-12)
    assert (finished / "out" / "fig_robustness.png").stat().st_size > 0
    assert "robustness_auc.csv" in json.loads((finished / "out" / "run.json").read_text())["outputs"]


def test_unperturbed_predictions_are_the_models(finished):
    predictions = pd.read_csv(finished / "out" / "predictions" / "cnn_robustness.csv")
    manifest = pd.read_csv(finished / "manifest.csv", keep_default_na=False)
    model = SmallCnn()
    loaded = model.load(finished / "cnn_seed0.pt", Options(input_size=32), "cpu")
    row = manifest.iloc[5]
    pixels = torch.from_numpy(np.load(finished / row.file).astype(np.float32))
    case = type("Case", (), {"images": (type("View", (), {"pixels": pixels, "max_value": 4095.0})(),)})()
    with torch.no_grad():
        expected = model.predict(loaded, [case])[0]
    got = predictions[(predictions.condition == "unperturbed") & (predictions.reader == "cnn_seed0")
                      & (predictions.case == row.case)].prediction.item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_baseline_noise_matches_the_perturbations_average_norm(finished):
    """sd = sum ||delta_i|| / sum E||z_i||, recomputed here with the plugin itself."""
    manifest = pd.read_csv(finished / "manifest.csv", keep_default_na=False)
    total, expected = 0.0, 0.0
    for file in manifest.file:
        pixels = torch.from_numpy(np.load(finished / file).astype(np.float32))
        batch = ImageBatch(pixels[None], torch.tensor([0.1]), 4095.0)
        changed = IdealLowpass().perturb(batch, 2.0, IdealLowpass.Options(), torch.Generator())[0]
        total += float(torch.linalg.vector_norm((changed - pixels).double()))
        expected += math.sqrt(pixels.numel())
    stored = [json.loads(p.read_text())["sd"] for p in (finished / ".perceptcore-cache" / "robustness").glob("*.json")]
    assert any(sd == pytest.approx(total / expected, rel=1e-4) for sd in stored)


def test_a_spec_can_hold_both_studies(tmp_path):
    spec = robustness_spec(tmp_path / "study", keep_perception=True)
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 0
    for name in ("robustness_auc.csv", "predictive_confidence.csv", "roi_separability.csv", "fig_robustness.png"):
        assert (tmp_path / "out" / name).exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s["observers"].append({"name": "readers", "predictions": "reads.csv"}),
     "observers[1].predictions: a robustness-only study (no severities and subgroups) takes model observers only"),
    (lambda s: s["robustness"]["perturbations"].append({"name": "ideal_lowpas", "severity": 1}),
     "robustness.perturbations[4].name: unknown perturbation 'ideal_lowpas'; did you mean 'ideal_lowpass'?"),
    (lambda s: s["robustness"]["perturbations"][0].update(options={"unit": "inch"}),
     "robustness.perturbations[0].options: "),
    (lambda s: s.update(perturbation={"name": "gaussian_lowpass"}),
     "perturbation: needs severities and subgroups"),
    (lambda s: s.pop("images"), "observers[0].model: observer 'cnn' is computed by a model, which needs an `images`"),
])
def test_robustness_errors(tmp_path, capsys, edit, fragment):
    spec_path = robustness_spec(tmp_path / "study")
    spec = yaml.safe_load(spec_path.read_text())
    edit(spec)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code = main(["run", str(spec_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_the_paper_002_example_spec_is_valid(tmp_path, capsys):
    """The example parses and checks; run here against a synthetic data folder in its layout."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    write_imaging_study(data, size=64)
    (data / "cnn_seed2.pt").write_bytes((data / "cnn_seed1.pt").read_bytes())
    code = main(["run", str(root / "examples/robustness/robustness.yaml"), "--set", f"data_dir={data}",
                 "--set", "observers[0].options.input_size=32", "--set", f"runner.cache={tmp_path / 'cache'}",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "out" / "robustness_auc.csv")
    assert len(table) == 5 and table.auc.between(0, 1).all()
