"""The Simpson's-paradox check: does merging the subgroups show an effect that one of them credibly lacks?

Subgroup A shows the paradox at severity s when, all three judged by findings.finding() on posterior
draws of the effect (gamma for predictive confidence, Delta = mean KS change for class separability):

  (i)   the merged subgroup's effect at s is lowered (or raised);
  (ii)  A's effect at s is "unchanged" (inside the equivalence margin: a positive statement, not a
        mere failure to find an effect, which the merged group's larger sample produces by itself)
        or reversed (raised where the merged one is lowered, the textbook paradox);
  (iii) the other subgroup's effect credibly lies beyond A's in that direction: the finding of
        effect_B - effect_A is the merged one at level alpha / (severities x pairs of subgroups).
        Bonferroni: when the subgroups share one effect, each severity and pair can then flag a
        subgroup (A or B, one tail each) with probability at most alpha / (severities x pairs), so
        the study flags with probability at most alpha, whatever (i) and (ii) do.

A subgroup is flagged (`differs`) when any severity shows it. benchmarks/simpsons_calibration.py
measures both error rates on simulated studies of the published size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from perceptcore.errors import PerceptcoreError
from perceptcore.findings import CHANGED, LOWERED, RAISED, UNCHANGED, finding, posterior_finding
from perceptcore.plugins import hookimpl
from perceptcore_plugins.metrics.bayesian_separability import study_mean_ks

COLUMNS = ("observer", "analysis", "subgroup", "merged_subgroup", "severities", "severity", "split_finding",
           "merged_finding", "p_differ", "p_threshold", "differs")


def check(split: dict, merged: np.ndarray, alpha: float, margin: float) -> dict:
    """The paradox check of every subgroup on draws of its effect.

    split: subgroup -> (draws, severities) joint draws from one fit; merged: (draws', severities).
    Returns subgroup -> per-severity lists `split`, `merged` (findings), `p_differ` (the evidence
    against condition (iii), NaN where the merged effect did not change), `flagged`; and `threshold`,
    the one-sided level p_differ must be below.
    """
    n_sev, n_pairs = merged.shape[1], len(split) * (len(split) - 1) // 2
    level = alpha / (n_sev * n_pairs)
    merged_found = [posterior_finding(merged[:, s], alpha, margin) for s in range(n_sev)]
    result = {}
    for name, mine in split.items():
        others = [effect for other, effect in split.items() if other != name]
        found, p_differ, flagged = [], [], []
        for s in range(n_sev):
            found.append(posterior_finding(mine[:, s], alpha, margin))
            p, differs = np.nan, False
            if merged_found[s] in CHANGED:
                # Turned so that the merged direction reads "lowered": B's effect beyond A's is B - A < 0.
                sign = 1.0 if merged_found[s] == LOWERED else -1.0
                evidence = []
                for other in others:
                    beyond = sign * (other[:, s] - mine[:, s])
                    evidence.append(float(np.mean(beyond >= 0)))
                    differs |= finding(evidence[-1], float(np.mean(beyond <= 0)), level) == LOWERED
                p = min(evidence)
            p_differ.append(p)
            opposite = RAISED if merged_found[s] == LOWERED else LOWERED
            flagged.append(merged_found[s] in CHANGED and found[s] in (UNCHANGED, opposite) and differs)
        result[name] = {"split": found, "merged": merged_found, "p_differ": p_differ, "flagged": flagged,
                        "threshold": level / 2}
    return result


class SimpsonsParadox:
    uses_posterior = True
    name = "simpsons_paradox"
    outputs = {"simpsons_paradox": COLUMNS}

    def check(self, study, where):
        if len(study.spec.subgroups.analyse) < 2:
            raise PerceptcoreError("the Simpson's-paradox check needs at least two analysed subgroups to merge",
                                   where)

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
                    rows.append(_row(observer, analysis, subgroup, merged_name, study.severities[1:], r))
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
            r["split"][s], r["merged"][s], r["p_differ"][s], r["threshold"], bool(flagged))


@hookimpl
def perceptcore_register_metrics(register):
    register(SimpsonsParadox())
