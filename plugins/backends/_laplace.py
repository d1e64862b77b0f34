"""The embedded default: a Laplace approximation with the case effects integrated out, corrected by
Pareto-smoothed importance sampling.

Why this shape. Every prediction involves the parameters of one subgroup only (its case's), and the
priors are independent, so the posterior factorises over subgroups: each subgroup g is a block with
one case effect mu[n] per case and 1 + (S - 1) + R shared parameters psi = (b[g], gamma[1:, g],
nu[:, g]), plus the class offset delta[g] under `by_class` case effects (at most a few dozen). Given
psi the cases are independent, so

    log p(psi, y) = log p(psi) + sum_n log integral p(y_n | mu, psi) N(mu; m_n, sd_mu) dmu

(m_n = delta[g] for a positive case under `by_class`, else 0)

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
Elsewhere (the reader-study design) a case's sum of softplus terms is the log of a product of
1 + e^mu e^c factors, with e^c tabulated per cell: a multiply-add per prediction instead of an
exponential and a logarithm.

Scale. Every array over cases is processed a chunk of cases at a time (CHUNK values per temporary), so
memory does not grow with (draws x predictions) and the cost is linear in the cases: a study 100 times
the published size (144,000 cases) fits in minutes and a few GB (benchmarks/fit_scale.py). The mu draws
of a block go straight into the fit's output array, a batch at a time.
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
PARETO_K_TRUSTED = 0.7  # above it importance sampling cannot correct the approximation (Vehtari et al.)


GRID_POINTS = 128  # grid of the dense design's sum of softplus terms: interpolation error ~1e-5 nats in all
CHUNK = 1 << 20  # values per temporary array (8 MB): cases are processed in chunks of about this size


def _chunks(n: int, per_case: int):
    """Slices of n cases, each small enough that an array of per_case values per case stays near CHUNK."""
    size = max(1, CHUNK // max(per_case, 1))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)] or [slice(0, 0)]


class Block:
    """The cases of one subgroup, in the (psi, mu) form: index maps, prior precision, log densities.

    psi = [b, gamma[1], ..., gamma[S-1], nu[0], ..., nu[R-1]] (this subgroup's), then delta under
    `by_class` case effects.
    """

    def __init__(self, data):
        """data: one subgroup's predictions (LatentModelData.only_subgroup)."""
        S, R = data.n_severities, data.n_readers
        self.S, self.R, self.N = S, R, data.n_cases
        as_index = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
        self.case = as_index(data.case)
        s, r = as_index(data.severity), as_index(data.reader)
        # The class offset delta (the case effects' prior mean is delta for a positive case, 0 for a
        # negative one) is the last entry of psi when the model has it.
        self.by_class = data.case_positive is not None
        self.P = S + R + int(self.by_class)
        # Positions of each prediction's gamma level and nu in psi (b is at 0); the reference severity
        # points at an extra zero appended to psi.
        self.gamma_pos = torch.where(s > 0, s, torch.full_like(s, self.P))
        self.nu_pos = S + r
        z = torch.as_tensor(np.asarray(data.prediction, dtype=np.float64))
        self.z = z if data.soft else torch.round(z)
        self.random_walk = data.parameterisation == "random_walk"
        pr = data.priors
        self.sd_mu = float(pr.mu)
        self.positive = torch.as_tensor(np.asarray(data.case_positive if self.by_class else np.zeros(self.N),
                                                   dtype=np.float64))
        self.Q = self._prior_precision(float(pr.b), float(pr.gamma), float(pr.nu), float(pr.delta))
        # log normalising constants of the priors of b, gamma_free, nu and delta (mu's is in each case integral).
        self.prior_const = -(math.log(pr.b) + (S - 1) * math.log(pr.gamma) + R * math.log(pr.nu)
                             + self.by_class * math.log(pr.delta)) - self.P * _HALF_LOG_2PI
        # b + gamma[s] + nu[r] takes one value per (reader, severity) cell: cell_part gives them all.
        cells = torch.arange(R * S)
        self.cell_gamma_pos = torch.where(cells % S > 0, cells % S, torch.full_like(cells, self.P))
        self.cell_nu_pos = S + cells // S
        cell = r * S + s
        key = cell * self.N + self.case
        self.dense = self.N > 0 and len(cell) == R * S * self.N and bool(
            (torch.bincount(key, minlength=R * S * self.N) == 1).all())
        if self.dense:
            z_grid = self.z[torch.argsort(key)].reshape(R * S, self.N)
            self.z_case = z_grid.sum(0)  # sum of z per case
            self.z_cell = z_grid.sum(1)  # sum of z per (reader, severity) cell
        else:
            self.z_case = torch.zeros(self.N, dtype=_DTYPE).index_add_(0, self.case, self.z)
            self.z_cell = torch.zeros(R * S, dtype=_DTYPE).index_add_(0, cell, self.z)
            # Each case's cells side by side in a row, padded to the longest row (at most R * S) with a
            # cell R * S that contributes nothing: sums per case become row sums, with no scatter.
            order = torch.argsort(self.case, stable=True)
            counts = torch.bincount(self.case, minlength=self.N)
            width = max(int(counts.max().item()) if len(counts) else 0, 1)
            slot = torch.arange(len(order)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            flat = self.case[order] * width + slot
            self.row_cell = torch.full((self.N * width,), R * S).index_put_((flat,), cell[order]).reshape(self.N, width)
            self.width = width

    def _prior_precision(self, sd_b: float, sd_gamma: float, sd_nu: float, sd_delta: float) -> torch.Tensor:
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
        Q[S:S + self.R, S:S + self.R] = torch.eye(self.R, dtype=_DTYPE) / sd_nu**2
        if self.by_class:
            Q[-1, -1] = 1.0 / sd_delta**2
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
        """b + gamma[s] + nu[r] of every (reader, severity) cell, (..., R*S)."""
        ext = self._extended(psi)
        return ext[..., :1] + ext[..., self.cell_gamma_pos] + ext[..., self.cell_nu_pos]

    def per_case(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per case of per-prediction values (..., M) -> (..., N)."""
        out = torch.zeros(values.shape[:-1] + (self.N,), dtype=values.dtype)
        return out.index_add_(-1, self.case, values)

    def log_prior_psi(self, psi: torch.Tensor) -> torch.Tensor:
        return self.prior_const - 0.5 * ((psi @ self.Q) * psi).sum(-1)

    def prior_mean(self, psi: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        """The case effects' prior means, (B, n) for psi (B, P): delta for positive cases, else 0."""
        if not self.by_class:
            return torch.zeros((1, 1), dtype=_DTYPE)
        return psi[..., -1:] * self.positive[sl]

    def _mu_prior(self, mu: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((mu - mean) / self.sd_mu) ** 2 - math.log(self.sd_mu) - _HALF_LOG_2PI

    def softplus_sums(self, psi: torch.Tensor, lo: torch.Tensor = None, hi: torch.Tensor = None):
        """F_n(mu) = sum over case n's predictions of softplus(mu + b + gamma[s] + nu[r]), for each psi
        (B, P): dense design, tabulated for mu in [lo, hi] (B, 1) (see _SoftplusSum); else by rows."""
        c = self.cell_part(psi)
        if self.dense:
            return _SoftplusSum(c, lo, hi)
        return _RowSums(c, self.row_cell)

    def case_log_density(self, mu: torch.Tensor, psi: torch.Tensor, sums=None) -> torch.Tensor:
        """log p(y_n | mu_n, psi) + log N(mu_n; 0, sd_mu) per case, (..., B, N) for psi (B, P) and
        mu (..., B, N), except the sum over the case's predictions of z * (b + gamma + nu), which does
        not depend on mu; `offset` gives its total over cases. sums: softplus_sums(psi) covering mu."""
        if sums is None:
            sums = self.softplus_sums(psi, *_range(mu.detach()))
        chunks = _chunks(self.N, mu[..., :1].numel() * sums.cost)
        if len(chunks) == 1:
            return self._density(mu, sums, chunks[0], psi)
        return torch.cat([self._density(mu[..., sl], sums, sl, psi) for sl in chunks], dim=-1)

    def _density(self, mu: torch.Tensor, sums, sl: slice, psi: torch.Tensor) -> torch.Tensor:
        return mu * self.z_case[sl] - sums.value(mu, sl) + self._mu_prior(mu, self.prior_mean(psi, sl))

    def offset(self, psi: torch.Tensor) -> torch.Tensor:
        """What case_log_density leaves out, summed over cases."""
        return self.cell_part(psi) @ self.z_cell

    def case_modes(self, psi: torch.Tensor, mu: torch.Tensor, steps: int = 50, tol: float = 1e-9) -> tuple:
        """Each case's conditional mode of mu given psi (B, P), by safeguarded Newton (the target is
        concave), and the second derivative there. mu: (B, N) starting points."""
        c = self.cell_part(psi)
        rows = None if self.dense else _RowSums(c, self.row_cell)
        mean = self.prior_mean(psi)
        for _ in range(steps + 1):
            sums = _SoftplusSum(c, *_range(mu), with_value=False) if self.dense else rows
            d1_sum, d2_sum = torch.empty_like(mu), torch.empty_like(mu)
            for sl in _chunks(self.N, len(mu) * sums.cost):
                d1_sum[..., sl], d2_sum[..., sl] = sums.derivatives(mu[..., sl], sl)
            d1 = self.z_case - d1_sum - (mu - mean) / self.sd_mu**2
            d2 = -d2_sum - 1.0 / self.sd_mu**2
            step = (d1 / -d2).clamp_(-4.0, 4.0)
            if step.abs().max().item() < tol:
                break
            mu = mu + step
        return mu, d2

    def log_marginal(self, psi: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor,
                     backward: bool = False) -> torch.Tensor:
        """log p(psi, y) with mu integrated out, (B,) values for psi (B, P).

        Gauss-Hermite quadrature per case with nodes at centre + scale * x: placed at (or near) each
        case's conditional mode with its curvature, where the integrand is close to a Gaussian bump,
        the rule is accurate to many digits. Any placement gives a valid quadrature; a good one
        needs fewer nodes. The cases are summed a chunk at a time; backward: accumulate the gradient
        into psi.grad chunk by chunk (the graph of all cases at once would not fit in memory for large
        blocks) and return the value detached.
        """
        x, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
        x = torch.as_tensor(x, dtype=_DTYPE).reshape(-1, 1, 1)
        log_w = torch.log(torch.as_tensor(w, dtype=_DTYPE)).reshape(-1, 1, 1)
        scale = scale.expand_as(centre)
        # The nodes' range, for the dense design's table: centre + scale * x is monotone in x.
        with torch.no_grad():
            ends = (centre + scale * x[0], centre + scale * x[-1])
            lo = torch.minimum(*ends).min(-1, keepdim=True).values
            hi = torch.maximum(*ends).max(-1, keepdim=True).values
        sums = self.softplus_sums(psi, lo - 1e-3, hi + 1e-3)
        total = self.log_prior_psi(psi) + self.offset(psi)
        if backward:
            total.sum().backward(retain_graph=True)
            total = total.detach()
        for sl in _chunks(self.N, QUADRATURE_NODES * len(psi) * sums.cost):
            nodes = centre[..., sl] + scale[..., sl] * x  # (K, B, n)
            f = self._density(nodes, sums, sl, psi) + 0.5 * x**2 + log_w
            part = (torch.logsumexp(f, dim=0) + torch.log(scale[..., sl])).sum(-1)
            if backward:
                part.sum().backward(retain_graph=True)
                part = part.detach()
            total = total + part
        return total

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
        if self.by_class:  # the prior's 0.5 (mu - delta * positive)^2 / sd^2 couples delta with mu
            H[-1, -1] += self.positive.sum() / self.sd_mu**2
            C[-1] -= self.positive / self.sd_mu**2
        return H, C, d

    def schur(self, psi: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """The precision of psi once mu is integrated out of the joint Gaussian approximation at (psi, mu)."""
        H, C, d = self.joint_hessian(psi, mu)
        return H - (C / d) @ C.T

    def _marginal_at(self, psi: torch.Tensor, mu: torch.Tensor, backward: bool = False) -> tuple:
        """log p(psi, y) at one psi with its conditional modes (mu: a starting point); backward: its
        gradient is accumulated into psi.grad."""
        with torch.no_grad():
            mu, d2 = self.case_modes(psi.detach()[None], mu[None])
        return self.log_marginal(psi[None], mu, (-d2).rsqrt(), backward=backward)[0], mu[0]

    def mode(self) -> tuple:
        """The mode of p(psi | y) (mu integrated out), by Newton steps with the Schur-complement curvature;
        returns psi, the conditional modes of mu there and the precision of the Gaussian proposal."""
        psi = torch.zeros(self.P, dtype=_DTYPE)
        mu = torch.zeros(self.N, dtype=_DTYPE)
        for _ in range(50):
            psi_var = psi.clone().requires_grad_(True)
            value, mu = self._marginal_at(psi_var, mu, backward=True)
            grad = psi_var.grad
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
        rows = None if self.dense else self.softplus_sums(psi)

        def log_ratio(mu):  # log target - log proposal, up to a constant per case
            return self.case_log_density(mu, psi, rows) + 0.5 * ((mu - mode) / scale) ** 2

        current = mode + scale * torch.randn(mode.shape, generator=gen, dtype=_DTYPE)
        current_lr = log_ratio(current)
        for _ in range(METROPOLIS_STEPS):
            proposal = mode + scale * torch.randn(mode.shape, generator=gen, dtype=_DTYPE)
            proposal_lr = log_ratio(proposal)
            accept = torch.log(torch.rand(mode.shape, generator=gen, dtype=_DTYPE)) < proposal_lr - current_lr
            current = torch.where(accept, proposal, current)
            current_lr = torch.where(accept, proposal_lr, current_lr)
        return current


def _range(points: torch.Tensor) -> tuple:
    """[lo, hi] (B, 1) around points (..., B, N), for _SoftplusSum."""
    flat = points.detach().movedim(-2, 0).reshape(points.shape[-2], -1)
    return flat.min(-1, keepdim=True).values - 1e-3, flat.max(-1, keepdim=True).values + 1e-3


class _RowSums:
    """F_n(mu) = sum over the cells in row n of softplus(mu + c_cell) for each row of c (B, cells),
    the rows (N, width) listing each case's cells (padded with cell index `cells`, which adds nothing).

    softplus is log(1 + e^mu e^c): with e^c tabulated per cell and e^mu once per point, a row's sum is
    the log of a product of `width` factors: one multiply-add per prediction instead of a logarithm
    and an exponential (ten times faster), and exact to rounding. Points where the product would
    overflow (sum of softplus terms above ~700, far outside any posterior) are computed term by term.
    """

    GROUP = 16  # factors per product: at most 16 softplus terms, so the product overflows only past eta ~ 44

    def __init__(self, c: torch.Tensor, row_cell: torch.Tensor):
        self.c = torch.cat([c, torch.full_like(c[..., :1], -math.inf)], dim=-1)
        self.e = torch.exp(self.c)  # the padding cell: e^-inf = 0, a factor 1
        self.row_cell = row_cell
        width = row_cell.shape[1]
        if width > self.GROUP:  # pad to whole groups
            pad = -width % self.GROUP
            self.row_cell = torch.cat([row_cell, torch.full((len(row_cell), pad), c.shape[-1])], dim=1)
        self.cost = self.row_cell.shape[1] + 2  # per point: the row's terms and a few per-point values

    def _rows(self, table: torch.Tensor, sl: slice) -> torch.Tensor:
        """table (B, cells + 1) read along the rows of the cases sl: (B, n, width), a new array."""
        index = self.row_cell[sl]
        return table.gather(1, index.reshape(1, -1).expand(len(table), -1)).view(len(table), *index.shape)

    def value(self, mu: torch.Tensor, sl: slice) -> torch.Tensor:
        """F at mu (..., B, n) for the cases sl."""
        rows = self._rows(self.e, sl)
        a = torch.exp(mu)[..., None]
        in_place = a.dim() == rows.dim() and not (a.requires_grad or rows.requires_grad)
        factors = (rows.mul_(a) if in_place else a * rows).add_(1.0)
        width = factors.shape[-1]
        if width > self.GROUP:
            factors = factors.reshape(factors.shape[:-1] + (width // self.GROUP, self.GROUP))
            out = torch.log(factors.prod(-1)).sum(-1)
        else:
            out = torch.log(factors.prod(-1))
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            direct = torch.nn.functional.softplus(mu[..., None] + self._rows(self.c, sl)).sum(-1)
            out = torch.where(bad, direct, out)
        return out

    def derivatives(self, mu: torch.Tensor, sl: slice) -> tuple:
        """F' and F'' at mu (B, n): sums of p = sigmoid(mu + c) = t / (1 + t), t = e^mu e^c, and of
        p (1 - p) = p / (1 + t)."""
        t = self._rows(self.e, sl).mul_(torch.exp(mu)[..., None])  # (Newton's steps: never differentiated)
        u = t + 1.0
        p = t.div_(u)
        d1 = p.sum(-1)
        d2 = p.div_(u).sum(-1)
        bad = ~(torch.isfinite(d1) & torch.isfinite(d2))
        if bool(bad.any()):
            q = torch.sigmoid(mu[..., None] + self._rows(self.c, sl))
            d1, d2 = torch.where(bad, q.sum(-1), d1), torch.where(bad, (q - q * q).sum(-1), d2)
        return d1, d2


class _SoftplusSum:
    """F(mu) = sum_cells softplus(mu + c_cell) for each row of c (B, cells), tabulated on a grid over
    [lo, hi] (B, 1) and read off by cubic Hermite interpolation: one table of GRID_POINTS x cells terms
    instead of points x cells. The same F for every case (the dense design), so `sl` is not used."""

    cost = 16  # temporaries per point of an evaluation

    def __init__(self, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, with_value: bool = True):
        self.lo, self.h = lo, (hi - lo) / (GRID_POINTS - 1)
        grid = lo + self.h * torch.arange(GRID_POINTS, dtype=_DTYPE)  # (B, T)
        eta = grid[..., :, None] + c[..., None, :]  # (B, T, cells)
        p = torch.sigmoid(eta)
        df = p.sum(-1)
        if with_value:
            # softplus(eta) = eta - log(sigmoid(eta)): one log instead of an exp and a log.
            self.f = self._cubic((eta - torch.log(p)).sum(-1), df)
        else:
            d2f = (p - p * p).sum(-1)
            self.df = self._cubic(df, d2f)
            self.d2f = (d2f[..., :-1], d2f[..., 1:] - d2f[..., :-1])

    def _cubic(self, f: torch.Tensor, df: torch.Tensor) -> tuple:
        """The cubic Hermite interpolant of values f and derivatives df (B, T) on the grid, as the
        coefficients (B, T - 1) of a + t (b + t (c + t d)) on each interval, t in [0, 1]."""
        f0, f1 = f[..., :-1], f[..., 1:]
        d0, d1 = df[..., :-1] * self.h, df[..., 1:] * self.h
        rise = f1 - f0
        return f0, d0, 3 * rise - 2 * d0 - d1, d0 + d1 - 2 * rise

    def _locate(self, mu: torch.Tensor):
        u = (mu - self.lo) / self.h
        i = u.detach().floor().clamp_(0, GRID_POINTS - 2).long()
        return i, u - i

    @staticmethod
    def _read(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """table (B, T - 1) at i (..., B, n)."""
        return table.expand(i.shape[:-1] + table.shape[-1:]).gather(-1, i)

    def _horner(self, coefficients: tuple, i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b, c, d = (self._read(k, i) for k in coefficients)
        return a + t * (b + t * (c + t * d))

    def value(self, mu: torch.Tensor, sl: slice = None) -> torch.Tensor:
        """F at mu (..., B, n)."""
        return self._horner(self.f, *self._locate(mu))

    def derivatives(self, mu: torch.Tensor, sl: slice = None) -> tuple:
        """F' (cubic Hermite) and F'' (linear: Newton needs only a close curvature) at mu (B, n)."""
        i, t = self._locate(mu)
        start, rise = self.d2f
        return self._horner(self.df, i, t), self._read(start, i) + t * self._read(rise, i)


def sample_block(block: Block, draws: int, max_proposals: int, gen: torch.Generator, store_mu=None) -> dict:
    """Importance-sampled draws of one block's psi, and exact conditional draws of its mu.

    Proposals come in rounds of `draws` (at least 1,000) until the importance ESS reaches half the
    draws kept and the Pareto k-hat is at most PARETO_K_TRUSTED, or `max_proposals` have been weighed:
    a near-Gaussian block stops after one round. k-hat is estimated from the largest weights, so one
    round's estimate is noisy; where it lands above the threshold, more proposals both sharpen the
    estimate and fill the tail (a proposal that truly misses the posterior stays above it).
    store_mu(rows, mu): where the mu draws go, BATCH rows at a time (by default into the result's
    "mu", (draws, N)); a large block's draws need not be held twice.
    """
    import arviz as az

    psi_hat, mu_hat, precision = block.mode()
    chol = torch.linalg.cholesky(precision)
    _, C, d = block.joint_hessian(psi_hat, mu_hat)
    scale = d.rsqrt()
    log_det = torch.log(torch.diagonal(chol)).sum() - block.P * (_HALF_LOG_2PI + math.log(PROPOSAL_SCALE))

    def modes(offsets):
        # Each case's conditional mode moves with psi, to first order by -C^T dpsi / d; the quadrature's
        # nodes go there, with the spread of the conditional at the mode. (B, N): made a batch at a time.
        return mu_hat - (offsets @ C) / d

    rounds, log_w = [], np.empty(0)
    while not rounds or ((ess < draws / 2 or khat > PARETO_K_TRUSTED) and len(log_w) < max_proposals):
        eps = torch.randn((max(draws, 1000), block.P), generator=gen, dtype=_DTYPE)
        # psi = psi_hat + scale * L^-T eps has covariance scale^2 * precision^-1.
        offsets = PROPOSAL_SCALE * torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T
        log_p = torch.empty(len(eps), dtype=_DTYPE)
        with torch.no_grad():
            for start in range(0, len(eps), BATCH):
                sl = slice(start, start + BATCH)
                log_p[sl] = block.log_marginal(psi_hat + offsets[sl], modes(offsets[sl]), scale)
        rounds.append(offsets)
        log_w = np.concatenate([log_w, (log_p - (log_det - 0.5 * (eps**2).sum(-1))).numpy()])
        smoothed, khat = az.psislw(log_w.copy(), reff=1.0)
        weights = np.exp(smoothed - np.max(smoothed))
        weights /= weights.sum()
        ess = float(1.0 / np.sum(weights**2))
    offsets = torch.cat(rounds)
    # Systematic resampling keeps the weighted draws' distribution with the least added noise; the kept
    # draws are then shuffled so that nothing of the proposal order remains.
    u = (torch.rand(1, generator=gen, dtype=_DTYPE).item() + np.arange(draws)) / draws
    chosen = np.minimum(np.searchsorted(np.cumsum(weights), u), len(log_w) - 1)
    chosen = chosen[torch.randperm(draws, generator=gen).numpy()]
    kept = psi_hat + offsets[chosen]
    mu = None
    if store_mu is None:
        mu = torch.empty((draws, block.N), dtype=_DTYPE)
        store_mu = mu.__setitem__
    with torch.no_grad():
        for start in range(0, draws, BATCH):
            sl = slice(start, start + BATCH)
            store_mu(sl, block.draw_case_effects(kept[sl], modes(offsets[chosen[sl]]), gen))
    return {"psi": kept, "mu": mu, "pareto_k": float(khat), "importance_ess": ess, "proposals": len(log_w),
            "log_evidence": float(np.logaddexp.reduce(log_w) - math.log(len(log_w))),
            "distinct_draws": int(len(np.unique(chosen)))}


def fit(data, draws: int, max_proposals: int, seed: int, progress) -> dict:
    """Joint posterior draws of the whole model, one independent block per subgroup, and the
    diagnostics of every block's approximation."""
    S, R, G = data.n_severities, data.n_readers, data.n_groups
    out = {"b": np.zeros((draws, G)), "mu": np.zeros((draws, data.n_cases)), "gamma": np.zeros((draws, S, G)),
           "nu": np.zeros((draws, R, G))}
    if data.case_positive is not None:
        out["delta"] = np.zeros((draws, G))
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
            def store(rows, mu, cases=cases):
                out["mu"][rows, cases] = mu.numpy()

            result = sample_block(block, draws, max_proposals, gen, store)
        progress(f"Laplace: subgroup {g + 1}/{G}: {block.N} cases, Pareto k-hat {result['pareto_k']:.2f}, "
                 f"importance ESS {result['importance_ess']:.0f} of {result['proposals']}")
        psi = result["psi"].numpy()
        out["b"][:, g] = psi[:, 0]
        out["gamma"][:, 1:, g] = psi[:, 1:S]
        out["nu"][:, :, g] = psi[:, S:S + R]
        if block.by_class:
            out["delta"][:, g] = psi[:, -1]
        blocks.append({"group": g, "cases": block.N, **{k: v for k, v in result.items() if k not in ("psi", "mu")}})
    # The blocks are independent, so log p(y) is the sum of theirs.
    return {"draws": out, "blocks": blocks, "log_evidence": float(sum(b["log_evidence"] for b in blocks))}
