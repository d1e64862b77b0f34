"""The CmdStan backend: `laplace` (the mode, CmdStan's Laplace draws, and their Pareto-smoothed
importance-sampling correction), `pathfinder`, `advi` and `nuts` with their diagnostics, and the
compiled model's cache.

CmdStan itself is not needed for most of these: a stand-in model writes the Stan CSV files CmdStan would
(`optimize`, then `laplace` with its `log_p__` and `log_q__` columns and the variables in Stan's column
names and order; `pathfinder`, `variational` with its console output, one `sample` file per chain), and
cmdstanpy reads them with `from_csv`, so the backend sees real cmdstanpy objects.
The stand-in's proposals are CmdStan's: theta_hat + L^-T z with L L' the negative Hessian of the model
at theta_hat (computed here with torch autograd, independently of the backend) and log_q__ = -z'z / 2.
What varies between tests is the target, log_p__, a Gaussian with a known normalising constant.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

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


@pytest.fixture(scope="module", params=["pooled", "by_class"])
def study(request):
    """40 cases, 3 observers, 4 severities, 2 subgroups (S != R, so a transposed matrix shows); the
    published model (pooled case effects) and the default one (a class offset delta per subgroup)."""
    data, truth = simulate_study(np.random.default_rng(5), 40, 3, 4, 2, soft=False,
                                 by_class=request.param == "by_class")
    return data, truth


# ---------------------------------------------------------------- the stand-in for CmdStan


def split(theta: np.ndarray, data) -> dict:
    """Stan's unconstrained vectors (K, dim) -> b, mu, gamma_free, nu; matrices are column-major in Stan."""
    G, N, S, R = data.n_groups, data.n_cases, data.n_severities, data.n_readers
    K = theta.shape[0]
    at = np.cumsum([0, G, N, (S - 1) * G, R * G])
    out = {
        "b": theta[:, at[0] : at[1]],
        "mu": theta[:, at[1] : at[2]],
        "gamma_free": theta[:, at[2] : at[3]].reshape(K, G, S - 1).swapaxes(1, 2),
        "nu": theta[:, at[3] : at[4]].reshape(K, G, R).swapaxes(1, 2),
    }
    if data.case_positive is not None:
        out["delta"] = theta[:, at[4] : at[4] + G]
    return out


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
        + ([f"delta.{i + 1}" for i in range(G)] if data.case_positive is not None else [])
        + [f"gamma.{i + 1}.{j + 1}" for j in range(G) for i in range(S)]
    )


def stan_values(theta: np.ndarray, data) -> np.ndarray:
    """(K, columns) in `stan_header` order: the unconstrained vector, then gamma column-major."""
    gamma = levels(split(theta, data)["gamma_free"], data)
    return np.concatenate([theta, gamma.transpose(0, 2, 1).reshape(theta.shape[0], -1)], axis=1)


