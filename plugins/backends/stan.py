"""The latent model in CmdStan through cmdstanpy: ADVI, NUTS, Pathfinder and Laplace.

Preferred (priority 10) wherever CmdStan is installed, because NUTS gives the
accurate posterior the papers' ADVI only approximated.
"""

from __future__ import annotations

import contextlib
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
from perceptcore.resources import available_cores

_INSTALL_HINT = "install it with `python -m cmdstanpy.install_cmdstan` (needs a C++ toolchain and internet access)"
_PARAMETERS = ("b", "mu", "gamma_free", "nu", "delta")  # the parameters block: all unconstrained
# Laplace and Pathfinder: importance sampling in ~1,500 dimensions needs many proposals for the weights to
# cover the posterior, and the Pareto k-hat of the weights is only a reliable diagnostic with a few thousand.
_MIN_PROPOSALS = 4000
_PROPOSALS_PER_DRAW = 4
_PARETO_K_TRUSTED = 0.7  # above: the importance weights cannot be trusted (Vehtari et al., PSIS)
_PARETO_K_SLOW = 0.5  # between the two: trusted, but slowly converging
_LOG_Q_TOLERANCE = 0.05  # nats: median |log_q__ - model quadratic form| for the normalising constant
# CmdStan ADVI's own default tol_rel_obj. The spec's `tolerance` is the torch ADVI's rule (a smoothed
# relative change, 1e-4); Stan's rule, on a noisier ELBO estimate, did not get that low in 20,000
# iterations (CmdStan 2.35), so every fit ran to max_iterations: it is not passed on.
_STAN_ADVI_TOL_REL_OBJ = 0.01
_PATHFINDER_PATHS = 4  # CmdStan's default number of single-path Pathfinders
# Pathfinder's resampled draws must be at least this share distinct: below it the summaries rest on
# a handful of points (CmdStan's own resampling once gave 1 distinct draw of 1,000), whatever k-hat says.
_MIN_DISTINCT_SHARE = 0.1
# NUTS: trusted when every check holds (Vehtari et al. 2021 for R-hat and ESS; Betancourt for E-BFMI).
_MAX_RHAT = 1.01
_MIN_ESS = 400
_MIN_BFMI = 0.3


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "perceptcore" / "cmdstan"


