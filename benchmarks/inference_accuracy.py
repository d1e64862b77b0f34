"""How close the embedded backend's methods come to NUTS on the published GMIC study.

Fits every observer group of `examples/perception_comparison/gmic.yaml` (split and merged subgroups)
with the torch backend's `laplace` (the default) and `advi` (the papers' method), and compares gamma
with the committed NUTS reference (`tests/data/nuts_reference_gmic.csv`, made by
`benchmarks/nuts_reference.py`) on every (observer group, subgroup, perturbed severity):

    python benchmarks/inference_accuracy.py [DATA_DIR] [--methods laplace advi]

It prints, per method: the largest |E[gamma] - NUTS| in NUTS posterior sds, the range of sd(gamma) /
NUTS sd, the largest |P(gamma > 0) - NUTS| (both from the normal approximation, as the tables report
it), how many cells land on the other side of 0.025 or 0.975 than NUTS, the worst Pareto k-hat,
and the fitting time (one process, one thread).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--methods", nargs="+", default=["laplace", "advi"])
    parser.add_argument("--reference", default=str(ROOT / "tests/data/nuts_reference_gmic.csv"))
    parser.add_argument("--rows", action="store_true", help="also print every cell")
    args = parser.parse_args()
    if not (Path(args.data_dir) / "exam_info.csv").exists():
        sys.exit(f"no published data folder at {args.data_dir}")

    from perceptcore.latent_model import normal_tail_above_zero
    from perceptcore.plugins import load_registry
    from perceptcore.run import Study
    from perceptcore.spec import load_spec

    reference = pd.read_csv(args.reference, dtype={"severity": str})
    for method in args.methods:
        spec = load_spec(ROOT / "examples/perception_comparison/gmic.yaml",
                         [f"data_dir={args.data_dir}", "model.backend=torch", f"model.method={method}"])
        study = Study(spec, load_registry(), progress=lambda message: None)
        rows, seconds, worst_k = [], 0.0, []
        for grouping in study.groupings:
            for observer in study.observers:
                started = time.perf_counter()
                fit = study.posterior(observer, grouping)
                seconds += time.perf_counter() - started
                worst_k.append(fit.diagnostics.get("pareto_k", np.nan))
                for subgroup in grouping.analysed:
                    gamma = fit.draws["gamma"][:, 1:, grouping.group_names.index(subgroup)]
                    mean, sd = gamma.mean(0), gamma.std(0, ddof=1)
                    for s, label in enumerate(study.severities[1:]):
                        rows.append((observer, subgroup, label, mean[s], sd[s], float(normal_tail_above_zero(mean[s], sd[s]))))
        ours = pd.DataFrame(rows, columns=["observer", "subgroup", "severity", "gamma_mean", "gamma_sd", "p"])
        both = ours.merge(reference, on=["observer", "subgroup", "severity"], suffixes=("", "_nuts"))
        z = (both["gamma_mean"] - both["gamma_mean_nuts"]).abs() / both["gamma_sd_nuts"]
        ratio = both["gamma_sd"] / both["gamma_sd_nuts"]
        dp = (both["p"] - both["p_gamma_gt0_normal"]).abs()

        def side(p):
            return np.where(p < 0.025, -1, np.where(p > 0.975, 1, 0))

        flipped = int((side(both["p"]) != side(both["p_gamma_gt0_normal"])).sum())
        print(f"{method}: {len(both)} cells; |E[gamma] - NUTS| <= {z.max():.3f} NUTS-sd (median {z.median():.3f}); "
              f"sd / NUTS sd in [{ratio.min():.3f}, {ratio.max():.3f}]; |P(gamma>0) - NUTS| <= {dp.max():.4f}; "
              f"{flipped} cells on another side of 0.025/0.975; worst Pareto k-hat {np.nanmax(worst_k):.2f}; "
              f"{seconds:.1f} s of fitting in one process", flush=True)
        if args.rows:
            print(both.assign(z=z, sd_ratio=ratio, dp=dp)[["observer", "subgroup", "severity", "z", "sd_ratio", "dp"]]
                  .to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