def write_stan_csv(path, config: list, header: list, rows: np.ndarray, after_header=(), footer=()) -> None:
    lines = ["# stan_version_major = 2", "# stan_version_minor = 36", "# stan_version_patch = 0",
             "# model = latent_model_model", *config]
    lines.append(",".join(header))
    lines += list(after_header)  # e.g. the sampler's adaptation block
    lines += [",".join(f"{v:.9g}" for v in row) for row in rows]
    lines += list(footer)
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
        self.one_point = False  # pathfinder: write one draw repeated
        self.divergent = 0  # sample: divergent transitions in the first chain

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

    def proposals(self, rng, n):
        """n draws of the Laplace Gaussian: (z, theta, its normalised log density in theta)."""
        z = rng.standard_normal((n, self.theta_hat.size))
        theta = self.theta_hat + np.linalg.solve(self.chol.T, z.T).T
        return z, theta, -0.5 * np.sum(z**2, axis=1) - self.log_normaliser()

    def pathfinder(self, data, seed, num_paths=4, num_single_draws=None, draws=None, psis_resample=True, **kwargs):
        """CmdStan's pathfinder, each path's approximation the Laplace Gaussian: with psis_resample (CmdStan's
        default) `draws` resampled with replacement by their PSIS weights, else every path's draws."""
        import arviz as az
        import cmdstanpy

        self.calls["pathfinder"] = {"num_paths": num_paths, "num_single_draws": num_single_draws, "draws": draws,
                                    "psis_resample": psis_resample, "seed": seed}
        rng = np.random.default_rng(seed + 54321)
        z, theta, lp_approx = self.proposals(rng, num_paths * (num_single_draws or 1000))
        lp = self.target(z)
        keep = np.arange(len(z))
        if psis_resample:
            smoothed, _ = az.psislw(lp - lp_approx, reff=1.0)
            weights = np.exp(smoothed - smoothed.max())
            keep = rng.choice(len(z), size=draws or 1000, p=weights / weights.sum())
        if self.one_point:  # the output the issue saw: one draw repeated (CmdStan's resampling at k-hat 9.9)
            keep = np.zeros(len(keep), dtype=int)
        rows = np.column_stack([lp_approx, lp, stan_values(theta, self.data)])[keep]
        config = ["# method = pathfinder", "#   pathfinder", f"#     num_psis_draws = {draws or 1000}",
                  f"#     num_paths = {num_paths}", f"#     psis_resample = {int(psis_resample)}",
                  "#     calculate_lp = 1 (Default)", f"#     num_draws = {num_single_draws or 1000}"]
        path = self.dir / "latent_model-pathfinder.csv"
        write_stan_csv(path, config, ["lp_approx__", "lp__"] + stan_header(self.data), rows)
        return cmdstanpy.from_csv(str(path), method="pathfinder")

    # Stan ADVI's rule compares the relative ELBO change, each ELBO a 100-draw Monte Carlo estimate, with
    # tol_rel_obj: the change falls as 0.5 / evaluation here, down to the estimates' noise, 0.003.
    ADVI_NOISE = 0.003

    def variational(self, data, seed, algorithm, iter, tol_rel_obj, draws, **kwargs):
        """CmdStan's meanfield ADVI: its console table and verdict, then draws of the Laplace Gaussian."""
        import cmdstanpy

        self.calls["variational"] = {"iter": iter, "tol_rel_obj": tol_rel_obj, "draws": draws}
        table, verdict = ["  iter             ELBO   delta_ELBO_mean   delta_ELBO_med   notes "], ""
        for k, at in enumerate(range(100, iter + 1, 100), start=1):
            change = max(0.5 / k, self.ADVI_NOISE)
            done = change < tol_rel_obj
            notes = "   MEAN ELBO CONVERGED   MEDIAN ELBO CONVERGED" if done else ""
            table.append(f"{at:6d} {-2000 - 100 / k:16.3f} {change:17.3f} {change:16.3f}{notes}")
            if done:
                break
        else:
            verdict = ("Informational Message: The maximum number of iterations is reached! "
                       "The algorithm may not have converged.")
        rng = np.random.default_rng(seed + 999)
        z, theta, _ = self.proposals(rng, draws)
        rows = np.column_stack([np.zeros(draws), self.target(z), -0.5 * np.sum(z**2, axis=1), stan_values(theta, self.data)])
        mean = np.concatenate([[0.0, 0.0, 0.0], stan_values(self.theta_hat[None], self.data)[0]])
        config = ["# method = variational", "#   variational", f"#     algorithm = {algorithm}", f"#       {algorithm}",
                  f"#     iter = {iter}", "#     grad_samples = 1 (Default)", "#     elbo_samples = 100 (Default)",
                  "#     eta = 1 (Default)", "#     adapt", "#       engaged = 1 (Default)", "#       iter = 50 (Default)",
                  f"#     tol_rel_obj = {tol_rel_obj:g}", "#     eval_elbo = 100 (Default)", f"#     output_samples = {draws}"]
        path = self.dir / "latent_model-variational.csv"
        write_stan_csv(path, config, ["lp__", "log_p__", "log_g__"] + stan_header(self.data),
                       np.vstack([mean, rows]), after_header=["# Stepsize adaptation complete.", "# eta = 1"])
        vb = cmdstanpy.from_csv(str(path), method="variational")
        stdout = Path(vb.runset.stdout_files[0])
        stdout.parent.mkdir(parents=True, exist_ok=True)
        stdout.write_text("\n".join(["Begin eta adaptation.", "Success! Found best value [eta = 1] earlier than expected.",
                                     "", "Begin stochastic gradient ascent.", *table, verdict, "",
                                     f"Drawing a sample of size {draws} from the approximate posterior... ",
                                     "COMPLETED."]) + "\n")
        return vb

    def sample(self, data, chains, parallel_chains, iter_warmup, iter_sampling, seed, **kwargs):
        """CmdStan's NUTS: one CSV per chain of independent draws of the Laplace Gaussian, energies
        independent too (E-BFMI 2), and `self.divergent` divergent transitions in the first chain."""
        import cmdstanpy

        self.calls["sample"] = {"chains": chains, "parallel_chains": parallel_chains, "iter_warmup": iter_warmup,
                                "iter_sampling": iter_sampling}
        rng = np.random.default_rng(seed + 777)
        files = []
        for chain in range(chains):
            z, theta, _ = self.proposals(rng, iter_sampling)
            divergent = np.zeros(iter_sampling)
            divergent[: self.divergent if chain == 0 else 0] = 1
            stats = [self.target(z), np.full(iter_sampling, 0.9), np.full(iter_sampling, 0.3), np.full(iter_sampling, 4),
                     np.full(iter_sampling, 15), divergent, rng.normal(size=iter_sampling)]
            config = ["# method = sample (Default)", "#   sample", f"#     num_samples = {iter_sampling}",
                      f"#     num_warmup = {iter_warmup}", "#     save_warmup = false (Default)", "#     thin = 1 (Default)",
                      "#     algorithm = hmc (Default)", "#       hmc", "#         engine = nuts (Default)",
                      "#           nuts", "#             max_depth = 10 (Default)",
                      "#         metric = diag_e (Default)", f"# id = {chain + 1}"]
            adaptation = ["# Adaptation terminated", "# Step size = 0.3", "# Diagonal elements of inverse mass matrix:",
                          "# " + ", ".join(["1"] * self.theta_hat.size)]
            timing = ["# ", "#  Elapsed Time: 1 seconds (Warm-up)", "#                1 seconds (Sampling)",
                      "#                2 seconds (Total)", "# "]
            path = self.dir / f"latent_model-{chain + 1}.csv"
            header = ["lp__", "accept_stat__", "stepsize__", "treedepth__", "n_leapfrog__", "divergent__", "energy__"]
            write_stan_csv(path, config, header + stan_header(self.data),
                           np.column_stack(stats + [stan_values(theta, self.data)]), adaptation, timing)
            files.append(str(path))
        return cmdstanpy.from_csv(files, method="sample")

    def log_normaliser(self) -> float:
        """log of the integral of exp(-z'z/2) over theta: the proposal's missing constant."""
        dim = self.theta_hat.size
        return 0.5 * dim * math.log(2 * math.pi) - float(np.sum(np.log(np.diag(self.chol))))


