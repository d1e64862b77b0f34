"""The latent model: its data, its settings, what a fit returns, and what every backend must do.

The model itself is the Stan program `latent_model.stan` beside this file; every
backend (registered through the `perceptcore_register_backends` hook) computes the
posterior of that same log density.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import attrs
import numpy as np

PARAMETERISATIONS = ("random_walk", "independent")
METHODS = ("laplace", "advi", "nuts", "pathfinder")
CASE_EFFECTS = ("by_class", "pooled")  # the case effects' prior: a mean per class, or one N(0, sd)


def stan_file() -> Path:
    """Path of the Stan program shipped inside the package."""
    return Path(str(resources.files("perceptcore") / "latent_model.stan"))


@attrs.frozen
class Priors:
    """Prior standard deviations of the latent variables: N(0, sd), except the case effects mu, whose
    prior mean is the class offset delta for positive cases (where the model has delta)."""

    b: float = 1.0
    mu: float = 1.0
    gamma: float = 1.0
    nu: float = 1.0
    delta: float = 2.5


@attrs.frozen(eq=False)
class LatentModelData:
    """One observer group's predictions in index form (0-based here, 1-based for Stan)."""

    n_cases: int
    n_readers: int
    n_severities: int
    n_groups: int
    case_group: np.ndarray  # (N,) subgroup index of each case
    reader: np.ndarray  # (M,) observer index of each prediction
    severity: np.ndarray  # (M,) severity index, 0 = unperturbed reference
    case: np.ndarray  # (M,) case index
    prediction: np.ndarray  # (M,) float, 0/1 calls or probabilities
    soft: bool  # True: probabilities (soft Bernoulli); False: 0/1 calls
    parameterisation: str = "random_walk"
    priors: Priors = Priors()
    # (N,) 0/1 class of each case: given, the case effects' prior is N(delta[g], sd) for positive cases
    # and N(0, sd) for negative ones; None: N(0, sd) for all (the published model).
    case_positive: np.ndarray | None = None

    def __attrs_post_init__(self):
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"unknown parameterisation {self.parameterisation!r}")

    @property
    def n_predictions(self) -> int:
        return int(self.prediction.shape[0])

    def with_parameterisation(self, parameterisation: str) -> "LatentModelData":
        return attrs.evolve(self, parameterisation=parameterisation)

    def only_subgroup(self, group: int) -> "LatentModelData":
        """The predictions on the cases of one subgroup, as a one-subgroup data set.

        Every prediction involves the parameters of its case's subgroup only and the priors are
        independent, so the posterior factorises over subgroups: this data set's posterior is exactly
        that subgroup's part of the whole one.
        """
        cases = np.flatnonzero(np.asarray(self.case_group) == group)
        local = np.full(self.n_cases, -1)
        local[cases] = np.arange(len(cases))
        keep = local[np.asarray(self.case)] >= 0
        return attrs.evolve(self, n_cases=len(cases), n_groups=1, case_group=np.zeros(len(cases), dtype=int),
                            reader=np.asarray(self.reader)[keep], severity=np.asarray(self.severity)[keep],
                            case=local[np.asarray(self.case)[keep]], prediction=np.asarray(self.prediction)[keep],
                            case_positive=None if self.case_positive is None else np.asarray(self.case_positive)[cases])

    def stan_data(self) -> dict:
        """The data block of `latent_model.stan`."""
        return {
            "N": self.n_cases,
            "R": self.n_readers,
            "S": self.n_severities,
            "G": self.n_groups,
            "M": self.n_predictions,
            "group": (self.case_group + 1).astype(int).tolist(),
            "reader": (self.reader + 1).astype(int).tolist(),
            "severity": (self.severity + 1).astype(int).tolist(),
            "case_id": (self.case + 1).astype(int).tolist(),
            "soft": int(self.soft),
            "y": [] if self.soft else np.rint(self.prediction).astype(int).tolist(),
            "z": self.prediction.astype(float).tolist() if self.soft else [],
            "random_walk": int(self.parameterisation == "random_walk"),
            "prior_sd_b": float(self.priors.b),
            "prior_sd_mu": float(self.priors.mu),
            "prior_sd_gamma": float(self.priors.gamma),
            "prior_sd_nu": float(self.priors.nu),
            "class_offset": int(self.case_positive is not None),
            "positive": ([0] * self.n_cases if self.case_positive is None
                         else np.asarray(self.case_positive).astype(int).tolist()),
            "prior_sd_delta": float(self.priors.delta),
        }


