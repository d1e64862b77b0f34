"""Time and memory of one latent-model fit as the study grows: 1x, 10x and 100x the published size.

    python benchmarks/fit_scale.py [--multiples 1 10 100] [--designs sparse dense] [--draws 1000] [--seed 0]

The published study: 720 exams = 1,440 cases (breasts) in three subgroups (109 microcalcification
cases, 136 soft-tissue-lesion cases, 1,195 others), 9 severities. Two designs, as in the published
study's observer groups:

  sparse: 10 radiologists each read every exam once at one uniformly drawn severity, 0/1 calls
          (10 calls per case: M = 14,400 at 1x, 1,440,000 at 100x);
  dense:  5 DNN seeds predict every case at every severity, probabilities
          (45 predictions per case: M = 64,800 at 1x, 6,480,000 at 100x).

A study k times the published size has k times the cases of every subgroup (the readers, seeds and
severities stay). It is simulated from the latent model (tests/simulate.py's simulate_study, found
beside this script whatever the working directory; about 30 % positive cases, whose effects have a
mean of their own, as under the default `by_class` case effects) and fitted by the torch backend's default
method (`laplace`) with `draws` posterior draws, each fit in a fresh spawned process that simulates its
study and then fits it, so the peak memory is that process's own: resource.getrusage's ru_maxrss
(the high-water mark of the resident set, the simulated data included; the resident set just
before the fit is printed beside it). Wall and CPU time (time.process_time of the process, all its
threads; the torch backend fits on one thread) are of the fit alone (ArviZ, which a fit imports, is
imported before). Per size it prints the cost per 1,000 cases and, from one size to the next, the
growth exponent of the time and memory (1 = linear), the fit's own diagnostic (trusted = Pareto k-hat <= 0.7 in every subgroup) and how well the posterior
recovers the simulated parameters: max over (severity > 0, subgroup) of |E[gamma] - true gamma| /
sd(gamma) (below about 3 for 24 cells of a calibrated posterior), the slope of E[gamma] on the true
gamma (1: no shrinkage or inflation) and the root mean square of the z-score of the case effects mu
(about 1 when calibrated).

In the dense design the model is not the one that made the data: the soft Bernoulli likelihood of
probabilities drawn from Beta(3p, 3(1 - p)) is a quasi-likelihood, flatter than the probabilities'
real spread, so the case effects' posterior is about twice too wide (rms mu z-score about 0.6) and
the estimates of gamma come out shrunk by 1-2 % (slope 0.98-0.99 in 3 seeds at 10x and at 100x),
which at 100x is a few posterior sd: a property of the model at that size, not of the fit (with 0/1
predictions the same design gave slopes 0.99-1.01 and calibrated z-scores).

The goal (issue 13): at 100x, each fit within 5 minutes and 8 GB on 2 cores, the cost growing
linearly with the size.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from simulate import PUBLISHED_SUBGROUPS, PUBLISHED_OTHERS, simulate_study  # noqa: E402

PUBLISHED_GROUPS = tuple(n for n, _ in PUBLISHED_SUBGROUPS.values()) + (PUBLISHED_OTHERS,)  # 109, 136, 1195
DESIGNS = {
    "sparse": dict(n_readers=10, n_severities=9, soft=False, sparse=True),
    "dense": dict(n_readers=5, n_severities=9, soft=True, sparse=False),
}


def simulated(design: str, multiple: int, seed: int):
    sizes = [n * multiple for n in PUBLISHED_GROUPS]
    return simulate_study(np.random.default_rng([seed, multiple, list(DESIGNS).index(design)]), sum(sizes),
                          n_groups=len(sizes), group_sizes=sizes, by_class=True, **DESIGNS[design])


def _rss_mib() -> float:
    """The resident set now (Linux: /proc/self/statm), in MiB; nan elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return math.nan


