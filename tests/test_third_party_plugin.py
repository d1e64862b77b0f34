"""examples/plugin_template installed as a separate package: found through its entry point,
listed by `perceptcore plugins`, and usable in a run whose numbers we check by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthetic import write_study

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin_template"
# chest_xray_findings, as its README describes it
FINDING_SUBGROUP = {"nodule": "nodule", "mass": "nodule", "consolidation": "diffuse_opacity",
                    "edema": "diffuse_opacity", "atelectasis": "diffuse_opacity", "effusion": "diffuse_opacity"}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Environment variables under which the template package is installed (in a private folder)."""
    root = tmp_path_factory.mktemp("third_party")
    source = root / "source"
    shutil.copytree(TEMPLATE, source)  # build in a copy: no build/ or egg-info in the work tree
    target = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def perceptcore(env, *args):
    return subprocess.run([sys.executable, "-m", "perceptcore.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_plugins_command_lists_the_third_party_plugin(plugin_env):
    result = perceptcore(plugin_env, "plugins")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.strip().splitlines()[1:]}
    assert rows["chest_xray_findings"] == ["chest_xray_findings", "subgroups", "perceptcore-chest-xray", "0.1.0",
                                           "chest_xray"]
    assert rows["observed_auc"] == ["observed_auc", "metric", "perceptcore-chest-xray", "0.1.0", "chest_xray"]
    assert rows["breast_lesions"][2] == "perceptcore"  # the bundled ones are still there


def brute_force_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative) + P(tie)/2 over every pair."""
    if len(positive) == 0 or len(negative) == 0:
        return np.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def test_run_with_the_third_party_subgroups_and_metric(plugin_env, tmp_path):
    spec = write_study(tmp_path / "study", chest=True, metrics=["predictive_confidence", "ks_separability", "observed_auc"],
                       spec_edit=lambda s: s["model"].update(draws=30, max_iterations=300))
    out = tmp_path / "out"
    result = perceptcore(plugin_env, "run", str(spec), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout

    table = pd.read_csv(out / "observed_auc.csv", dtype={"severity": str})
    assert list(table.columns) == ["observer", "subgroup", "severity", "auc_mean", "n_observers"]
    assert (out / "predictive_confidence.csv").is_file() and (out / "class_separability.csv").is_file()

    folder = tmp_path / "study"
    cases = pd.read_csv(folder / "cases.csv", keep_default_na=False)
    cases["subgroup"] = cases["finding"].map(FINDING_SUBGROUP).fillna("other")
    expected = []
    for observer in ("radiologists", "dnns"):
        predictions = pd.read_csv(folder / f"{observer}.csv", dtype={"severity": str}).merge(cases, on="case")
        for subgroup in ("nodule", "diffuse_opacity"):
            for severity in ("0", "0.5", "1"):
                aucs = []
                for _, mine in predictions[predictions["severity"] == severity].groupby("reader"):
                    positive = mine[(mine["label"] == "abnormal") & (mine["subgroup"] == subgroup)]["prediction"]
                    negative = mine[mine["label"] != "abnormal"]["prediction"]
                    auc = brute_force_auc(positive.to_numpy(), negative.to_numpy())
                    if np.isfinite(auc):
                        aucs.append(auc)
                expected.append((observer, subgroup, severity, np.mean(aucs), len(aucs)))
    expected = pd.DataFrame(expected, columns=["observer", "subgroup", "severity", "auc", "n"])

    joined = table.merge(expected, on=["observer", "subgroup", "severity"], how="outer", indicator=True)
    assert (joined["_merge"] == "both").all() and len(joined) == 2 * 2 * 3
    np.testing.assert_allclose(joined["auc_mean"], joined["auc"], rtol=1e-12)
    np.testing.assert_array_equal(joined["n_observers"], joined["n"])
    # The dense DNN arm: both seeds at every severity; the signal is real but not perfect.
    dnn = joined[joined["observer"] == "dnns"]
    assert (dnn["n_observers"] == 2).all()
    assert dnn["auc_mean"].between(0.5, 1.0).all() and (dnn["auc_mean"] < 1.0).any()
