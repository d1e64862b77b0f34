"""The latent model's backends: the torch log density is the Stan program's, torch ADVI
converges to the right answer, and the CmdStan backend agrees with it where it can run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perceptcore.errors import PerceptcoreError
from perceptcore.latent_model import Backend, FitSettings, stan_file
from perceptcore_plugins.backends import stan as stan_backend_module
from perceptcore_plugins.backends import _advi, torch_backend
from perceptcore_plugins.backends.stan import StanBackend
from perceptcore_plugins.backends._advi import log_density
from perceptcore_plugins.backends.torch_backend import TorchBackend

try:
    from simulate import simulate_study
except ImportError:  # tests/ made a package
    from tests.simulate import simulate_study

LIKELIHOODS = {"binary": False, "soft": True}
PARAMETERISATIONS = ("random_walk", "independent")


# ---------------------------------------------------------------- data and helpers


ADVI = FitSettings(method="advi", seed=0)


def small_study(soft: bool, parameterisation: str = "random_walk"):
    """60 cases, 4 observers, 4 severities, 2 subgroups: NUTS takes seconds on it."""
    data, truth = simulate_study(np.random.default_rng(11), 60, 4, 4, 2, soft, parameterisation)
    return data, truth


@pytest.fixture(scope="module")
def small():
    studies = {name: small_study(soft) for name, soft in LIKELIHOODS.items()}
    # The default model: binary calls, the positive cases' effects with a mean of their own.
    studies["by_class"] = simulate_study(np.random.default_rng(12), 60, 4, 4, 2, False, by_class=True)
    return studies


def random_params(rng, data, scale=1.5) -> dict:
    G, N, S, R = data.n_groups, data.n_cases, data.n_severities, data.n_readers
    params = {
        "b": torch.tensor(rng.normal(scale=scale, size=G)),
        "mu": torch.tensor(rng.normal(scale=scale, size=N)),
        "gamma_free": torch.tensor(rng.normal(scale=scale, size=(S - 1, G))),
        "nu": torch.tensor(rng.normal(scale=scale, size=(R, G))),
    }
    if data.case_positive is not None:
        params["delta"] = torch.tensor(rng.normal(scale=scale, size=G))
    return params


def stan_vector(params: dict) -> list:
    """Stan's unconstrained vector: parameters block order, matrices column-major."""
    return np.concatenate(
        [params["b"].numpy(), params["mu"].numpy(), params["gamma_free"].numpy().T.ravel(), params["nu"].numpy().T.ravel()]
        + ([params["delta"].numpy()] if "delta" in params else [])
    ).tolist()


def numpy_log_density(params: dict, data) -> float:
    """The Stan program written out again, from its own (1-based) data block."""
    d = data.stan_data()
    p = {k: v.numpy() for k, v in params.items()}
    gf = p["gamma_free"]
    gamma = np.vstack([np.zeros((1, d["G"])), np.cumsum(gf, 0) if d["random_walk"] else gf])
    case = np.asarray(d["case_id"]) - 1
    g = np.asarray(d["group"])[case] - 1
    eta = p["b"][g] + p["mu"][case] + gamma[np.asarray(d["severity"]) - 1, g] + p["nu"][np.asarray(d["reader"]) - 1, g]

    def normal(x, sd):
        return float(np.sum(-0.5 * (x / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)))

    mean = p["delta"][np.asarray(d["group"]) - 1] * np.asarray(d["positive"]) if d["class_offset"] else 0.0
    lp = normal(p["b"], d["prior_sd_b"]) + normal(p["mu"] - mean, d["prior_sd_mu"])
    if d["class_offset"]:
        lp += normal(p["delta"], d["prior_sd_delta"])
    lp += normal(gf, d["prior_sd_gamma"]) + normal(p["nu"], d["prior_sd_nu"])
    log_inv_logit, log1m_inv_logit = -np.logaddexp(0, -eta), -np.logaddexp(0, eta)
    y = np.asarray(d["z"] if d["soft"] else d["y"], dtype=float)
    return lp + float(np.sum(y * log_inv_logit + (1 - y) * log1m_inv_logit))