def fit_with(monkeypatch, stand_in, draws=DRAWS, seed=3, method="laplace", **settings):
    import cmdstanpy

    monkeypatch.setattr(cmdstanpy, "cmdstan_path", lambda: "/nonexistent/cmdstan-2.36.0")
    monkeypatch.setattr(stan_backend_module, "_compiled_model", lambda progress: stand_in)
    return StanBackend().fit(stand_in.data, FitSettings(method=method, draws=draws, seed=seed, **settings))


def theta_of(fit, data) -> np.ndarray:
    """The fit's draws back in Stan's unconstrained vector."""
    d = fit.draws
    gamma = d["gamma"][:, 1:, :]
    free = np.diff(d["gamma"], axis=1) if data.parameterisation == "random_walk" else gamma
    K = d["b"].shape[0]
    return np.concatenate(
        [d["b"], d["mu"], free.transpose(0, 2, 1).reshape(K, -1), d["nu"].transpose(0, 2, 1).reshape(K, -1)]
        + ([d["delta"]] if "delta" in d else []), axis=1
    )


def theta_hat_of(truth) -> np.ndarray:
    return np.concatenate([truth["b"], truth["mu"], truth["gamma_free"].T.ravel(), truth["nu"].T.ravel()]
                          + ([truth["delta"]] if "delta" in truth else []))


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


# ---------------------------------------------------------------- pathfinder, advi and nuts with the stand-in


def test_pathfinder_keeps_every_paths_draws_and_judges_them_by_pareto_k(monkeypatch, tmp_path, study):
    """A proposal close to the target: the backend asks for every path's draws, resamples them itself, trusts it."""
    data, truth = study
    u = np.zeros(theta_hat_of(truth).size)
    u[[0, 5]] = [0.3, -0.2]
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum((z - u) ** 2, axis=1), tmp_path)
    fit = fit_with(monkeypatch, stand_in, method="pathfinder")

    assert stand_in.calls["pathfinder"]["psis_resample"] is False
    assert stand_in.calls["pathfinder"]["num_paths"] * stand_in.calls["pathfinder"]["num_single_draws"] == 4000
    assert fit.converged and fit.diagnostics["pareto_k"] <= 0.5
    assert fit.diagnostics["proposals"] == 4000 and fit.n_draws == DRAWS
    assert fit.diagnostics["distinct_draws"] > 0.5 * DRAWS
    assert np.isfinite(fit.elbo) and "k-hat" in fit.convergence_note
    assert fit.draws["gamma"].shape == (DRAWS, data.n_severities, data.n_groups)
    z = (theta_of(fit, data) - stand_in.theta_hat) @ stand_in.chol  # the reweighting reaches the target
    assert abs(z.mean(axis=0)[0] - 0.3) < 0.15


