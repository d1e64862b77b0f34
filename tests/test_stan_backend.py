"""The CmdStan backend's `laplace` method: the mode, CmdStan's Laplace draws, and their Pareto-smoothed
importance-sampling correction.

CmdStan itself is not needed for most of these: a stand-in model writes the Stan CSV files CmdStan would
(`optimize`, then `laplace` with its `log_p__` and `log_q__` columns and the variables in Stan's column
names and order), and cmdstanpy reads them with `from_csv`, so the backend sees real cmdstanpy objects.
The stand-in's proposals are CmdStan's: theta_hat + L^-T z with L L' the negative Hessian of the model
at theta_hat (computed here with torch autograd, independently of the backend) and log_q__ = -z'z / 2.
What varies between tests is the target, log_p__, a Gaussian with a known normalising constant.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perceptcore.latent_model import FitSettings, stan_file
from perceptcore_plugins.backends import stan as stan_backend_module
from perceptcore_plugins.backends.stan import StanBackend

try:  # the embedded backend's modules (renamed while this was written)
    from perceptcore_plugins.backends._advi import log_density
    from perceptcore_plugins.backends.torch_backend import TorchBackend
except ImportError:
    from perceptcore_plugins.backends.torch_advi import TorchAdviBackend as TorchBackend, log_density

try:
    from simulate import simulate_study
except ImportError:  # tests/ made a package
    from tests.simulate import simulate_study

DRAWS = 1000  # so 4000 proposals: the backend's minimum


@pytest.fixture(scope="module")
def study():
    """40 cases, 3 observers, 4 severities, 2 subgroups (S != R, so a transposed matrix shows)."""
    data, truth = simulate_study(np.random.default_rng(5), 40, 3, 4, 2, soft=False)
    return data, truth


# ---------------------------------------------------------------- the stand-in for CmdStan


def split(theta: np.ndarray, data) -> dict:
    """Stan's unconstrained vectors (K, dim) -> b, mu, gamma_free, nu; matrices are column-major in Stan."""
    G, N, S, R = data.n_groups, data.n_cases, data.n_severities, data.n_readers
    K = theta.shape[0]
    at = np.cumsum([0, G, N, (S - 1) * G, R * G])
    return {
        "b": theta[:, at[0] : at[1]],
        "mu": theta[:, at[1] : at[2]],
        "gamma_free": theta[:, at[2] : at[3]].reshape(K, G, S - 1).swapaxes(1, 2),
        "nu": theta[:, at[3] : at[4]].reshape(K, G, R).swapaxes(1, 2),
    }


def levels(gamma_free: np.ndarray, data) -> np.ndarray:
    """Stan's transformed parameter gamma (K, S, G), reference row of zeros included."""
    lv = np.cumsum(gamma_free, axis=1) if data.parameterisation == "random_walk" else gamma_free
    return np.concatenate([np.zeros_like(lv[:, :1, :]), lv], axis=1)


def stan_header(data) -> list:
    """CmdStan's CSV names of the parameters and transformed parameters, in its order."""
    G, N, S, R = data.n_groups, data.n_cases, data.n_severities, data.n_readers
    return (
        [f"b.{i + 1}" for i in range(G)]
        + [f"mu.{i + 1}" for i in range(N)]
        + [f"gamma_free.{i + 1}.{j + 1}" for j in range(G) for i in range(S - 1)]
        + [f"nu.{i + 1}.{j + 1}" for j in range(G) for i in range(R)]
        + [f"gamma.{i + 1}.{j + 1}" for j in range(G) for i in range(S)]
    )


def stan_values(theta: np.ndarray, data) -> np.ndarray:
    """(K, columns) in `stan_header` order: the unconstrained vector, then gamma column-major."""
    gamma = levels(split(theta, data)["gamma_free"], data)
    return np.concatenate([theta, gamma.transpose(0, 2, 1).reshape(theta.shape[0], -1)], axis=1)


