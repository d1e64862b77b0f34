"""The torch backend's default method, `laplace`: its pieces against brute force, its posterior against
NUTS (PyStan) on simulated studies, and its own accuracy diagnostic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from perceptcore.latent_model import FitSettings, normal_tail_above_zero, stan_file
from perceptcore_plugins.backends import _laplace
from perceptcore_plugins.backends.torch_backend import TorchBackend

try:
    from simulate import simulate_study
except ImportError:  # run from the repository root
    from tests.simulate import simulate_study


def sparse_binary_study(seed=5, n_cases=160, readers=6, severities=5):
    """The reader-study design: every reader reads each exam (two cases) once, at a random severity."""
    return simulate_study(np.random.default_rng(seed), n_cases, readers, severities, 2, False, sparse=True,
                          gamma_scale=0.8)[0]


def dense_soft_study(seed=6, n_cases=120, readers=4, severities=5):
    return simulate_study(np.random.default_rng(seed), n_cases, readers, severities, 2, True, gamma_scale=0.8)[0]


def by_class_study(seed=7, n_cases=160, readers=6, severities=5):
    """The reader-study design under the default model: positive cases' effects have their own mean."""
    return simulate_study(np.random.default_rng(seed), n_cases, readers, severities, 2, False, sparse=True,
                          gamma_scale=0.8, by_class=True)[0]


def shared_parameters(data, psi: np.ndarray) -> tuple:
    """b, gamma (with its zero reference), nu and the class offset (0 without one) of one subgroup's psi,
    and their log prior density from the model's definition (random-walk prior on gamma's increments or on
    its levels, N(0, 1) priors, N(0, priors.delta) for the offset)."""
    S, R = data.n_severities, data.n_readers
    b, levels, nu = psi[0], psi[1:S], psi[S:S + R]
    gamma = np.concatenate([[0.0], levels])
    increments = np.diff(gamma) if data.parameterisation == "random_walk" else levels
    log_prior = stats.norm.logpdf(b) + stats.norm.logpdf(increments).sum() + stats.norm.logpdf(nu).sum()
    delta = 0.0
    if data.case_positive is not None:
        delta = psi[S + R]
        log_prior += stats.norm.logpdf(delta, scale=data.priors.delta)
    return b, gamma, nu, delta, float(log_prior)


def brute_force_log_marginal(data, group: int, psi: np.ndarray) -> float:
    """log p(psi, y) of one subgroup with mu integrated out by scipy's adaptive quadrature."""
    b, gamma, nu, delta, total = shared_parameters(data, psi)
    y = data.prediction if data.soft else np.round(data.prediction)
    positive = np.zeros(data.n_cases) if data.case_positive is None else data.case_positive
    for n in np.flatnonzero(data.case_group == group):
        m = data.case == n
        shared = b + gamma[data.severity[m]] + nu[data.reader[m]]
        mean = delta * positive[n]

        def log_f(mu):
            eta = mu + shared
            return float(np.sum(y[m] * eta - np.logaddexp(0.0, eta)) + stats.norm.logpdf(mu, loc=mean))

        peak = max((log_f(x), x) for x in np.linspace(-8, 8, 161))
        value, _ = integrate.quad(lambda mu: math.exp(log_f(mu) - peak[0]), -15, 15, points=[peak[1]], limit=200,
                                  epsabs=0, epsrel=1e-11)
        total += peak[0] + math.log(value)
    return float(total)


def prior_quadrature_log_marginal(data, group: int, psi: np.ndarray, nodes: int = 80) -> float:
    """The same integral by a fixed Gauss-Hermite rule against mu's N(0, 1) prior (not adaptive, vectorised):
    a second independent computation, fast enough to evaluate on a grid of psi."""
    b, gamma, nu, _, total = shared_parameters(data, psi)
    y = data.prediction if data.soft else np.round(data.prediction)
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    members = data.case_group[data.case] == group
    eta = x[:, None] + (b + gamma[data.severity] + nu[data.reader])[None, members]
    terms = y[members] * eta - np.logaddexp(0.0, eta)  # (nodes, predictions)
    cases = np.unique(data.case[members], return_inverse=True)[1]
    per_case = np.zeros((nodes, cases.max() + 1))
    np.add.at(per_case.T, cases, terms.T)
    return float(total + np.sum(np.logaddexp.reduce(per_case + np.log(w / w.sum())[:, None], axis=0)))


