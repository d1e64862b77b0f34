"""Bayesian class separability: the posterior of the readers' mean KS distance, and of its change.

The published analysis (ks_separability) averages the predictive probabilities over the posterior
and then tests the readers' KS statistics with a KS test. Here the KS statistics are computed *per
posterior draw*, from that draw's predictive probabilities of every reader x severity x case (the
sparse cells filled in from the joint draw), so the change Delta_s = mean KS at s - mean KS at the
reference has a posterior, and findings.finding() can state "lowered", "raised" or "unchanged"
(|Delta_s| < analyses.margins.ks) with the same rule as predictive confidence.
"""

from __future__ import annotations

import weakref

import numpy as np
import pandas as pd

from perceptcore.findings import posterior_finding
from perceptcore.plugins import hookimpl

COLUMNS = ("observer", "subgroup", "severity", "ks_mean", "ks_sd", "delta_mean", "delta_sd", "p_lower",
           "p_outside_margin", "finding")

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def mean_ks_draws(draws: dict, case_group: np.ndarray, positive: np.ndarray,
                  subgroups: list[np.ndarray]) -> np.ndarray:
    """Per draw, per severity, per subgroup: the readers' mean KS statistic between that subgroup's
    positive cases (`subgroups[k] & positive`) and all negative cases. Returns (draws, severities, K).

    Within one draw a case's logit at (reader r, severity s) is mu[n] + c[r, s, g(n)], with
    c = b + gamma + nu: the negatives of each group keep their order across (r, s). So each group's
    negatives are sorted once per draw, and the negatives' ECDF at the few positive points is a
    searchsorted per group, instead of sorting every (draw, reader, severity) row of ~1,400 cases
    (stats.ks_statistic on every row: 16x slower at the published size). Ranks suffice because the
    logistic is increasing; the draws are continuous, so ties between cases have probability 0.
    """
    b, mu, gamma, nu = (np.asarray(draws[k], dtype=float) for k in ("b", "mu", "gamma", "nu"))
    negative = ~positive
    n_neg = int(negative.sum())
    groups = np.unique(case_group[negative])
    sorted_neg = [np.sort(mu[:, negative & (case_group == h)], axis=1) for h in groups]  # (D, n_h) each
    positives = [np.flatnonzero(members & positive) for members in subgroups]
    out = np.empty((b.shape[0], gamma.shape[1], len(subgroups)))
    for d in range(b.shape[0]):
        c = b[d] + gamma[d][None, :, :] + nu[d][:, None, :]  # (R, S, G)
        for k, pos in enumerate(positives):
            x = np.sort(mu[d, pos] + c[:, :, case_group[pos]], axis=-1)  # (R, S, n) positives' logits
            below = sum(np.searchsorted(neg[d], x - c[:, :, h, None]) for h, neg in zip(groups, sorted_neg))
            f_neg = below / n_neg  # the negatives' ECDF at each positive point
            i = np.arange(x.shape[-1])
            # Between consecutive positive points the positives' ECDF is flat, so the largest gap is
            # at one of them: just after it (positives ahead) or just before it (negatives ahead).
            gap = np.maximum((i + 1) / len(i) - f_neg, f_neg - i / len(i))
            out[d, :, k] = gap.max(axis=-1).mean(axis=0)
    return out


def study_mean_ks(study, observer: str, grouping) -> np.ndarray:
    """mean_ks_draws for every analysed subgroup of a grouping (draws, severities, analysed), computed
    once per study: the Simpson's-paradox check reuses it."""
    per_study = _cache.setdefault(study, {})
    key = (observer, grouping.name)
    if key not in per_study:
        fit = study.posterior(observer, grouping)
        per_study[key] = mean_ks_draws(fit.draws, grouping.case_group, study.cases.positive,
                                       [grouping.members(s) for s in grouping.analysed])
    return per_study[key]


class BayesianSeparability:
    uses_posterior = True  # the core may fit every posterior up front, in parallel
    name = "bayesian_separability"
    outputs = {"bayesian_separability": COLUMNS}

    def compute(self, study):
        margin = study.spec.analyses.margins.ks
        rows = []
        for grouping in study.groupings:
            for observer in study.observers:
                ks = study_mean_ks(study, observer, grouping)
                for k, subgroup in enumerate(grouping.analysed):
                    for s, label in enumerate(study.severities):
                        row = (observer, subgroup, label, ks[:, s, k].mean(), ks[:, s, k].std(ddof=1))
                        if s == 0:
                            rows.append(row + (np.nan,) * 4 + ("",))
                            continue
                        delta = ks[:, s, k] - ks[:, 0, k]
                        rows.append(row + (delta.mean(), delta.std(ddof=1), np.mean(delta < 0),
                                           np.mean(np.abs(delta) >= margin),
                                           posterior_finding(delta, study.alpha, margin)))
        return {"bayesian_separability": pd.DataFrame(rows, columns=COLUMNS)}


@hookimpl
def perceptcore_register_metrics(register):
    register(BayesianSeparability())