def write_stan_csv(path, config: list, header: list, rows: np.ndarray) -> None:
    lines = ["# stan_version_major = 2", "# stan_version_minor = 36", "# stan_version_patch = 0",
             "# model = latent_model_model", *config]
    lines.append(",".join(header))
    lines += [",".join(f"{v:.9g}" for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def negative_hessian(theta_hat: np.ndarray, data) -> np.ndarray:
    """Of the model's log density (torch, the Stan program's), in Stan's unconstrained coordinates."""

    def f(t):
        return log_density({k: v[0] for k, v in split(t[None], data).items()}, data)

    return -torch.autograd.functional.hessian(f, torch.as_tensor(theta_hat, dtype=torch.float64)).numpy()


class StandIn:
    """A CmdStanModel stand-in: `optimize` and `laplace_sample` write the CSV files CmdStan would.

    target(z) gives log_p__ of each proposal from its standard normal z; log_q__ is -z'z/2 times
    q_scale (1 is CmdStan's). Records the proposals for the tests.
    """

    def __init__(self, data, theta_hat, target, tmp_path, q_scale=1.0, q_column="log_q__"):
        self.data, self.theta_hat, self.target, self.dir, self.q_scale = data, theta_hat, target, tmp_path, q_scale
        self.q_column = q_column
        self.chol = np.linalg.cholesky(negative_hessian(theta_hat, data))
        self.calls = {}

    def optimize(self, data, seed, jacobian, **kwargs):
        import cmdstanpy

        self.calls["optimize"] = {"jacobian": jacobian, "seed": seed}
        path = self.dir / "latent_model-opt.csv"
        config = ["# method = optimize", "#   optimize", "#     algorithm = lbfgs (Default)",
                  f"#     jacobian = {'true' if jacobian else 'false'}", "#     iter = 2000 (Default)",
                  "#     save_iterations = false (Default)"]
        row = np.concatenate([[0.0, 0.0], stan_values(self.theta_hat[None], self.data)[0]])
        write_stan_csv(path, config, ["lp__", "converged__"] + stan_header(self.data), row[None])
        return cmdstanpy.from_csv(str(path), method="optimize")

    def laplace_sample(self, data, mode, draws, jacobian, seed, **kwargs):
        import cmdstanpy

        self.calls["laplace_sample"] = {"draws": draws, "jacobian": jacobian, "seed": seed, "mode": mode}
        rng = np.random.default_rng(seed + 12345)
        z = rng.standard_normal((draws, self.theta_hat.size))
        theta = self.theta_hat + np.linalg.solve(self.chol.T, z.T).T  # covariance (L L')^-1
        self.z, self.theta = z, theta
        log_q = -0.5 * self.q_scale * np.sum(z**2, axis=1)
        rows = np.column_stack([self.target(z), log_q, stan_values(theta, self.data)])
        path = self.dir / "latent_model-laplace.csv"
        config = ["# method = laplace", "#   laplace", f"#     mode = {mode.runset.csv_files[0]}",
                  f"#     jacobian = {'true' if jacobian else 'false'}", f"#     draws = {draws}"]
        write_stan_csv(path, config, ["log_p__", self.q_column] + stan_header(self.data), rows)
        return cmdstanpy.from_csv(str(path), method="laplace")

    def log_normaliser(self) -> float:
        """log of the integral of exp(-z'z/2) over theta: the proposal's missing constant."""
        dim = self.theta_hat.size
        return 0.5 * dim * math.log(2 * math.pi) - float(np.sum(np.log(np.diag(self.chol))))


def fit_with(monkeypatch, stand_in, draws=DRAWS, seed=3):
    import cmdstanpy

    monkeypatch.setattr(cmdstanpy, "cmdstan_path", lambda: "/nonexistent/cmdstan-2.36.0")
    monkeypatch.setattr(stan_backend_module, "_compiled_model", lambda progress: stand_in)
    return StanBackend().fit(stand_in.data, FitSettings(method="laplace", draws=draws, seed=seed))


def theta_of(fit, data) -> np.ndarray:
    """The fit's draws back in Stan's unconstrained vector."""
    d = fit.draws
    gamma = d["gamma"][:, 1:, :]
    free = np.diff(d["gamma"], axis=1) if data.parameterisation == "random_walk" else gamma
    K = d["b"].shape[0]
    return np.concatenate(
        [d["b"], d["mu"], free.transpose(0, 2, 1).reshape(K, -1), d["nu"].transpose(0, 2, 1).reshape(K, -1)], axis=1
    )


def theta_hat_of(truth) -> np.ndarray:
    return np.concatenate([truth["b"], truth["mu"], truth["gamma_free"].T.ravel(), truth["nu"].T.ravel()])


# ---------------------------------------------------------------- tests with the stand-in


def test_laplace_is_a_stan_method():
    assert "laplace" in StanBackend.methods
    from perceptcore.latent_model import METHODS

    assert "laplace" in METHODS


def test_exact_proposal_is_trusted_and_its_draws_have_the_right_mean(monkeypatch, tmp_path, study):
    """log_p__ == log_q__ (+ a constant): equal weights, k-hat 0, draws centred on the mode."""
    data, truth = study
    constant = -1234.5
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1) + constant, tmp_path)
    fit = fit_with(monkeypatch, stand_in)

    assert stand_in.calls["optimize"]["jacobian"] is True and stand_in.calls["laplace_sample"]["jacobian"] is True
    assert stand_in.calls["laplace_sample"]["draws"] == 4000 == fit.diagnostics["proposals"]
    assert (fit.backend, fit.method) == ("stan", "laplace")
    assert fit.converged and fit.diagnostics["pareto_k"] <= 0.5
    assert fit.diagnostics["importance_ess"] == pytest.approx(4000, rel=1e-9)
    assert fit.diagnostics["distinct_draws"] == DRAWS  # equal weights: every 4th proposal
    assert "k-hat" in fit.convergence_note and "ESS" in fit.convergence_note
    # log marginal likelihood of exp(log_p__): the constant plus the Gaussian's log normaliser, exactly
    # (the backend's own Hessian against torch autograd's).
    assert fit.log_evidence == pytest.approx(constant + stand_in.log_normaliser(), abs=1e-6)
    assert math.isnan(fit.elbo)  # not a variational method
    assert fit.diagnostics["log_q_mismatch"] < 1e-5

    theta = theta_of(fit, data)
    sd = stand_in.theta.std(axis=0)
    z_scores = (theta.mean(axis=0) - stand_in.theta_hat) / (sd / math.sqrt(DRAWS))
    assert np.abs(z_scores).max() < 4.5


