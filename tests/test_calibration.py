"""Dirichlet calibration: the fit against independent computations, cross-validation's choice,
a whole run with a calibration section, and the spec's errors against their messages."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import arviz as az
import numpy as np
import pandas as pd
import pytest
import scipy.optimize

from perceptcore import calibration
from perceptcore.calibration import (COLUMNS, calibrate_group, classwise_ece, fit_dirichlet, fit_logistic,
                                     reliability, stratified_folds)
from perceptcore.cli import main
from perceptcore.plugins import load_registry
from perceptcore.run import Study, _one_model_per_severity
from perceptcore.spec import load_spec
from synthetic import BREAST_PLAN, write_study


def miscalibrated(rng, n, scale=3.0, shift=1.0, spread=1.2):
    """Labels drawn from known probabilities sigmoid(t); reported probabilities sigmoid(scale * t + shift):
    over-confident for scale > 1 and shifted, so the inverse map is w = (1/scale, -1/scale), b = -shift/scale."""
    t = rng.normal(-0.5, spread, n)
    truth = 1 / (1 + np.exp(-t))
    y = (rng.random(n) < truth).astype(float)
    return 1 / (1 + np.exp(-(scale * t + shift))), y, truth


# --------------------------------------------------------------------------- the calibration error

def test_classwise_ece_by_hand():
    p = np.array([0.5, 0.9, 0.2])
    y = np.array([0, 1, 0])
    # Two bins, [0, .5) and [.5, 1]. Class 1: {.2} conf .2 freq 0; {.5, .9} conf .7 freq .5 -> (.2 + 2 * .2) / 3.
    # Class 0 (probabilities .5, .1, .8 of labels 1, 0, 1): {.1} conf .1 freq 0; {.5, .8} conf .65 freq 1
    # -> (.1 + 2 * .35) / 3. The 0.5 falls in the upper bin for both classes, so the two differ.
    assert classwise_ece(p, y, bins=2) == pytest.approx((0.6 / 3 + 0.8 / 3) / 2, abs=1e-12)
    r = reliability(p, y, bins=2)
    assert np.allclose(r.centres, [0.25, 0.75])
    assert r.counts.tolist() == [1, 2]
    assert np.allclose(r.frequency, [0, 0.5]) and np.allclose(r.confidence, [0.2, 0.7])
    empty = reliability(np.array([0.95]), np.array([1]), bins=4)
    assert empty.counts.tolist() == [0, 0, 0, 1] and np.isnan(empty.frequency[:3]).all()


# --------------------------------------------------------------------------- the fit

def test_calibration_lowers_the_ece_of_a_held_out_split():
    rng = np.random.default_rng(0)
    p, y, _ = miscalibrated(rng, 600)
    p_test, y_test, truth_test = miscalibrated(rng, 5000)
    fit = fit_dirichlet(p, y, seed=0)
    before = classwise_ece(p_test, y_test)
    after = classwise_ece(fit.calibrator.apply(p_test), y_test)
    floor = classwise_ece(truth_test, y_test)  # what the true probabilities score on this sample
    assert before > 0.12
    assert after < 0.4 * before and after < floor + 0.03


def test_the_fit_recovers_the_inverse_of_the_miscalibration():
    rng = np.random.default_rng(1)
    p, y, truth = miscalibrated(rng, 10000)
    calibrator = fit_dirichlet(p, y, (1e-4, 1e-2, 1.0), seed=0).calibrator
    # w1 - w2 is the slope on the logit, well determined; w1 + w2 (and with it the intercept) less so,
    # because log p and log(1 - p) move almost oppositely over the probabilities seen.
    assert calibrator.weights[0] - calibrator.weights[1] == pytest.approx(2 / 3, abs=0.03)
    assert calibrator.weights == pytest.approx((1 / 3, -1 / 3), abs=0.04)
    assert calibrator.intercept == pytest.approx(-1 / 3, abs=0.08)
    assert np.max(np.abs(calibrator.apply(p) - truth)) < 0.02


def test_the_solution_is_optimal_and_agrees_with_scipy():
    rng = np.random.default_rng(2)
    p, y, _ = miscalibrated(rng, 300)
    p[:3] = [0.0, 1.0, 1e-9]  # clipped before the logarithm
    strength = 0.7
    fitted = fit_logistic(p, y, strength)
    x = np.column_stack([np.log(np.clip(p, 1e-6, 1 - 1e-6)), np.log(1 - np.clip(p, 1e-6, 1 - 1e-6))])

    def penalised(params):
        z = x @ params[:2] + params[2]
        return np.sum(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - y * z) + strength / 2 * params[:2] @ params[:2]

    def penalised_gradient(params):
        q = 1 / (1 + np.exp(-(x @ params[:2] + params[2])))
        return np.r_[x.T @ (q - y) + strength * params[:2], np.sum(q - y)]

    ours = np.r_[fitted.weights, fitted.intercept]
    assert np.max(np.abs(penalised_gradient(ours))) < 1e-7
    reference = scipy.optimize.minimize(penalised, np.zeros(3), jac=penalised_gradient, method="L-BFGS-B",
                                        options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 10000})
    assert reference.success
    assert np.allclose(ours, reference.x, rtol=0, atol=1e-5)
    assert penalised(ours) <= reference.fun + 1e-9


def test_calibration_keeps_unobserved_cells_unobserved():
    calibrator = calibration.DirichletCalibrator((0.5, -0.5), 0.1, 1.0)
    out = calibrator.apply(np.array([[0.2, np.nan], [np.nan, 0.9]]))
    assert np.isnan(out[0, 1]) and np.isnan(out[1, 0])
    assert out[0, 0] == pytest.approx(1 / (1 + np.exp(-(0.5 * np.log(0.2 / 0.8) + 0.1))))


# --------------------------------------------------------------------------- cross-validation

def test_folds_are_seeded_and_stratified():
    y = np.r_[np.ones(23), np.zeros(41)]
    folds = stratified_folds(y, 10, seed=3)
    assert np.array_equal(folds, stratified_folds(y, 10, seed=3))
    assert not np.array_equal(folds, stratified_folds(y, 10, seed=4))
    for cls in (0, 1):
        counts = np.bincount(folds[y == cls], minlength=10)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1


def test_cross_validation_prefers_the_strong_penalty_only_for_tiny_noisy_sets():
    strengths = (1e-2, 1e3)

    def strong_share(n, spread):
        chosen = []
        for seed in range(16):
            p, y, _ = miscalibrated(np.random.default_rng(100 + seed), n, spread=spread)
            if min(y.sum(), len(y) - y.sum()) < 2:
                continue
            chosen.append(fit_dirichlet(p, y, strengths, seed=seed).calibrator.strength == 1e3)
        return np.mean(chosen)

    # 20 cases whose labels barely depend on p: any slope fitted on them is noise.
    assert strong_share(20, spread=0.3) >= 0.75
    # 500 informative cases: the strong penalty would flatten a map the data support.
    assert strong_share(500, spread=1.5) == 0


def test_ties_go_to_the_stronger_penalty(monkeypatch):
    p, y, _ = miscalibrated(np.random.default_rng(5), 80)
    monkeypatch.setattr(calibration, "classwise_ece", lambda p, y, bins: 0.125)
    fit = fit_dirichlet(p, y, (1e-3, 10.0, 0.1), seed=0)
    assert fit.calibrator.strength == 10.0 and fit.chosen_cv_ece == 0.125


def test_per_severity_models_get_their_own_maps():
    rng = np.random.default_rng(6)
    n = 200
    positive = rng.random(n) < 0.4
    eta = np.where(positive, 1.0, -1.0) + rng.normal(size=n)
    # severity 0 over-confident, severity 1 under-confident: one shared map could not fix both
    values = np.stack([1 / (1 + np.exp(-3 * eta)), 1 / (1 + np.exp(-eta / 3))])[None]
    validation = np.arange(n) % 3 == 0
    args = ("net", ("seed0",), values, positive, validation, ("0", "2"))
    shared, rows = calibrate_group(*args, False, (1e-3,), 5, 10, 0, "calibration")
    own, own_rows = calibrate_group(*args, True, (1e-3,), 5, 10, 0, "calibration")
    assert [r["fitted_at"] for r in rows] == ["0"] and [r["fitted_at"] for r in own_rows] == ["0", "2"]
    assert set(rows[0]) == set(COLUMNS)
    assert np.array_equal(own[0, 0], shared[0, 0])  # the same map at the reference severity
    severity_map = fit_dirichlet(values[0, 1, validation], positive[validation], (1e-3,), 5, 10, 0).calibrator
    assert np.allclose(own[0, 1], severity_map.apply(values[0, 1]))
    assert own_rows[1]["ece_test_after"] < own_rows[1]["ece_test_before"]


def test_which_observers_are_one_model_per_severity():
    spec = SimpleNamespace(training=(SimpleNamespace(name="filtered", per_severity=True),
                                     SimpleNamespace(name="plain", per_severity=False)))
    assert _one_model_per_severity(spec, SimpleNamespace(trained="filtered"))
    assert not _one_model_per_severity(spec, SimpleNamespace(trained="plain"))
    assert not _one_model_per_severity(spec, SimpleNamespace(trained=None))
    assert not _one_model_per_severity(spec, SimpleNamespace())


# --------------------------------------------------------------------------- in a study

def with_calibration(**section):
    def edit(spec):
        spec["calibration"] = section
    return edit


def validation_file(folder: Path, cases) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"case": list(cases)}).to_csv(folder / "val.csv", index=False)
    return "val.csv"


def study_of(spec_path) -> Study:
    return Study(load_spec(spec_path), load_registry(), progress=lambda message: None)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated")
    held_out = [f"c{i:03d}" for i in range(0, 60, 3)]
    validation_file(folder, held_out)
    spec = write_study(folder, roi=True, metrics=["predictive_confidence"],
                       spec_edit=with_calibration(validation_cases="val.csv"))
    out = folder / "out"
    assert main(["run", str(spec), "--out", str(out), "--set", "outputs.report=true"]) == 0
    return spec, out, held_out


def test_a_run_writes_calibration_csv(calibrated_run):
    _, out, held_out = calibrated_run
    table = pd.read_csv(out / "calibration.csv", dtype={"fitted_at": str})
    assert tuple(table.columns) == COLUMNS
    assert table["observer"].tolist() == ["dnns", "dnns"] and table["reader"].tolist() == ["seed1", "seed2"]
    assert (table["fitted_at"] == "0").all()
    assert (table["n_validation"] == len(held_out)).all() and (table["n_test"] == 60 - len(held_out)).all()
    assert (table["ece_test_after"] < table["ece_test_before"]).all()
    manifest = pd.read_json(out / "run.json", typ="series")
    assert "calibration.csv" in manifest["outputs"] and "fig_reliability.png" in manifest["outputs"]
    assert manifest["calibration"] == {"observers": ["dnns"], "validation_cases": 20, "test_cases": 40}


def test_the_analyses_leave_the_validation_cases_out(calibrated_run):
    _, out, held_out = calibrated_run
    for name in ("radiologists_split", "dnns_merged"):
        posterior = az.from_netcdf(out / "posterior" / f"{name}.nc").posterior
        analysed = {str(case) for case in posterior.case.values}
        assert posterior["mu"].sizes["case"] == 40
        assert analysed == {f"c{i:03d}" for i in range(60)} - set(held_out)


def test_the_report_shows_the_reliability_diagram_and_says_what_calibration_did(calibrated_run):
    _, out, _ = calibrated_run
    html = (out / "report.html").read_text()
    assert "alt='fig_reliability'" in html
    table = pd.read_csv(out / "calibration.csv")
    before, after = table["ece_test_before"].mean(), table["ece_test_after"].mean()
    sentence = (f"Calibration lowered dnns&#x27;s class-wise ECE on the test cases from {before:.2f} to {after:.2f} "
                "(mean over 2 readers; fitted at 0 mm and applied at every severity; 20 validation cases).")
    assert sentence in html
    assert "A further 20 cases were held out to calibrate dnns" in html


def test_the_map_fitted_at_the_reference_applies_at_every_severity(calibrated_run):
    spec, _, held_out = calibrated_run
    study = study_of(spec)
    raw = pd.read_csv(spec.parent / "dnns.csv", dtype={"severity": str})
    ids = study.cases.ids
    assert set(ids).isdisjoint(held_out) and len(ids) == 40
    positive = pd.read_csv(spec.parent / "cases.csv").set_index("case")["label"].eq("malignant")
    for r, reader in enumerate(("seed1", "seed2")):
        mine = raw[raw.reader == reader]
        at_reference = mine[(mine.severity == "0") & mine.case.isin(held_out)]
        expected = fit_dirichlet(at_reference.prediction.to_numpy(), positive[at_reference.case].to_numpy(),
                                 calibration.DEFAULT_STRENGTHS, 10, 15, seed=0).calibrator
        for s, level in enumerate(("0", "0.5", "1")):
            cell = mine[mine.severity == level].set_index("case").prediction
            assert np.allclose(study.observers["dnns"].values[r, s], expected.apply(cell[ids].to_numpy()),
                               rtol=0, atol=1e-12)
    radiologists = pd.read_csv(spec.parent / "radiologists.csv")
    seen = np.isfinite(study.observers["radiologists"].values).sum()
    assert seen == (~radiologists.case.isin(held_out)).sum()  # uncalibrated, but only the test cases


def test_roi_predictions_keep_only_test_cases(calibrated_run):
    spec, _, held_out = calibrated_run
    study = study_of(spec)
    roi_cases = np.asarray(study.cases.ids)[study.roi.cases]
    expected = [f"c{i:03d}" for i in range(0, 60, 2) if f"c{i:03d}" not in held_out]
    assert sorted(roi_cases) == expected
    assert all(v.shape[-1] == len(expected) for v in study.roi.values.values())


def test_the_held_out_fraction_is_seeded_and_stratified(tmp_path):
    spec = write_study(tmp_path, spec_edit=with_calibration(validation=0.3))
    study = study_of(spec)
    again = study_of(spec)
    assert study.cases.ids == again.cases.ids
    cases = pd.read_csv(tmp_path / "cases.csv")
    kept = cases[cases.case.isin(study.cases.ids)]
    for subgroup, (malignant, benign) in BREAST_PLAN.items():
        for label, count in (("malignant", malignant), ("benign", benign), ("nonbiopsied", benign)):
            total = ((cases.subgroup == subgroup) & (cases.label == label)).sum()
            if total:
                analysed = ((kept.subgroup == subgroup) & (kept.label == label)).sum()
                assert total - analysed == int(np.floor(0.3 * total + 0.5)), (subgroup, label)
    assert study.calibration.table["observer"].unique().tolist() == ["dnns"]  # the soft group by default
    other = study_of(write_study(tmp_path / "seed1", spec_edit=lambda s: (with_calibration(validation=0.3)(s),
                                                                           s["study"].update(seed=1))))
    assert other.cases.ids != study.cases.ids


# --------------------------------------------------------------------------- errors

def assert_run_fails(tmp_path, capsys, *fragments, files=None, **section):
    folder = tmp_path / "study"
    if files is not None:
        validation_file(folder, files)
    spec = write_study(folder, spec_edit=with_calibration(**section))
    code = main(["run", str(spec), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("section, message", [
    ({"validation": 1.5}, "spec.yaml: calibration.validation: must be between 0 and 1"),
    ({"validation": 0}, "spec.yaml: calibration.validation: must be between 0 and 1"),
    ({"fold": 3}, "spec.yaml: calibration.fold: unknown key 'fold' (did you mean 'folds'?); expected one of observers, validation"),
    ({"folds": 1}, "spec.yaml: calibration.folds: must be at least 2"),
    ({"bins": 0}, "spec.yaml: calibration.bins: must be at least 1"),
    ({"strengths": [0.1, -1]},
     "spec.yaml: calibration.strengths[1]: an L2 strength must be a positive number, got '-1'"),
    ({"strengths": ["lots"]}, "spec.yaml: calibration.strengths[0]: an L2 strength must be a positive number"),
    ({"validation": 0.2, "validation_cases": "val.csv"},
     "spec.yaml: calibration: give validation (a fraction of the cases) or validation_cases (a file naming them), "
     "not both"),
    ({"observers": ["gmic"]},
     "spec.yaml: calibration.observers[0]: no observer group named 'gmic'; observers are radiologists, dnns"),
    ({"observers": ["radiologists"]},
     "spec.yaml: calibration.observers[0]: observer 'radiologists' gives 0/1 calls; only probabilities can be "
     "calibrated"),
])
def test_spec_errors_name_the_key(tmp_path, capsys, section, message):
    assert_run_fails(tmp_path, capsys, message, **section)


def test_an_observer_declared_binary_cannot_be_calibrated(tmp_path, capsys):
    folder = tmp_path / "study"

    def edit(spec):
        spec["observers"][0]["likelihood"] = "binary"
        spec["calibration"] = {"observers": ["radiologists"]}

    spec = write_study(folder, spec_edit=edit)
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 1
    assert ("spec.yaml: calibration.observers[0]: observer 'radiologists' gives 0/1 calls (likelihood: binary)"
            in capsys.readouterr().err)


def test_unknown_validation_case_names_the_file_and_row(tmp_path, capsys):
    err = assert_run_fails(tmp_path, capsys, "calibration.validation_cases:", "val.csv: row 3: case 'c999' is not in "
                           "the cases table", files=["c000", "c999"], validation_cases="val.csv")
    assert re.search(r"study/val\.csv: row 3", err)


def test_validation_cases_of_one_class(tmp_path, capsys):
    benign = [f"c{i:03d}" for i in range(8, 14)]  # the benign microcalcifications
    assert_run_fails(tmp_path, capsys, "calibration.validation_cases: none of the 6 validation cases are malignant: "
                     "fitting a calibration needs cases of both classes", files=benign, validation_cases="val.csv")


def test_holding_out_every_positive_of_a_subgroup(tmp_path, capsys):
    held = [f"c{i:03d}" for i in range(0, 12)]  # all 8 malignant microcalcifications and 4 benign ones
    assert_run_fails(tmp_path, capsys, "subgroups.analyse[0]: subgroup 'microcalcifications' has no malignant cases "
                     "among the test cases (the others are held out for calibration)", files=held,
                     validation_cases="val.csv")
