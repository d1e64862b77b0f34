"""One finding rule everywhere (findings.finding): the KS p-value floor, the tables' finding columns,
the report's sentences and the ROI analysis's unit, each checked against scipy or brute force.

The study: the synthetic breast study of tests/synthetic.py with 5 DNN seeds whose predictions on
malignant microcalcifications *rise* with severity (separability and confidence raised), and its
3 sparse radiologists (too few observers for a KS test to reach alpha / 2).
"""

from __future__ import annotations

import html
import itertools
import math
import re

import arviz as az
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import synthetic
from perceptcore.cli import main
from perceptcore.stats import ks_pvalue_floor

SEEDS = tuple(f"seed{i}" for i in range(5))
MICRO = "microcalcifications"
MARGIN = 0.5


def raised_dnns(cases: pd.DataFrame, rng) -> pd.DataFrame:
    """Dense probabilities of 5 seeds; the logit of malignant microcalcifications rises by 3 per severity step."""
    positive = (cases["label"] == "malignant").to_numpy()
    raised = positive & (cases["subgroup"] == MICRO).to_numpy()
    parts = []
    for seed in SEEDS:
        for s, label in enumerate(synthetic.SEVERITIES):
            eta = -0.5 + 0.5 * positive + 3.0 * s * raised + rng.normal(size=len(cases))
            parts.append(pd.DataFrame({"reader": seed, "severity": label, "case": cases["case"],
                                       "prediction": np.round(1 / (1 + np.exp(-eta)), 6)}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raised")
    rng = np.random.default_rng(1)
    cases = synthetic.breast_cases()
    dnns = raised_dnns(cases, rng)

    def edit(spec):
        spec["outputs"]["report"] = True
        spec["analyses"]["margins"] = {"gamma": MARGIN}

    spec = synthetic.write_study(
        folder, roi=True, metrics=["predictive_confidence", "ks_separability", "roi_separability", "simpsons_paradox"],
        dnns_edit=lambda _: dnns, roi_edit=lambda _: synthetic.roi_predictions(cases, dnns, rng),
        spec_edit=edit)
    out = folder / "run"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    return folder, out


def table(out, name):
    return pd.read_csv(out / f"{name}.csv", dtype={"severity": str})


def sentences(out):
    """The report's findings and Simpson's-paradox sentences, one plain-text sentence per list item."""
    page = (out / "report.html").read_text()
    sections = [page.split(f"<h2 id='{name}'>")[1].split("<h2")[0] for name in ("simpson", "details")]
    return [html.unescape(re.sub(r"<[^>]+>", "", item)) for section in sections
            for item in re.findall(r"<li[^>]*>(.*?)</li>", section, flags=re.S)]


def scipy_ks(predictions: pd.DataFrame, positive: set, negative: set, units: list) -> dict:
    """severity -> one KS statistic per seed (scipy), averaged over the other unit columns (annotators)."""
    out = {}
    for severity, rows in predictions.groupby("severity"):
        per_unit = {}
        for keys, unit_rows in rows.groupby(units):
            keys = keys if isinstance(keys, tuple) else (keys,)
            pos = unit_rows.prediction[unit_rows.case.isin(positive)]
            neg = unit_rows.prediction[unit_rows.case.isin(negative)]
            per_unit.setdefault(keys[-1], []).append(stats.ks_2samp(pos, neg).statistic)
        out[severity] = np.array([np.mean(per_unit[seed]) for seed in sorted(per_unit)])
    return out


# --------------------------------------------------------------------------- the KS floor

@pytest.mark.parametrize("n", range(1, 7))
def test_ks_floor_is_one_over_the_central_binomial(n):
    assert ks_pvalue_floor(n, n) == pytest.approx(1 / math.comb(2 * n, n), rel=1e-9)


@pytest.mark.parametrize("n", range(1, 5))
def test_ks_floor_is_the_smallest_p_over_every_ordering(n):
    # Brute force: every way of interleaving n reference and n perturbed values (all KS p-values depend on).
    smallest = min(
        stats.ks_2samp(np.flatnonzero(mask), np.flatnonzero(~mask), alternative="less").pvalue
        for chosen in itertools.combinations(range(2 * n), n)
        for mask in [np.isin(np.arange(2 * n), chosen)])
    assert ks_pvalue_floor(n, n) == pytest.approx(smallest, rel=1e-9)


# --------------------------------------------------------------------------- one rule everywhere

def test_a_raised_effect_is_raised_in_every_table_and_sentence(study):
    folder, out = study
    cases = pd.read_csv(folder / "cases.csv")
    dnns = pd.read_csv(folder / "dnns.csv", dtype={"severity": str})
    positive = set(cases.case[(cases.label == "malignant") & (cases.subgroup == MICRO)])
    negative = set(cases.case[cases.label != "malignant"])
    # Independently: scipy's KS test of the seeds' observed separability, in the raising direction.
    ks = scipy_ks(dnns, positive, negative, ["reader"])
    for level in synthetic.SEVERITIES[1:]:
        assert stats.ks_2samp(ks["0"], ks[level], alternative="greater").pvalue < 0.025

    mine = {name: table(out, name) for name in ("predictive_confidence", "class_separability",
                                                "class_separability_observed")}
    mine = {name: t[(t.observer == "dnns") & (t.subgroup == MICRO)].set_index("severity")
            for name, t in mine.items()}
    for name in ("predictive_confidence", "class_separability_observed"):
        assert (mine[name].loc[list(synthetic.SEVERITIES[1:]), "finding"] == "raised").all(), name
    # The latent model's per-case effects already separate these cases almost perfectly at the reference
    # (KS near 1), so the posterior-predictive separability has no room to rise; it must not be lowered.
    assert not (mine["class_separability"].finding == "lowered").any()
    observed = mine["class_separability_observed"]
    for level in synthetic.SEVERITIES[1:]:
        expected = stats.ks_2samp(ks["0"], ks[level], alternative="greater").pvalue
        assert observed.loc[level, "ks_pvalue_raised"] == pytest.approx(expected, abs=1e-12)
    posterior = az.from_netcdf(out / "posterior" / "dnns_split.nc").posterior
    gamma = posterior["gamma"].sel(subgroup=MICRO).stack(sample=("chain", "draw")).transpose("sample", "severity")
    gamma = gamma.values[:, 1:]
    assert (np.mean(gamma > 0, axis=0) > 0.975).all()  # the posterior itself says raised
    confidence = mine["predictive_confidence"]
    assert np.allclose(confidence.p_outside_margin, [np.mean(np.abs(g) >= MARGIN) for g in gamma.T], atol=1e-12)

    simpson = table(out, "simpsons_paradox")
    simpson = simpson[(simpson.observer == "dnns") & (simpson.subgroup == MICRO)]
    assert simpson.loc[simpson.analysis == "predictive_confidence", "split_finding"].eq("raised").all()
    assert not simpson[["split_finding", "merged_finding"]].isin(["lowered", "invariant"]).any().any()

    about = [s for s in sentences(out) if s.startswith("dnns,") and MICRO in s]  # its tables, ROI and Simpson's
    assert any("raises predictive confidence at every severity" in s for s in about)
    assert any("raises class separability of the observed predictions at every severity" in s for s in about)
    for s in about:
        assert "lower" not in s and "invariant" not in s, s


def test_three_observers_cannot_detect_a_change_in_separability(study):
    folder, out = study
    radiologists = pd.read_csv(folder / "radiologists.csv")
    n = radiologists.reader.nunique()
    assert n == 3
    separability = table(out, "class_separability")
    rows = separability[(separability.observer == "radiologists") & (separability.severity != "0")]
    assert np.allclose(rows.ks_pvalue_floor, 1 / math.comb(2 * n, n))
    assert (rows.finding == "cannot be detected").all()
    about = [s for s in sentences(out) if s.startswith("radiologists, ") and "class separability" in s]
    assert about and all("cannot be detected with 3 observers" in s for s in about)
    assert not any("no detectable" in s for s in about)


# --------------------------------------------------------------------------- the ROI unit

def test_every_roi_region_is_tested_on_one_unit_per_seed(study):
    folder, out = study
    cases = pd.read_csv(folder / "cases.csv")
    roi = pd.read_csv(folder / "roi.csv", dtype={"severity": str})
    dnns = pd.read_csv(folder / "dnns.csv", dtype={"severity": str})
    in_roi = set(roi.case)
    negative = set(cases.case[cases.label != "malignant"]) & in_roi
    ours = table(out, "roi_separability")
    n = len(SEEDS)
    assert np.allclose(ours.ks_pvalue_floor.dropna(), 1 / math.comb(2 * n, n))  # n = seeds in every region
    for subgroup in ("microcalcifications", "soft_tissue_lesions"):
        positive = set(cases.case[(cases.label == "malignant") & (cases.subgroup == subgroup)]) & in_roi
        for region in ("roi_interior", "roi_exterior", "entire_image"):
            if region == "entire_image":
                ks = scipy_ks(dnns[dnns.case.isin(in_roi)], positive, negative, ["reader"])
            else:
                ks = scipy_ks(roi[roi.region == region], positive, negative, ["annotator", "reader"])
            t = ours[(ours.subgroup == subgroup) & (ours.region == region)].set_index("severity")
            for level in synthetic.SEVERITIES:
                assert len(ks[level]) == n
                assert t.loc[level, "ks_mean"] == pytest.approx(ks[level].mean(), abs=1e-12)
                assert t.loc[level, "ks_sd"] == pytest.approx(ks[level].std(ddof=1), abs=1e-12)
                if level != "0":
                    for column, tail in (("ks_pvalue", "less"), ("ks_pvalue_raised", "greater")):
                        expected = stats.ks_2samp(ks["0"], ks[level], alternative=tail).pvalue
                        assert t.loc[level, column] == pytest.approx(expected, abs=1e-12)
