"""The demo study (examples/demo/demo.yaml) end to end, shrunk by command-line overrides to a
few dozen phantoms and one training epoch: every documented output exists with its schema,
and the report shows every figure and table it promises."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from perceptcore.cli import main

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo" / "demo.yaml"
SMALL = [
    *(f"dataset.options.{s}_{kind}={n}" for s, n in (("test", 6), ("train", 8))
      for kind in ("malignant_calcification", "malignant_soft_tissue", "benign_calcification", "benign_soft_tissue")),
    "dataset.options.test_normal=12", "dataset.options.train_normal=12",
    "training[0].seeds=3", "training[1].epochs=1", "training[2].epochs=1",
    "model.draws=100", "model.max_iterations=600",
]
KS = ["ks_mean", "ks_sd", "ks_pvalue", "ks_pvalue_raised", "ks_pvalue_floor", "finding"]
SCHEMAS = {
    "predictive_confidence.csv": ["observer", "subgroup", "severity", "gamma_mean", "gamma_sd", "p_gamma_gt0",
                                  "p_outside_margin", "finding"],
    "class_separability.csv": ["observer", "subgroup", "severity", *KS],
    "class_separability_observed.csv": ["observer", "subgroup", "severity", *KS],
    "roi_separability.csv": ["observer", "subgroup", "region", "severity", *KS],
    "calibration.csv": ["observer", "reader", "fitted_at", "strength", "ece_validation_cv", "ece_test_before",
                        "ece_test_after", "n_validation", "n_test"],
    "training.csv": ["training", "model", "severity", "reader", "epoch", "loss"],
    "models.csv": ["observer", "reader", "cases", "accuracy", "auc", "mean_probability", "prevalence",
                   "calibrated_mean"],
    "predictions/radiologists.csv": ["reader", "severity", "case", "prediction"],
    "predictions/cnn.csv": ["reader", "severity", "case", "prediction"],
    "predictions/cnn_filtered.csv": ["reader", "severity", "case", "prediction"],
    "predictions/cnn_roi.csv": ["annotator", "reader", "severity", "case", "region", "prediction"],
}
# No `fit_elbo`: the default method (laplace) has no ELBO trace to draw.
FIGURES = ["fig4_microcalcifications", "fig4_soft_tissue_lesions", "fig5_roi", "fig6_merged", "fig_reliability",
           "fig_training"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    shutil.copy(DEMO, folder / "demo.yaml")  # the cache lives beside the spec: keep it out of the source tree
    assert main(["run", str(folder / "demo.yaml"), "--out", str(folder / "out"), *(f"--set={s}" for s in SMALL)]) == 0
    return folder / "out"


def test_the_demo_writes_every_documented_output_with_its_schema(demo):
    for name, columns in SCHEMAS.items():
        assert list(pd.read_csv(demo / name).columns) == columns, name
    for stem in FIGURES:
        assert (demo / f"{stem}.png").stat().st_size > 10_000, stem
    listed = set(json.loads((demo / "run.json").read_text())["outputs"])
    assert set(SCHEMAS) | {f"{stem}.png" for stem in FIGURES} | {"report.html", "simpsons_paradox.csv"} <= listed


def test_the_demo_reads_through_the_designs_it_promises(demo):
    radiologists = pd.read_csv(demo / "predictions" / "radiologists.csv", dtype={"severity": str})
    # Six simulated readers (three here), each reading every case once with a binary call.
    assert set(radiologists.prediction) <= {0, 1}
    assert not radiologists.duplicated(["reader", "case"]).any()
    assert radiologists.groupby("reader").size().nunique() == 1
    filtered = pd.read_csv(demo / "predictions" / "cnn_filtered.csv", dtype={"severity": str})
    assert filtered.groupby(["reader", "severity"]).size().nunique() == 1  # dense: every seed, severity, case
    training = pd.read_csv(demo / "training.csv", dtype={"severity": str})
    assert set(training[training.training == "cnn_filtered"].severity) == {"0", "0.25", "0.5", "1", "2"}


def test_the_report_shows_every_figure_and_table(demo):
    html = (demo / "report.html").read_text()
    assert len(re.findall(r"<img src='data:image/png;base64,", html)) == len(FIGURES)
    for heading in ("Findings", "Predictive confidence", "Class separability", "Simpson", "Calibration"):
        assert heading in html, heading
    # The findings are computed from this run's tables.
    confidence = pd.read_csv(demo / "predictive_confidence.csv")
    worst = confidence[confidence.observer == "cnn"].sort_values("gamma_mean").iloc[0]
    assert f"{worst.gamma_mean:.3g}" in html


def _phantom_cases(folder: Path, which: str):
    """The CaseImages and labels (1 = malignant) of a generated phantom set, and each case's row."""
    import numpy as np
    import torch

    from perceptcore.images import load_manifest, read_image
    from perceptcore.runner import CaseImages, ViewImage

    base = folder / which if which == "train" else folder
    manifest = load_manifest(base / "manifest.csv", "manifest")
    table = pd.read_csv(base / "cases.csv").set_index("case")
    cases = []
    for case in manifest.cases:
        views = []
        for record in manifest.for_case(case):
            image = read_image(record, "manifest")
            views.append(ViewImage(record.view, record.laterality, torch.from_numpy(image.pixels.astype(np.float32)),
                                   image.pixel_spacing_mm, float(image.max_value), tuple(record.roi_boxes)))
        cases.append(CaseImages(case, tuple(views)))
    rows = table.loc[[c.case for c in cases]]
    return cases, (rows.label == "malignant").to_numpy().astype(int), rows