def test_importance_weights_move_the_draws_to_the_target(monkeypatch, tmp_path, study):
    """Target N(theta_hat + L^-T u, (L L')^-1): the reweighted draws' mean is the target's, not the proposal's."""
    data, truth = study
    u = np.zeros(theta_hat_of(truth).size)
    u[[0, 5, -1]] = [0.5, -0.4, 0.3]  # in the whitened coordinates z
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum((z - u) ** 2, axis=1), tmp_path)
    fit = fit_with(monkeypatch, stand_in)

    assert fit.converged and fit.diagnostics["pareto_k"] < 0.5
    assert 1000 < fit.diagnostics["importance_ess"] < 4000
    # The target's log normaliser is that of the proposal: the evidence estimate finds it.
    assert fit.log_evidence == pytest.approx(stand_in.log_normaliser(), abs=0.05)
    z = (theta_of(fit, data) - stand_in.theta_hat) @ stand_in.chol  # back to the whitened coordinates
    error = math.sqrt(1.0 / fit.diagnostics["importance_ess"] + 1.0 / DRAWS)
    assert np.abs(z.mean(axis=0) - u).max() < 4.5 * error
    assert z.mean(axis=0)[0] > 0.5 - 4.5 * error > 0.25  # the shift is seen, not just tolerated


