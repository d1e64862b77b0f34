"""Small synthetic studies written to disk: a tidy cases CSV, tidy prediction CSVs, an
optional tidy ROI CSV and the spec YAML that ties them together.

`write_study(folder)` returns the spec's path. The defaults give a valid breast study
(60 cases over the five breast_lesions subgroups, malignant cases among the
microcalcifications and the soft tissue lesions, 3 radiologists reading sparsely with
0/1 calls, 2 DNN seeds predicting every cell with probabilities, 3 severities); the
keyword arguments corrupt or change any part of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import yaml

SEVERITIES = ("0", "0.5", "1")

# subgroup: (malignant, benign); nonbiopsied cases are labelled nonbiopsied.
BREAST_PLAN = {
    "microcalcifications": (8, 6),
    "soft_tissue_lesions": (8, 6),
    "mixed": (3, 3),
    "occult": (2, 4),
    "nonbiopsied": (0, 20),
}
# finding: (abnormal, normal) for the chest_xray_findings plugin of examples/plugin_template.
CHEST_PLAN = {
    "nodule": (6, 3),
    "mass": (3, 2),
    "consolidation": (5, 2),
    "edema": (4, 3),
    "fracture": (2, 4),
    "none": (0, 26),
}
RADIOLOGISTS = ("radiologist1", "radiologist2", "radiologist3")
SEEDS = ("seed1", "seed2")
ANNOTATORS = ("annotator1", "annotator2")

Edit = Optional[Callable[[pd.DataFrame], Optional[pd.DataFrame]]]


def breast_cases() -> pd.DataFrame:
    rows = []
    for subgroup, (malignant, benign) in BREAST_PLAN.items():
        negative = "nonbiopsied" if subgroup == "nonbiopsied" else "benign"
        rows += [(subgroup, "malignant")] * malignant + [(subgroup, negative)] * benign
    table = pd.DataFrame(rows, columns=["subgroup", "label"])
    table.insert(0, "case", [f"c{i:03d}" for i in range(len(table))])
    return table


def chest_cases() -> pd.DataFrame:
    rows = []
    for finding, (abnormal, normal) in CHEST_PLAN.items():
        rows += [(finding, "abnormal")] * abnormal + [(finding, "normal")] * normal
    table = pd.DataFrame(rows, columns=["finding", "label"])
    table.insert(0, "case", [f"x{i:03d}" for i in range(len(table))])
    return table


def _signal(cases: pd.DataFrame, positive_label: str, hard_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per case: whether it is positive, and whether filtering hides its signal."""
    positive = (cases["label"] == positive_label).to_numpy()
    kind = cases["subgroup"] if "subgroup" in cases else cases["finding"]
    fragile = positive & (kind == hard_kind).to_numpy()
    return positive, fragile


def _logit(positive, fragile, severity_index, n_severities):
    strength = severity_index / max(n_severities - 1, 1)
    return -1.5 + 3.0 * positive - 2.5 * fragile * strength


def predictions(cases: pd.DataFrame, severities, rng, *, positive_label="malignant",
                hard_kind="microcalcifications") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(radiologists, dnns): sparse 0/1 calls of 3 readers, dense probabilities of 2 seeds."""
    positive, fragile = _signal(cases, positive_label, hard_kind)
    S = len(severities)
    readers = []
    for reader in RADIOLOGISTS:
        severity = rng.integers(0, S, size=len(cases))
        severity[: S] = np.arange(S)  # every severity is read at least once
        p = 1 / (1 + np.exp(-_logit(positive, fragile, severity, S)))
        call = (rng.random(len(cases)) < p).astype(int)
        readers.append(pd.DataFrame({"reader": reader, "severity": [severities[s] for s in severity],
                                     "case": cases["case"], "prediction": call}))
    dnns = []
    for seed in SEEDS:
        for s, label in enumerate(severities):
            eta = _logit(positive, fragile, s, S) + rng.normal(scale=0.7, size=len(cases))
            dnns.append(pd.DataFrame({"reader": seed, "severity": label, "case": cases["case"],
                                      "prediction": np.round(1 / (1 + np.exp(-eta)), 6)}))
    return pd.concat(readers, ignore_index=True), pd.concat(dnns, ignore_index=True)


def roi_predictions(cases: pd.DataFrame, dnns: pd.DataFrame, rng) -> pd.DataFrame:
    """Every second case, for 2 annotators x both seeds x every severity x both regions."""
    chosen = set(cases["case"].iloc[::2])
    base = dnns[dnns["case"].isin(chosen)]
    parts = []
    for annotator in ANNOTATORS:
        for region, shift in (("roi_interior", -0.05), ("roi_exterior", 0.0)):
            part = base.copy()
            noise = rng.normal(scale=0.03, size=len(part))
            part["prediction"] = np.round(np.clip(part["prediction"] + shift + noise, 0, 1), 6)
            part.insert(0, "annotator", annotator)
            part["region"] = region
            parts.append(part)
    return pd.concat(parts, ignore_index=True)[["annotator", "reader", "severity", "case", "region", "prediction"]]


def _apply(edit: Edit, table: pd.DataFrame) -> pd.DataFrame:
    if edit is None:
        return table
    edited = edit(table)
    return table if edited is None else edited


def write_study(
    folder: Path,
    *,
    chest: bool = False,
    roi: bool = False,
    severities=SEVERITIES,
    metrics=None,
    seed: int = 0,
    cases_edit: Edit = None,
    radiologists_edit: Edit = None,
    dnns_edit: Edit = None,
    roi_edit: Edit = None,
    spec_edit: Optional[Callable[[dict], None]] = None,
    spec_name: str = "spec.yaml",
) -> Path:
    """Write a synthetic study into `folder` and return the path of its spec.

    The *_edit callables receive a table (or the spec as a dict) before it is written
    and may change it in place or return a replacement: that is how tests corrupt it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = chest_cases() if chest else breast_cases()
    positive_label = "abnormal" if chest else "malignant"
    radiologists, dnns = predictions(cases, severities, rng, positive_label=positive_label,
                                     hard_kind="nodule" if chest else "microcalcifications")
    _apply(cases_edit, cases).to_csv(folder / "cases.csv", index=False)
    _apply(radiologists_edit, radiologists).to_csv(folder / "radiologists.csv", index=False)
    _apply(dnns_edit, dnns).to_csv(folder / "dnns.csv", index=False)

    if metrics is None:
        metrics = ["predictive_confidence", "ks_separability", "simpsons_paradox"] + (["roi_separability"] if roi else [])
    spec = {
        "study": {"name": "synthetic-chest" if chest else "synthetic", "seed": 0},
        "cases": {"file": "cases.csv", "positive": positive_label},
        "observers": [
            {"name": "radiologists", "predictions": "radiologists.csv"},
            {"name": "dnns", "predictions": "dnns.csv"},
        ],
        "severities": {"unit": "mm", "levels": list(severities)},
        "subgroups": {
            "definition": "chest_xray_findings" if chest else "breast_lesions",
            "analyse": ["nodule", "diffuse_opacity"] if chest else ["microcalcifications", "soft_tissue_lesions"],
        },
        "model": {"backend": "torch", "method": "laplace", "draws": 40},
        "analyses": {"metrics": list(metrics)},
        "outputs": {"figures": ["png"], "report": False},
    }
    if roi:
        _apply(roi_edit, roi_predictions(cases, dnns, rng)).to_csv(folder / "roi.csv", index=False)
        spec["roi"] = {"observer": "dnns", "predictions": "roi.csv"}
    if spec_edit is not None:
        spec_edit(spec)
    path = folder / spec_name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
