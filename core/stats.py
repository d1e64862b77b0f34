"""Statistics shared by analyses: vectorised two-sample KS and the across-observer summary."""

from __future__ import annotations

import numpy as np
from scipy import stats

from .findings import finding


def ks_statistic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two-sample Kolmogorov-Smirnov statistic along the last axis, for every leading index.

    a (..., n1) and b (..., n2): returns (...). Equals scipy.stats.ks_2samp(...).statistic
    row by row, ties included, without a Python loop over rows.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    n1, n2 = a.shape[-1], b.shape[-1]
    values = np.concatenate([a, b], axis=-1)
    from_a = np.concatenate([np.ones(a.shape, bool), np.zeros(b.shape, bool)], axis=-1)
    order = np.argsort(values, axis=-1, kind="stable")
    values = np.take_along_axis(values, order, axis=-1)
    from_a = np.take_along_axis(from_a, order, axis=-1)
    gap = np.cumsum(from_a, axis=-1) / n1 - np.cumsum(~from_a, axis=-1) / n2
    # The ECDFs may only be compared after the last of a run of tied values.
    run_end = np.ones(values.shape, bool)
    run_end[..., :-1] = values[..., 1:] != values[..., :-1]
    return np.where(run_end, np.abs(gap), 0.0).max(axis=-1)


def separability_summary(ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Across observers, per severity: mean and sd of the KS statistics, and the one-tailed p-value.

    ks is (observers, severities), severity 0 the reference. The p-value of severity s is
    scipy's ks_2samp(ks[:, 0], ks[:, s], alternative='less'): small when perturbation
    lowers separability. It is NaN at the reference.
    """
    mean = ks.mean(axis=0)
    sd = ks.std(axis=0, ddof=1) if ks.shape[0] > 1 else np.full(ks.shape[1], np.nan)
    pvalue = np.full(ks.shape[1], np.nan)
    for s in range(1, ks.shape[1]):
        pvalue[s] = stats.ks_2samp(ks[:, 0], ks[:, s], alternative="less").pvalue
    return mean, sd, pvalue


def ks_pvalue_floor(n_reference: int, n_perturbed: int) -> float:
    """The smallest p-value a one-tailed two-sample KS test (either tail) can give with these sample sizes.

    Computed by scipy on perfectly separated samples, so it follows whichever method (exact or
    asymptotic) scipy uses at these sizes; with n per side and the exact method it is 1 / C(2n, n).
    """
    return float(stats.ks_2samp(np.ones(n_reference), np.zeros(n_perturbed), alternative="less").pvalue)


def separability_columns(ks: np.ndarray, alpha: float) -> dict[str, list]:
    """Per severity, the columns of a class-separability table: ks_mean, ks_sd, ks_pvalue (the published
    one-tailed test: small when separability is lowered), ks_pvalue_raised (the other tail),
    ks_pvalue_floor and the finding (findings.finding). ks is (observers, severities), severity 0 the
    reference, whose tests and finding are empty.
    """
    mean, sd, lowered = separability_summary(ks)
    raised = np.full(ks.shape[1], np.nan)
    for s in range(1, ks.shape[1]):
        raised[s] = stats.ks_2samp(ks[:, 0], ks[:, s], alternative="greater").pvalue
    floor = np.r_[np.nan, np.full(ks.shape[1] - 1, ks_pvalue_floor(ks.shape[0], ks.shape[0]))]
    found = [None] + [finding(lowered[s], raised[s], alpha, p_floor=floor[s]) for s in range(1, ks.shape[1])]
    return {"ks_mean": list(mean), "ks_sd": list(sd), "ks_pvalue": list(lowered), "ks_pvalue_raised": list(raised),
            "ks_pvalue_floor": list(floor), "finding": found}


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    ranks = stats.rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