def test_narrow_proposal_is_flagged_not_converged(monkeypatch, tmp_path, study):
    """A target twice as wide as the Laplace approximation in every direction: heavy weights, k-hat > 0.7."""
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1) / 4.0, tmp_path)
    fit = fit_with(monkeypatch, stand_in)

    assert fit.diagnostics["pareto_k"] > 0.7
    assert fit.converged is False
    assert "cannot be trusted" in fit.convergence_note and "not to be used" in fit.convergence_note
    assert fit.diagnostics["importance_ess"] < 100
    assert fit.diagnostics["distinct_draws"] < DRAWS


def test_draws_have_the_documented_shapes_and_stans_layout(monkeypatch, tmp_path, study):
    """b (D,G), mu (D,N), gamma (D,S,G) with gamma[:,0,:] == 0, nu (D,R,G); each draw one proposal, intact."""
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum((z - 0.1) ** 2, axis=1), tmp_path)
    fit = fit_with(monkeypatch, stand_in, draws=300)
    D, G, N, S, R = 300, data.n_groups, data.n_cases, data.n_severities, data.n_readers
    assert fit.draws["b"].shape == (D, G) and fit.draws["mu"].shape == (D, N)
    assert fit.draws["gamma"].shape == (D, S, G) and fit.draws["nu"].shape == (D, R, G)
    np.testing.assert_array_equal(fit.draws["gamma"][:, 0, :], 0.0)
    assert fit.n_draws == D and fit.diagnostics["proposals"] == 4000
    # Every draw is one of the proposals, all of its variables from that same proposal.
    proposals = split(stand_in.theta, data)
    index = [int(np.argmin(np.abs(stand_in.theta - t).sum(axis=1))) for t in theta_of(fit, data)]
    np.testing.assert_allclose(fit.draws["b"], proposals["b"][index], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fit.draws["mu"], proposals["mu"][index], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fit.draws["nu"], proposals["nu"][index], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fit.draws["gamma"], levels(proposals["gamma_free"], data)[index], rtol=1e-6, atol=1e-8)
    # Shuffled: not in proposal order.
    assert not np.all(np.diff(index) >= 0)


def test_independent_parameterisation_normaliser(monkeypatch, tmp_path, study):
    """The Hessian's determinant under `independent` too (no random-walk prior on gamma); and the
    approximation's column read under ADVI's name log_g__ where a CmdStan writes that."""
    data, truth = study
    data = data.with_parameterisation("independent")
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1), tmp_path, q_column="log_g__")
    fit = fit_with(monkeypatch, stand_in, draws=200)
    assert "log_p__ - log_g__" in fit.convergence_note
    assert fit.log_evidence == pytest.approx(stand_in.log_normaliser(), abs=1e-6)
    assert fit.diagnostics["log_q_mismatch"] < 1e-5


def test_unknown_normaliser_gives_no_evidence_estimate(monkeypatch, tmp_path, study):
    """If the model's Hessian does not reproduce log_q__, the evidence is not made up (nan), the rest stands."""
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.55 * np.sum(z**2, axis=1), tmp_path, q_scale=1.1)
    fit = fit_with(monkeypatch, stand_in, draws=200)
    assert math.isnan(fit.log_evidence) and fit.diagnostics["log_q_mismatch"] > 1.0
    assert "no estimate of log p(y)" in fit.convergence_note
    assert fit.converged and fit.diagnostics["pareto_k"] <= 0.5  # log_p__ == log_q__ up to rounding


# ---------------------------------------------------------------- the real thing


def _cmdstan_missing() -> str | None:
    try:
        import cmdstanpy

        cmdstanpy.cmdstan_path()
    except Exception as exc:  # ImportError, or ValueError/RuntimeError when no CmdStan is installed
        return f"CmdStan is not installed ({exc}); `python -m cmdstanpy.install_cmdstan` would install it"
    return None


