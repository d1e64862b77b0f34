"""The embedded default: a Laplace approximation with the case effects integrated out, corrected by
Pareto-smoothed importance sampling.

Why this shape. The latent model has one case effect mu[n] per case (about 1,440) and fewer than a
hundred shared parameters psi = (b, gamma, nu). Given psi the cases are independent, so

    log p(psi, y) = log p(psi) + sum_n log integral p(y_n | mu, psi) N(mu; 0, sd_mu) dmu

is a sum of one-dimensional integrals, each computed here by adaptive Gauss-Hermite quadrature to
near machine precision. A Gaussian approximation of the ~100-dimensional p(psi | y), placed at its
mode with the curvature of the model there, is then a good importance-sampling proposal: the
weights p(psi, y) / q(psi) correct its remaining error (the skew that a plain Laplace approximation
of all ~1,500 parameters leaves in the posterior means of strong effects), and the Pareto k-hat of
those weights says whether the correction can be trusted (k-hat <= 0.7). The case effects of each
kept draw are then drawn from their exact one-dimensional conditionals (independence Metropolis
with the conditional's own Laplace approximation as proposal), so the draws are joint.

gamma is kept as levels (gamma[s, g], s >= 1) inside; under `random_walk` the prior on the increments
becomes a tridiagonal prior precision on the levels (a linear map of determinant 1, so the density is
the Stan program's).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_DTYPE = torch.float64
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
QUADRATURE_NODES = 9  # Gauss-Hermite nodes per case integral: exact for polynomials of degree 17
METROPOLIS_STEPS = 6  # independence-Metropolis steps per case effect draw
PROPOSAL_SCALE = 1.1  # widen the proposal a little: importance sampling needs tails at least as heavy
BATCH = 32  # psi draws evaluated at once


class Collapsed:
    """One data set in the (psi, mu) form: index maps, prior precisions and the log densities."""

    def __init__(self, data):
        G, S, R, N = data.n_groups, data.n_severities, data.n_readers, data.n_cases
        self.G, self.S, self.R, self.N = G, S, R, N
        as_index = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        self.group = as_index(data.case_group)
        self.case = as_index(data.case)
        g = self.group[self.case]
        s = as_index(data.severity)
        self.P = G + (S - 1) * G + R * G
        # Positions of each prediction's b, gamma level and nu in psi; the reference severity points at
        # an extra zero appended to psi.
        self.b_pos = g
        self.gamma_pos = torch.where(s > 0, G + (s - 1) * G + g, torch.full_like(s, self.P))
        self.nu_pos = G + (S - 1) * G + as_index(data.reader) * G + g
        z = torch.as_tensor(np.asarray(data.prediction, dtype=np.float64))
        self.z = z if data.soft else torch.round(z)
        self.random_walk = data.parameterisation == "random_walk"
        pr = data.priors
        self.sd_mu = float(pr.mu)
        self.Q = self._prior_precision(float(pr.b), float(pr.gamma), float(pr.nu))
        # log of the normalising constants of the priors of b, gamma_free and nu (that of mu is inside
        # each case integral).
        self.prior_const = -(G * math.log(pr.b) + (S - 1) * G * math.log(pr.gamma) + R * G * math.log(pr.nu)) \
            - self.P * _HALF_LOG_2PI
        self.n_per_case = torch.bincount(self.case, minlength=N).to(_DTYPE)

    def _prior_precision(self, sd_b: float, sd_gamma: float, sd_nu: float) -> torch.Tensor:
        G, S, R = self.G, self.S, self.R
        Q = torch.zeros((self.P, self.P), dtype=_DTYPE)
        Q[range(G), range(G)] = 1.0 / sd_b**2
        levels = S - 1
        if self.random_walk:
            # gamma_free = D gamma with D the first-difference matrix: precision D^T D / sd^2.
            D = torch.eye(levels, dtype=_DTYPE) - torch.diag(torch.ones(levels - 1, dtype=_DTYPE), -1)
            block = D.T @ D / sd_gamma**2
        else:
            block = torch.eye(levels, dtype=_DTYPE) / sd_gamma**2
        for g in range(G):
            at = G + torch.arange(levels) * G + g
            Q[at[:, None], at[None, :]] = block
        nu = torch.arange(G + levels * G, self.P)
        Q[nu, nu] = 1.0 / sd_nu**2
        return Q

    # --------------------------------------------------------------- pieces of the density

    def shared_part(self, psi: torch.Tensor) -> torch.Tensor:
        """b[g] + gamma[s, g] + nu[r, g] of every prediction: (..., M) from psi (..., P)."""
        ext = torch.cat([psi, torch.zeros_like(psi[..., :1])], dim=-1)
        return ext[..., self.b_pos] + ext[..., self.gamma_pos] + ext[..., self.nu_pos]

    def per_case(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per case of per-prediction values (..., M) -> (..., N)."""
        out = torch.zeros(values.shape[:-1] + (self.N,), dtype=_DTYPE)
        return out.index_add_(-1, self.case, values)

    def log_prior_psi(self, psi: torch.Tensor) -> torch.Tensor:
        return self.prior_const - 0.5 * ((psi @ self.Q) * psi).sum(-1)

    def case_log_density(self, mu: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """log p(y_n | mu_n, psi) + log N(mu_n; 0, sd_mu) for every case: (..., N) from mu (..., N)."""
        eta = mu[..., self.case] + shared
        f = self.per_case(self.z * eta - torch.nn.functional.softplus(eta))
        return f - 0.5 * (mu / self.sd_mu) ** 2 - math.log(self.sd_mu) - _HALF_LOG_2PI

    def case_modes(self, shared: torch.Tensor, mu: torch.Tensor, steps: int = 50, tol: float = 1e-9) -> tuple:
        """Each case's conditional mode of mu given psi, by safeguarded Newton (the target is concave),
        and the curvature there."""
        for _ in range(steps + 1):
            p = torch.sigmoid(mu[..., self.case] + shared)
            d1 = self.per_case(self.z - p) - mu / self.sd_mu**2
            d2 = -self.per_case(p * (1.0 - p)) - 1.0 / self.sd_mu**2
            step = (d1 / -d2).clamp_(-4.0, 4.0)
            if step.abs().max().item() < tol:
                break
            mu = mu + step
        return mu, d2

    def log_marginal(self, psi: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """log p(psi, y) with mu integrated out, (...,) values.

        Gauss-Hermite quadrature per case with nodes at centre + scale * x: placed at (or near) each
        case's conditional mode with its curvature, where the integrand is close to a Gaussian bump,
        the rule is accurate to many digits. Any placement gives a valid quadrature; a good one
        needs fewer nodes.
        """
        shared = self.shared_part(psi)
        x, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
        x = torch.as_tensor(x, dtype=_DTYPE).reshape((-1,) + (1,) * centre.dim())
        mu = centre + scale * x  # (K, ..., N)
        f = self.case_log_density(mu, shared) + 0.5 * x**2 + torch.log(torch.as_tensor(w, dtype=_DTYPE)).reshape(x.shape)
        log_integral = torch.logsumexp(f, dim=0) + torch.log(scale)
        return self.log_prior_psi(psi) + log_integral.sum(-1)

    # --------------------------------------------------------------- the joint mode

    def joint_hessian(self, psi: torch.Tensor, mu: torch.Tensor) -> tuple:
        """The negative Hessian of log p(psi, mu, y), as its blocks: psi-psi (P, P), psi-mu (P, N), mu-mu (N,)."""
        eta = mu[self.case] + self.shared_part(psi)
        w = torch.sigmoid(eta) * torch.sigmoid(-eta)
        P, N = self.P, self.N
        positions = (self.b_pos, self.gamma_pos, self.nu_pos)
        pair = torch.zeros((P + 1) * (P + 1), dtype=_DTYPE)
        for a in positions:
            for b in positions:
                pair.index_add_(0, a * (P + 1) + b, w)
        H = pair.reshape(P + 1, P + 1)[:P, :P] + self.Q
        cross = torch.zeros((P + 1) * N, dtype=_DTYPE)
        for a in positions:
            cross.index_add_(0, a * N + self.case, w)
        C = cross.reshape(P + 1, N)[:P]
        d = self.per_case(w) + 1.0 / self.sd_mu**2
        return H, C, d

    def schur(self, psi: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """The precision of psi after integrating mu out of the joint Gaussian approximation at (psi, mu)."""
        H, C, d = self.joint_hessian(psi, mu)
        return H - (C / d) @ C.T

    def mode(self) -> tuple:
        """The mode of p(psi | y) (mu integrated out), by Newton steps with the Schur-complement curvature."""
        psi = torch.zeros(self.P, dtype=_DTYPE)
        mu = torch.zeros(self.N, dtype=_DTYPE)
        value = None
        for _ in range(100):
            mu, d2 = self.case_modes(self.shared_part(psi), mu)
            psi_var = psi.clone().requires_grad_(True)
            lm = self.log_marginal(psi_var, mu, (-d2).rsqrt())
            (grad,) = torch.autograd.grad(lm, psi_var)
            lm = lm.item()
            precision = self.schur(psi, mu)
            step = torch.linalg.solve(precision, grad)
            decrement = float(grad @ step)
            if value is not None and decrement < 1e-9:
                break
            # Backtrack if a full step lowers the marginal (it rarely does: the target is close to quadratic).
            t = 1.0
            while True:
                trial = psi + t * step
                with torch.no_grad():
                    trial_mu, trial_d2 = self.case_modes(self.shared_part(trial), mu)
                    new = self.log_marginal(trial, trial_mu, (-trial_d2).rsqrt())
                if new.item() >= lm - 1e-9 or t < 1e-4:
                    break
                t *= 0.5
            psi, mu, value = trial, trial_mu, new.item()
        mu, _ = self.case_modes(self.shared_part(psi), mu)
        precision = self.schur(psi, mu)
        return psi, mu, precision

    # --------------------------------------------------------------- draws of mu given psi

    def draw_case_effects(self, psi: torch.Tensor, mode_start: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Draws of mu (D, N) from p(mu | psi, y) for each of D psi draws, by independence Metropolis."""
        shared = self.shared_part(psi)
        mode, d2 = self.case_modes(shared, mode_start)
        scale = (-d2).rsqrt() * PROPOSAL_SCALE

        def log_ratio(mu):  # log target - log proposal, up to a constant per case
            return self.case_log_density(mu, shared) + 0.5 * ((mu - mode) / scale) ** 2

        current = mode + scale * torch.randn(mode.shape, generator=gen, dtype=_DTYPE)
        current_lr = log_ratio(current)
        for _ in range(METROPOLIS_STEPS):
            proposal = mode + scale * torch.randn(mode.shape, generator=gen, dtype=_DTYPE)
            proposal_lr = log_ratio(proposal)
            accept = torch.log(torch.rand(mode.shape, generator=gen, dtype=_DTYPE)) < proposal_lr - current_lr
            current = torch.where(accept, proposal, current)
            current_lr = torch.where(accept, proposal_lr, current_lr)
        return current


def fit(data, draws: int, proposals: int, seed: int, progress) -> dict:
    """Draws of the posterior and the diagnostics of the approximation (see the module docstring)."""
    import arviz as az

    prob = Collapsed(data)
    gen = torch.Generator().manual_seed(int(seed))
    progress(f"Laplace: {data.n_predictions} predictions, {prob.P} shared parameters and {prob.N} case effects")
    psi_hat, mu_hat, precision = prob.mode()
    chol = torch.linalg.cholesky(precision)
    _, C, d = prob.joint_hessian(psi_hat, mu_hat)
    eps = torch.randn((proposals, prob.P), generator=gen, dtype=_DTYPE)
    # psi = psi_hat + scale * L^-T eps has covariance scale^2 * precision^-1.
    offsets = PROPOSAL_SCALE * torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T
    psi = psi_hat + offsets
    log_q = -0.5 * (eps**2).sum(-1) - prob.P * (_HALF_LOG_2PI + math.log(PROPOSAL_SCALE)) \
        + torch.log(torch.diagonal(chol)).sum()
    log_p = torch.empty(proposals, dtype=_DTYPE)
    # Each case's conditional mode moves with psi; to first order by -C^T dpsi / d. The quadrature's
    # nodes go there, with the spread of the conditional at the joint mode.
    modes = mu_hat - (offsets @ C) / d
    scale = d.rsqrt()
    with torch.no_grad():
        for start in range(0, proposals, BATCH):
            sl = slice(start, start + BATCH)
            log_p[sl] = prob.log_marginal(psi[sl], modes[sl], scale)
            if start // BATCH % 20 == 19:
                progress(f"Laplace: importance weights {start + BATCH}/{proposals}")
    log_w = (log_p - log_q).numpy()
    smoothed, khat = az.psislw(log_w.copy(), reff=1.0)
    weights = np.exp(smoothed - np.max(smoothed))
    weights /= weights.sum()
    ess = float(1.0 / np.sum(weights**2))
    log_evidence = float(np.logaddexp.reduce(log_w) - math.log(proposals))
    # Systematic resampling keeps the draws' weighted empirical distribution with the least extra noise;
    # the kept draws are then put in random order, so no structure of the proposal order remains.
    u = (torch.rand(1, generator=gen, dtype=_DTYPE).item() + np.arange(draws)) / draws
    chosen = np.minimum(np.searchsorted(np.cumsum(weights), u), proposals - 1)
    chosen = chosen[torch.randperm(draws, generator=gen).numpy()]
    kept = psi[chosen]
    mu = torch.empty((draws, prob.N), dtype=_DTYPE)
    with torch.no_grad():
        for start in range(0, draws, BATCH):
            sl = slice(start, start + BATCH)
            mu[sl] = prob.draw_case_effects(kept[sl], modes[chosen[sl]], gen)
    G, S, R = prob.G, prob.S, prob.R
    gamma = torch.zeros((draws, S, G), dtype=_DTYPE)
    gamma[:, 1:, :] = kept[:, G:G + (S - 1) * G].reshape(draws, S - 1, G)
    return {
        "draws": {"b": kept[:, :G].numpy(), "mu": mu.numpy(), "gamma": gamma.numpy(),
                  "nu": kept[:, G + (S - 1) * G:].reshape(draws, R, G).numpy()},
        "pareto_k": float(khat), "importance_ess": ess, "log_evidence": log_evidence,
        "distinct_draws": int(len(np.unique(chosen))), "proposals": proposals,
    }
