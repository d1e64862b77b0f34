"""How often each posterior finding is wrong, and how often it is found, on simulated studies.

    python benchmarks/finding_calibration.py [--studies 100] [--design radiologists|dnns]

Simulates studies of the published size (tests/simulate.py: 109 microcalcification cases, 22
malignant; 136 soft-tissue, 30 malignant; other negatives; 9 severities) with the torch backend's
default method, in two scenarios:

  null:   no effect in either subgroup (gamma = 0 at every severity);
  effect: gamma falls linearly to -1.5 at the fifth severity and stays there, in both subgroups.

For predictive confidence (gamma) and Bayesian separability (Delta) it prints, with 95 %
Clopper-Pearson intervals:
  - false "lowered"/"raised" per severity under the null (the two-sided level alpha is the claim),
    and the share of studies with at least one at any severity (not corrected for the 8 severities:
    the report's per-severity findings are per-severity statements);
  - "unchanged" under the null (the power of the equivalence statement) and wrongly "unchanged"
    where the true effect lies beyond the margin (at most alpha is the claim; for Delta the truth is
    the simulated readers' mean KS change, tests/simulate.py);
  - "lowered" under the effect (power), per severity;
  - the coverage of the central 95 % credible interval (the true effect inside it), per scenario.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from simulate import PUBLISHED_SUBGROUPS, ramp, simulate_subgroup_study  # noqa: E402

from perceptcore.findings import posterior_finding  # noqa: E402
from perceptcore.latent_model import FitSettings  # noqa: E402
from perceptcore.plugins import load_registry  # noqa: E402
from perceptcore.spec import AnalysesSection  # noqa: E402

SCENARIOS = {"null": 0.0, "effect": -1.5}


def one_study(task: tuple) -> tuple:
    """Findings of one simulated study: {analysis: (subgroups, severities) array of finding names}."""
    from perceptcore_plugins.metrics.bayesian_separability import mean_ks_draws

    seed, i, name, design, n_others = task
    rng = np.random.default_rng([seed, i, list(SCENARIOS).index(name)])
    gamma = {subgroup: ramp(SCENARIOS[name]) for subgroup in PUBLISHED_SUBGROUPS}
    split, _, positive, truth = simulate_subgroup_study(rng, gamma, design, n_others)
    backend = load_registry().get("backend", "torch", "benchmark")
    fit = backend.fit(split, FitSettings(draws=1000, seed=int(rng.integers(2**31))), lambda m: None)
    analyses = AnalysesSection()
    ks = mean_ks_draws(fit.draws, split.case_group, positive, [split.case_group == k for k in (0, 1)])
    true_gamma = np.column_stack([gamma[s][1:] for s in PUBLISHED_SUBGROUPS])  # (S - 1, 2)
    effects = {"predictive_confidence": (fit.draws["gamma"][:, 1:, :2], analyses.margins.gamma, true_gamma),
               "bayesian_separability": (ks[:, 1:, :] - ks[:, :1, :], analyses.margins.ks, truth["ks_change"])}
    out = {}
    for analysis, (draws, margin, true) in effects.items():
        found = np.array([[posterior_finding(draws[:, s, k], analyses.alpha, margin)
                           for s in range(draws.shape[1])] for k in range(2)])
        low, high = np.quantile(draws, [0.025, 0.975], axis=0)  # (S - 1, 2)
        out[analysis] = {"found": found, "truth": true.T, "covered": ((low <= true) & (true <= high)).T}
    return name, out, fit.converged


def rate(k: int, n: int) -> str:
    lo, hi = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return f"{k}/{n} = {k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100, help="studies per scenario")
    parser.add_argument("--design", default="radiologists", choices=("radiologists", "dnns"))
    parser.add_argument("--others", type=int, default=200, help="other negative cases (published: 1,195)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261129)
    args = parser.parse_args()
    started = time.perf_counter()
    tasks = [(args.seed, i, name, args.design, args.others) for name in SCENARIOS for i in range(args.studies)]
    results = {name: [] for name in SCENARIOS}
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, found, trusted in pool.map(one_study, tasks):
            results[name].append(found)
    alpha = AnalysesSection().alpha
    print(f"{args.studies} studies per scenario, design {args.design}, {args.others} other negatives, alpha {alpha}, "
          f"{time.perf_counter() - started:.0f} s")
    for analysis in ("predictive_confidence", "bayesian_separability"):
        null = np.stack([r[analysis]["found"] for r in results["null"]])  # (studies, subgroups, severities)
        effect = np.stack([r[analysis]["found"] for r in results["effect"]])
        n = null.shape[0] * null.shape[1]
        changed = np.isin(null, ("lowered", "raised"))
        print(f"{analysis}:")
        print(f"  null, per severity, false lowered/raised: "
              + "; ".join(rate(int(changed[:, :, s].sum()), n) for s in range(null.shape[2])))
        print(f"  null, any of the {null.shape[2]} severities: {rate(int(changed.any(axis=2).sum()), n)}")
        unchanged = null == "unchanged"
        print(f"  null, 'unchanged' (equivalence power), per severity: "
              + "; ".join(rate(int(unchanged[:, :, s].sum()), n) for s in range(null.shape[2])))
        margin = getattr(AnalysesSection().margins, "gamma" if analysis == "predictive_confidence" else "ks")
        found = np.concatenate([null, effect])
        truth = np.stack([r[analysis]["truth"] for name in SCENARIOS for r in results[name]])
        beyond = np.abs(truth) >= margin
        wrong = (found == "unchanged")[beyond]
        print(f"  wrongly 'unchanged' where the true |effect| >= margin {margin}: {rate(int(wrong.sum()), wrong.size)}")
        for name in SCENARIOS:
            covered = np.stack([r[analysis]["covered"] for r in results[name]])
            print(f"  {name}, true effect inside the 95 % credible interval: {rate(int(covered.sum()), covered.size)}")
        lowered = effect == "lowered"
        print(f"  effect, 'lowered' (power), per severity: "
              + "; ".join(rate(int(lowered[:, :, s].sum()), n) for s in range(effect.shape[2])))


if __name__ == "__main__":
    main()