def test_the_demo_observers_see_the_phantoms_lesions(tmp_path):
    """Sanity of the demo's observers on unperturbed phantoms made with the demo's options: the
    simulated radiologists (CHO) and a small CNN trained for a few epochs separate malignant
    lesions of both families from normal breasts far better than chance."""
    import numpy as np
    import torch
    import yaml

    from perceptcore.stats import auc
    from perceptcore_plugins.datasets.mammography_phantoms import MammographyPhantoms, Options as PhantomOptions
    from perceptcore_plugins.models import cho, small_cnn

    options = yaml.safe_load(DEMO.read_text())["dataset"]["options"]
    counts = {f"{s}_{kind}": n for s, n in (("test", 10), ("train", 30))
              for kind in ("malignant_calcification", "malignant_soft_tissue", "benign_calcification",
                           "benign_soft_tissue")}
    MammographyPhantoms().generate(PhantomOptions(**options, **counts, test_normal=20, train_normal=60), tmp_path, 3,
                                   lambda message: None)
    train, train_labels, _ = _phantom_cases(tmp_path, "train")
    test, _, rows = _phantom_cases(tmp_path, "test")
    normal = (rows.label == "normal").to_numpy()
    families = {"calcifications": (rows.label == "malignant").to_numpy() & (rows.calcification == 1).to_numpy(),
                "soft tissue": (rows.label == "malignant").to_numpy() & (rows.calcification == 0).to_numpy()}

    torch.save(cho.ChoReader().fit(train, train_labels, cho.Options(), seed=0), tmp_path / "reader.pt")
    reader = cho.ChoReader().load(tmp_path / "reader.pt", cho.Options(), "cpu")
    statistic = cho.statistics(reader, test)
    for family, members in families.items():
        assert auc(statistic[members], statistic[normal]) > 0.8, family

    cnn = small_cnn.SmallCnn()
    cnn_options = small_cnn.Options(input_size=128)
    torch.manual_seed(0)
    network = cnn.network(cnn_options)
    optimiser = torch.optim.Adam(network.parameters(), lr=0.002)
    labels = torch.tensor(train_labels, dtype=torch.float32)
    order = np.random.default_rng(0)
    for _ in range(12):
        network.train()
        for batch in np.array_split(order.permutation(len(train)), len(train) // 16):
            loss = cnn.loss(network, [train[i] for i in batch], labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    network.eval()
    with torch.no_grad():
        probability = cnn.predict(network, test)
    for family, members in families.items():
        assert auc(probability[members], probability[normal]) > 0.8, family


def test_the_demo_report_fits_a_printed_page_in_a_browser(demo, tmp_path):
    import test_report_browser as browser
    if browser.CHROMIUM is None:
        pytest.skip("headless Chromium is not installed")
    browser.assert_fits_a_page_with_its_summary(demo / "report.html", tmp_path, ("radiologists", "cnn", "cnn_filtered"))