@pytest.mark.parametrize("parameterisation", ["random_walk", "independent"])
@pytest.mark.parametrize("make", [sparse_binary_study, dense_soft_study, by_class_study],
                         ids=["sparse-binary", "dense-soft", "by-class"])
def test_collapsed_density_is_the_brute_force_integral(make, parameterisation):
    data = make(n_cases=40).with_parameterisation(parameterisation)
    block = _laplace.Block(data.only_subgroup(1))
    assert block.dense == (make is dense_soft_study)
    assert block.by_class == (make is by_class_study)
    psi_hat, mu_hat, precision = block.mode()
    rng = np.random.default_rng(0)
    cov = torch.linalg.inv(precision).numpy()
    for psi in rng.multivariate_normal(psi_hat.numpy(), 2.0 * cov, size=3):
        psi_t = torch.as_tensor(psi)[None]
        modes, d2 = block.case_modes(psi_t, mu_hat[None].clone())
        ours = block.log_marginal(psi_t, modes, (-d2).rsqrt())[0].item()
        assert ours == pytest.approx(brute_force_log_marginal(data, 1, psi), abs=1e-5)


def test_mode_is_where_the_brute_force_marginal_peaks():
    data = sparse_binary_study(n_cases=40)
    block = _laplace.Block(data.only_subgroup(0))
    psi_hat, _, _ = block.mode()
    at_mode = prior_quadrature_log_marginal(data, 0, psi_hat.numpy())
    assert at_mode == pytest.approx(brute_force_log_marginal(data, 0, psi_hat.numpy()), abs=1e-6)
    for j in range(block.P):
        for step in (-0.02, 0.02):
            moved = psi_hat.numpy().copy()
            moved[j] += step
            assert prior_quadrature_log_marginal(data, 0, moved) < at_mode


def test_case_effect_draws_follow_their_exact_conditional():
    """mu | psi, y drawn by independence Metropolis has the conditional's mean and sd (by quadrature)."""
    data = sparse_binary_study(n_cases=40).only_subgroup(0)
    block = _laplace.Block(data)
    psi_hat, mu_hat, _ = block.mode()
    gen = torch.Generator().manual_seed(3)
    psi = psi_hat.expand(4000, -1)
    draws = block.draw_case_effects(psi, mu_hat.expand(4000, -1).clone(), gen).numpy()
    y = np.round(data.prediction)
    S = data.n_severities
    b, gamma, nu, _, _ = shared_parameters(data, psi_hat.numpy())
    for n in range(6):
        m = data.case == n
        shared = b + gamma[data.severity[m]] + nu[data.reader[m]]
        density = lambda mu: math.exp(np.sum(y[m] * (mu + shared) - np.logaddexp(0, mu + shared)) - mu * mu / 2)  # noqa: E731
        z = integrate.quad(density, -12, 12)[0]
        mean = integrate.quad(lambda mu: mu * density(mu), -12, 12)[0] / z
        sd = math.sqrt(integrate.quad(lambda mu: (mu - mean) ** 2 * density(mu), -12, 12)[0] / z)
        assert draws[:, n].mean() == pytest.approx(mean, abs=5 * sd / math.sqrt(4000))
        assert draws[:, n].std() == pytest.approx(sd, rel=0.06)