def one_fit(task: tuple) -> dict:
    """Simulate one study and fit it (run in a fresh process): times, memory, diagnostics, recovery."""
    design, multiple, draws, seed = task
    import arviz  # noqa: F401  (imported by the first fit in a process: 1-2 s that are not the fit's)

    from perceptcore.latent_model import FitSettings
    from perceptcore_plugins.backends.torch_backend import TorchBackend

    data, truth = simulated(design, multiple, seed)
    rss_before = _rss_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    fit = TorchBackend().fit(data, FitSettings(method="laplace", draws=draws, seed=seed))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gamma = fit.draws["gamma"][:, 1:, :]
    true = truth["gamma"][1:]
    gamma_z = np.abs(gamma.mean(0) - true) / gamma.std(0, ddof=1)
    mu = fit.draws["mu"]
    mu_z = np.concatenate([(mu[:, sl].mean(0) - truth["mu"][sl]) / mu[:, sl].std(0, ddof=1)
                           for sl in (slice(i, i + 10_000) for i in range(0, mu.shape[1], 10_000))])
    return {"design": design, "multiple": multiple, "cases": data.n_cases, "predictions": data.n_predictions,
            "wall": wall, "cpu": cpu, "peak_mib": peak, "rss_before_mib": rss_before,
            "trusted": fit.converged, "pareto_k": fit.diagnostics["pareto_k"],
            "importance_ess": fit.diagnostics["importance_ess"], "proposals": fit.diagnostics["proposals"],
            "gamma_z_max": float(gamma_z.max()), "gamma_slope": float(np.sum(gamma.mean(0) * true) / np.sum(true**2)),
            "mu_z_rms": float(np.sqrt(np.mean(mu_z**2)))}


def in_fresh_process(task: tuple) -> dict:
    # spawn: a fresh interpreter per fit, so ru_maxrss is this fit's alone (torch's threads do not survive a fork)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(one_fit, task).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 10, 100],
                        help="sizes as multiples of the published study's 1,440 cases")
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=list(DESIGNS))
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; laplace, {args.draws} draws, one torch thread per fit, "
          f"seed {args.seed}; one fresh process per fit; peak = ru_maxrss of that process", flush=True)
    for design in args.designs:
        rows = []
        for multiple in sorted(args.multiples):
            r = in_fresh_process((design, multiple, args.draws, args.seed))
            rows.append(r)
            per = 1000 / r["cases"]
            print(f"{design} {multiple:>4}x: {r['cases']:>7} cases, {r['predictions']:>8} predictions: "
                  f"wall {r['wall']:8.1f} s, CPU {r['cpu']:8.1f} s, peak {r['peak_mib']:7.0f} MiB "
                  f"({r['rss_before_mib']:.0f} MiB before the fit); per 1,000 cases: wall {r['wall'] * per:.2f} s, "
                  f"CPU {r['cpu'] * per:.2f} s, {(r['peak_mib'] - r['rss_before_mib']) * per:.1f} MiB above the "
                  f"data; trusted={r['trusted']} (worst k-hat {r['pareto_k']:.2f}, smallest importance ESS "
                  f"{r['importance_ess']:.0f} of {r['proposals']}); max |E[gamma] - true| / sd "
                  f"{r['gamma_z_max']:.2f}, slope of E[gamma] on true {r['gamma_slope']:.4f}, rms mu z "
                  f"{r['mu_z_rms']:.2f}", flush=True)
        for a, b in zip(rows, rows[1:]):
            growth = lambda key: math.log(b[key] / a[key]) / math.log(b["cases"] / a["cases"])  # noqa: E731
            print(f"{design} {a['multiple']}x -> {b['multiple']}x: cost grows as size^{growth('wall'):.2f} (wall), "
                  f"size^{growth('cpu'):.2f} (CPU), peak memory as size^{growth('peak_mib'):.2f}", flush=True)
        for r in rows:
            if r["multiple"] == 100:
                ok = r["wall"] <= 300 and r["peak_mib"] <= 8 * 1024
                print(f"{design} 100x: goal <= 300 s and <= 8 GiB: {'met' if ok else 'NOT met'}", flush=True)


if __name__ == "__main__":
    main()
