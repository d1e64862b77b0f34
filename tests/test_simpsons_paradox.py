"""The Simpson's-paradox check: its rule on hand-made draws, and its error rates on simulated studies."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from perceptcore.latent_model import FitSettings
from perceptcore.plugins import load_registry
from perceptcore.run import Grouping
from perceptcore.spec import AnalysesSection
from perceptcore_plugins.metrics.simpsons_paradox import SimpsonsParadox, band_threshold, check

try:
    from simulate import PUBLISHED_SUBGROUPS, paradox_flags, ramp, simulate_subgroup_study
except ImportError:  # tests/ made a package
    from tests.simulate import PUBLISHED_SUBGROUPS, paradox_flags, ramp, simulate_subgroup_study

ALPHA, MARGIN, D, S = 0.05, 0.7, 4000, 8


def normal(mean, sd, seed):
    """(D, S) draws of an effect N(mean, sd) at every severity."""
    return np.random.default_rng(seed).normal(mean, sd, size=(D, S))


def flags(a, b, merged):
    result = check({"a": a, "b": b}, merged, ALPHA, MARGIN)
    return all(result["a"]["flagged"]), any(result["a"]["flagged"]), any(result["b"]["flagged"])


def test_invariant_subgroup_hidden_by_merging_is_flagged_and_the_sensitive_one_is_not():
    a, b, merged = normal(0.0, 0.1, 1), normal(-2.0, 0.1, 2), normal(-1.0, 0.1, 3)
    every_a, any_a, any_b = flags(a, b, merged)
    assert every_a and not any_b


def test_raised_and_reversed_effects():
    assert flags(normal(0.0, 0.1, 1), normal(2.0, 0.1, 2), normal(1.0, 0.1, 3))[0]  # merged raised, a unchanged
    assert flags(normal(0.3, 0.05, 1), normal(-2.0, 0.1, 2), normal(-1.0, 0.1, 3))[0]  # a raised: a reversal


def test_no_flag_when_the_subgroups_share_the_effect():
    # merged "lowered", a "unchanged", but b is no lower than a: nothing to explain.
    assert not any(flags(normal(0.0, 0.1, 1), normal(0.0, 0.1, 2), normal(-1.0, 0.1, 3)))


def test_no_flag_when_the_subgroup_merely_shows_no_detectable_change():
    # The old rule flagged this (merged significant, subgroup not): a's sd 1 leaves its effect open, at
    # every severity and on average (one uncertain effect shared by the severities, as a shared reference makes it).
    a = np.repeat(normal(0.0, 1.0, 1)[:, :1], S, axis=1)
    b, merged = normal(-2.0, 0.1, 2), normal(-1.0, 0.1, 3)
    assert not any(flags(a, b, merged)[1:])


def test_no_flag_when_the_merged_effect_did_not_change():
    assert not any(flags(normal(0.0, 0.1, 1), normal(-2.0, 0.1, 2), normal(0.0, 0.1, 3)))


def test_false_flags_at_most_alpha_when_the_subgroups_share_the_effect():
    """Brute force: posteriors of a shared effect (each subgroup's draws centred on its own noisy estimate)
    flag at most alpha of the studies. Every study's merged effect is lowered and a is unchanged, so the
    rate is that of statement (iii) alone: the band's."""
    rng = np.random.default_rng(5)
    studies, flagged = 400, 0
    sd = np.linspace(0.05, 0.15, S)
    for _ in range(studies):
        truth = np.full(S, -0.3)
        estimate = {k: truth + rng.normal(0, sd) for k in "ab"}
        draws = {k: estimate[k] + rng.normal(0, sd, size=(1000, S)) for k in "ab"}
        result = check(draws, normal(-1.0, 0.1, 3), ALPHA, 0.7)
        flagged += any(any(r["flagged"]) for r in result.values())
    assert flagged <= stats.binom.ppf(0.995, studies, ALPHA)


def test_band_level_between_bonferroni_and_a_single_test():
    """band_threshold against brute force: independent severities need Sidak's level, identical ones none."""
    rng = np.random.default_rng(0)
    level, columns = 0.05, 9
    independent = rng.normal(size=(200_000, columns))
    sidak = (1 - (1 - level) ** (1 / columns)) / 2  # one-sided, per column
    assert band_threshold(independent, level) == pytest.approx(sidak, rel=0.05)
    identical = np.repeat(independent[:, :1], columns, axis=1)
    assert band_threshold(identical, level) == pytest.approx(level / 2, rel=0.02)
    # Correlated columns: the band holds at all columns at once in 1 - level of fresh draws.
    shared = rng.normal(size=(200_000, 1)) + 0.5 * rng.normal(size=(200_000, columns))
    q = band_threshold(shared, level)
    assert sidak * 1.5 < q < level / 2
    low, high = np.quantile(shared, q, axis=0), np.quantile(shared, 1 - q, axis=0)
    fresh = rng.normal(size=(200_000, 1)) + 0.5 * rng.normal(size=(200_000, columns))
    outside = ((fresh < low) | (fresh > high)).any(axis=1).mean()
    assert outside == pytest.approx(level, abs=0.003)


def test_difference_must_leave_the_band():
    """(iii) holds when P(b - a >= 0) is below the band's level, here that of identical columns."""
    a, merged = np.zeros((1000, S)), np.full((1000, S), -1.0)
    b = np.repeat(np.random.default_rng(1).normal(-1.0, 0.3, size=(1000, 1)), S, axis=1)
    result = check({"a": a, "b": b}, merged, ALPHA, MARGIN)
    q = result["a"]["threshold"][0]
    p = float(np.mean(b[:, 0] >= 0))
    assert q == pytest.approx(band_threshold(b - a, ALPHA), abs=1e-12)
    assert result["a"]["p_differ"] == [p] * (S + 1)
    assert all(result["a"]["flagged"]) is (p < q)
    shifted = b + 0.5  # the difference now reaches 0 in about 5 % of the draws: inside the band
    assert not any(check({"a": a, "b": shifted}, merged, ALPHA, MARGIN)["a"]["flagged"])


# --------------------------------------------------------------------------- calibration on simulated studies

STUDIES = 20


def bounds(n: int, alpha: float, detection: float, risk: float = 0.005) -> tuple[int, int]:
    """The most false flags and the fewest detections that a check meeting its claims (false-flag rate
    <= alpha, detection rate >= `detection`) produces in n studies except with probability < risk."""
    most = int(stats.binom.ppf(1 - risk, n, alpha))
    fewest = int(stats.binom.ppf(risk, n, detection))
    return most, fewest


@pytest.mark.slow
def test_error_rates_on_simulated_studies():
    """The benchmark's two scenarios (benchmarks/simpsons_calibration.py) with fewer studies and negatives:
    both analyses held to both claims (false flags <= alpha, detections >= 80 %), under the default
    by-class case effects (with pooled ones separability found about half of the paradoxes)."""
    backend = load_registry().get("backend", "torch", "test")
    method = "laplace" if "laplace" in backend.methods else "advi"
    analyses = AnalysesSection()
    sensitive, invariant = PUBLISHED_SUBGROUPS
    rng = np.random.default_rng(7)
    analysed = ("predictive_confidence", "bayesian_separability")
    false_flags, detections, wrong = ({a: 0 for a in analysed} for _ in range(3))
    for _ in range(STUDIES):
        for shared, gamma in ((True, {sensitive: ramp(-1.0), invariant: ramp(-1.0)}),
                              (False, {sensitive: ramp(-2.0), invariant: ramp(0.0)})):
            split, merged, positive, _ = simulate_subgroup_study(rng, gamma, n_others=100)
            settings = FitSettings(method=method, draws=1000, seed=int(rng.integers(2**31)))
            result = paradox_flags(backend, settings, split, merged, positive, analyses.alpha, analyses.margins)
            for analysis, per_subgroup in result.items():
                flagged = {s: any(r["flagged"]) for s, r in per_subgroup.items()}
                if shared:
                    false_flags[analysis] += any(flagged.values())
                else:
                    detections[analysis] += flagged[invariant]
                    wrong[analysis] += flagged[sensitive]
    most, fewest = bounds(STUDIES, analyses.alpha, 0.8)
    for analysis in analysed:
        assert false_flags[analysis] <= most and wrong[analysis] <= most, analysis
        assert detections[analysis] >= fewest, (analysis, detections[analysis], fewest)


class Study(SimpleNamespace):
    """A stand-in study, hashable and weakly referable like a real one."""

    __hash__ = object.__hash__


def test_table_names_the_flagged_severities():
    """Hand-made posteriors: a unchanged, b falling to -2, merged -1, at severities 1, 2 and 4."""
    rng = np.random.default_rng(0)
    n, draws = 40, 500
    split_group = np.arange(n) % 3  # a, b, and negatives of neither
    positive = (np.arange(n) % 2 == 0) & (split_group < 2)
    levels = {"split": [[0, 0, 0], [0, -2, 0], [0, -2, 0], [0, -2, 0]], "merged": [[0, 0], [-1, 0], [-1, 0], [-1, 0]]}

    def fit(grouping):
        g = len(grouping.group_names)
        gamma = np.asarray(levels[grouping.name], float)[None] + rng.normal(0, 0.05, size=(draws, 4, g))
        gamma[:, 0] = 0
        return SimpleNamespace(draws={"b": rng.normal(size=(draws, g)), "mu": rng.normal(size=(draws, n)),
                                      "gamma": gamma, "nu": rng.normal(size=(draws, 3, g))})

    groupings = [Grouping("split", ("a", "b"), ("a", "b", "other"), split_group),
                 Grouping("merged", ("a+b",), ("a+b", "other"), np.where(split_group < 2, 0, 1))]
    fits = {g.name: fit(g) for g in groupings}
    study = Study(groupings=groupings, grouping=lambda name: next(g for g in groupings if g.name == name),
                  observers={"obs": None}, severities=("0", "1", "2", "4"), alpha=ALPHA,
                  spec=SimpleNamespace(analyses=AnalysesSection()), cases=SimpleNamespace(positive=positive),
                  posterior=lambda observer, grouping: fits[grouping.name])
    table = SimpsonsParadox().compute(study)["simpsons_paradox"]
    assert list(table.columns) == list(SimpsonsParadox.outputs["simpsons_paradox"])
    rows = table[table.analysis == "predictive_confidence"].set_index("subgroup")
    a, b = rows.loc["a"], rows.loc["b"]
    assert a.differs and a.severities == "1, 2, 4, mean" and a.split_finding == "unchanged"
    assert a.merged_finding == "lowered" and a.merged_subgroup == "a+b"
    assert a.p_differ == 0 and ALPHA / 4 / 2 <= a.p_threshold <= ALPHA / 2  # 3 severities and their mean
    assert not b.differs and b.severities == "" and b.split_finding == "lowered" and b.p_differ == 1
    assert set(table.analysis) == {"predictive_confidence", "bayesian_separability"} and len(table) == 4
