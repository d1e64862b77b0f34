"""Simulated studies with known parameters, for tests and benchmarks."""

from __future__ import annotations

import attrs
import numpy as np
from scipy import stats

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
    group_sizes=None,
    by_class: bool = False,
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
    group_sizes: cases per subgroup (summing to n_cases), e.g. the published subgroups' sizes;
    by default the cases are spread evenly over the subgroups.
    by_class: about 30 % of the cases are positive and their case effects have mean delta[g] ~ N(2, 0.5)
    (the `by_class` model, which the data then carry as case_positive); else the pooled model.
    """
    N, R, S, G = n_cases, n_readers, n_severities, n_groups
    if group_sizes is None:
        case_group = rng.permutation(np.arange(N) % G)  # every subgroup present
    else:
        if len(group_sizes) != G or sum(group_sizes) != N:
            raise ValueError(f"group_sizes {group_sizes} must have {G} entries summing to {N}")
        case_group = rng.permutation(np.repeat(np.arange(G), group_sizes))
    b = rng.normal(size=G)
    mu = rng.normal(size=N)
    positive = delta = None
    if by_class:
        positive = rng.random(N) < 0.3
        delta = rng.normal(2.0, 0.5, size=G)
        mu = mu + delta[case_group] * positive
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
        case_positive=positive,
    )
    truth = {"b": b, "mu": mu, "gamma_free": gamma_free, "gamma": gamma, "nu": nu}
    if by_class:
        truth["delta"] = delta
    return data, truth


# --------------------------------------------------------------------------- the Simpson's-paradox calibration

# The published study's analysed subgroups: (cases, malignant); the other 1,195 of 1,440 cases are negative.
PUBLISHED_SUBGROUPS = {"microcalcifications": (109, 22), "soft_tissue_lesions": (136, 30)}
PUBLISHED_OTHERS = 1440 - 109 - 136


def ramp(low: float, n_severities: int = 9, full_at: int = 5) -> np.ndarray:
    """gamma levels falling linearly from 0 at the reference to `low` at severity `full_at`, then level."""
    return low * np.minimum(np.arange(n_severities) / full_at, 1.0)


def simulate_subgroup_study(rng: np.random.Generator, gamma: dict, design: str = "radiologists",
                            n_others: int = PUBLISHED_OTHERS, n_readers: int | None = None):
    """A study of the published size with known subgroup effects, fitted split and merged.

    gamma: subgroup name (of PUBLISHED_SUBGROUPS) -> its levels (S,), gamma[0] = 0. The cases are the
    analysed subgroups' (positives and benign) and n_others negatives forming one more group, unaffected.
    design "radiologists": 10 readers each read every case once at a uniformly random severity, 0/1
    calls; "dnns": 5 seeds predict every case at every severity, probabilities (Beta around the
    model's p). Case effects separate the classes: mu ~ N(+-1.25, 1) for malignant / negative.
    Returns (split data, merged data, positive mask, truth); data hold group 0, 1 = the subgroups in
    PUBLISHED_SUBGROUPS order (merged: group 0 = both) and the last group = the other negatives.
    truth["ks_change"] (S - 1, 2): each subgroup's true change of the readers' mean KS statistic (its
    positives against all negatives, on the noise-free logits) from the reference to each severity,
    the quantity bayesian_separability's Delta estimates.
    """
    names = list(PUBLISHED_SUBGROUPS)
    sizes = [PUBLISHED_SUBGROUPS[n] for n in names] + [(n_others, 0)]
    group = np.repeat(np.arange(len(sizes)), [n for n, _ in sizes])
    positive = np.concatenate([np.arange(n) < k for n, k in sizes])
    S = len(next(iter(gamma.values())))
    levels = np.column_stack([gamma[n] for n in names] + [np.zeros(S)])  # (S, G)
    R = n_readers or (10 if design == "radiologists" else 5)
    N, G = len(group), len(sizes)
    # Class separation (mu) well above the groups' differences (b): KS is unsigned, so a group whose
    # positives sat below another group's negatives would read a fall of its logits as a rise.
    b = rng.normal(0.0, 0.25, size=G)
    mu = np.where(positive, 1.25, -1.25) + rng.normal(size=N)
    nu = rng.normal(0.0, 0.5, size=(R, G))
    if design == "radiologists":
        reader, case = (a.ravel() for a in np.meshgrid(np.arange(R), np.arange(N), indexing="ij"))
        severity = rng.integers(0, S, size=reader.shape)
    else:
        reader, severity, case = (a.ravel() for a in np.meshgrid(np.arange(R), np.arange(S), np.arange(N),
                                                                 indexing="ij"))
    g = group[case]
    p = 1.0 / (1.0 + np.exp(-(b[g] + mu[case] + levels[severity, g] + nu[reader, g])))
    soft = design != "radiologists"
    prediction = rng.beta(3.0 * p, 3.0 * (1.0 - p)) if soft else (rng.random(p.shape) < p).astype(float)
    # The default model (case_effects: by_class): the classes' case effects are two populations.
    split = LatentModelData(n_cases=N, n_readers=R, n_severities=S, n_groups=G, case_group=group, reader=reader,
                            severity=severity, case=case, prediction=prediction, soft=soft,
                            case_positive=positive.astype(float))
    merged_group = np.where(group < len(names), 0, 1)
    merged = attrs.evolve(split, n_groups=2, case_group=merged_group)
    logits = b[group] + mu + levels[:, group][None] + nu[:, group][:, None]  # (R, S, N)
    ks = np.array([[[stats.ks_2samp(logits[r, s, (group == k) & positive], logits[r, s, ~positive]).statistic
                     for k in range(len(names))] for s in range(S)] for r in range(R)]).mean(axis=0)
    return split, merged, positive, {"ks_change": ks[1:] - ks[:1]}


def paradox_flags(backend, settings, split, merged, positive, alpha: float, margins) -> dict:
    """Fit a simulated study split and merged and run the Simpson's-paradox check on both analyses.

    Returns {analysis: {subgroup name: check() result}}, analyses `predictive_confidence` and
    `bayesian_separability`, as the simpsons_paradox metric computes them.
    """
    from perceptcore_plugins.metrics.bayesian_separability import mean_ks_draws
    from perceptcore_plugins.metrics.simpsons_paradox import check

    names = list(PUBLISHED_SUBGROUPS)
    fit_split = backend.fit(split, settings, lambda m: None)
    fit_merged = backend.fit(merged, settings, lambda m: None)
    gamma_split, gamma_merged = fit_split.draws["gamma"], fit_merged.draws["gamma"]
    ks_split = mean_ks_draws(fit_split.draws, split.case_group, positive, [split.case_group == k for k in (0, 1)])
    ks_merged = mean_ks_draws(fit_merged.draws, merged.case_group, positive, [merged.case_group == 0])
    return {
        "predictive_confidence": check({n: gamma_split[:, 1:, k] for k, n in enumerate(names)},
                                       gamma_merged[:, 1:, 0], alpha, margins.gamma),
        "bayesian_separability": check({n: ks_split[:, 1:, k] - ks_split[:, :1, k] for k, n in enumerate(names)},
                                    ks_merged[:, 1:, 0] - ks_merged[:, :1, 0], alpha, margins.ks),
    }
