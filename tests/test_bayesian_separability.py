"""Bayesian separability against KS statistics computed draw by draw with SciPy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from scipy.stats import ks_2samp

from perceptcore.findings import finding
from perceptcore.run import Grouping
from perceptcore_plugins.metrics.bayesian_separability import BayesianSeparability, mean_ks_draws

D, R, S, G, N = 30, 3, 4, 3, 60


def random_draws(seed=0):
    rng = np.random.default_rng(seed)
    case_group = rng.permutation(np.arange(N) % G)
    positive = rng.random(N) < 0.4
    draws = {"b": rng.normal(size=(D, G)), "mu": rng.normal(size=(D, N)) + 1.5 * positive,
             "gamma": np.concatenate([np.zeros((D, 1, G)), rng.normal(size=(D, S - 1, G))], axis=1),
             "nu": rng.normal(size=(D, R, G))}
    return draws, case_group, positive


def scipy_mean_ks(draws, case_group, positive, members):
    """(D, S): per draw, the readers' mean SciPy KS statistic of the predictive probabilities."""
    out = np.empty((D, S))
    for d in range(D):
        for s in range(S):
            ks = []
            for r in range(R):
                g = case_group
                p = 1 / (1 + np.exp(-(draws["b"][d, g] + draws["mu"][d] + draws["gamma"][d, s, g]
                                      + draws["nu"][d, r, g])))
                ks.append(ks_2samp(p[members & positive], p[~positive]).statistic)
            out[d, s] = np.mean(ks)
    return out


def test_mean_ks_draws_equals_scipy_per_draw():
    draws, case_group, positive = random_draws()
    subgroups = [case_group == 0, case_group == 1, case_group <= 1]  # the last spans two groups
    got = mean_ks_draws(draws, case_group, positive, subgroups)
    for k, members in enumerate(subgroups):
        np.testing.assert_allclose(got[..., k], scipy_mean_ks(draws, case_group, positive, members), atol=1e-12)


class Study(SimpleNamespace):
    """A stand-in study, hashable and weakly referable like a real one (the metric caches per study)."""

    __hash__ = object.__hash__


def test_table_summarises_the_per_draw_changes():
    draws, case_group, positive = random_draws(1)
    grouping = Grouping("split", ("a", "b"), ("a", "b", "c"), case_group)
    margin, alpha = 0.1, 0.05
    study = Study(
        groupings=[grouping], observers={"obs": None}, severities=("0", "1", "2", "4"), alpha=alpha,
        spec=SimpleNamespace(analyses=SimpleNamespace(margins=SimpleNamespace(ks=margin))),
        cases=SimpleNamespace(positive=positive), posterior=lambda o, g: SimpleNamespace(draws=draws))
    table = BayesianSeparability().compute(study)["bayesian_separability"]
    assert list(table["subgroup"]) == ["a"] * S + ["b"] * S
    for k, name in enumerate(("a", "b")):
        ks = scipy_mean_ks(draws, case_group, positive, case_group == k)
        rows = table[table["subgroup"] == name]
        np.testing.assert_allclose(rows["ks_mean"], ks.mean(axis=0))
        delta = ks[:, 1:] - ks[:, :1]
        np.testing.assert_allclose(rows["delta_mean"].iloc[1:], delta.mean(axis=0))
        np.testing.assert_allclose(rows["p_lower"].iloc[1:], (delta < 0).mean(axis=0))
        np.testing.assert_allclose(rows["p_outside_margin"].iloc[1:], (np.abs(delta) >= margin).mean(axis=0))
        expected = [finding((x >= 0).mean(), (x <= 0).mean(), alpha, 0.0, (np.abs(x) >= margin).mean())
                    for x in delta.T]
        assert list(rows["finding"].iloc[1:]) == expected
        assert np.isnan(rows["delta_mean"].iloc[0])
