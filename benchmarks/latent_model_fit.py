"""Time one torch ADVI fit of the latent model at the sizes of the published study.

    python benchmarks/latent_model_fit.py [--repeat 3]

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
from perceptcore_plugins.backends.torch_advi import TorchAdviBackend  # noqa: E402

SIZES = {
    "published DNNs (soft, dense)": dict(n_cases=1440, n_readers=5, n_severities=9, n_groups=5, soft=True),
    "radiologists (binary, sparse)": dict(
        n_cases=1440, n_readers=10, n_severities=9, n_groups=5, soft=False, sparse=True
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fits per size (different seeds)")
    args = parser.parse_args()
    backend = TorchAdviBackend()
    for label, size in SIZES.items():
        data, _ = simulate_study(np.random.default_rng(0), **size)
        wall, cpu = [], []
        for seed in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            fit = backend.fit(data, FitSettings(seed=seed))
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        print(
            f"{label}: M={data.n_predictions}, {fit.diagnostics['iterations']} iterations, "
            f"wall {np.median(wall):.2f} s (min {min(wall):.2f}), CPU {np.median(cpu):.2f} s per fit, "
            f"converged={fit.converged}, ELBO {fit.elbo:.1f}"
        )


if __name__ == "__main__":
    main()
