"""The embedded backend: the latent model's posterior in PyTorch, with no C++ toolchain.

Two methods: `laplace` (the default; accurate, see _laplace.py) and `advi` (mean-field ADVI, the
published papers' method, kept to reproduce them; see _advi.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.latent_model import Fit, FitSettings, LatentModelData
from perceptcore.plugins import hookimpl

from . import _laplace
from ._advi import fit_advi
from ._laplace import PARETO_K_TRUSTED


class TorchBackend:
    """Laplace with importance sampling (default) or mean-field ADVI, in PyTorch."""

    name = "torch"
    methods = ("laplace", "advi")
    # `backend: auto` prefers it for the methods it has; CmdStan's backend serves the others.
    priority = 20

    def unavailable_reason(self) -> str | None:
        return None

    def fit(self, data: LatentModelData, settings: FitSettings, progress: Callable[[str], None] = lambda m: None) -> Fit:
        if settings.method not in self.methods:
            raise PerceptcoreError(f"the torch backend runs {' and '.join(self.methods)}, not {settings.method!r}; "
                                   "use backend 'stan' for it", "model.method")
        with _one_thread():
            if settings.method == "advi":
                return fit_advi(data, settings, progress)
            return fit_laplace(data, settings, progress)


def fit_laplace(data: LatentModelData, settings: FitSettings, progress: Callable[[str], None]) -> Fit:
    started = time.perf_counter()
    # At most 4 rounds of proposals per subgroup: an approximation that needs more is not one to trust.
    max_proposals = 4 * max(settings.draws, 1000)
    result = _laplace.fit(data, settings.draws, max_proposals, settings.seed, progress)
    blocks = [b for b in result["blocks"] if b["cases"] > 0]
    worst = max(blocks, key=lambda b: b["pareto_k"])
    ess = min(b["importance_ess"] for b in blocks)
    trusted = bool(worst["pareto_k"] <= PARETO_K_TRUSTED)
    verdict = "trusted" if trusted else f"NOT to be trusted (k-hat above {PARETO_K_TRUSTED})"
    note = (
        f"Laplace approximation of each subgroup's shared parameters (b, gamma, nu; delta with by-class case effects) with the case effects "
        f"integrated out by {_laplace.QUADRATURE_NODES}-node adaptive Gauss-Hermite quadrature, corrected by "
        f"Pareto-smoothed importance sampling (proposals in rounds until the importance ESS reaches half the "
        f"draws and k-hat is at most {PARETO_K_TRUSTED}, at most {max_proposals} per subgroup), {settings.draws} draws kept by systematic resampling; "
        f"case effects then drawn from their exact conditionals. Judged by the Pareto k-hat of the importance "
        f"weights (at most {PARETO_K_TRUSTED}: the correction can be trusted): worst k-hat "
        f"{worst['pareto_k']:.2f} (subgroup {worst['group'] + 1} of {data.n_groups}), smallest importance ESS "
        f"{ess:.0f}: {verdict}. log p(y) = {result['log_evidence']:.2f} (importance-sampling estimate)."
    )
    progress(f"torch Laplace: done, worst Pareto k-hat {worst['pareto_k']:.2f}")
    return Fit(
        backend="torch", method="laplace", parameterisation=data.parameterisation, draws=result["draws"],
        elbo=math.nan, log_evidence=result["log_evidence"], converged=trusted, convergence_note=note,
        diagnostics={"pareto_k": worst["pareto_k"], "importance_ess": ess,
                     "distinct_draws": min(b["distinct_draws"] for b in blocks),
                     "proposals": max(b["proposals"] for b in blocks)},
        seconds=time.perf_counter() - started,
    )


@contextlib.contextmanager
def _one_thread():
    """Run torch on one thread, restoring the caller's setting after.

    A fit's operations are small: too small to gain from a second thread, and on a busy 2-core
    machine two threads made fits 10-20 times slower (threads spin waiting for each other). Fits
    run in parallel processes instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@hookimpl
def perceptcore_register_backends(register):
    register(TorchBackend())