def test_pathfinder_whose_paths_miss_the_posterior_is_not_converged(monkeypatch, tmp_path, study):
    """A target twice as wide as the paths' approximation: CmdStan's own resampling would give a few draws
    repeated (finite ELBO, once called converged); the backend's k-hat is far above 0.7."""
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1) / 4.0, tmp_path)
    fit = fit_with(monkeypatch, stand_in, method="pathfinder")

    assert fit.converged is False
    assert fit.diagnostics["pareto_k"] > 0.7 and fit.diagnostics["importance_ess"] < 100
    assert "cannot be trusted" in fit.convergence_note


def test_pathfinder_output_of_one_draw_repeated_is_not_converged(monkeypatch, tmp_path, study):
    """What the issue saw: 1 distinct draw of 1,000. Equal weights give k-hat 0; the distinct count flags it."""
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1), tmp_path)
    stand_in.one_point = True
    fit = fit_with(monkeypatch, stand_in, method="pathfinder")

    assert fit.diagnostics["distinct_draws"] == 1 and fit.diagnostics["pareto_k"] <= 0.7
    assert fit.converged is False and "collapsed" in fit.convergence_note


def test_stan_advi_keeps_stans_own_tolerance(monkeypatch, tmp_path, study):
    """The spec's tolerance (1e-4, the torch ADVI's rule) is not CmdStan's tol_rel_obj: Stan's 0.01 is used,
    and CmdStan's ADVI converges instead of running to max_iterations."""
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1), tmp_path)
    fit = fit_with(monkeypatch, stand_in, method="advi", tolerance=1e-4)

    assert stand_in.calls["variational"]["tol_rel_obj"] == 0.01
    assert fit.converged and "MEAN ELBO CONVERGED" in fit.convergence_note
    assert fit.diagnostics["iterations"] < 20000
    assert "tol_rel_obj=0.01" in fit.convergence_note and "Stan's default" in fit.convergence_note


def test_stan_advi_takes_a_tolerance_set_for_it(monkeypatch, tmp_path, study):
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1), tmp_path)
    fit = fit_with(monkeypatch, stand_in, method="advi", stan_tol_rel_obj=0.001)

    assert stand_in.calls["variational"]["tol_rel_obj"] == 0.001
    # Below the noise of Stan's ELBO estimates: the rule never holds, and the fit says so.
    assert fit.converged is False and "maximum number of iterations" in fit.convergence_note
    assert "set for the stan backend" in fit.convergence_note


def test_nuts_chains_share_the_cores_given_and_keep_the_draws_asked_for(monkeypatch, tmp_path, study):
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1), tmp_path)
    fit = fit_with(monkeypatch, stand_in, draws=1000, method="nuts", chains=4, warmup=200, cores=3)

    assert stand_in.calls["sample"] == {"chains": 4, "parallel_chains": 3, "iter_warmup": 200, "iter_sampling": 1000}
    assert fit.chains == 4 and fit.n_draws == 4000  # 1,000 per chain, as asked, not 1,000 split over 4
    assert fit.converged, fit.convergence_note  # independent draws pass every check
    assert fit.diagnostics["max_rhat"] <= 1.01 and fit.diagnostics["min_ess_tail"] >= 400


def test_nuts_in_a_fit_worker_runs_its_chains_one_at_a_time(monkeypatch, tmp_path, study):
    """Told nothing, a fit in a worker process does not start `cpu_count` chains beside its sibling workers."""
    import multiprocessing

    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1), tmp_path)
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    fit_with(monkeypatch, stand_in, draws=100, method="nuts", chains=4, warmup=100)
    assert stand_in.calls["sample"]["parallel_chains"] == 1


def test_nuts_divergent_transition_marks_the_fit_not_converged(monkeypatch, tmp_path, study):
    data, truth = study
    stand_in = StandIn(data, theta_hat_of(truth), lambda z: -0.5 * np.sum(z**2, axis=1), tmp_path)
    stand_in.divergent = 3
    fit = fit_with(monkeypatch, stand_in, draws=1000, method="nuts", chains=4, warmup=200)
    assert fit.diagnostics["divergences"] == 3
    assert fit.converged is False and "divergent transitions" in fit.convergence_note