def test_fit_shapes_determinism_and_diagnostic():
    data = sparse_binary_study(n_cases=60)
    settings = FitSettings(seed=4, draws=300)
    a, b = (TorchBackend().fit(data, settings) for _ in range(2))
    assert (a.backend, a.method, a.n_draws) == ("torch", "laplace", 300)
    assert a.draws["gamma"].shape == (300, data.n_severities, 2) and a.draws["mu"].shape == (300, data.n_cases)
    np.testing.assert_array_equal(a.draws["gamma"][:, 0, :], 0.0)
    for key in a.draws:
        np.testing.assert_array_equal(a.draws[key], b.draws[key])
    assert a.converged and a.diagnostics["pareto_k"] <= 0.7 and "k-hat" in a.convergence_note
    assert np.isfinite(a.log_evidence) and math.isnan(a.elbo)


def test_a_proposal_that_misses_the_posterior_is_flagged(monkeypatch):
    """Pareto k-hat is a real diagnostic: squeeze the proposal to a third of its width and the fit says
    not to trust it."""
    monkeypatch.setattr(_laplace, "PROPOSAL_SCALE", 0.33)
    fit = TorchBackend().fit(dense_soft_study(), FitSettings(seed=0, draws=200))
    assert fit.diagnostics["pareto_k"] > 0.7
    assert not fit.converged and "NOT to be trusted" in fit.convergence_note


def test_log_evidence_matches_brute_force_for_one_reader():
    """With one reader, two severities and few cases the whole marginal likelihood is a low-dimensional
    integral; importance sampling's estimate of it is within its Monte Carlo error."""
    data = simulate_study(np.random.default_rng(2), 12, 1, 2, 1, False, sparse=False)[0]
    fit = TorchBackend().fit(data, FitSettings(seed=0, draws=2000))
    block = _laplace.Block(data.only_subgroup(0))
    psi_hat, _, precision = block.mode()
    # psi = (b, gamma[1], nu[0]): a 3-D integral of the brute-force marginal on a Gauss-Hermite product grid.
    sd = torch.linalg.inv(precision).diagonal().sqrt().numpy()
    x, w = np.polynomial.hermite_e.hermegauss(11)
    grid = np.stack(np.meshgrid(x, x, x, indexing="ij"), -1).reshape(-1, 3)
    weights = np.prod(np.stack(np.meshgrid(w, w, w, indexing="ij"), -1).reshape(-1, 3), axis=1)
    values = []
    for point, weight in zip(grid, weights):
        psi = psi_hat.numpy() + 1.5 * sd * point
        values.append(prior_quadrature_log_marginal(data, 0, psi) + 0.5 * np.sum(point**2) + math.log(weight))
    exact = float(np.logaddexp.reduce(values) + np.sum(np.log(1.5 * sd)))
    assert fit.log_evidence == pytest.approx(exact, abs=0.02)


# ---------------------------------------------------------------- against NUTS


@pytest.fixture(scope="module")
def nuts_studies():
    """Two simulated studies and PyStan NUTS draws of gamma (4 chains x 1,500)."""
    import stan

    code = stan_file().read_text()
    out = {}
    for name, data in (("sparse-binary", sparse_binary_study()), ("dense-soft", dense_soft_study()),
                       ("by-class", by_class_study())):
        model = stan.build(code, data=data.stan_data(), random_seed=1)
        fit = model.sample(num_chains=4, num_warmup=1000, num_samples=1500)
        # PyStan puts draws last; the Fit layout puts them first.
        names = ("b", "mu", "gamma", "nu") + (("delta",) if data.case_positive is not None else ())
        out[name] = (data, {k: np.moveaxis(np.asarray(fit[k]), -1, 0) for k in names})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sparse-binary", "dense-soft", "by-class"])
def test_laplace_matches_nuts(nuts_studies, name):
    """The issue's bounds, on every (severity > 0, subgroup): E[gamma] within 0.25 NUTS-sd, sd(gamma)
    within 20 %, P(gamma > 0) within 0.05; and the same bounds on the class offset where the model has it."""
    data, nuts = nuts_studies[name]
    fit = TorchBackend().fit(data, FitSettings(seed=0))
    assert fit.converged
    pairs = [(fit.draws["gamma"][:, 1:, :], nuts["gamma"][:, 1:, :])]
    if "delta" in nuts:
        pairs.append((fit.draws["delta"], nuts["delta"]))
    for ours, ref in pairs:
        ref_mean, ref_sd = ref.mean(0), ref.std(0, ddof=1)
        mean, sd = ours.mean(0), ours.std(0, ddof=1)
        assert (np.abs(mean - ref_mean) / ref_sd).max() < 0.25
        assert np.abs(sd / ref_sd - 1).max() < 0.20
        assert np.abs(normal_tail_above_zero(mean, sd) - normal_tail_above_zero(ref_mean, ref_sd)).max() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sparse-binary", "dense-soft", "by-class"])