def fit_mean(fit, key="gamma"):
    return fit.draws[key].mean(axis=0)


# ---------------------------------------------------------------- PyStan (the reference Stan)


@pytest.fixture(scope="module")
def pystan_models(small):
    """One PyStan model per (likelihood, parameterisation) on the small studies.

    build() bakes the data in; the program is compiled once (and cached by httpstan
    across sessions), so the later builds only attach data.
    """
    import stan  # a test dependency: its absence is a failure, not a skip

    code = stan_file().read_text()
    models = {}
    for name in LIKELIHOODS:
        data = small[name][0]
        for parameterisation in PARAMETERISATIONS:
            d = data.with_parameterisation(parameterisation)
            models[name, parameterisation] = (d, stan.build(code, data=d.stan_data(), random_seed=1))
    d = small["by_class"][0]
    models["by_class", "random_walk"] = (d, stan.build(code, data=d.stan_data(), random_seed=1))
    return models


@pytest.mark.slow
@pytest.mark.parametrize("likelihood, parameterisation",
                         [(k, p) for k in LIKELIHOODS for p in PARAMETERISATIONS] + [("by_class", "random_walk")])
def test_torch_log_density_is_the_stan_programs(pystan_models, likelihood, parameterisation):
    data, model = pystan_models[likelihood, parameterisation]
    assert model.param_names[:4] == ("b", "mu", "gamma_free", "nu")
    dims = dict(zip(model.param_names, model.dims))  # PyStan lists zero-size parameters too
    assert dims["delta"] == ([data.n_groups] if likelihood == "by_class" else [0])
    rng = np.random.default_rng(3)
    for _ in range(4):
        params = random_params(rng, data)
        stan_lp = model.log_prob(stan_vector(params), adjust_transform=False)
        torch_lp = log_density(params, data).item()
        assert torch_lp == pytest.approx(stan_lp, rel=1e-8, abs=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", list(LIKELIHOODS) + ["by_class"])
def test_torch_advi_matches_nuts(pystan_models, likelihood):
    """Mean-field posterior means of gamma within 0.15 of the exact posterior's."""
    data, model = pystan_models[likelihood, "random_walk"]
    nuts = model.sample(num_chains=2, num_samples=1000, num_warmup=1000)
    nuts_gamma = np.moveaxis(nuts["gamma"], -1, 0).mean(axis=0)  # PyStan puts draws last
    fit = TorchBackend().fit(data, ADVI)
    assert fit.converged
    np.testing.assert_array_equal(nuts_gamma[0], 0.0)
    assert np.abs(fit_mean(fit) - nuts_gamma).max() < 0.15


# ---------------------------------------------------------------- torch backend


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS) + ["by_class"])
@pytest.mark.parametrize("parameterisation", PARAMETERISATIONS)
def test_log_density_matches_a_numpy_transcription(small, likelihood, parameterisation):
    data = small[likelihood][0].with_parameterisation(parameterisation)
    rng = np.random.default_rng(5)
    for _ in range(3):
        params = random_params(rng, data)
        assert log_density(params, data).item() == pytest.approx(numpy_log_density(params, data), rel=1e-10)
    batch = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    expected = [log_density({k: v[i] for k, v in batch.items()}, data).item() for i in range(2)]
    np.testing.assert_allclose(log_density(batch, data).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("by_class", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("parameterisation", PARAMETERISATIONS)
def test_hand_gradient_is_the_autograd_gradient(sparse, parameterisation, by_class):
    """The fit's hand-written reparameterisation gradient, against autograd of the same estimate."""
    data, _ = simulate_study(np.random.default_rng(2), 30, 3, 4, 2, True, parameterisation, sparse=sparse,
                             by_class=by_class)
    prob = _advi._Problem(data)
    assert prob.grid == (not sparse)
    rng = np.random.default_rng(0)
    mean = torch.tensor(rng.normal(size=prob.P), requires_grad=True)
    log_sd = torch.tensor(rng.normal(-1.0, 0.3, size=prob.P), requires_grad=True)
    eps = torch.randn(data.n_predictions, dtype=torch.float64)
    elbo, g_mean, g_log_sd = prob.elbo_and_gradient(mean.detach(), log_sd.detach(), eps)

    var = torch.exp(2 * log_sd)
    em, sd = prob.to_eta(mean), prob.to_eta(var).sqrt()
    softplus = torch.nn.functional.softplus
    loglik = (prob.z * em).sum() - 0.5 * (softplus(em + sd * eps) + softplus(em - sd * eps)).sum()
    prior = prob.prior_const - 0.5 * ((mean**2 + var) / prob.prior_var).sum()
    reference = loglik + prior + log_sd.sum() + prob.P * (0.5 + 0.5 * math.log(2 * math.pi))
    reference.backward()
    assert elbo == pytest.approx(reference.item(), rel=1e-10)
    torch.testing.assert_close(g_mean, mean.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_log_sd, log_sd.grad, rtol=1e-9, atol=1e-9)


def test_ridge_step_keeps_eta_and_raises_the_elbo():
    data, _ = simulate_study(np.random.default_rng(4), 40, 3, 4, 2, False, sparse=True)
    prob = _advi._Problem(data)
    mean = torch.tensor(np.random.default_rng(1).normal(size=prob.P))
    log_sd = torch.full((prob.P,), -1.0, dtype=torch.float64)
    before_eta, before_elbo = prob.to_eta(mean), prob.elbo(mean, log_sd)
    prob.ridge_step(mean)
    torch.testing.assert_close(prob.to_eta(mean), before_eta, rtol=0, atol=1e-12)
    assert prob.elbo(mean, log_sd) > before_elbo
    again = mean.clone()
    prob.ridge_step(again)  # already at the optimum along the ridges
    torch.testing.assert_close(again, mean, rtol=0, atol=1e-12)


def test_quadrature_elbo_is_the_monte_carlo_elbo_of_the_log_density(small):
    """The final ELBO (quadrature) equals E_q[log_density] + entropy by joint draws."""
    data = small["soft"][0]
    fit = TorchBackend().fit(data, FitSettings(method="advi", seed=0, draws=4000))
    draws = fit.draws
    params = {
        "b": torch.tensor(draws["b"]),
        "mu": torch.tensor(draws["mu"]),
        "gamma_free": torch.tensor(np.diff(draws["gamma"], axis=1)),  # random walk increments
        "nu": torch.tensor(draws["nu"]),
    }
    log_p = log_density(params, data).numpy()
    flat = np.concatenate([v.numpy().reshape(len(log_p), -1) for v in params.values()], axis=1)
    entropy = np.sum(np.log(flat.std(axis=0))) + flat.shape[1] * 0.5 * (1 + math.log(2 * math.pi))
    mc, se = log_p.mean() + entropy, log_p.std() / math.sqrt(len(log_p))
    assert abs(fit.elbo - mc) < 4 * se + 0.5  # 0.5: entropy from sample sds


@pytest.mark.parametrize(
    "soft, sparse, readers, gamma_tol, case_corr",
    [(True, False, 5, 0.2, 0.95), (False, False, 5, 0.35, 0.88), (False, True, 10, 0.5, 0.7)],
)
def test_torch_advi_recovers_simulated_parameters(soft, sparse, readers, gamma_tol, case_corr):
    """A study simulated from known parameters: gamma and the case effects come back.

    The tolerances are what the simulated data allow (NUTS is as far off on them:
    e.g. 0.5 for a subgroup's whole gamma curve in the sparse binary design), not
    ADVI's error; a wrong fit (gamma near 0, wrong signs, swapped groups) fails.
    """
    data, truth = simulate_study(np.random.default_rng(101), 800, readers, 6, 3, soft, sparse=sparse, gamma_scale=1.0)
    fit = TorchBackend().fit(data, ADVI)
    assert fit.converged, fit.convergence_note
    gamma = fit_mean(fit)
    assert gamma.shape == (6, 3)
    np.testing.assert_array_equal(fit.draws["gamma"][:, 0, :], 0.0)
    assert np.abs(gamma - truth["gamma"]).max() < gamma_tol
    assert np.corrcoef(gamma[1:].ravel(), truth["gamma"][1:].ravel())[0, 1] > 0.97
    # Case effects as eta sees them, b[g] + mu[n]: free of the b/mu ridge.
    case_effect = fit_mean(fit, "mu") + fit_mean(fit, "b")[data.case_group]
    assert np.corrcoef(case_effect, truth["mu"] + truth["b"][data.case_group])[0, 1] > case_corr


def test_torch_advi_is_deterministic_given_the_seed(small):
    data = small["binary"][0]
    backend = TorchBackend()
    a, b = (backend.fit(data, FitSettings(method="advi", seed=7, draws=50)) for _ in range(2))
    c = backend.fit(data, FitSettings(method="advi", seed=8, draws=50))
    for key in ("b", "mu", "gamma", "nu"):
        np.testing.assert_array_equal(a.draws[key], b.draws[key])
        assert not np.array_equal(a.draws[key][:, 1:] if key == "gamma" else a.draws[key], c.draws[key][:, 1:] if key == "gamma" else c.draws[key])
    assert a.elbo == b.elbo
    np.testing.assert_array_equal(a.elbo_trace, b.elbo_trace)


def test_torch_advi_seeds_agree_on_gamma():
    """Run to convergence, different seeds give the same gamma means (Stan's default rule: ~0.4 apart)."""
    data, _ = simulate_study(np.random.default_rng(7), 600, 5, 9, 3, True)
    fits = [TorchBackend().fit(data, FitSettings(method="advi", seed=s)) for s in (0, 1)]
    assert np.abs(fit_mean(fits[0]) - fit_mean(fits[1])).max() < 0.05
    assert fits[0].elbo == pytest.approx(fits[1].elbo, abs=1.0)


def test_torch_advi_fit_record(small):
    data = small["soft"][0]
    fit = TorchBackend().fit(data, FitSettings(method="advi", seed=0, draws=123), progress=lambda m: None)
    assert (fit.backend, fit.method, fit.parameterisation, fit.n_draws) == ("torch", "advi", "random_walk", 123)
    assert fit.draws["b"].shape == (123, 2) and fit.draws["mu"].shape == (123, 60)
    assert fit.draws["gamma"].shape == (123, 4, 2) and fit.draws["nu"].shape == (123, 4, 2)
    assert fit.converged and "tolerance" in fit.convergence_note
    assert fit.elbo_trace.shape[1] == 2 and np.all(np.diff(fit.elbo_trace[:, 0]) > 0)
    assert np.isfinite(fit.elbo) and fit.elbo < 0
    assert fit.seconds > 0
    short = TorchBackend().fit(data, FitSettings(method="advi", seed=0, max_iterations=120))
    assert not short.converged and "budget ran out" in short.convergence_note
    assert short.diagnostics["iterations"] <= 120


def test_torch_backend_rejects_other_methods(small):
    with pytest.raises(PerceptcoreError, match="laplace and advi"):
        TorchBackend().fit(small["soft"][0], FitSettings(method="nuts"))


@pytest.mark.parametrize("module, cls", [(torch_backend, TorchBackend), (stan_backend_module, StanBackend)])
def test_plugin_modules_register_their_backend(module, cls):
    registered = []
    module.perceptcore_register_backends(registered.append)
    assert len(registered) == 1 and isinstance(registered[0], cls)
    assert isinstance(registered[0], Backend)


def test_backend_declarations():
    assert (TorchBackend.name, TorchBackend.methods, TorchBackend.priority) == ("torch", ("laplace", "advi"), 20)
    assert TorchBackend().unavailable_reason() is None
    assert StanBackend.name == "stan" and StanBackend.priority == 10
    assert set(StanBackend.methods) == {"laplace", "advi", "nuts", "pathfinder"}


# ---------------------------------------------------------------- CmdStan backend


def test_stan_backend_says_how_to_install_cmdstan_when_absent(monkeypatch, small):
    import cmdstanpy

    def no_cmdstan():
        raise ValueError("No CmdStan installation found")

    monkeypatch.setattr(cmdstanpy, "cmdstan_path", no_cmdstan)
    reason = StanBackend().unavailable_reason()
    assert reason and "python -m cmdstanpy.install_cmdstan" in reason
    with pytest.raises(PerceptcoreError, match="install_cmdstan"):
        StanBackend().fit(small["soft"][0], FitSettings(method="nuts"))


def test_parse_cmdstan_advi_output():
    text = """Begin eta adaptation.
Iteration:   1 / 250 [  0%]  (Adaptation)
Success! Found best value [eta = 1] earlier than expected.

Begin stochastic gradient ascent.
  iter             ELBO   delta_ELBO_mean   delta_ELBO_med   notes 
   100       -1.234e+03             1.000            1.000
   200        -1200.500             0.514            1.000
   300        -1200.100             0.001            0.000   MEAN ELBO CONVERGED   MEDIAN ELBO CONVERGED

Drawing a sample of size 1000 from the approximate posterior... 
COMPLETED.
"""
    trace, converged, why = stan_backend_module.parse_advi_stdout(text)
    np.testing.assert_array_equal(trace, [[100, -1234.0], [200, -1200.5], [300, -1200.1]])
    assert converged and "CONVERGED" in why
    capped = text.replace("MEAN ELBO CONVERGED   MEDIAN ELBO CONVERGED", "") + (
        "Informational Message: The maximum number of iterations is reached! The algorithm may not have converged."
    )
    assert stan_backend_module.parse_advi_stdout(capped)[1] is False


@pytest.mark.slow
def test_stan_backend_agrees_with_torch(small):
    """A real CmdStan fit (NUTS and ADVI) against the torch backend; needs CmdStan."""
    backend = StanBackend()
    reason = backend.unavailable_reason()
    if reason:
        pytest.skip(reason)
    data = small["soft"][0]
    reference = TorchBackend().fit(data, FitSettings(method="advi", seed=1))
    nuts = backend.fit(data, FitSettings(method="nuts", chains=2, warmup=1000, draws=1000, seed=1), print)
    assert nuts.draws["gamma"].shape == (2000, 4, 2) and nuts.draws["nu"].shape == (2000, 4, 2)
    np.testing.assert_array_equal(nuts.draws["gamma"][:, 0, :], 0.0)
    assert nuts.diagnostics["max_rhat"] < 1.05 and nuts.diagnostics["divergences"] == 0
    assert np.abs(fit_mean(nuts) - fit_mean(reference)).max() < 0.15
    advi = backend.fit(data, FitSettings(method="advi", seed=1, draws=2000), print)
    assert len(advi.elbo_trace) > 0 and advi.draws["mu"].shape == (2000, 60)
    # Stan's stochastic ELBO: never far above the converged optimum, not far below it.
    assert reference.elbo - 0.02 * abs(reference.elbo) < advi.elbo < reference.elbo + 3.0
    path = backend.fit(data, FitSettings(method="pathfinder", seed=1, draws=1000), print)
    assert np.isfinite(path.elbo) and path.draws["gamma"].shape == (1000, 4, 2)
