"""Make the NUTS reference posterior of the published GMIC study with PyStan.

Fits the latent model of every observer group of `examples/perception_comparison/gmic.yaml`
(split and merged subgroups, the spec's parameterisation) with Stan's NUTS through PyStan,
long chains, and writes the summary of gamma that the tests and `benchmarks/inference_accuracy.py`
compare perceptcore's default method with. The posterior factorises over subgroups (each prediction
involves its case's subgroup's parameters only; the priors are independent), so each analysed
subgroup is fitted on its own cases (`LatentModelData.only_subgroup`): the same posterior of its
gamma at a fraction of the cost (the non-biopsied cases are three quarters of the data).

    python benchmarks/nuts_reference.py [DATA_DIR] [--chains 4] [--warmup 1000] [--draws 2500]
        [--out tests/data/nuts_reference_gmic.csv]

It refuses to write a reference whose chains disagree (R-hat above 1.01) or whose bulk or tail
ESS of gamma is below 400. DATA_DIR is the published data folder (default:
../shared/data/perception_comparison/published). About an hour on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared/data/perception_comparison/published"
COLUMNS = ("observer", "grouping", "subgroup", "severity", "gamma_mean", "gamma_sd", "p_gamma_gt0_normal",
           "p_gamma_gt0_draws", "rhat", "ess_bulk", "ess_tail", "draws")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000, help="draws per chain kept after warm-up")
    parser.add_argument("--seed", type=int, default=20261129)
    parser.add_argument("--out", default=str(ROOT / "tests/data/nuts_reference_gmic.csv"))
    parser.add_argument("--only", help="fit only this observer group (for a quick look)")
    args = parser.parse_args()
    if not (Path(args.data_dir) / "exam_info.csv").exists():
        sys.exit(f"no published data folder at {args.data_dir}")

    import arviz as az
    import stan

    from perceptcore.latent_model import normal_tail_above_zero, stan_file
    from perceptcore.plugins import load_registry
    from perceptcore.run import Study
    from perceptcore.spec import load_spec

    spec = load_spec(ROOT / "examples/perception_comparison/gmic.yaml", [f"data_dir={args.data_dir}"])
    study = Study(spec, load_registry(), progress=lambda message: None)
    (parameterisation,) = spec.model.parameterisations
    code = stan_file().read_text()
    rows = []
    fits = [(observer, grouping, subgroup) for observer in study.observers for grouping in study.groupings
            for subgroup in grouping.analysed if not args.only or observer == args.only]
    for observer, grouping, subgroup in fits:
        data = study.model_data(observer, grouping, parameterisation).only_subgroup(
            grouping.group_names.index(subgroup))
        started = time.perf_counter()
        model = stan.build(code, data=data.stan_data(), random_seed=args.seed)
        fit = model.sample(num_chains=args.chains, num_warmup=args.warmup, num_samples=args.draws)
        # PyStan gives (S, 1, chains * draws), one chain's draws after another -> (chain, draw, S).
        gamma = np.asarray(fit["gamma"]).reshape(data.n_severities, args.chains, args.draws).transpose(1, 2, 0)
        for s, label in enumerate(study.severities[1:], start=1):
            x = gamma[:, :, s]
            mean, sd = float(x.mean()), float(x.std(ddof=1))
            rows.append((observer, grouping.name, subgroup, label, mean, sd, float(normal_tail_above_zero(mean, sd)),
                         float((x > 0).mean()), float(az.rhat(x)), float(az.ess(x, method="bulk")),
                         float(az.ess(x, method="tail")), x.size))
        done = pd.DataFrame(rows[-(len(study.severities) - 1):], columns=COLUMNS)
        print(f"{observer} ({grouping.name}, {subgroup}): {time.perf_counter() - started:.0f} s, max R-hat "
              f"{done.rhat.max():.4f}, min bulk ESS {done.ess_bulk.min():.0f}, min tail ESS {done.ess_tail.min():.0f}",
              flush=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bad = table[(table.rhat > 1.01) | (table.ess_bulk < 400) | (table.ess_tail < 400)]
    if len(bad):
        print(bad.to_string(), file=sys.stderr)
        rejected = out.with_suffix(".rejected.csv")
        table.to_csv(rejected, index=False, float_format="%.6g")
        sys.exit(f"the chains do not meet R-hat <= 1.01 and ESS >= 400; wrote {rejected} to look at, not {out} "
                 "(run longer chains)")
    table.to_csv(out, index=False, float_format="%.6g")
    print(f"wrote {out}: {len(table)} rows")


if __name__ == "__main__":
    main()