def test_bayesian_separability_matches_nuts(nuts_studies, name):
    """The posterior of the change of separability needs every parameter's joint draws (the case effects
    included): from `laplace` it matches the same summary from NUTS's draws within the same bounds."""
    from perceptcore_plugins.metrics.bayesian_separability import mean_ks_draws

    data, nuts = nuts_studies[name]
    fit = TorchBackend().fit(data, FitSettings(seed=0))
    positive = (data.case_positive.astype(bool) if data.case_positive is not None  # the model's classes, or
                else np.random.default_rng(0).random(data.n_cases) < 0.3)  # any labelling: a comparison
    members = [data.case_group == g for g in range(data.n_groups)]
    delta = {}
    for who, draws in (("laplace", fit.draws), ("nuts", nuts)):
        ks = mean_ks_draws(draws, data.case_group, positive, members)
        delta[who] = ks[:, 1:, :] - ks[:, :1, :]
    ref_mean, ref_sd = delta["nuts"].mean(0), delta["nuts"].std(0, ddof=1)
    assert (np.abs(delta["laplace"].mean(0) - ref_mean) / ref_sd).max() < 0.25
    assert np.abs(delta["laplace"].std(0, ddof=1) / ref_sd - 1).max() < 0.20


@pytest.mark.parametrize("make", [sparse_binary_study, by_class_study], ids=["sparse-binary", "by-class"])
def test_joint_hessian_is_the_autograd_hessian(make):
    """The proposal's curvature (psi-psi, psi-mu and mu-mu blocks) against torch autograd of the joint log
    density written out from the model's definition."""
    data = make(n_cases=30).only_subgroup(0)
    block = _laplace.Block(data)
    S, R, N = data.n_severities, data.n_readers, data.n_cases
    rng = np.random.default_rng(1)
    psi = torch.tensor(rng.normal(scale=0.5, size=block.P))
    mu = torch.tensor(rng.normal(size=N))
    y = torch.as_tensor(np.round(data.prediction))
    positive = torch.as_tensor(np.zeros(N) if data.case_positive is None else data.case_positive, dtype=torch.float64)

    def log_joint(x):
        p, m = x[:block.P], x[block.P:]
        gamma = torch.cat([torch.zeros(1, dtype=x.dtype), p[1:S]])
        delta = p[S + R] if block.by_class else 0.0
        eta = p[0] + m[data.case] + gamma[data.severity] + p[S:S + R][data.reader]
        increments = torch.diff(gamma) if data.parameterisation == "random_walk" else gamma[1:]
        prior = -0.5 * (p[0] ** 2 + (increments**2).sum() + (p[S:S + R] ** 2).sum() + ((m - delta * positive) ** 2).sum())
        if block.by_class:
            prior = prior - 0.5 * (delta / data.priors.delta) ** 2
        return (y * eta - torch.nn.functional.softplus(eta)).sum() + prior

    full = -torch.autograd.functional.hessian(log_joint, torch.cat([psi, mu]))
    H, C, d = block.joint_hessian(psi, mu)
    torch.testing.assert_close(H, full[:block.P, :block.P], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(C, full[:block.P, block.P:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d, torch.diagonal(full[block.P:, block.P:]), rtol=1e-10, atol=1e-10)
    off_diagonal = full[block.P:, block.P:] - torch.diag(torch.diagonal(full[block.P:, block.P:]))
    assert off_diagonal.abs().max().item() == 0.0
