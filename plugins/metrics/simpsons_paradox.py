"""The Simpson's-paradox check: does merging the subgroups show an effect that one of them credibly lacks?

Subgroup A shows the paradox at severity s when, all judged on posterior draws of the effect (gamma
for predictive confidence, Delta = mean KS change for class separability):

  (i)   the merged subgroup's effect at s is lowered (or raised), by findings.posterior_finding;
  (ii)  A's effect at s is "unchanged" (inside the equivalence margin: a positive statement, not a
        mere failure to find an effect, which the merged group's larger sample produces by itself)
        or reversed (raised where the merged one is lowered, the textbook paradox), by the same rule;
  (iii) the other subgroup's effect B lies beyond A's in that direction, outside a simultaneous
        credible band of B - A over all severities at level alpha / pairs of subgroups
        (band_threshold). When the subgroups share one effect, B - A = 0 everywhere lies inside the
        band at every severity at once with probability 1 - alpha / pairs, so the study flags with
        probability at most alpha whatever (i) and (ii) do. The band is Bonferroni over severities
        made exact for their correlation: they share the reference, which Bonferroni ignores.

The statements are also made of the effect averaged over the perturbed severities (one more column
of the band, labelled MEAN): a single severity's Delta is often too uncertain for a subgroup of the
published size to be shown inside the margin, its average rarely. A subgroup is flagged (`differs`)
when any severity or the mean shows it. benchmarks/simpsons_calibration.py measures both error rates
on simulated studies of the published size.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from perceptcore.errors import PerceptcoreError
from perceptcore.findings import CHANGED, LOWERED, RAISED, UNCHANGED, posterior_finding
from perceptcore.plugins import hookimpl
from perceptcore_plugins.metrics.bayesian_separability import study_mean_ks

MEAN = "mean"  # the label of the effect averaged over the perturbed severities
COLUMNS = ("observer", "analysis", "subgroup", "merged_subgroup", "severities", "severity", "split_finding",
           "merged_finding", "p_differ", "p_threshold", "differs")


def check(split: dict, merged: np.ndarray, alpha: float, margin: float) -> dict:
    """The paradox check of every subgroup on draws of its effect.

    split: subgroup -> (draws, severities) joint draws from one fit; merged: (draws', severities).
    Returns subgroup -> lists over the severities and then their mean: `split`, `merged` (findings),
    `p_differ` (the evidence against condition (iii), NaN where the merged effect did not change),
    `threshold` (the level p_differ must be below) and `flagged`.
    """
    split = {name: _with_mean(effect) for name, effect in split.items()}
    merged = _with_mean(merged)
    n_sev, n_pairs = merged.shape[1], len(split) * (len(split) - 1) // 2
    thresholds = {}
    for a, b in itertools.combinations(split, 2):
        thresholds[a, b] = thresholds[b, a] = band_threshold(split[b] - split[a], alpha / n_pairs)
    merged_found = [posterior_finding(merged[:, s], alpha, margin) for s in range(n_sev)]
    result = {}
    for name, mine in split.items():
        found, p_differ, threshold, flagged = [], [], [], []
        for s in range(n_sev):
            found.append(posterior_finding(mine[:, s], alpha, margin))
            # The other subgroup whose effect lies furthest beyond this one's, relative to its pair's band.
            p, q = np.nan, min(thresholds[name, other] for other in split if other != name)
            if merged_found[s] in CHANGED:
                # Turned so that the merged direction reads "lowered": B's effect beyond A's is B - A < 0.
                sign = 1.0 if merged_found[s] == LOWERED else -1.0
                p, q = min(((float(np.mean(sign * (split[other][:, s] - mine[:, s]) >= 0)), thresholds[name, other])
                            for other in split if other != name), key=lambda pq: pq[0] / pq[1])
            p_differ.append(p)
            threshold.append(q)
            opposite = RAISED if merged_found[s] == LOWERED else LOWERED
            flagged.append(merged_found[s] in CHANGED and found[s] in (UNCHANGED, opposite) and p < q)
        result[name] = {"split": found, "merged": merged_found, "p_differ": p_differ, "flagged": flagged,
                        "threshold": threshold}
    return result


def band_threshold(difference: np.ndarray, level: float) -> float:
    """The one-sided tail probability q of a simultaneous credible band for every column of `difference`
    (draws, columns): the band from each column's q- to its (1 - q)-quantile holds in every column at
    once in a fraction 1 - level of the joint draws. A column's statement "beyond the band" then needs
    P(difference on the other side of 0) < q. The columns (severities) share the reference, so they
    are correlated and q lies between Bonferroni's level / (2 columns) and level / 2."""
    n = difference.shape[0]
    rank = difference.argsort(axis=0).argsort(axis=0)
    # Per draw, its most extreme one-sided tail over the columns; q: the largest with at most `level` below.
    extreme = np.sort(np.minimum(rank + 1, n - rank).min(axis=1) / n)
    return float(extreme[int(np.floor(level * n))])


def _with_mean(effect: np.ndarray) -> np.ndarray:
    return np.column_stack([effect, effect.mean(axis=1)])


class SimpsonsParadox:
    uses_posterior = True
    name = "simpsons_paradox"
    outputs = {"simpsons_paradox": COLUMNS}

    def check_spec(self, spec, where):
        if len(spec.subgroups.analyse) < 2:
            raise PerceptcoreError("the Simpson's-paradox check needs at least two analysed subgroups to merge",
                                   where)

    def check(self, study, where):
        self.check_spec(study.spec, where)

    def compute(self, study):
        split_grouping, merged_grouping = study.grouping("split"), study.grouping("merged")
        merged_name = merged_grouping.analysed[0]
        margins = study.spec.analyses.margins
        rows = []
        for observer in study.observers:
            for analysis, margin, effects in (("predictive_confidence", margins.gamma, _gamma_effects),
                                              ("bayesian_separability", margins.ks, _separability_effects)):
                split = effects(study, observer, split_grouping)
                merged = effects(study, observer, merged_grouping)[merged_name]
                for subgroup, r in check(split, merged, study.alpha, margin).items():
                    labels = [*study.severities[1:], MEAN]
                    rows.append(_row(observer, analysis, subgroup, merged_name, labels, r))
        return {"simpsons_paradox": pd.DataFrame(rows, columns=COLUMNS)}


def _gamma_effects(study, observer, grouping) -> dict:
    gamma = study.posterior(observer, grouping).draws["gamma"]
    return {s: gamma[:, 1:, grouping.group_names.index(s)] for s in grouping.analysed}


def _separability_effects(study, observer, grouping) -> dict:
    ks = study_mean_ks(study, observer, grouping)
    return {s: ks[:, 1:, k] - ks[:, :1, k] for k, s in enumerate(grouping.analysed)}


def _row(observer, analysis, subgroup, merged_name, labels, r) -> tuple:
    """One row; its single-severity columns describe the flagged severity with the strongest evidence,
    else the severity where the merged effect changed with the strongest evidence, else the last."""
    flagged = [s for s, f in enumerate(r["flagged"]) if f]
    candidates = flagged or [s for s, p in enumerate(r["p_differ"]) if np.isfinite(p)]
    s = min(candidates, key=lambda i: r["p_differ"][i]) if candidates else len(labels) - 1
    return (observer, analysis, subgroup, merged_name, ", ".join(str(labels[i]) for i in flagged), labels[s],
            r["split"][s], r["merged"][s], r["p_differ"][s], r["threshold"][s], bool(flagged))


@hookimpl
def perceptcore_register_metrics(register):
    register(SimpsonsParadox())