@pytest.mark.slow
def test_real_cmdstan_laplace_agrees_with_torch():
    """A real CmdStan laplace fit of a small simulated study against the torch backend's gamma means."""
    reason = _cmdstan_missing()
    if reason:
        pytest.skip(reason)
    assert stan_file().exists()
    data, _ = simulate_study(np.random.default_rng(11), 60, 4, 4, 2, soft=True)
    torch_method = "laplace" if "laplace" in TorchBackend.methods else "advi"
    reference = TorchBackend().fit(data, FitSettings(method=torch_method, draws=1000, seed=1))
    fit = StanBackend().fit(data, FitSettings(method="laplace", draws=1000, seed=1), print)
    print(fit.convergence_note)
    assert (fit.backend, fit.method) == ("stan", "laplace")
    assert fit.draws["gamma"].shape == (1000, 4, 2) and fit.draws["nu"].shape == (1000, 4, 2)
    np.testing.assert_array_equal(fit.draws["gamma"][:, 0, :], 0.0)
    assert fit.converged and fit.diagnostics["pareto_k"] <= 0.7
    assert fit.diagnostics["log_q_mismatch"] < 0.05 and np.isfinite(fit.log_evidence)
    if np.isfinite(reference.log_evidence):  # two estimates of the same log p(y)
        assert fit.log_evidence == pytest.approx(reference.log_evidence, abs=3.0)
    else:  # log p(y) is at least the ELBO of any approximation (up to Monte Carlo error)
        assert fit.log_evidence > reference.elbo - 1.0
    assert np.abs(fit.draws["gamma"].mean(axis=0) - reference.draws["gamma"].mean(axis=0)).max() < 0.15


# ---------------------------------------------------------------- NUTS diagnostics


def _nuts_like(rng, chains=4, per_chain=1000, rho=0.0, shift=0.0, n=3):
    """Draws of the Fit layout whose autocorrelation (AR(1), rho) and between-chain shift are known."""
    x = np.empty((chains, per_chain, n))
    x[:, 0] = rng.normal(size=(chains, n))
    for t in range(1, per_chain):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho**2) * rng.normal(size=(chains, n))
    x += shift * np.arange(chains)[:, None, None]
    flat = x.reshape(chains * per_chain, n)
    gamma = np.concatenate([np.zeros((len(flat), 1, 1)), flat[:, :1, None]], axis=1)
    return {"b": flat[:, 1:2], "mu": flat[:, 2:3], "gamma": gamma, "nu": flat[:, :1, None]}


def test_nuts_diagnostics_follow_theory():
    rng = np.random.default_rng(0)
    energy = rng.normal(size=4000)
    iid = stan_backend_module._nuts_diagnostics(_nuts_like(rng), {"energy": energy, "diverging": np.zeros(4000)}, 4)
    assert iid["max_rhat"] < 1.01 and iid["divergences"] == 0
    assert 0.8 * 4000 < iid["min_ess_bulk"] < 1.2 * 4000  # independent draws: ESS = draws
    assert iid["min_bfmi"] > 1.5  # E-BFMI of independent energies is 2
    # AR(1) with rho = 0.9: ESS = n (1 - rho) / (1 + rho) = 4000 / 19.
    sticky = stan_backend_module._nuts_diagnostics(_nuts_like(rng, rho=0.9), {"energy": energy}, 4)
    assert 0.6 * 4000 / 19 < sticky["min_ess_bulk"] < 1.4 * 4000 / 19
    apart = stan_backend_module._nuts_diagnostics(_nuts_like(rng, shift=0.5), {"energy": energy}, 4)
    assert apart["max_rhat"] > 1.05  # chains that disagree
    walk = np.cumsum(rng.normal(size=4000))
    stuck = stan_backend_module._nuts_diagnostics(_nuts_like(rng), {"energy": walk, "diverging": np.eye(1, 4000)[0]}, 4)
    assert stuck["min_bfmi"] < 0.3 and stuck["divergences"] == 1
