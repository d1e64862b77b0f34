"""Time one fit of the latent model at the sizes of the published study, per torch method.

    python benchmarks/latent_model_fit.py [--repeat 3] [--methods laplace advi]

The methods' fits alternate within each repetition (same process, one thread), so they see the
same machine.

DNNs: 1,440 cases, 5 seeds, 9 severities, 5 subgroups, dense soft predictions
(M = 64,800). Radiologists: 10 readers, each reading every exam pair at one random
severity, binary calls (M = 14,400). A study needs about 12 such fits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from simulate import simulate_study  # noqa: E402

from perceptcore.latent_model import FitSettings  # noqa: E402
from perceptcore_plugins.backends.torch_backend import TorchBackend  # noqa: E402

SIZES = {
    "published DNNs (soft, dense)": dict(n_cases=1440, n_readers=5, n_severities=9, n_groups=5, soft=True),
    "radiologists (binary, sparse)": dict(
        n_cases=1440, n_readers=10, n_severities=9, n_groups=5, soft=False, sparse=True
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fits per size and method (different seeds)")
    parser.add_argument("--methods", nargs="+", default=["laplace", "advi"])
    args = parser.parse_args()
    backend = TorchBackend()
    for label, size in SIZES.items():
        data, _ = simulate_study(np.random.default_rng(0), **size, by_class=True)  # the default model
        wall = {m: [] for m in args.methods}
        last = {}
        for seed in range(args.repeat):
            for method in args.methods:
                w0 = time.perf_counter()
                last[method] = backend.fit(data, FitSettings(method=method, seed=seed))
                wall[method].append(time.perf_counter() - w0)
        for method in args.methods:
            fit = last[method]
            print(f"{label}, {method}: M={data.n_predictions}, wall {np.median(wall[method]):.2f} s per fit "
                  f"(min {min(wall[method]):.2f}), trusted={fit.converged}, "
                  + ", ".join(f"{k} {v:.3g}" for k, v in fit.diagnostics.items()))


if __name__ == "__main__":
    main()
