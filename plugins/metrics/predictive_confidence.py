"""Predictive confidence: the posterior of gamma, the perturbation's effect on the logit scale."""

from __future__ import annotations

import pandas as pd

from perceptcore.latent_model import normal_tail_above_zero
from perceptcore.plugins import hookimpl

COLUMNS = ("observer", "subgroup", "severity", "gamma_mean", "gamma_sd", "p_gamma_gt0")


class PredictiveConfidence:
    uses_posterior = True  # the core may fit every posterior up front, in parallel
    name = "predictive_confidence"
    outputs = {"predictive_confidence": COLUMNS}

    def compute(self, study):
        rows = []
        for grouping in study.groupings:
            for observer in study.observers:
                gamma = study.posterior(observer, grouping).draws["gamma"]  # (draws, severities, groups)
                for subgroup in grouping.analysed:
                    g = grouping.group_names.index(subgroup)
                    mean = gamma[:, 1:, g].mean(axis=0)
                    sd = gamma[:, 1:, g].std(axis=0, ddof=1)
                    # As published: P(gamma > 0) from a normal approximation of the posterior.
                    p = normal_tail_above_zero(mean, sd)
                    for s, label in enumerate(study.severities[1:]):
                        rows.append((observer, subgroup, label, mean[s], sd[s], p[s]))
        return {"predictive_confidence": pd.DataFrame(rows, columns=COLUMNS)}


@hookimpl
def perceptcore_register_metrics(register):
    register(PredictiveConfidence())
