"""The latent model in CmdStan through cmdstanpy: ADVI, NUTS and Pathfinder.

Preferred (priority 10) wherever CmdStan is installed, because NUTS gives the
accurate posterior the papers' ADVI only approximated.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from perceptcore.errors import PerceptcoreError
from perceptcore.latent_model import Fit, FitSettings, LatentModelData, stan_file

_INSTALL_HINT = "install it with `python -m cmdstanpy.install_cmdstan` (needs a C++ toolchain and internet access)"
_PARAMETERS = ("b", "mu", "gamma_free", "nu")  # the parameters block: all unconstrained


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "perceptcore" / "cmdstan"


def _compiled_model(progress: Callable[[str], None]):
    """The CmdStanModel of the shipped program, compiled once per program and CmdStan.

    cmdstanpy builds the executable beside the .stan file and rebuilds it only when
    the file is newer, so a copy in a cache directory keyed by the program text
    and the CmdStan version is compiled exactly once (the package directory may
    not be writable).
    """
    import cmdstanpy

    code = stan_file().read_text()
    version = Path(cmdstanpy.cmdstan_path()).name  # e.g. cmdstan-2.36.0
    key = hashlib.sha256(code.encode()).hexdigest()[:16]
    directory = _cache_dir() / f"{version}-{key}"
    program = directory / "latent_model.stan"
    if not program.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"latent_model.stan.{os.getpid()}.tmp"
        tmp.write_text(code)
        tmp.replace(program)  # atomic, so a parallel run never sees half a file
    if not (directory / ("latent_model" + (".exe" if os.name == "nt" else ""))).exists():
        progress("stan: compiling the latent model (once per CmdStan version, about a minute)")
    try:
        return cmdstanpy.CmdStanModel(stan_file=str(program))
    except Exception as exc:  # compiler missing or broken toolchain
        raise PerceptcoreError(f"CmdStan could not compile the latent model: {exc}", "backend stan") from exc


def _draws(fit, data: LatentModelData, **kwargs) -> dict:
    """Stan's variables (draws first; matrices as (D, rows, cols)) in the Fit layout.

    Stan's gamma is the transformed parameter, reference row of zeros included.
    The reshape restores size-1 dimensions cmdstanpy may squeeze.
    """
    out = {k: np.asarray(fit.stan_variable(k, **kwargs), dtype=float) for k in ("b", "mu", "gamma", "nu")}
    D = out["b"].shape[0]
    shapes = {
        "b": (D, data.n_groups),
        "mu": (D, data.n_cases),
        "gamma": (D, data.n_severities, data.n_groups),
        "nu": (D, data.n_readers, data.n_groups),
    }
    return {k: v.reshape(shapes[k]) for k, v in out.items()}


_TRACE_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+\S+\s+\S+")


def parse_advi_stdout(text: str) -> tuple[np.ndarray, bool, str]:
    """(iteration, ELBO) rows, whether ADVI reported convergence, and why, from CmdStan's console output.

    The rows are the table Stan prints during stochastic gradient ascent:
    `iter  ELBO  delta_ELBO_mean  delta_ELBO_med  notes`, every eval_elbo iterations.
    """
    rows, in_table = [], False
    for line in text.splitlines():
        if "delta_ELBO_mean" in line:
            in_table = True
        elif line.lstrip().startswith("Drawing a sample"):
            in_table = False
        elif in_table and (m := _TRACE_ROW.match(line)):
            try:
                rows.append((float(m.group(1)), float(m.group(2))))
            except ValueError:
                pass
    trace = np.asarray(rows, dtype=float).reshape(-1, 2)
    if "maximum number of iterations is reached" in text or "MAX ITERATIONS" in text:
        return trace, False, "CmdStan reached the maximum number of iterations"
    for flag in ("MEAN ELBO CONVERGED", "MEDIAN ELBO CONVERGED"):
        if flag in text:
            return trace, True, f"CmdStan reported {flag}"
    return trace, False, "CmdStan reported no convergence"


class StanBackend:
    """CmdStan via cmdstanpy: mean-field ADVI, NUTS and Pathfinder."""

    name = "stan"
    methods = ("advi", "nuts", "pathfinder")
    priority = 10

    def unavailable_reason(self) -> str | None:
        try:
            import cmdstanpy
        except ImportError:
            return f"cmdstanpy is not installed: `pip install cmdstanpy`, then {_INSTALL_HINT}"
        try:
            cmdstanpy.cmdstan_path()
        except (ValueError, RuntimeError, OSError):
            return f"CmdStan is not installed (cmdstanpy found none, nor a CMDSTAN variable); {_INSTALL_HINT}"
        return None

    def fit(self, data: LatentModelData, settings: FitSettings, progress: Callable[[str], None] = lambda m: None) -> Fit:
        reason = self.unavailable_reason()
        if reason:
            raise PerceptcoreError(reason, "backend stan")
        if settings.method not in self.methods:
            raise PerceptcoreError(
                f"unknown method {settings.method!r}; the stan backend runs {', '.join(self.methods)}", "fit.method"
            )
        start = time.perf_counter()
        model = _compiled_model(progress)
        stan_data = data.stan_data()
        out_dir = tempfile.mkdtemp(prefix="perceptcore-stan-")
        try:
            run = {"advi": self._advi, "nuts": self._nuts, "pathfinder": self._pathfinder}[settings.method]
            fit = run(model, stan_data, data, settings, progress, out_dir)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)  # everything is read before this
        return Fit(**{**fit, "seconds": time.perf_counter() - start})

    def _base(self, data: LatentModelData, method: str) -> dict:
        return {"backend": self.name, "method": method, "parameterisation": data.parameterisation}

    def _advi(self, model, stan_data, data, settings, progress, out_dir) -> dict:
        progress("stan: mean-field ADVI")
        vb = model.variational(
            data=stan_data,
            seed=int(settings.seed),
            algorithm="meanfield",
            iter=int(settings.max_iterations),
            tol_rel_obj=float(settings.tolerance),
            draws=int(settings.draws),
            require_converged=False,
            output_dir=out_dir,
            sig_figs=9,
        )
        text = Path(vb.runset.stdout_files[0]).read_text()
        trace, converged, why = parse_advi_stdout(text)
        columns = list(vb.column_names)
        sample = np.asarray(vb.variational_sample, dtype=float)
        log_p = sample[:, columns.index("log_p__")]
        # Every parameter is unconstrained, so the draws' sds are the Gaussian's sds
        # and the ELBO is E[log p] + its entropy (log_p__ includes the constants).
        unconstrained = [i for i, c in enumerate(columns) if c.split("[")[0] in _PARAMETERS]
        sd = sample[:, unconstrained].std(axis=0, ddof=1)
        entropy = float(np.sum(np.log(sd)) + len(sd) * 0.5 * (1.0 + math.log(2.0 * math.pi)))
        elbo = float(log_p.mean()) + entropy
        last = f"; last ELBO in its trace {trace[-1, 1]:.2f} at iteration {int(trace[-1, 0])}" if len(trace) else ""
        note = (
            f"CmdStan meanfield ADVI with tol_rel_obj={settings.tolerance:g} (Stan's rule: relative ELBO "
            f"change, mean or median over recent evaluations every 100 iterations): {why}{last}. "
            f"ELBO {elbo:.2f} = mean log_p__ of {len(log_p)} draws + Gaussian entropy."
        )
        return {
            **self._base(data, "advi"),
            "draws": _draws(vb, data, mean=False),
            "elbo": elbo,
            "converged": converged,
            "convergence_note": note,
            "elbo_trace": trace,
            "diagnostics": {"iterations": int(trace[-1, 0]) if len(trace) else 0},
        }

    def _nuts(self, model, stan_data, data, settings, progress, out_dir) -> dict:
        chains = int(settings.chains)
        per_chain = max(1, math.ceil(int(settings.draws) / chains))
        progress(f"stan: NUTS, {chains} chains x ({settings.warmup} warmup + {per_chain} draws)")
        mcmc = model.sample(
            data=stan_data,
            chains=chains,
            parallel_chains=min(chains, os.cpu_count() or 1),
            iter_warmup=int(settings.warmup),
            iter_sampling=per_chain,
            seed=int(settings.seed),
            output_dir=out_dir,
            show_progress=False,
        )
        summary = mcmc.summary()
        params = summary[[i.split("[")[0] in _PARAMETERS for i in summary.index]]
        ess_col = "ESS_bulk" if "ESS_bulk" in params.columns else "N_Eff"
        max_rhat = float(np.nanmax(params["R_hat"].to_numpy(dtype=float)))
        min_ess = float(np.nanmin(params[ess_col].to_numpy(dtype=float)))
        divergences = int(np.sum(mcmc.divergences))
        converged = max_rhat < 1.01 and divergences == 0
        note = (
            f"NUTS, {chains} chains: converged means max R-hat < 1.01 over b, mu, gamma_free, nu and no "
            f"divergent transitions; seen max R-hat {max_rhat:.4f}, min {ess_col} {min_ess:.0f}, "
            f"{divergences} divergences."
        )
        return {
            **self._base(data, "nuts"),
            "draws": _draws(mcmc, data),
            "elbo": float("nan"),
            "converged": converged,
            "convergence_note": note,
            "diagnostics": {"max_rhat": max_rhat, "min_ess_bulk": min_ess, "divergences": divergences},
        }

    def _pathfinder(self, model, stan_data, data, settings, progress, out_dir) -> dict:
        progress("stan: Pathfinder")
        pf = model.pathfinder(
            data=stan_data,
            seed=int(settings.seed),
            draws=int(settings.draws),
            output_dir=out_dir,
            sig_figs=9,
        )
        method_vars = pf.method_variables()
        lp = np.asarray(method_vars["lp__"], dtype=float).ravel()
        lp_approx = np.asarray(method_vars["lp_approx__"], dtype=float).ravel()
        elbo = float(np.mean(lp - lp_approx))
        converged = bool(np.isfinite(elbo))
        note = (
            "Pathfinder has no convergence test of its own; its L-BFGS paths ran to CmdStan's defaults. "
            f"ELBO {elbo:.2f} = mean(lp__ - lp_approx__) over its {lp.size} draws."
        )
        return {
            **self._base(data, "pathfinder"),
            "draws": _draws(pf, data),
            "elbo": elbo,
            "converged": converged,
            "convergence_note": note,
        }


from perceptcore.plugins import hookimpl  # noqa: E402


@hookimpl
def perceptcore_register_backends(register):
    register(StanBackend())
