"""Calibrate the Simpson's-paradox check on simulated studies of the published size.

    python benchmarks/simpsons_calibration.py [--studies 200] [--paradox-studies 100] [--others 200]
                                              [--paradox-low -2 -3] [--design radiologists|dnns] [--workers 2]

Each study has the published subgroups (109 microcalcification cases, 22 malignant; 136
soft-tissue cases, 30 malignant) and --others of the other 1,195 negatives (200 by default: they
enter only the KS comparisons, since the posterior factorises over subgroups, and they dominate
the fitting time), 9 severities, 10 radiologists reading every case once at a uniformly drawn
severity (or 5 dense DNN seeds), and is fitted split and merged with the torch backend (`laplace`
when it has it). Two kinds of study:

  null:    both subgroups share one effect (gamma falling to --null-low), so no subgroup may be
           flagged: the check must flag at most alpha of them;
  paradox: microcalcifications fall to gamma = --paradox-low (each of them: -2 and -3 by default),
           soft-tissue lesions are unaffected (gamma = 0), so the merged group looks sensitive: the
           check must flag soft_tissue_lesions (and never microcalcifications) in at least 80 % of
           them at a stated effect size.

It prints, per analysis, the rate of studies flagged with its 95 % Clopper-Pearson interval, the
simulated true change of each subgroup's mean KS statistic (averaged over the perturbed severities
and the studies: the effect size separability is asked to detect), and the time taken. The simulation lives in tests/simulate.py (shared with tests/test_simpsons_paradox.py),
found beside this script whatever the working directory.
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

from simulate import paradox_flags, ramp, simulate_subgroup_study  # noqa: E402

from perceptcore.findings import CHANGED  # noqa: E402
from perceptcore.latent_model import FitSettings  # noqa: E402
from perceptcore.spec import AnalysesSection  # noqa: E402
from perceptcore.plugins import load_registry  # noqa: E402

SENSITIVE, INVARIANT = "microcalcifications", "soft_tissue_lesions"


def torch_backend():
    return load_registry().get("backend", "torch", "benchmark")


def scenarios(null_low: float, paradox_lows: tuple = (-2.0,)) -> dict:
    out = {"null": {SENSITIVE: ramp(null_low), INVARIANT: ramp(null_low)}}
    for low in paradox_lows:
        out[f"paradox {low:g}"] = {SENSITIVE: ramp(low), INVARIANT: ramp(0.0)}
    return out


def one_study(task: tuple) -> tuple:
    """(scenario, {analysis: {subgroup: flagged}}, true mean-KS changes {subgroup: float}, CPU seconds)
    of one simulated study, seeded by its task."""
    started = time.process_time()
    seed, i, k, design, method, null_low, paradox_lows, n_others = task
    name, gamma = list(scenarios(null_low, paradox_lows).items())[k]
    rng = np.random.default_rng([seed, i, k])
    split, merged, positive, truth = simulate_subgroup_study(rng, gamma, design, n_others)
    ks_change = dict(zip((SENSITIVE, INVARIANT), truth["ks_change"].mean(axis=0)))
    settings = FitSettings(method=method, draws=1000, seed=int(rng.integers(2**31)))
    analyses = AnalysesSection()
    result = paradox_flags(torch_backend(), settings, split, merged, positive, analyses.alpha, analyses.margins)
    flags = {a: {s: any(r["flagged"]) for s, r in per.items()} for a, per in result.items()}
    # The paradox's premise: the merged group looks sensitive (its effect changed at some severity).
    for a, per in result.items():
        flags[a]["premise"] = any(f in CHANGED for f in per[INVARIANT]["merged"])
    return name, flags, ks_change, time.process_time() - started


def run(n_studies: dict, design: str, method: str, null_low: float, paradox_lows: tuple, n_others: int,
        seed: int = 0, workers: int = 1, progress=print) -> dict:
    """Flag counts {scenario: {analysis: {"any" or subgroup: count}}}, the true mean-KS changes
    {scenario: {subgroup: [per study]}} under "ks_change", and `cpu` (seconds). n_studies: scenario ->
    studies; the scenarios alternate while several run."""
    names = scenarios(null_low, paradox_lows)
    counts = {name: {} for name in names}
    counts["cpu"] = 0.0
    counts["ks_change"] = {name: {SENSITIVE: [], INVARIANT: []} for name in names}
    tasks = [(seed, i, k, design, method, null_low, paradox_lows, n_others) for i in range(max(n_studies.values()))
             for k, name in enumerate(names) if i < n_studies[name]]
    context = multiprocessing.get_context("spawn")  # torch's thread pool does not survive a fork
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for done, (name, flags, ks_change, cpu) in enumerate(pool.map(one_study, tasks), 1):
            counts["cpu"] += cpu
            for subgroup, change in ks_change.items():
                counts["ks_change"][name][subgroup].append(change)
            for analysis, flagged in flags.items():
                tally = counts[name].setdefault(analysis, {"any": 0, SENSITIVE: 0, INVARIANT: 0, "premise": 0,
                                                           "premise_flagged": 0})
                premise = flagged.pop("premise")
                tally["any"] += any(flagged.values())
                tally["premise"] += premise
                tally["premise_flagged"] += premise and flagged[INVARIANT]
                for s, f in flagged.items():
                    tally[s] += f
            if done % 20 == 0:
                progress(f"  {done}/{len(tasks)} studies: " + "; ".join(
                    f"{name} {analysis} {t['any']} (mc {t[SENSITIVE]}, st {t[INVARIANT]})"
                    for name in names for analysis, t in counts[name].items()), flush=True)
        return counts


def interval(k: int, n: int) -> tuple[float, float]:
    """95 % Clopper-Pearson interval of a binomial rate."""
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return ci.low, ci.high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200, help="studies where the subgroups share the effect")
    parser.add_argument("--paradox-studies", type=int, default=100, help="studies with a real paradox")
    parser.add_argument("--design", choices=("radiologists", "dnns"), default="radiologists")
    parser.add_argument("--null-low", type=float, default=-1.0, help="the shared effect's lowest gamma")
    parser.add_argument("--paradox-low", type=float, nargs="+", default=[-2.0, -3.0],
                        help="the sensitive subgroup's lowest gamma in the paradox studies (one scenario each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--others", type=int, default=200,
                        help="negatives outside the analysed subgroups (published: 1195; fewer fit faster)")
    parser.add_argument("--method", help="the torch backend's method (default: laplace when it has it, else advi)")
    args = parser.parse_args()
    method = args.method or ("laplace" if "laplace" in torch_backend().methods else "advi")
    alpha = AnalysesSection().alpha
    margins = AnalysesSection().margins
    print(f"{args.studies} + {args.paradox_studies} studies, {args.design}, {args.others} other negatives, "
          f"torch {method}, alpha {alpha}, "
          f"margins gamma {margins.gamma}, KS {margins.ks}")
    start = time.perf_counter()
    paradox_lows = tuple(args.paradox_low)
    names = list(scenarios(args.null_low, paradox_lows))
    studies = {name: args.studies if name == "null" else args.paradox_studies for name in names}
    counts = run(studies, args.design, method, args.null_low, paradox_lows, args.others, args.seed, args.workers)
    seconds = time.perf_counter() - start
    for name in names:
        change = counts["ks_change"][name]
        print(f"{name}: true change of the mean KS statistic, averaged over the perturbed severities and "
              f"{studies[name]} studies: {SENSITIVE} {np.mean(change[SENSITIVE]):+.3f}, "
              f"{INVARIANT} {np.mean(change[INVARIANT]):+.3f}")
    for analysis in counts["null"]:
        null = counts["null"][analysis]
        n = studies["null"]
        lo, hi = interval(null["any"], n)
        print(f"{analysis}: null (shared effect to {args.null_low}): flagged {null['any']}/{n} = "
              f"{null['any'] / n:.3f} [95 % CI {lo:.3f}, {hi:.3f}] (claim <= {alpha})")
        for name in names[1:]:
            paradox, n = counts[name][analysis], studies[name]
            lo, hi = interval(paradox[INVARIANT], n)
            print(f"{analysis}: {name}: {INVARIANT} flagged {paradox[INVARIANT]}/{n} = {paradox[INVARIANT] / n:.3f} "
                  f"[95 % CI {lo:.3f}, {hi:.3f}]; {SENSITIVE} wrongly flagged {paradox[SENSITIVE]}/{n}")
            k, m = paradox["premise_flagged"], paradox["premise"]
            if m:
                lo, hi = interval(k, m)
                print(f"{analysis}: {name}, among the {m} studies whose merged effect changed at some severity (the "
                      f"paradox's premise): flagged {k}/{m} = {k / m:.3f} [95 % CI {lo:.3f}, {hi:.3f}]")
    total = sum(studies.values())
    print(f"{total} studies, {2 * total} fits in {seconds:.0f} s wall with {args.workers} workers, "
          f"{counts['cpu'] / total:.1f} CPU s per study")


if __name__ == "__main__":
    main()