HEALTHY_NUTS = {"max_rhat": 1.002, "min_ess_bulk": 3000.0, "min_ess_tail": 2500.0, "divergences": 0, "min_bfmi": 1.1}


@pytest.mark.parametrize("key, value, reason", [
    ("max_rhat", 1.02, "R-hat"), ("min_ess_bulk", 399.0, "bulk ESS"), ("min_ess_tail", 399.0, "tail ESS"),
    ("divergences", 1, "divergent"), ("min_bfmi", 0.29, "E-BFMI"), ("max_rhat", float("nan"), "R-hat")])
def test_each_nuts_check_alone_fails_the_fit(key, value, reason):
    assert stan_backend_module._nuts_failures(HEALTHY_NUTS) == []
    failures = stan_backend_module._nuts_failures({**HEALTHY_NUTS, key: value})
    assert len(failures) == 1 and reason in failures[0]


# ---------------------------------------------------------------- the compiled model's cache


class FakeCmdStanModel:
    """cmdstanpy.CmdStanModel's compile step: builds the executable beside the program unless it is there."""

    compiles: list = []
    inside = 0
    overlapped = False
    guard = threading.Lock()

    def __init__(self, stan_file):
        cls = FakeCmdStanModel
        with cls.guard:
            cls.inside += 1
            cls.overlapped |= cls.inside > 1
        executable = Path(stan_file).with_suffix("")
        if not executable.exists():
            time.sleep(0.3)  # a compile takes a while: long enough for concurrent callers to meet
            cls.compiles.append(stan_file)
            executable.write_text("a program")
        with cls.guard:
            cls.inside -= 1
        self.stan_file = stan_file


@pytest.fixture
def fake_cmdstan(monkeypatch, tmp_path):
    """A CmdStan folder named plainly `cmdstan` (as a git checkout is) whose version the test sets."""
    import cmdstanpy

    home = tmp_path / "cmdstan"
    home.mkdir()
    version = {"value": (2, 35)}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cmdstanpy, "cmdstan_path", lambda: str(home))
    monkeypatch.setattr(cmdstanpy, "cmdstan_version", lambda: version["value"])
    monkeypatch.setattr(cmdstanpy, "CmdStanModel", FakeCmdStanModel)
    monkeypatch.setattr(FakeCmdStanModel, "compiles", [])
    monkeypatch.setattr(FakeCmdStanModel, "overlapped", False)
    return version


def test_executable_cache_is_keyed_by_the_cmdstan_version(fake_cmdstan):
    first = stan_backend_module._compiled_model(lambda m: None).stan_file
    again = stan_backend_module._compiled_model(lambda m: None).stan_file
    fake_cmdstan["value"] = (2, 36)  # the same folder, upgraded in place
    upgraded = stan_backend_module._compiled_model(lambda m: None).stan_file
    assert first == again and upgraded != first
    assert "cmdstan-2.35" in first and "cmdstan-2.36" in upgraded
    assert FakeCmdStanModel.compiles == [first, upgraded]


def test_concurrent_compiles_are_serialised(fake_cmdstan):
    """Fit workers starting together: one compiles, the others wait for it and find the executable."""
    messages = []
    threads = [threading.Thread(target=stan_backend_module._compiled_model, args=(messages.append,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not FakeCmdStanModel.overlapped
    assert len(FakeCmdStanModel.compiles) == 1 and len(messages) == 1


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


def test_spec_sets_stan_advi_tolerance_apart_from_the_torch_one(tmp_path):
    """`model.stan_tol_rel_obj` reaches the fit settings on its own; `model.tolerance` stays the torch rule's."""
    from synthetic import write_study

    from perceptcore.errors import PerceptcoreError
    from perceptcore.plugins import load_registry
    from perceptcore.run import Study
    from perceptcore.spec import load_spec

    spec_path = write_study(tmp_path / "study")
    settings = Study(load_spec(spec_path, ["model.stan_tol_rel_obj=0.002"]), load_registry()).fit_settings()
    assert settings.stan_tol_rel_obj == 0.002 and settings.tolerance == 1e-4
    assert Study(load_spec(spec_path), load_registry()).fit_settings().stan_tol_rel_obj is None
    with pytest.raises(PerceptcoreError, match="must lie between 0 and 1") as err:
        load_spec(spec_path, ["model.stan_tol_rel_obj=1.5"])
    assert "model.stan_tol_rel_obj" in str(err.value.where)