def _executable_dir(code: str) -> Path:
    """Where the shipped program is compiled: one folder per CmdStan version and program text.

    Keyed by `cmdstanpy.cmdstan_version()`, not by the CmdStan folder's name (CMDSTAN may point at
    a checkout called `cmdstan` whatever its version), and by the folder's full path as well: the
    executable finds CmdStan's TBB library by that absolute path (rpath), so another installation
    of the same version gets its own build.
    """
    import cmdstanpy

    home = str(Path(cmdstanpy.cmdstan_path()).resolve())
    version = cmdstanpy.cmdstan_version()
    label = "cmdstan-" + (".".join(map(str, version)) if version else "unknown")
    key = hashlib.sha256(f"{home}\0{code}".encode()).hexdigest()[:16]
    return _cache_dir() / f"{label}-{key}"


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on `path` (created if missing) across processes; released on exit."""
    with open(path, "a") as handle:
        if os.name == "nt":
            import msvcrt

            while True:  # msvcrt gives up after 10 s; a compile takes about a minute
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _compiled_model(progress: Callable[[str], None]):
    """The CmdStanModel of the shipped program, compiled once per program and CmdStan.

    cmdstanpy builds the executable beside the .stan file and rebuilds it only when
    the file is newer, so a copy in a cache directory keyed by the program text
    and the CmdStan version is compiled exactly once (the package directory may
    not be writable). Fit workers start together: a lock file makes the first compile
    while the others wait, then find the executable built.
    """
    import cmdstanpy

    code = stan_file().read_text()
    directory = _executable_dir(code)
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / "latent_model.stan"
    with _exclusive(directory / "compile.lock"):
        if not program.exists():
            tmp = directory / "latent_model.stan.tmp"
            tmp.write_text(code)
            tmp.replace(program)  # atomic: a run killed mid-write leaves no half a program to compile
        if not (directory / ("latent_model" + (".exe" if os.name == "nt" else ""))).exists():
            progress("stan: compiling the latent model (once per CmdStan version, about a minute)")
        try:
            return cmdstanpy.CmdStanModel(stan_file=str(program))
        except Exception as exc:  # compiler missing or broken toolchain
            raise PerceptcoreError(f"CmdStan could not compile the latent model: {exc}", "backend stan") from exc


# CmdStan's sampler columns and ArviZ's names for them.
_SAMPLER_STATS = {"lp__": "lp", "accept_stat__": "acceptance_rate", "stepsize__": "step_size",
                  "treedepth__": "tree_depth", "n_leapfrog__": "n_steps", "divergent__": "diverging",
                  "energy__": "energy"}


def _nuts_diagnostics(draws: dict, sample_stats: dict, chains: int) -> dict:
    """R-hat, bulk and tail ESS over every parameter (ArviZ), divergences and the lowest E-BFMI."""
    import arviz as az

    # gamma's reference row is the constant 0: no diagnostic applies to it.
    posterior = {k: (v[:, 1:] if k == "gamma" else v) for k, v in draws.items()}
    data = az.convert_to_dataset({k: v.reshape((chains, -1) + v.shape[1:]) for k, v in posterior.items()})

    def extreme(result, pick):
        return float(pick([pick(result[k].values) for k in result.data_vars]))

    energy = sample_stats.get("energy")
    bfmi = az.bfmi(energy.reshape(chains, -1)) if energy is not None else np.array([np.nan])
    return {
        "max_rhat": extreme(az.rhat(data), np.nanmax),
        "min_ess_bulk": extreme(az.ess(data, method="bulk"), np.nanmin),
        "min_ess_tail": extreme(az.ess(data, method="tail"), np.nanmin),
        "divergences": int(np.sum(sample_stats.get("diverging", 0))),
        "min_bfmi": float(np.min(bfmi)),
    }


def _nuts_failures(summary: dict) -> list[str]:
    """The NUTS checks a summary of `_nuts_diagnostics` fails, in words (none: the fit is trusted)."""
    checks = [
        (summary["max_rhat"] <= _MAX_RHAT, f"R-hat above {_MAX_RHAT}"),
        (summary["min_ess_bulk"] >= _MIN_ESS, f"bulk ESS below {_MIN_ESS}"),
        (summary["min_ess_tail"] >= _MIN_ESS, f"tail ESS below {_MIN_ESS}"),
        (summary["divergences"] == 0, "divergent transitions"),
        (summary["min_bfmi"] >= _MIN_BFMI, f"E-BFMI below {_MIN_BFMI}"),
    ]
    return [reason for ok, reason in checks if not ok]  # a nan diagnostic fails its check too


def _cores(settings: FitSettings) -> int:
    """The CPU cores a fit may use for parallel chains.

    A run fitting in parallel should say how many (`settings.cores`). Without it, a fit in a worker
    process assumes sibling workers fill the machine (the run starts one per core by default) and
    takes one core; in the main process it takes them all.
    """
    import multiprocessing

    if settings.cores:
        return int(settings.cores)
    return 1 if multiprocessing.parent_process() is not None else available_cores()


def _draws(fit, data: LatentModelData, **kwargs) -> dict:
    """Stan's variables (draws first; matrices as (D, rows, cols)) in the Fit layout.

    Stan's gamma is the transformed parameter, reference row of zeros included.
    The reshape restores size-1 dimensions cmdstanpy may squeeze.
    A point estimate (CmdStanMLE) comes back as one draw.
    """
    names = ("b", "mu", "gamma", "nu") + (("delta",) if data.case_positive is not None else ())
    out = {k: np.asarray(fit.stan_variable(k, **kwargs), dtype=float) for k in names}
    shapes = {
        "b": (data.n_groups,),
        "mu": (data.n_cases,),
        "gamma": (data.n_severities, data.n_groups),
        "nu": (data.n_readers, data.n_groups),
        "delta": (data.n_groups,),
    }
    return {k: v.reshape((-1,) + shapes[k]) for k, v in out.items()}


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


def _psis_resample(log_w: np.ndarray, draws: int, seed: int, method: str) -> dict:
    """Pareto-smoothed importance resampling of `draws` of the proposals by their log weights.

    Returns the chosen proposals' indices, the Pareto k-hat, the importance ESS, how many distinct
    proposals were chosen, and how many had no finite weight (weight 0).
    """
    import arviz as az

    finite = np.isfinite(log_w)  # a draw where the model's log density fails gets weight 0
    if not finite.any():
        raise PerceptcoreError(f"CmdStan's {method} draws: the log density failed at every proposal", "backend stan")
    smoothed = np.full_like(log_w, -np.inf)
    smoothed[finite], khat = az.psislw(log_w[finite].copy(), reff=1.0)
    # Equal weights (the proposal is the target) leave arviz no tail to fit, and it says inf; weights
    # equal to a millionth (CmdStan's CSV keeps 9 digits of log_p__ and log_q__) are equal for any use.
    khat = 0.0 if np.ptp(log_w[finite]) < 1e-6 else float(khat)
    weights = np.exp(smoothed - np.max(smoothed[finite]))
    weights /= weights.sum()
    # Systematic resampling keeps the weighted empirical distribution with the least added noise;
    # the kept draws are then put in random order, so no trace of the proposal order remains.
    rng = np.random.default_rng(seed)
    u = (rng.random() + np.arange(draws)) / draws
    chosen = np.minimum(np.searchsorted(np.cumsum(weights), u), len(log_w) - 1)
    chosen = chosen[rng.permutation(draws)]
    return {"chosen": chosen, "pareto_k": khat, "importance_ess": float(1.0 / np.sum(weights**2)),
            "distinct_draws": int(len(np.unique(chosen))), "failed": int(np.sum(~finite))}


class _Curvature:
    """The negative Hessian of the Stan program's log density at a point, in blocks.

    CmdStan's laplace output gives the log density of its Gaussian approximation, log_q__, only up
    to the Gaussian's normalising constant (-0.5 z'z for the standard normal z behind each draw), and
    that constant needs log det of the negative Hessian at the mode. The Hessian of this model is
    simple: every prediction's log-likelihood has second derivative -p (1 - p) in eta, for 0/1 calls
    and probabilities alike, and the priors are Gaussian. Coordinates: psi = (b, gamma levels 2..S,
    nu), each matrix row-major, and the case effects mu apart, whose block is diagonal. Using gamma's
    levels rather than gamma_free changes nothing here: under `random_walk` the map between them is
    unit triangular, so determinants and quadratic forms are those of Stan's unconstrained space.
    """

    def __init__(self, data: LatentModelData, at: dict):
        G, S, R, N = data.n_groups, data.n_severities, data.n_readers, data.n_cases
        self.by_class = data.case_positive is not None
        self.G, self.P, self.N = G, G + (S - 1) * G + R * G + G * self.by_class, N
        case = np.asarray(data.case, dtype=np.int64)
        severity = np.asarray(data.severity, dtype=np.int64)
        g = np.asarray(data.case_group, dtype=np.int64)[case]
        reader = np.asarray(data.reader, dtype=np.int64)
        eta = at["b"][g] + at["mu"][case] + at["gamma"][severity, g] + at["nu"][reader, g]
        p = 1.0 / (1.0 + np.exp(-eta))
        w = p * (1.0 - p)
        # Positions in psi; the reference severity (gamma fixed at 0) points at a dropped extra slot.
        positions = (g, np.where(severity > 0, G + (severity - 1) * G + g, self.P), G + (S - 1) * G + reader * G + g)
        P1 = self.P + 1
        A = sum(np.bincount(a * P1 + b, weights=w, minlength=P1 * P1) for a in positions for b in positions)
        A = A.reshape(P1, P1)[: self.P, : self.P]
        C = sum(np.bincount(a * N + case, weights=w, minlength=P1 * N) for a in positions)
        self.C = C.reshape(P1, N)[: self.P]
        self.d = np.bincount(case, weights=w, minlength=N) + 1.0 / data.priors.mu**2
        # Prior precisions of b, the gamma levels of each subgroup, and nu.
        A[range(G), range(G)] += 1.0 / data.priors.b**2
        levels = S - 1
        if data.parameterisation == "random_walk":  # gamma_free = D levels, D the first differences
            D = np.eye(levels) - np.eye(levels, k=-1)
            block = D.T @ D / data.priors.gamma**2
        else:
            block = np.eye(levels) / data.priors.gamma**2
        for k in range(G):
            at_levels = G + np.arange(levels) * G + k
            A[np.ix_(at_levels, at_levels)] += block
        nu = np.arange(G + levels * G, G + levels * G + R * G)
        A[nu, nu] += 1.0 / data.priors.nu**2
        if self.by_class:  # delta[g], last: the prior 0.5 (mu[n] - delta[g] positive[n])^2 / sd^2 couples them
            positive = np.asarray(data.case_positive, dtype=float)
            group = np.asarray(data.case_group, dtype=np.int64)
            delta = self.P - G + np.arange(G)
            A[delta, delta] += np.bincount(group, weights=positive, minlength=G) / data.priors.mu**2 \
                + 1.0 / data.priors.delta**2
            self.C[self.P - G + group, np.arange(N)] -= positive / data.priors.mu**2
        self.A = A

    @property
    def dimension(self) -> int:
        return self.P + self.N

    def log_det(self) -> float:
        """log det of the negative Hessian: the mu block, then the Schur complement of psi."""
        schur = self.A - (self.C / self.d) @ self.C.T
        return float(np.sum(np.log(self.d)) + 2.0 * np.sum(np.log(np.diag(np.linalg.cholesky(schur)))))

    def quadratic(self, draws: dict, at: dict) -> np.ndarray:
        """(x - at)' H (x - at) for each draw x, with H the negative Hessian: (D,) values."""
        def psi(v):
            n = v["b"].shape[0]
            return np.concatenate([v["b"], v["gamma"][:, 1:, :].reshape(n, -1), v["nu"].reshape(n, -1)]
                                  + ([v["delta"]] if self.by_class else []), axis=1)

        x = psi(draws) - psi({k: v[None] for k, v in at.items()})
        m = draws["mu"] - at["mu"]
        return np.einsum("kp,kp->k", x @ self.A, x) + 2.0 * np.einsum("kn,kn->k", x @ self.C, m) + (m**2) @ self.d


