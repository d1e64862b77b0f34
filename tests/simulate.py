"""Simulated studies with known parameters, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from perceptcore.latent_model import LatentModelData, Priors


def simulate_study(
    rng: np.random.Generator,
    n_cases: int,
    n_readers: int,
    n_severities: int,
    n_groups: int,
    soft: bool,
    parameterisation: str = "random_walk",
    sparse: bool = False,
    concentration: float = 3.0,
    gamma_scale: float = 0.5,
) -> tuple[LatentModelData, dict]:
    """Draw parameters and predictions from the latent model.

    b, mu and nu come from their N(0, 1) priors; gamma_free from N(0, gamma_scale),
    because N(0, 1) random-walk increments reach implausible effects of +-7 by
    the last of 9 severities (the published fits stay within about +-3).

    Dense: every observer predicts every case at every severity (the DNN design).
    Sparse: cases come in pairs (the two breasts of an exam) and each observer reads
    each pair once, at one severity drawn uniformly (the reader-study design).
    Soft predictions are Beta draws with mean inv_logit(eta): their expectation is
    what the soft Bernoulli likelihood fits, so the parameters stay recoverable.
    """
    N, R, S, G = n_cases, n_readers, n_severities, n_groups
    case_group = rng.permutation(np.arange(N) % G)  # every subgroup present
    b = rng.normal(size=G)
    mu = rng.normal(size=N)
    gamma_free = rng.normal(scale=gamma_scale, size=(S - 1, G))
    nu = rng.normal(size=(R, G))
    levels = np.cumsum(gamma_free, axis=0) if parameterisation == "random_walk" else gamma_free
    gamma = np.vstack([np.zeros((1, G)), levels])

    if sparse:
        n_pairs = (N + 1) // 2
        pair_severity = rng.integers(0, S, size=(R, n_pairs))
        reader, case = np.meshgrid(np.arange(R), np.arange(N), indexing="ij")
        severity = pair_severity[:, case[0] // 2]
    else:
        reader, severity, case = np.meshgrid(np.arange(R), np.arange(S), np.arange(N), indexing="ij")
    reader, severity, case = (a.ravel() for a in (reader, severity, case))
    g = case_group[case]
    eta = b[g] + mu[case] + gamma[severity, g] + nu[reader, g]
    p = 1.0 / (1.0 + np.exp(-eta))
    if soft:
        prediction = rng.beta(concentration * p, concentration * (1.0 - p))
    else:
        prediction = (rng.random(p.shape) < p).astype(float)

    data = LatentModelData(
        n_cases=N,
        n_readers=R,
        n_severities=S,
        n_groups=G,
        case_group=case_group,
        reader=reader,
        severity=severity,
        case=case,
        prediction=prediction,
        soft=soft,
        parameterisation=parameterisation,
        priors=Priors(),
    )
    truth = {"b": b, "mu": mu, "gamma_free": gamma_free, "gamma": gamma, "nu": nu}
    return data, truth
