"""Predictive confidence: the posterior of gamma, the perturbation's effect on the logit scale.

The finding (findings.finding) is lowered where P(gamma > 0) < alpha / 2, raised where
P(gamma > 0) > 1 - alpha / 2, and unchanged where the posterior puts at least 1 - alpha of its draws
inside the equivalence margin |gamma| < analyses.margins.gamma (p_outside_margin < alpha).
"""

from __future__ import annotations

import pandas as pd

from perceptcore.findings import posterior_finding
from perceptcore.latent_model import normal_tail_above_zero
from perceptcore.plugins import hookimpl

COLUMNS = ("observer", "subgroup", "severity", "gamma_mean", "gamma_sd", "p_gamma_gt0", "p_outside_margin",
           "finding")


class PredictiveConfidence:
    uses_posterior = True  # the core may fit every posterior up front, in parallel
    name = "predictive_confidence"
    outputs = {"predictive_confidence": COLUMNS}

    def compute(self, study):
        rows = []
        margin = study.spec.analyses.margins.gamma
        for grouping in study.groupings:
            for observer in study.observers:
                gamma = study.posterior(observer, grouping).draws["gamma"]  # (draws, severities, groups)
                for subgroup in grouping.analysed:
                    g = grouping.group_names.index(subgroup)
                    mean = gamma[:, 1:, g].mean(axis=0)
                    sd = gamma[:, 1:, g].std(axis=0, ddof=1)
                    # As published: P(gamma > 0) from a normal approximation of the posterior. The
                    # finding counts the draws themselves, as every posterior finding does.
                    p = normal_tail_above_zero(mean, sd)
                    outside = (abs(gamma[:, 1:, g]) >= margin).mean(axis=0)
                    for s, label in enumerate(study.severities[1:]):
                        found = posterior_finding(gamma[:, 1 + s, g], study.alpha, margin)
                        rows.append((observer, subgroup, label, mean[s], sd[s], p[s], outside[s], found))
        return {"predictive_confidence": pd.DataFrame(rows, columns=COLUMNS)}


@hookimpl
def perceptcore_register_metrics(register):
    register(PredictiveConfidence())