@attrs.frozen
class FitSettings:
    """How to fit: validated by the spec before anything runs."""

    method: str = "laplace"
    draws: int = 1000
    seed: int = 0
    # Variational inference: stop when the relative change of the smoothed ELBO
    # stays below `tolerance` (see the backend's convergence_note), or at max_iterations.
    # `tolerance` is the torch ADVI's rule; CmdStan's ADVI has a rule of its own, with its own
    # scale, and keeps Stan's default (tol_rel_obj 0.01) unless `stan_tol_rel_obj` is given.
    max_iterations: int = 20000
    tolerance: float = 1e-4
    stan_tol_rel_obj: float | None = None
    # NUTS: `chains` chains of `draws` draws each
    chains: int = 4
    warmup: int = 1000
    # CPU cores this one fit may use; a run fitting several at once gives each its share.
    # None: every core when fitted in the main process, one in a worker process.
    cores: int | None = None


@attrs.frozen(eq=False)
class Fit:
    """One posterior of the latent model, and how it was obtained.

    `draws` are joint draws of the posterior (or of its approximation), keyed by
    variable: b (D, G), mu (D, N), gamma (D, S, G) with gamma[:, 0, :] == 0,
    nu (D, R, G), and delta (D, G) where the model has the class offset.
    """

    backend: str
    method: str
    parameterisation: str
    draws: dict
    elbo: float  # the ELBO at the optimum of a variational method (nan for other methods)
    converged: bool  # whether the fit's own accuracy diagnostic says it can be trusted
    convergence_note: str  # how that was judged and what was seen
    elbo_trace: np.ndarray = attrs.field(factory=lambda: np.empty((0, 2)))  # (iteration, ELBO) rows
    diagnostics: dict = attrs.field(factory=dict)  # e.g. max_rhat, min_ess_bulk for NUTS
    seconds: float = float("nan")
    log_evidence: float = float("nan")  # an estimate of log p(y) where the method gives one (importance sampling)
    chains: int = 1  # the draws are `chains` chains one after another, each of n_draws / chains draws
    sample_stats: dict = attrs.field(factory=dict)  # per-draw sampler statistics in ArviZ's names (NUTS)

    @property
    def selection_score(self) -> float:
        """What chooses between parameterisations: log p(y) where estimated, else the ELBO (a lower bound)."""
        score = self.log_evidence if np.isfinite(self.log_evidence) else self.elbo
        return float(score) if np.isfinite(score) else -np.inf

    @property
    def n_draws(self) -> int:
        return int(self.draws["b"].shape[0])


