"""Class separability: KS distance between predictions on positive cases of a subgroup and on all negatives.

From the latent model's posterior-predictive probabilities (which fill in the cells a
sparse reader study left empty), and, for observers that predicted every cell, from
their observed predictions as well.
"""

from __future__ import annotations

import pandas as pd

from perceptcore.plugins import hookimpl
from perceptcore.stats import ks_statistic, separability_columns

KS_COLUMNS = ("ks_mean", "ks_sd", "ks_pvalue", "ks_pvalue_raised", "ks_pvalue_floor", "finding")
COLUMNS = ("observer", "subgroup", "severity") + KS_COLUMNS


class KsSeparability:
    uses_posterior = True  # the core may fit every posterior up front, in parallel
    name = "ks_separability"
    outputs = {"class_separability": COLUMNS, "class_separability_observed": COLUMNS}

    def compute(self, study):
        negative = ~study.cases.positive
        modelled, observed = [], []
        for grouping in study.groupings:
            for observer, group in study.observers.items():
                predictive = study.predictive(observer, grouping)
                for subgroup in grouping.analysed:
                    positive = study.cases.positive & grouping.members(subgroup)
                    modelled += _rows(study, observer, subgroup, predictive, positive, negative)
                    if group.dense:
                        observed += _rows(study, observer, subgroup, group.values, positive, negative)
        return {
            "class_separability": pd.DataFrame(modelled, columns=COLUMNS),
            "class_separability_observed": pd.DataFrame(observed, columns=COLUMNS),
        }


def _rows(study, observer, subgroup, predictions, positive, negative):
    ks = ks_statistic(predictions[..., positive], predictions[..., negative])  # (observers, severities)
    columns = separability_columns(ks, study.alpha)
    return [(observer, subgroup, label, *(columns[c][s] for c in KS_COLUMNS))
            for s, label in enumerate(study.severities)]


@hookimpl
def perceptcore_register_metrics(register):
    register(KsSeparability())
