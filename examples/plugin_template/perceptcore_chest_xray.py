"""A template for a third-party perceptcore plugin, for chest radiographs.

Registers a subgroup definition (`chest_xray_findings`: localised nodules versus diffuse
opacities, each analysed separately) and a metric (`observed_auc`: the AUC of every
observer's observed predictions per subgroup and severity).
"""

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

SUBGROUPS = ("nodule", "diffuse_opacity", "other_finding", "no_finding")
NODULAR = {"nodule", "mass"}
DIFFUSE = {"consolidation", "edema", "atelectasis", "effusion"}


class ChestXrayFindings:
    name = "chest_xray_findings"
    subgroups = SUBGROUPS

    def assign(self, cases, options, where):
        column = options.get("column", "finding")
        if column not in cases.columns:
            raise PerceptcoreError(f"the cases table has no column {column!r}", f"{where}.column")
        findings = cases[column].fillna("").astype(str).str.strip().str.lower()
        return np.select(
            [findings.isin(NODULAR), findings.isin(DIFFUSE), findings.isin({"", "none"})],
            ["nodule", "diffuse_opacity", "no_finding"],
            default="other_finding",
        )


class ObservedAuc:
    name = "observed_auc"
    outputs = {"observed_auc": ("observer", "subgroup", "severity", "auc_mean", "n_observers")}

    def compute(self, study):
        negative = ~study.cases.positive
        rows = []
        for subgroup in study.groupings[0].analysed:
            positive = study.cases.positive & (study.subgroup == subgroup)
            for observer, group in study.observers.items():
                for s, severity in enumerate(study.severities):
                    aucs = [_auc(values[positive], values[negative]) for values in group.values[:, s, :]]
                    aucs = [a for a in aucs if np.isfinite(a)]
                    rows.append((observer, subgroup, severity, np.mean(aucs) if aucs else np.nan, len(aucs)))
        return {"observed_auc": pd.DataFrame(rows, columns=self.outputs["observed_auc"])}


def _auc(positive, negative):
    """Mann-Whitney AUC of the observed (non-missing) predictions."""
    positive, negative = positive[np.isfinite(positive)], negative[np.isfinite(negative)]
    if len(positive) == 0 or len(negative) == 0:
        return np.nan
    ranks = rankdata(np.concatenate([positive, negative]))
    return (ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative))


@hookimpl
def perceptcore_register_subgroups(register):
    register(ChestXrayFindings())


@hookimpl
def perceptcore_register_metrics(register):
    register(ObservedAuc())