@runtime_checkable
class Backend(Protocol):
    """An inference backend for the latent model.

    name: how specs refer to it; methods: the subset of METHODS it runs;
    priority: `backend: auto` picks the available backend with the highest priority.
    """

    name: str
    methods: tuple
    priority: int

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else why not (shown to the user)."""

    def fit(self, data: LatentModelData, settings: FitSettings, progress: Callable[[str], None]) -> Fit:
        """Fit the model; call progress(message) now and then during long work."""


def inference_data(fit: Fit, data: LatentModelData, coords: dict):
    """The fit as ArviZ InferenceData: the posterior with its chains and named dimensions, the sampler's
    statistics where the method has them, and the observed predictions.

    coords: labels of `reader`, `severity`, `case` and `subgroup` (the fit's groups). What the posterior
    was and how far to trust it are attributes of the posterior group.
    """
    import arviz as az  # heavy; only where posteriors are written

    chains = fit.chains
    per_chain = fit.n_draws // chains

    def shaped(values):
        values = np.asarray(values)
        return values.reshape((chains, per_chain) + values.shape[1:])

    dims = {"b": ["subgroup"], "mu": ["case"], "gamma": ["severity", "subgroup"], "nu": ["reader", "subgroup"],
            "delta": ["subgroup"], "prediction": ["observation"]}
    labels = {k: [str(v) for v in values] for k, values in coords.items()}
    observed = {"prediction": np.asarray(data.prediction, dtype=float)}
    where = {"observation": np.arange(data.n_predictions)}
    idata = az.from_dict(
        posterior={k: shaped(fit.draws[k]) for k in ("b", "mu", "gamma", "nu", "delta") if k in fit.draws},
        sample_stats={k: shaped(v) for k, v in fit.sample_stats.items()} or None,
        observed_data=observed,
        coords={**labels, **where},
        dims=dims,
    )
    # Which reader, severity and case each observation is, as coordinates along it.
    idata.observed_data = idata.observed_data.assign_coords(
        obs_reader=("observation", np.asarray(labels["reader"])[data.reader]),
        obs_severity=("observation", np.asarray(labels["severity"])[data.severity]),
        obs_case=("observation", np.asarray(labels["case"])[data.case]),
    )
    attributes = {"backend": fit.backend, "method": fit.method, "parameterisation": fit.parameterisation,
                  "trusted": int(fit.converged), "accuracy_note": fit.convergence_note,
                  "likelihood": "soft" if data.soft else "binary",
                  **{k: float(v) for k, v in fit.diagnostics.items() if np.isscalar(v)}}
    for group in idata.groups():
        # ArviZ stamps the creation time; a run's files must be byte-identical for identical inputs.
        idata[group].attrs.pop("created_at", None)
    idata.posterior.attrs.update(attributes)
    return idata


def predictive_probability(fit: Fit, data: LatentModelData, chunk: int = 20) -> np.ndarray:
    """Posterior-predictive P(y = 1) for every observer x severity x case, shape (R, S, N).

    Averages inv_logit(b[g] + mu[n] + gamma[s, g] + nu[r, g]) over the *joint* draws,
    so cells no observer read (the sparse reader-study design) are filled in too.
    """
    import torch  # the heavy import only where posterior predictions are needed

    g = torch.as_tensor(data.case_group, dtype=torch.long)
    # Single precision for the ~10^8 logistic evaluations; the average is kept in double.
    b, mu, gamma, nu = (torch.as_tensor(np.asarray(fit.draws[k]), dtype=torch.float32) for k in ("b", "mu", "gamma", "nu"))
    total = torch.zeros((data.n_readers, data.n_severities, data.n_cases), dtype=torch.float64)
    for start in range(0, fit.n_draws, chunk):
        sl = slice(start, start + chunk)
        case_part = b[sl][:, g] + mu[sl]  # (d, N)
        gamma_part = gamma[sl][:, :, g]  # (d, S, N)
        nu_part = nu[sl][:, :, g]  # (d, R, N)
        eta = case_part[:, None, None, :] + gamma_part[:, None, :, :] + nu_part[:, :, None, :]
        total += torch.sigmoid_(eta).sum(dim=0, dtype=torch.float64)
    return (total / fit.n_draws).numpy()


def normal_tail_above_zero(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """P(x > 0) under N(mean, sd): the paper's P(gamma > 0) summary."""
    mean = np.asarray(mean, dtype=float)
    sd = np.asarray(sd, dtype=float)
    return 0.5 * np.vectorize(math.erfc)(-mean / (sd * math.sqrt(2.0)))
