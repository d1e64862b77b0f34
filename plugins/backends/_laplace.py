"""The embedded default: a Laplace approximation with the case effects integrated out, corrected by
Pareto-smoothed importance sampling.

Why this shape. Every prediction involves the parameters of one subgroup only (its case's), and the
priors are independent, so the posterior factorises over subgroups: each subgroup g is a block with
one case effect mu[n] per case and 1 + (S - 1) + R shared parameters psi = (b[g], gamma[1:, g],
nu[:, g]) (at most a few dozen). Given psi the cases are independent, so

    log p(psi, y) = log p(psi) + sum_n log integral p(y_n | mu, psi) N(mu; 0, sd_mu) dmu

is a sum of one-dimensional integrals, each computed here by adaptive Gauss-Hermite quadrature to
many digits. A Gaussian approximation of the low-dimensional p(psi | y), at its mode with the
curvature of the model there, is then a good importance-sampling proposal: the weights
p(psi, y) / q(psi) correct its remaining error (the skew that a plain Laplace approximation of all
~1,500 parameters at once leaves in the posterior means of strong effects), and the Pareto k-hat of
the weights says whether the correction can be trusted (k-hat <= 0.7). The case effects of each kept
draw are then drawn from their exact one-dimensional conditionals (independence Metropolis with the
conditional's own Laplace approximation as proposal), so the draws are joint.

gamma is kept as levels inside; under `random_walk` the prior on the increments becomes a
tridiagonal prior precision on the levels (a linear map of determinant 1, so the density is the Stan
program's). Where every case of a block was predicted at every (reader, severity) cell (the DNN
design), sum_cells softplus(mu + c_cell) is one function of mu per block: it is tabulated on a fine
grid and interpolated (cubic Hermite, error below 1e-7 per case), which is what keeps dense fits fast.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_DTYPE = torch.float64
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
QUADRATURE_NODES = 9  # Gauss-Hermite nodes per case integral: exact for polynomials of degree 17
METROPOLIS_STEPS = 4  # independence-Metropolis steps per case effect draw (acceptance is above 90 %)
PROPOSAL_SCALE = 1.1  # widen the proposal a little: importance sampling needs tails at least as heavy
BATCH = 32  # psi draws evaluated at once


GRID_POINTS = 128  # grid of the dense design's sum of softplus terms: interpolation error ~1e-5 nats in all


class Block:
    """The cases of one subgroup, in the (psi, mu) form: index maps, prior precision, log densities.

    psi = [b, gamma[1], ..., gamma[S-1], nu[0], ..., nu[R-1]] (this subgroup's).
    """

    def __init__(self, data):
        """data: one subgroup's predictions (LatentModelData.only_subgroup)."""
        S, R = data.n_severities, data.n_readers
        self.S, self.R, self.N = S, R, data.n_cases
        as_index = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        self.case = as_index(data.case)
        s, r = as_index(data.severity), as_index(data.reader)
        self.P = S + R
        # Positions of each prediction's gamma level and nu in psi (b is at 0); the reference severity
        # points at an extra zero appended to psi.
        self.gamma_pos = torch.where(s > 0, s, torch.full_like(s, self.P))
        self.nu_pos = S + r
        z = torch.as_tensor(np.asarray(data.prediction, dtype=np.float64))
        self.z = z if data.soft else torch.round(z)
        self.random_walk = data.parameterisation == "random_walk"
        pr = data.priors
        self.sd_mu = float(pr.mu)
        self.Q = self._prior_precision(float(pr.b), float(pr.gamma), float(pr.nu))
        # log normalising constants of the priors of b, gamma_free and nu (mu's is in each case integral).
        self.prior_const = -(math.log(pr.b) + (S - 1) * math.log(pr.gamma) + R * math.log(pr.nu)) \
            - self.P * _HALF_LOG_2PI
        cell = (r * S + s) * self.N + self.case
        self.dense = self.N > 0 and len(cell) == R * S * self.N and bool(
            (torch.bincount(cell, minlength=R * S * self.N) == 1).all())
        if not self.dense:
            # Each case's predictions side by side in a row, padded to the longest row (at most R * S):
            # sums per case become row sums, with no scatter.
            order = torch.argsort(self.case, stable=True)
            counts = torch.bincount(self.case, minlength=self.N)
            width = max(int(counts.max().item()) if len(counts) else 0, 1)
            slot = torch.arange(len(order)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            flat = self.case[order] * width + slot
            self.row_gamma_pos = torch.full((self.N * width,), self.P).index_put_((flat,), self.gamma_pos[order])
            self.row_nu_pos = torch.full((self.N * width,), self.P).index_put_((flat,), self.nu_pos[order])
            self.row_b_pos = torch.full((self.N * width,), self.P).index_put_((flat,), torch.zeros_like(flat))
            self.row_z = torch.zeros(self.N * width, dtype=_DTYPE).index_put_((flat,), self.z[order]).reshape(self.N, width)
            self.row_used = torch.zeros(self.N * width, dtype=_DTYPE).index_put_(
                (flat,), torch.ones(len(flat), dtype=_DTYPE)).reshape(self.N, width)
            self.width = width
        if self.dense:
            order = torch.argsort(cell)
            z_grid = self.z[order].reshape(R * S, self.N)
            self.z_case = z_grid.sum(0)  # sum of z per case
            self.z_cell = z_grid.sum(1)  # sum of z per (reader, severity) cell
            cells = torch.arange(R * S)
            self.cell_gamma_pos = torch.where(cells % S > 0, cells % S, torch.full_like(cells, self.P))
            self.cell_nu_pos = S + cells // S

    def _prior_precision(self, sd_b: float, sd_gamma: float, sd_nu: float) -> torch.Tensor:
        S = self.S
        Q = torch.zeros((self.P, self.P), dtype=_DTYPE)
        Q[0, 0] = 1.0 / sd_b**2
        levels = S - 1
        if self.random_walk:
            # gamma_free = D gamma with D the first-difference matrix: precision D^T D / sd^2.
            D = torch.eye(levels, dtype=_DTYPE) - torch.diag(torch.ones(levels - 1, dtype=_DTYPE), -1)
            Q[1:S, 1:S] = D.T @ D / sd_gamma**2
        else:
            Q[1:S, 1:S] = torch.eye(levels, dtype=_DTYPE) / sd_gamma**2
        Q[S:, S:] = torch.eye(self.R, dtype=_DTYPE) / sd_nu**2
        return Q

    # --------------------------------------------------------------- pieces of the density

    @staticmethod
    def _extended(psi: torch.Tensor) -> torch.Tensor:
        return torch.cat([psi, torch.zeros_like(psi[..., :1])], dim=-1)

    def shared_part(self, psi: torch.Tensor) -> torch.Tensor:
        """b + gamma[s] + nu[r] of every prediction: (..., M) from psi (..., P)."""
        ext = self._extended(psi)
        return ext[..., :1] + ext[..., self.gamma_pos] + ext[..., self.nu_pos]

    def cell_part(self, psi: torch.Tensor) -> torch.Tensor:
        """Dense design: b + gamma[s] + nu[r] of every (reader, severity) cell, (..., R*S)."""
        ext = self._extended(psi)
        return ext[..., :1] + ext[..., self.cell_gamma_pos] + ext[..., self.cell_nu_pos]

    def per_case(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per case of per-prediction values (..., M) -> (..., N)."""
        out = torch.zeros(values.shape[:-1] + (self.N,), dtype=values.dtype)
        return out.index_add_(-1, self.case, values)

    def log_prior_psi(self, psi: torch.Tensor) -> torch.Tensor:
        return self.prior_const - 0.5 * ((psi @ self.Q) * psi).sum(-1)

    def _mu_prior(self, mu: torch.Tensor) -> torch.Tensor:
        return -0.5 * (mu / self.sd_mu) ** 2 - math.log(self.sd_mu) - _HALF_LOG_2PI

    def case_log_density(self, mu: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """log p(y_n | mu_n, psi) + log N(mu_n; 0, sd_mu) per case, (..., B, N) for psi (B, P) and
        mu (..., B, N), except (dense design) the sum over the case's cells of z * (b + gamma + nu),
        which does not depend on mu; `offset` gives its total over cases."""
        if self.dense:
            c = self.cell_part(psi)  # (B, cells)
            flat = mu.movedim(-2, 0).reshape(c.shape[0], -1)  # (B, points)
            softplus_sum = _SoftplusSum(c, flat.detach()).value(flat).reshape(mu.movedim(-2, 0).shape).movedim(0, -2)
            return mu * self.z_case - softplus_sum + self._mu_prior(mu)
        eta = mu[..., None] + self.row_shared(psi)
        terms = self.row_z * eta - torch.nn.functional.softplus(eta)
        return (terms * self.row_used).sum(-1) + self._mu_prior(mu)

    def row_shared(self, psi: torch.Tensor) -> torch.Tensor:
        """b + gamma[s] + nu[r] of every prediction in the padded per-case rows: (B, N, width)."""
        ext = self._extended(psi)
        shared = ext[..., self.row_b_pos] + ext[..., self.row_gamma_pos] + ext[..., self.row_nu_pos]
        return shared.reshape(psi.shape[:-1] + (self.N, self.width))

    def offset(self, psi: torch.Tensor) -> torch.Tensor:
        """What case_log_density leaves out, summed over cases (0 unless dense)."""
        if self.dense:
            return self.cell_part(psi) @ self.z_cell
        return torch.zeros(psi.shape[:-1], dtype=_DTYPE)

    def case_modes(self, psi: torch.Tensor, mu: torch.Tensor, steps: int = 50, tol: float = 1e-9) -> tuple:
        """Each case's conditional mode of mu given psi (B, P), by safeguarded Newton (the target is
        concave), and the second derivative there. mu: (B, N) starting points."""
        if self.dense:
            c = self.cell_part(psi)
        else:
            shared = self.row_shared(psi)
        for _ in range(steps + 1):
            if self.dense:
                d1_sum, d2_sum = _SoftplusSum(c, mu, with_value=False).derivatives(mu)
                d1 = self.z_case - d1_sum
            else:
                p = torch.sigmoid(mu[..., None] + shared) * self.row_used
                d1 = (self.row_z * self.row_used - p).sum(-1)
                d2_sum = (p - p * p).sum(-1)
            d1 = d1 - mu / self.sd_mu**2
            d2 = -d2_sum - 1.0 / self.sd_mu**2
            step = (d1 / -d2).clamp_(-4.0, 4.0)
            if step.abs().max().item() < tol:
                break
            mu = mu + step
        return mu, d2

    def log_marginal(self, psi: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """log p(psi, y) with mu integrated out, (B,) values for psi (B, P).

        Gauss-Hermite quadrature per case with nodes at centre + scale * x: placed at (or near) each
        case's conditional mode with its curvature, where the integrand is close to a Gaussian bump,
        the rule is accurate to many digits. Any placement gives a valid quadrature; a good one
        needs fewer nodes.
        """
        x, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
        x = torch.as_tensor(x, dtype=_DTYPE).reshape(-1, 1, 1)
        log_w = torch.log(torch.as_tensor(w, dtype=_DTYPE)).reshape(-1, 1, 1)
        f = self.case_log_density(centre + scale * x, psi) + 0.5 * x**2 + log_w  # (K, B, N)
        log_integral = torch.logsumexp(f, dim=0) + torch.log(scale)
        return self.log_prior_psi(psi) + self.offset(psi) + log_integral.sum(-1)


    # --------------------------------------------------------------- the mode and the proposal

    def joint_hessian(self, psi: torch.Tensor, mu: torch.Tensor) -> tuple:
        """The negative Hessian of log p(psi, mu, y) at psi (P,), mu (N,), as its blocks: psi-psi (P, P),
        psi-mu (P, N) and the diagonal mu-mu block (N,)."""
        eta = mu[self.case] + self.shared_part(psi)
        w = torch.sigmoid(eta) * torch.sigmoid(-eta)
        P, N = self.P, self.N
        positions = (torch.zeros_like(self.gamma_pos), self.gamma_pos, self.nu_pos)
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
        """The precision of psi once mu is integrated out of the joint Gaussian approximation at (psi, mu)."""
        H, C, d = self.joint_hessian(psi, mu)
        return H - (C / d) @ C.T

    def _marginal_at(self, psi: torch.Tensor, mu: torch.Tensor) -> tuple:
        """log p(psi, y) at one psi with its conditional modes (mu: a starting point)."""
        with torch.no_grad():
            mu, d2 = self.case_modes(psi.detach()[None], mu[None])
        return self.log_marginal(psi[None], mu, (-d2).rsqrt())[0], mu[0]

    def mode(self) -> tuple:
        """The mode of p(psi | y) (mu integrated out), by Newton steps with the Schur-complement curvature;
        returns psi, the conditional modes of mu there and the precision of the Gaussian proposal."""
        psi = torch.zeros(self.P, dtype=_DTYPE)
        mu = torch.zeros(self.N, dtype=_DTYPE)
        for _ in range(50):
            psi_var = psi.clone().requires_grad_(True)
            value, mu = self._marginal_at(psi_var, mu)
            (grad,) = torch.autograd.grad(value, psi_var)
            step = torch.linalg.solve(self.schur(psi, mu), grad)
            # Half the Newton decrement is the rise a full step expects: below 1e-7 nats the mode is found
            # to far better than the proposal needs (the quadrature's own noise is ~1e-9).
            if float(grad @ step) < 2e-7:
                break
            # Backtrack if a full step lowers the marginal (rare: the target is close to quadratic).
            t = 1.0
            while t > 1e-3:
                with torch.no_grad():
                    new, new_mu = self._marginal_at(psi + t * step, mu)
                if new.item() >= value.item() - 1e-9:
                    break
                t *= 0.5
            psi, mu = psi + t * step, new_mu
        return psi, mu, self.schur(psi, mu)

    def draw_case_effects(self, psi: torch.Tensor, mode_start: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Draws of mu (B, N) from p(mu | psi, y) for each of B psi draws, by independence Metropolis.

        The proposal only needs to be close to each conditional (Metropolis makes the draws exact), so two
        Newton steps from the first-order guess place it."""
        mode, d2 = self.case_modes(psi, mode_start, steps=2)
        scale = (-d2).rsqrt() * PROPOSAL_SCALE

        def log_ratio(mu):  # log target - log proposal, up to a constant per case
            return self.case_log_density(mu, psi) + 0.5 * ((mu - mode) / scale) ** 2

        current = mode + scale * torch.randn(mode.shape, generator=gen, dtype=_DTYPE)
        current_lr = log_ratio(current)
        for _ in range(METROPOLIS_STEPS):
            proposal = mode + scale * torch.randn(mode.shape, generator=gen, dtype=_DTYPE)
            proposal_lr = log_ratio(proposal)
            accept = torch.log(torch.rand(mode.shape, generator=gen, dtype=_DTYPE)) < proposal_lr - current_lr
            current = torch.where(accept, proposal, current)
            current_lr = torch.where(accept, proposal_lr, current_lr)
        return current


class _SoftplusSum:
    """F(mu) = sum_cells softplus(mu + c_cell) for each row of c (B, cells), tabulated on a grid that
    covers the points it will be asked about (B, points), and read off by cubic Hermite
    interpolation: one table of GRID_POINTS x cells terms instead of points x cells."""

    def __init__(self, c: torch.Tensor, points: torch.Tensor, with_value: bool = True):
        lo = points.detach().min(-1, keepdim=True).values - 1e-3
        hi = points.detach().max(-1, keepdim=True).values + 1e-3
        self.lo, self.h = lo, (hi - lo) / (GRID_POINTS - 1)
        grid = lo + self.h * torch.arange(GRID_POINTS, dtype=_DTYPE)  # (B, T)
        eta = grid[..., :, None] + c[..., None, :]  # (B, T, cells)
        p = torch.sigmoid(eta)
        # softplus(eta) = eta - log(sigmoid(eta)): one log instead of an exp and a log.
        self.f = (eta - torch.log(p)).sum(-1) if with_value else None
        self.df = p.sum(-1)
        self.d2f = None if with_value else (p - p * p).sum(-1)

    def _locate(self, mu: torch.Tensor):
        u = (mu - self.lo) / self.h
        i = u.detach().floor().clamp_(0, GRID_POINTS - 2).long()
        t = u - i
        return i, t

    def _hermite(self, mu, f, df):
        i, t = self._locate(mu)
        f0, f1 = f.gather(-1, i), f.gather(-1, i + 1)
        d0, d1 = df.gather(-1, i) * self.h, df.gather(-1, i + 1) * self.h
        t2, t3 = t * t, t * t * t
        return (2 * t3 - 3 * t2 + 1) * f0 + (t3 - 2 * t2 + t) * d0 + (3 * t2 - 2 * t3) * f1 + (t3 - t2) * d1

    def value(self, mu: torch.Tensor) -> torch.Tensor:
        return self._hermite(mu, self.f, self.df)

    def derivatives(self, mu: torch.Tensor) -> tuple:
        """F' (cubic Hermite) and F'' (linear: Newton needs only a close curvature) at mu."""
        i, t = self._locate(mu)
        d2 = (1 - t) * self.d2f.gather(-1, i) + t * self.d2f.gather(-1, i + 1)
        return self._hermite(mu, self.df, self.d2f), d2



def sample_block(block: Block, draws: int, max_proposals: int, gen: torch.Generator) -> dict:
    """Importance-sampled draws of one block's psi, and exact conditional draws of its mu.

    Proposals come in rounds of `draws` (at least 1,000) until the importance ESS reaches half the
    draws kept, or `max_proposals` have been weighed: a near-Gaussian block stops after one round.
    """
    import arviz as az

    psi_hat, mu_hat, precision = block.mode()
    chol = torch.linalg.cholesky(precision)
    _, C, d = block.joint_hessian(psi_hat, mu_hat)
    scale = d.rsqrt()
    log_det = torch.log(torch.diagonal(chol)).sum() - block.P * (_HALF_LOG_2PI + math.log(PROPOSAL_SCALE))
    rounds, log_w = [], np.empty(0)
    while not rounds or (ess < draws / 2 and len(log_w) < max_proposals):
        eps = torch.randn((max(draws, 1000), block.P), generator=gen, dtype=_DTYPE)
        # psi = psi_hat + scale * L^-T eps has covariance scale^2 * precision^-1.
        offsets = PROPOSAL_SCALE * torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T
        # Each case's conditional mode moves with psi, to first order by -C^T dpsi / d; the quadrature's
        # nodes go there, with the spread of the conditional at the mode.
        modes = mu_hat - (offsets @ C) / d
        log_p = torch.empty(len(eps), dtype=_DTYPE)
        with torch.no_grad():
            for start in range(0, len(eps), BATCH):
                sl = slice(start, start + BATCH)
                log_p[sl] = block.log_marginal(psi_hat + offsets[sl], modes[sl], scale)
        rounds.append((psi_hat + offsets, modes))
        log_w = np.concatenate([log_w, (log_p - (log_det - 0.5 * (eps**2).sum(-1))).numpy()])
        smoothed, khat = az.psislw(log_w.copy(), reff=1.0)
        weights = np.exp(smoothed - np.max(smoothed))
        weights /= weights.sum()
        ess = float(1.0 / np.sum(weights**2))
    psi = torch.cat([r[0] for r in rounds])
    modes = torch.cat([r[1] for r in rounds])
    # Systematic resampling keeps the weighted draws' distribution with the least added noise; the kept
    # draws are then shuffled so that nothing of the proposal order remains.
    u = (torch.rand(1, generator=gen, dtype=_DTYPE).item() + np.arange(draws)) / draws
    chosen = np.minimum(np.searchsorted(np.cumsum(weights), u), len(log_w) - 1)
    chosen = chosen[torch.randperm(draws, generator=gen).numpy()]
    kept = psi[chosen]
    mu = torch.empty((draws, block.N), dtype=_DTYPE)
    with torch.no_grad():
        for start in range(0, draws, BATCH):
            sl = slice(start, start + BATCH)
            mu[sl] = block.draw_case_effects(kept[sl], modes[chosen[sl]], gen)
    return {"psi": kept, "mu": mu, "pareto_k": float(khat), "importance_ess": ess, "proposals": len(log_w),
            "log_evidence": float(np.logaddexp.reduce(log_w) - math.log(len(log_w))),
            "distinct_draws": int(len(np.unique(chosen)))}


def fit(data, draws: int, max_proposals: int, seed: int, progress) -> dict:
    """Joint posterior draws of the whole model, one independent block per subgroup, and the
    diagnostics of every block's approximation."""
    S, R, G = data.n_severities, data.n_readers, data.n_groups
    out = {"b": np.zeros((draws, G)), "mu": np.zeros((draws, data.n_cases)), "gamma": np.zeros((draws, S, G)),
           "nu": np.zeros((draws, R, G))}
    blocks = []
    for g in range(G):
        cases = np.flatnonzero(np.asarray(data.case_group) == g)
        block = Block(data.only_subgroup(g))
        # Its own seed per subgroup: a block's draws do not depend on the other blocks.
        gen = torch.Generator().manual_seed(int(seed) * 1009 + g)
        if block.N == 0:  # no data: the posterior is the prior
            psi = torch.linalg.solve_triangular(torch.linalg.cholesky(block.Q).T,
                                                torch.randn((block.P, draws), generator=gen, dtype=_DTYPE),
                                                upper=True).T
            result = {"psi": psi, "mu": torch.empty((draws, 0), dtype=_DTYPE), "pareto_k": -np.inf,
                      "importance_ess": float(draws), "log_evidence": 0.0, "distinct_draws": draws, "proposals": 0}
        else:
            result = sample_block(block, draws, max_proposals, gen)
        progress(f"Laplace: subgroup {g + 1}/{G}: {block.N} cases, Pareto k-hat {result['pareto_k']:.2f}, "
                 f"importance ESS {result['importance_ess']:.0f} of {result['proposals']}")
        psi = result["psi"].numpy()
        out["b"][:, g] = psi[:, 0]
        out["gamma"][:, 1:, g] = psi[:, 1:S]
        out["nu"][:, :, g] = psi[:, S:]
        out["mu"][:, cases] = result["mu"].numpy()
        blocks.append({"group": g, "cases": block.N, **{k: v for k, v in result.items() if k not in ("psi", "mu")}})
    # The blocks are independent, so log p(y) is the sum of theirs.
    return {"draws": out, "blocks": blocks, "log_evidence": float(sum(b["log_evidence"] for b in blocks))}
