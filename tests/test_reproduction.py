"""The GMIC arm of the published perception-comparison study, reproduced from its published data.

Runs examples/perception_comparison/gmic.yaml through the CLI on ../shared/data (skipped
when that folder is absent) and checks what the published data supports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from perceptcore.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "perception_comparison"
LEVELS = ["0", "0.17", "0.22", "0.33", "0.5", "0.67", "1", "2", "4"]
MICRO, SOFT = "microcalcifications", "soft_tissue_lesions"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    if not (SHARED / "published" / "exam_info.csv").exists():
        pytest.skip(f"the published perception-comparison data is not at {SHARED}")
    out = tmp_path_factory.mktemp("gmic") / "run"
    code = main(["run", str(ROOT / "examples/perception_comparison/gmic.yaml"),
                 "--set", f"data_dir={SHARED / 'published'}", "--set", "model.backend=torch", "--out", str(out)])
    assert code == 0
    return out


def _table(run_dir, name):
    return pd.read_csv(run_dir / f"{name}.csv", dtype={"severity": str})


def _series(table, observer, subgroup, column):
    rows = table[(table.observer == observer) & (table.subgroup == subgroup)]
    return rows.set_index("severity")[column]


def test_outputs_follow_the_documented_schema(run_dir):
    ks = ["ks_mean", "ks_sd", "ks_pvalue", "ks_pvalue_raised", "ks_pvalue_floor", "finding"]
    expected = {
        "predictive_confidence": ["observer", "subgroup", "severity", "gamma_mean", "gamma_sd", "p_gamma_gt0",
                                  "p_outside_margin", "finding"],
        "class_separability": ["observer", "subgroup", "severity", *ks],
        "roi_separability": ["observer", "subgroup", "region", "severity", *ks],
    }
    for name, columns in expected.items():
        assert list(_table(run_dir, name).columns) == columns
    confidence = _table(run_dir, "predictive_confidence")
    assert set(confidence.observer) == {"radiologists", "gmic_trained_unperturbed", "gmic_trained_filtered"}
    assert set(confidence.subgroup) == {MICRO, SOFT, f"{MICRO}+{SOFT}"}
    assert list(_series(confidence, "radiologists", MICRO, "gamma_mean").index) == LEVELS[1:]
    for stem in ("fig4_microcalcifications", "fig4_soft_tissue_lesions", "fig5_roi", "fig6_merged"):
        for fmt in ("png", "svg"):
            assert (run_dir / f"{stem}.{fmt}").stat().st_size > 0
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["backend"] == "torch" and manifest["method"] == "laplace"
    assert manifest["all_fits_converged"] is True
    html = (run_dir / "report.html").read_text()
    assert "torch" in html and "laplace" in html


def test_default_method_matches_the_nuts_reference(run_dir):
    """The issue's bounds against the committed NUTS reference (benchmarks/nuts_reference.py: PyStan, 4 chains
    x 1,000 draws, R-hat <= 1.01, ESS >= 400), on every observer group, subgroup and perturbed severity."""
    reference = pd.read_csv(ROOT / "tests/data/nuts_reference_gmic.csv", dtype={"severity": str})
    assert (reference.rhat <= 1.01).all() and (reference[["ess_bulk", "ess_tail"]] >= 400).all().all()
    ours = _table(run_dir, "predictive_confidence")
    both = ours.merge(reference, on=["observer", "subgroup", "severity"], suffixes=("", "_nuts"))
    assert len(both) == len(reference) == 3 * 3 * (len(LEVELS) - 1)
    assert ((both.gamma_mean - both.gamma_mean_nuts).abs() / both.gamma_sd_nuts).max() <= 0.25
    assert (both.gamma_sd / both.gamma_sd_nuts - 1).abs().max() <= 0.20
    assert (both.p_gamma_gt0 - both.p_gamma_gt0_normal).abs().max() <= 0.05


def test_radiologists_microcalcifications(run_dir):
    confidence = _table(run_dir, "predictive_confidence")
    separability = _table(run_dir, "class_separability")
    p = _series(confidence, "radiologists", MICRO, "p_gamma_gt0")
    gamma = _series(confidence, "radiologists", MICRO, "gamma_mean")
    ks_p = _series(separability, "radiologists", MICRO, "ks_pvalue")
    for level in ("1", "2", "4"):
        assert p[level] < 0.01
        assert ks_p[level] < 0.01
    assert gamma["4"] <= -1.5


def test_radiologists_soft_tissue_lesions_are_invariant(run_dir):
    confidence = _table(run_dir, "predictive_confidence")
    separability = _table(run_dir, "class_separability")
    assert (_series(confidence, "radiologists", SOFT, "p_gamma_gt0") > 0.1).all()
    assert (_series(separability, "radiologists", SOFT, "ks_pvalue").dropna() > 0.1).all()


def test_gmic_loses_confidence_on_both_subgroups(run_dir):
    confidence = _table(run_dir, "predictive_confidence")
    micro = _series(confidence, "gmic_trained_unperturbed", MICRO, "p_gamma_gt0")
    soft = _series(confidence, "gmic_trained_unperturbed", SOFT, "p_gamma_gt0")
    for level in ("2", "4"):
        assert micro[level] < 0.01
        assert soft[level] < 0.05


def test_radiologists_level_off_while_gmic_keeps_falling(run_dir):
    confidence = _table(run_dir, "predictive_confidence")
    radiologists = _series(confidence, "radiologists", MICRO, "gamma_mean")
    radiologists_sd = _series(confidence, "radiologists", MICRO, "gamma_sd")
    gmic = _series(confidence, "gmic_trained_unperturbed", MICRO, "gamma_mean")
    # Radiologists: beyond 1 mm gamma moves by less than its posterior sd.
    assert abs(radiologists["4"] - radiologists["1"]) < radiologists_sd["4"]
    # GMIC: every further step of severity lowers gamma.
    assert gmic["1"] > gmic["2"] > gmic["4"]


def test_simpsons_paradox_flags_soft_tissue_lesions_for_radiologists(run_dir):
    check = _table(run_dir, "simpsons_paradox")
    rows = check[(check.observer == "radiologists") & (check.subgroup == SOFT)]
    assert len(rows) == 2
    for _, row in rows.iterrows():
        assert row.split_finding == "unchanged"
        assert row.merged_finding == "lowered"
        assert row.differs
    # Nothing else shows it: microcalcifications share the merged fall, and GMIC's subgroups both fall.
    assert not check[check.subgroup != SOFT].differs.any()
    assert not check[check.observer != "radiologists"].differs.any()


def test_roi_separability_follows_the_definition(run_dir):
    """Recomputed here from the tidy copy of the data, one scipy KS test at a time: one unit per network
    seed in every region (the ROI regions' KS statistics averaged over annotators)."""
    tidy = SHARED / "tidy"
    cases = pd.read_csv(tidy / "cases.csv")
    roi = pd.read_csv(tidy / "gmic_roi.csv")
    entire = pd.read_csv(tidy / "gmic_trained_unperturbed.csv")
    in_study = cases[cases.in_annotation_study == 1]
    entire = entire.merge(in_study[["exam_id", "side"]], on=["exam_id", "side"])
    negatives = set(map(tuple, in_study.loc[in_study.label != "malignant", ["exam_id", "side"]].to_numpy()))
    ours = _table(run_dir, "roi_separability")
    seeds = entire.reader.nunique()
    for subgroup in (MICRO, SOFT):
        chosen = in_study[(in_study.label == "malignant") & (in_study.subgroup == subgroup)]
        positives = set(map(tuple, chosen[["exam_id", "side"]].to_numpy()))
        for region in ("roi_interior", "roi_exterior", "entire_image"):
            data = entire if region == "entire_image" else roi[roi.region == region]
            units = ["reader"] if region == "entire_image" else ["annotator", "reader"]
            keys = list(zip(data.exam_id, data.side))
            data = data.assign(is_pos=[k in positives for k in keys], is_neg=[k in negatives for k in keys])
            ks = {}
            for (unit, severity), rows in data.groupby([data[units].astype(str).agg("/".join, axis=1),
                                                        "severity_mm"]):
                pos = rows.prediction[rows.is_pos]
                neg = rows.prediction[rows.is_neg]
                seed = unit.split("/")[-1]
                ks.setdefault(severity, {}).setdefault(seed, []).append(stats.ks_2samp(pos, neg).statistic)
            ks = {severity: np.array([np.mean(v) for v in per_seed.values()]) for severity, per_seed in ks.items()}
            mine = ours[(ours.subgroup == subgroup) & (ours.region == region)].set_index("severity")
            reference = ks[0]
            for level in LEVELS:
                values = ks[float(level)]
                assert len(values) == seeds
                assert mine.loc[level, "ks_mean"] == pytest.approx(values.mean(), abs=1e-12)
                assert mine.loc[level, "ks_sd"] == pytest.approx(values.std(ddof=1), abs=1e-12)
                if level != "0":
                    for column, tail in (("ks_pvalue", "less"), ("ks_pvalue_raised", "greater")):
                        expected = stats.ks_2samp(reference, values, alternative=tail).pvalue
                        assert mine.loc[level, column] == pytest.approx(expected, abs=1e-12)


def test_dmv_spec_reads_the_same_layout(tmp_path, capsys):
    """dmv.yaml runs unchanged on DMV files in the published layout (here: links to the GMIC arrays)."""
    published = SHARED / "published"
    if not (published / "exam_info.csv").exists():
        pytest.skip(f"the published perception-comparison data is not at {SHARED}")
    for name in ("exam_info.csv", "annotation_study_idxs.pkl", "observed_predictions/perturbation_study/radiologists.pkl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(published / name)
    for study in ("perturbation_study/dnns", "annotation_study"):
        (tmp_path / "observed_predictions" / study).mkdir(parents=True, exist_ok=True)
        (tmp_path / "observed_predictions" / study / "dmv").symlink_to(published / "observed_predictions" / study / "gmic")
    code = main(["validate", str(ROOT / "examples/perception_comparison/dmv.yaml"), "--set", f"data_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "dmv_trained_unperturbed: 64800 predictions" in out and "radiologists: 13440 predictions" in out


def test_the_gmic_report_fits_a_printed_page_in_a_browser(run_dir, tmp_path):
    import test_report_browser as browser
    if browser.CHROMIUM is None:
        pytest.skip("headless Chromium is not installed")
    browser.assert_fits_a_page_with_its_summary(
        run_dir / "report.html", tmp_path, ("radiologists", "gmic_trained_unperturbed", "gmic_trained_filtered"))