class StanBackend:
    """CmdStan via cmdstanpy: mean-field ADVI, NUTS, Pathfinder and Laplace (PSIS-corrected)."""

    name = "stan"
    methods = ("advi", "nuts", "pathfinder", "laplace")
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
            run = {"advi": self._advi, "nuts": self._nuts, "pathfinder": self._pathfinder, "laplace": self._laplace}[
                settings.method
            ]
            fit = run(model, stan_data, data, settings, progress, out_dir)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)  # everything is read before this
        return Fit(**{**fit, "seconds": time.perf_counter() - start})

    def _base(self, data: LatentModelData, method: str) -> dict:
        return {"backend": self.name, "method": method, "parameterisation": data.parameterisation}

    def _advi(self, model, stan_data, data, settings, progress, out_dir) -> dict:
        progress("stan: mean-field ADVI")
        tol_rel_obj = float(settings.stan_tol_rel_obj or _STAN_ADVI_TOL_REL_OBJ)
        vb = model.variational(
            data=stan_data,
            seed=int(settings.seed),
            algorithm="meanfield",
            iter=int(settings.max_iterations),
            tol_rel_obj=tol_rel_obj,
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
            f"CmdStan meanfield ADVI with tol_rel_obj={tol_rel_obj:g} ("
            + ("set for the stan backend" if settings.stan_tol_rel_obj else "Stan's default; the spec's tolerance "
               "is the torch ADVI's rule") + "; Stan's rule: relative ELBO change, mean or median over recent "
            f"evaluations every 100 iterations): {why}{last}. "
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
        chains, per_chain = int(settings.chains), int(settings.draws)
        parallel = max(1, min(chains, _cores(settings)))
        progress(f"stan: NUTS, {chains} chains x ({settings.warmup} warmup + {per_chain} draws), {parallel} at a time")
        mcmc = model.sample(
            data=stan_data,
            chains=chains,
            parallel_chains=parallel,
            iter_warmup=int(settings.warmup),
            iter_sampling=per_chain,
            seed=int(settings.seed),
            output_dir=out_dir,
            show_progress=False,
        )
        draws = _draws(mcmc, data)  # chains one after another
        stats = mcmc.method_variables()  # (draws, chains) each
        sample_stats = {arviz_name: np.asarray(stats[name], dtype=float).T.reshape(-1)
                        for name, arviz_name in _SAMPLER_STATS.items() if name in stats}
        summary = _nuts_diagnostics(draws, sample_stats, chains)
        failed = _nuts_failures(summary)
        note = (
            f"NUTS, {chains} chains x {per_chain} draws, diagnostics from ArviZ: trusted when max R-hat <= "
            f"{_MAX_RHAT}, bulk and tail ESS >= {_MIN_ESS} for every parameter, no divergent transition and E-BFMI "
            f">= {_MIN_BFMI} in every chain; seen max R-hat {summary['max_rhat']:.4f}, min bulk ESS "
            f"{summary['min_ess_bulk']:.0f}, min tail ESS {summary['min_ess_tail']:.0f}, {summary['divergences']} "
            f"divergences, min E-BFMI {summary['min_bfmi']:.2f}"
            + (f": not trusted ({'; '.join(failed)})." if failed else ".")
        )
        return {
            **self._base(data, "nuts"),
            "draws": draws,
            "elbo": float("nan"),
            "converged": not failed,
            "convergence_note": note,
            "diagnostics": summary,
            "chains": chains,
            "sample_stats": sample_stats,
        }

    def _pathfinder(self, model, stan_data, data, settings, progress, out_dir) -> dict:
        """CmdStan's Pathfinder, every path's draws kept, then Pareto-smoothed importance resampling here.

        CmdStan's own resampling (psis_resample) hides its k-hat and can return one draw repeated; here
        the draws are `settings.draws` resampled from the paths' max(4 x draws, 4000) draws by the weights
        lp__ - lp_approx__ (each draw's own path's approximation, as CmdStan's multi-path Pathfinder uses).
        """
        draws = int(settings.draws)
        per_path = max(_PROPOSALS_PER_DRAW * draws, _MIN_PROPOSALS) // _PATHFINDER_PATHS
        progress(f"stan: Pathfinder, {_PATHFINDER_PATHS} paths x {per_path} draws")
        try:
            pf = model.pathfinder(
                data=stan_data,
                seed=int(settings.seed),
                num_paths=_PATHFINDER_PATHS,
                num_single_draws=per_path,
                psis_resample=False,
                output_dir=out_dir,
                sig_figs=9,
            )
        except ValueError as exc:  # CmdStan before 2.34 cannot return the paths' draws unresampled
            raise PerceptcoreError(f"CmdStan's pathfinder method failed: {exc}", "backend stan") from exc
        method_vars = pf.method_variables()
        lp = np.asarray(method_vars["lp__"], dtype=float).ravel()
        lp_approx = np.asarray(method_vars["lp_approx__"], dtype=float).ravel()
        log_w = lp - lp_approx
        proposals = len(log_w)
        psis = _psis_resample(log_w, draws, int(settings.seed), "pathfinder")
        elbo = float(np.mean(log_w[np.isfinite(log_w)]))
        kept = {k: v[psis["chosen"]] for k, v in _draws(pf, data).items()}
        # Distinct values, not distinct rows: a CmdStan output of one point repeated has equal weights
        # and k-hat 0, and only this shows it.
        distinct = len(np.unique(np.concatenate([v.reshape(draws, -1) for v in kept.values()], axis=1), axis=0))
        khat = psis["pareto_k"]
        failed = []
        if not khat <= _PARETO_K_TRUSTED:
            failed.append(f"k-hat > {_PARETO_K_TRUSTED}: the importance weights cannot be trusted")
        if distinct < _MIN_DISTINCT_SHARE * draws:
            failed.append(f"fewer than {_MIN_DISTINCT_SHARE:.0%} of the draws are distinct: they have collapsed")
        note = (
            f"CmdStan Pathfinder, {_PATHFINDER_PATHS} paths x {per_path} draws, resampled here by Pareto-smoothed "
            f"importance sampling (weights lp__ - lp_approx__): trusted when the Pareto k-hat is <= "
            f"{_PARETO_K_TRUSTED} and at least {_MIN_DISTINCT_SHARE:.0%} of the {draws} resampled draws are "
            f"distinct. Seen k-hat {khat:.3f}, importance ESS {psis['importance_ess']:.0f} of {proposals}, "
            f"{distinct} distinct draws"
            + (f", {psis['failed']} draws where the log density failed (weight 0)" if psis["failed"] else "")
            + (f": not trusted ({'; '.join(failed)})" if failed else "")
            + f". ELBO {elbo:.2f} = mean(lp__ - lp_approx__) over the {proposals} draws."
        )
        return {
            **self._base(data, "pathfinder"),
            "draws": kept,
            "elbo": elbo,
            "converged": not failed,
            "convergence_note": note,
            "diagnostics": {"pareto_k": khat, "importance_ess": psis["importance_ess"], "distinct_draws": distinct,
                            "proposals": proposals},
        }

    def _laplace(self, model, stan_data, data, settings, progress, out_dir) -> dict:
        """CmdStan's Laplace approximation at the mode, corrected by Pareto-smoothed importance sampling.

        The draws are `settings.draws` resampled (systematic resampling, then shuffled) from
        max(4 x draws, 4000) proposals by their smoothed importance weights.
        """
        draws = int(settings.draws)
        proposals = max(_PROPOSALS_PER_DRAW * draws, _MIN_PROPOSALS)
        progress("stan: the mode (L-BFGS, with the Jacobian adjustment) for the Laplace approximation")
        # jacobian=True: the Laplace approximation of the posterior is centred at the Jacobian-adjusted
        # mode (every parameter here is unconstrained, so it is also the plain posterior mode).
        mode = model.optimize(
            data=stan_data,
            seed=int(settings.seed),
            jacobian=True,
            require_converged=False,
            output_dir=out_dir,
            sig_figs=9,
        )
        progress(f"stan: Laplace approximation, {proposals} proposals")
        try:
            laplace = model.laplace_sample(
                data=stan_data,
                mode=mode,
                draws=proposals,
                jacobian=True,
                seed=int(settings.seed),
                output_dir=out_dir,
                sig_figs=9,
            )
        except ValueError as exc:  # e.g. CmdStan older than 2.32, which has no laplace method
            raise PerceptcoreError(f"CmdStan's laplace method failed: {exc}", "backend stan") from exc
        method_vars = laplace.method_variables()
        # CmdStan's services write the approximation's log density as log_q__; log_g__ (ADVI's name, and
        # the one in the method's design notes) is read if that is what a CmdStan wrote instead.
        q_name = next((n for n in ("log_q__", "log_g__") if n in method_vars), None)
        if "log_p__" not in method_vars or q_name is None:
            raise PerceptcoreError(
                f"CmdStan's laplace output has no log_p__ and log_q__ columns (found {', '.join(method_vars)})",
                "backend stan",
            )
        log_p = np.asarray(method_vars["log_p__"], dtype=float).ravel()
        log_q = np.asarray(method_vars[q_name], dtype=float).ravel()
        sample = _draws(laplace, data)
        centre = {k: v[0] for k, v in _draws(mode, data).items()}

        # CmdStan's log_q__ is -0.5 z'z: the Gaussian's normalising constant is added here, from the
        # model's own Hessian at the mode, after checking that it reproduces log_q__ draw by draw.
        curvature = _Curvature(data, centre)
        mismatch = float(np.median(np.abs(-0.5 * curvature.quadratic(sample, centre) - log_q)))
        log_norm = 0.5 * curvature.log_det() - 0.5 * curvature.dimension * math.log(2.0 * math.pi)
        log_w = log_p - (log_q + log_norm)
        psis = _psis_resample(log_w, draws, int(settings.seed), "laplace")
        chosen, khat, ess, distinct = psis["chosen"], psis["pareto_k"], psis["importance_ess"], psis["distinct_draws"]
        finite = np.isfinite(log_w)
        log_evidence = float(np.logaddexp.reduce(log_w[finite]) - math.log(proposals))
        if mismatch > _LOG_Q_TOLERANCE:
            log_evidence = float("nan")

        converged = khat <= _PARETO_K_TRUSTED
        if not converged:
            verdict = (
                f"k-hat > {_PARETO_K_TRUSTED}: the importance weights cannot be trusted and these draws are "
                "not to be used (the Gaussian at the mode misses too much of the posterior; use nuts, or backend "
                "torch, whose laplace integrates the case effects out first)"
            )
        elif khat > _PARETO_K_SLOW:
            verdict = (
                f"k-hat between {_PARETO_K_SLOW} and {_PARETO_K_TRUSTED}: usable, but the importance "
                "sampling converges slowly (more draws, hence proposals, help)"
            )
        else:
            verdict = f"k-hat <= {_PARETO_K_SLOW}: the importance-sampling correction is reliable"
        failed = psis["failed"]
        evidence = (
            f"log p(y) = {log_evidence:.2f}: the importance-sampling estimate of the log marginal likelihood, "
            "log mean exp(log_w) over the proposals, with the Gaussian's normalising constant (CmdStan "
            "writes log_q__ without it) from the model's Hessian at the mode"
            if np.isfinite(log_evidence)
            else f"no estimate of log p(y): the model's Hessian at the mode does not reproduce CmdStan's "
            f"log_q__ (median mismatch {mismatch:.3g} nats), so the proposal's normalising constant is "
            "unknown; the draws and k-hat do not depend on it"
        )
        note = (
            f"CmdStan Laplace approximation at the Jacobian-adjusted mode with {proposals} proposals, "
            f"corrected by Pareto-smoothed importance sampling (weights log_p__ - {q_name}): trusted when "
            f"the Pareto k-hat of the weights is <= {_PARETO_K_TRUSTED}; above it the weights cannot be "
            f"trusted and the draws are not to be used, between {_PARETO_K_SLOW} and {_PARETO_K_TRUSTED} "
            f"convergence is slow. Seen k-hat {khat:.3f}, importance ESS {ess:.0f} of {proposals} proposals, "
            f"{distinct} distinct proposals among the {draws} resampled draws"
            + (f", {failed} proposals where the log density failed (weight 0)" if failed else "")
            + f": {verdict}. {evidence}."
        )
        return {
            **self._base(data, "laplace"),
            "draws": {k: v[chosen] for k, v in sample.items()},
            "elbo": float("nan"),  # not a variational method
            "log_evidence": log_evidence,
            "converged": converged,
            "convergence_note": note,
            "diagnostics": {
                "pareto_k": khat,
                "importance_ess": ess,
                "distinct_draws": distinct,
                "proposals": proposals,
                "log_q_mismatch": mismatch,
            },
        }


from perceptcore.plugins import hookimpl  # noqa: E402


@hookimpl
def perceptcore_register_backends(register):
    register(StanBackend())
