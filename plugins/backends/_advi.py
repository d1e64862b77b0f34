"""Mean-field ADVI of `latent_model.stan`, in PyTorch: the torch backend's `advi` method (the
published papers' inference, kept to reproduce them; the default is `laplace`, see _laplace.py).

The variational family is Stan's `meanfield`: an independent Gaussian for every
unconstrained parameter (b, mu, gamma_free, nu; all are unconstrained already, so
there is no Jacobian). The objective is the ELBO of the Stan program's log density
with its normalising constants, so the ELBO is comparable with CmdStan's.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Callable

import numpy as np
import torch

from perceptcore.latent_model import Fit, FitSettings, LatentModelData

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_DTYPE = torch.float64

# Optimiser settings. Chosen on simulated studies of the published size; they are
# not user settings because the stopping rule, not these, decides the result.
_LR = 0.05  # Adam step size of the constant phase
_WINDOW = 50  # iterations per ELBO window of the stopping rule
_MIN_DECAY = 200  # shortest decay-to-zero phase
_ELBO_NODES = 32  # Gauss-Hermite nodes of the final ELBO


def _gamma_levels(gamma_free: torch.Tensor, random_walk: bool) -> torch.Tensor:
    """gamma (..., S, G) from gamma_free (..., S-1, G), with the zero reference row."""
    levels = torch.cumsum(gamma_free, dim=-2) if random_walk else gamma_free
    zero = torch.zeros_like(levels[..., :1, :])
    return torch.cat([zero, levels], dim=-2)


class _Problem:
    """One data set in index form, and the linear map from parameters to eta.

    Every eta is b[g] + mu[n] + gamma[s, g] + nu[r, g], and gamma is a (cumulative)
    sum of gamma_free, so eta = A theta for the flat parameter vector
    theta = [b, mu, gamma_free, nu] and a 0/1 matrix A. Under a mean-field Gaussian
    eta's mean is A mean and (0/1 entries) its variance is A var. The fit applies
    A^T by hand instead of building an autograd graph per step: that is what makes
    a step cost a few milliseconds at 65k predictions.

    When every observer predicted every case at every severity (the DNN design)
    the fit orders the predictions as an (R, S, N) grid and applies A by
    broadcasting and axis sums, several times faster than gathers and scatters;
    all of the fit's per-prediction vectors (z, eta, weights) are then in grid order.
    """

    def __init__(self, data: LatentModelData):
        G, S, R, N = data.n_groups, data.n_severities, data.n_readers, data.n_cases
        self.G, self.S, self.R, self.N = G, S, R, N

        def index(a):
            return torch.as_tensor(np.asarray(a, dtype=np.int64))

        self.group = index(data.case_group)
        self.case = index(data.case)
        self.obs_group = self.group[self.case]
        # Row-major positions into the (S, G) and (R, G) tables.
        self.sg_pos = index(data.severity) * G + self.obs_group
        self.rg_pos = index(data.reader) * G + self.obs_group
        z = torch.as_tensor(np.asarray(data.prediction, dtype=np.float64))
        self.z_data = z if data.soft else torch.round(z)  # the same 0/1 the Stan data gets
        self.random_walk = data.parameterisation == "random_walk"
        pr = data.priors
        # The class offset (where the model has it) is fitted non-centred: mu here is the case effect's
        # deviation from its prior mean delta[g] * positive[n], so that every prior stays an independent
        # N(0, sd), the form this fit's closed-form terms rely on. The shift has Jacobian 1: the same
        # posterior as the Stan program's centred mu. The draws are returned centred.
        self.by_class = data.case_positive is not None
        self.names = ("b", "mu", "gamma_free", "nu") + (("delta",) if self.by_class else ())
        self.positive = torch.as_tensor(np.asarray(data.case_positive if self.by_class else np.zeros(N),
                                                   dtype=np.float64))
        self.prior_sd = {"b": float(pr.b), "mu": float(pr.mu), "gamma_free": float(pr.gamma), "nu": float(pr.nu),
                         "delta": float(pr.delta)}
        self.shapes = {"b": (G,), "mu": (N,), "gamma_free": (S - 1, G), "nu": (R, G), "delta": (G,)}
        self.sizes = [math.prod(self.shapes[k]) for k in self.names]
        self.P = sum(self.sizes)
        prior_sd = torch.cat([torch.full((n,), self.prior_sd[k], dtype=_DTYPE) for n, k in zip(self.sizes, self.names)])
        self.prior_var = prior_sd**2
        self.prior_const = -(torch.log(prior_sd) + _HALF_LOG_2PI).sum().item()
        cell = (index(data.reader) * S + index(data.severity)) * N + self.case
        self.grid = data.n_predictions == R * S * N and bool((torch.bincount(cell, minlength=R * S * N) == 1).all())
        self.z = self.z_data[torch.argsort(cell)] if self.grid else self.z_data
        self.z_minus_1 = self.z - 1.0

    def split(self, flat: torch.Tensor) -> dict:
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.sizes, dim=-1)
        return {k: p.reshape(*lead, *self.shapes[k]) for k, p in zip(self.names, parts)}

    def case_effects(self, p: dict) -> torch.Tensor:
        """The centred case effects mu[n] (+ delta[g] for a positive case) of split parameters p."""
        if not self.by_class:
            return p["mu"]
        return p["mu"] + p["delta"].index_select(-1, self.group) * self.positive

    def to_eta(self, flat: torch.Tensor) -> torch.Tensor:
        p = self.split(flat)
        p["mu"] = self.case_effects(p)
        table = p["b"][None, :] + _gamma_levels(p["gamma_free"], self.random_walk)  # (S, G)
        if self.grid:
            case_part = p["mu"] + table.index_select(1, self.group)  # (S, N)
            return (case_part[None] + p["nu"].index_select(1, self.group)[:, None, :]).flatten()
        return (
            p["mu"].index_select(0, self.case)
            + table.flatten().index_select(0, self.sg_pos)
            + p["nu"].flatten().index_select(0, self.rg_pos)
        )

    def from_eta(self, w: torch.Tensor) -> torch.Tensor:
        """A^T w: the gradient with respect to the flat parameters of sum(w * eta)."""
        G, S, R, N = self.G, self.S, self.R, self.N
        if self.grid:
            w = w.reshape(R, S, N)
            w_sn = w.sum(0)
            g_mu = w_sn.sum(0)
            g_table = torch.zeros((S, G), dtype=_DTYPE).index_add_(1, self.group, w_sn)
            g_nu = torch.zeros((R, G), dtype=_DTYPE).index_add_(1, self.group, w.sum(1)).flatten()
        else:
            g_mu = torch.bincount(self.case, weights=w, minlength=N)
            g_table = torch.bincount(self.sg_pos, weights=w, minlength=S * G).reshape(S, G)
            g_nu = torch.bincount(self.rg_pos, weights=w, minlength=R * G)
        g_levels = g_table[1:]
        g_free = g_levels.flip(0).cumsum(0).flip(0) if self.random_walk else g_levels
        parts = [g_table.sum(0), g_mu, g_free.flatten(), g_nu]
        if self.by_class:
            parts.append(torch.zeros(G, dtype=_DTYPE).index_add_(0, self.group, g_mu * self.positive))
        return torch.cat(parts)

    def ridge_step(self, mean: torch.Tensor) -> None:
        """Move the means, in place, to the ELBO maximum along the model's ridges.

        Adding c1 + c2 to b[g] and taking c1 from every mu[n] of subgroup g and c2
        from every nu[r, g] leaves every eta, hence the expected likelihood, exactly
        unchanged; only the prior term moves, so the best (c1, c2) solves a 2x2
        linear system per subgroup. Gradient steps crawl along these flat
        directions (prior curvature only), this reaches their optimum at once.
        """
        p = self.split(mean)
        b, mu, nu = p["b"], p["mu"], p["nu"]
        pb, pm, pn = (1.0 / self.prior_sd[k] ** 2 for k in ("b", "mu", "nu"))
        n_g = torch.bincount(self.group, minlength=self.G).to(_DTYPE)
        sum_mu = torch.zeros(self.G, dtype=_DTYPE).index_add_(0, self.group, mu)
        lhs = torch.empty((self.G, 2, 2), dtype=_DTYPE)
        lhs[:, 0, 0], lhs[:, 0, 1], lhs[:, 1, 0] = pb + pm * n_g, pb, pb
        lhs[:, 1, 1] = pb + pn * self.R
        rhs = torch.stack([pm * sum_mu - pb * b, pn * nu.sum(0) - pb * b], dim=1)
        c = torch.linalg.solve(lhs, rhs)
        b += c[:, 0] + c[:, 1]
        mu -= c[:, 0].index_select(0, self.group)
        nu -= c[:, 1]

    def counts(self) -> torch.Tensor:
        """How many predictions each parameter enters: A^T 1."""
        return self.from_eta(torch.ones_like(self.z))

    def analytic_terms(self, mean: torch.Tensor, log_sd: torch.Tensor) -> float:
        """E_q[log prior] + entropy of q, both in closed form."""
        var = torch.exp(2.0 * log_sd)
        prior = self.prior_const - 0.5 * ((mean**2 + var) / self.prior_var).sum()
        entropy = log_sd.sum() + self.P * (0.5 + _HALF_LOG_2PI)
        return (prior + entropy).item()

    def elbo(self, mean: torch.Tensor, log_sd: torch.Tensor, nodes: int = _ELBO_NODES) -> float:
        """The ELBO by Gauss-Hermite quadrature over each prediction's eta.

        The likelihood is a sum over predictions and each term depends on q only
        through its own Gaussian eta, so a 1-D quadrature per term gives the
        expectation to near machine precision, where joint MC draws would leave an
        error of a few nats.
        """
        x, w = np.polynomial.hermite_e.hermegauss(nodes)
        x = torch.as_tensor(x, dtype=_DTYPE)
        w = torch.as_tensor(w / w.sum(), dtype=_DTYPE)
        em = self.to_eta(mean)
        sd = self.to_eta(torch.exp(2.0 * log_sd)).sqrt()
        total = (self.z * em).sum().item()
        for start in range(0, em.numel(), 16384):
            sl = slice(start, start + 16384)
            total -= (torch.nn.functional.softplus(em[sl, None] + sd[sl, None] * x) @ w).sum().item()
        return total + self.analytic_terms(mean, log_sd)

    def elbo_and_gradient(self, mean: torch.Tensor, log_sd: torch.Tensor, eps: torch.Tensor):
        """One Monte Carlo ELBO estimate and its reparameterisation gradient.

        Local reparameterisation: each prediction's eta gets its own standard normal
        draw eps, used antithetically (+eps and -eps, two draws), from its exact
        Gaussian marginal under q. The ELBO is a sum of one term per prediction, so
        this is unbiased, with much less noise than drawing the parameters jointly.
        """
        var = torch.exp(2.0 * log_sd)
        em = self.to_eta(mean)
        sd = self.to_eta(var).sqrt_()
        d = sd * eps
        sig_plus, sig_minus = torch.sigmoid(em + d), torch.sigmoid(em - d)
        # d/d em and d/d var(eta) of the expected log likelihood z*em - E[softplus(eta)].
        w_mean = torch.add(self.z, sig_plus + sig_minus, alpha=-0.5)
        w_var = (sig_minus - sig_plus).mul_(eps).div_(sd).mul_(0.25)
        g_mean = self.from_eta(w_mean) - mean / self.prior_var
        g_var = self.from_eta(w_var) - 0.5 / self.prior_var
        g_log_sd = 2.0 * var * g_var + 1.0
        # softplus(x) = x - log(sigmoid(x)); the x parts of the two antithetic draws
        # sum to 2 em. Cheaper than softplus and accurate in absolute terms, which is
        # all a sum needs; this estimate only feeds the stopping rule.
        log_sig = torch.log(sig_plus.mul_(sig_minus).clamp_(min=1e-300)).sum().item()
        loglik = torch.dot(self.z_minus_1, em).item() + 0.5 * log_sig
        return loglik + self.analytic_terms(mean, log_sd), g_mean, g_log_sd


_CACHE: "weakref.WeakKeyDictionary[LatentModelData, _Problem]" = weakref.WeakKeyDictionary()


def _problem(data: LatentModelData) -> _Problem:
    prob = _CACHE.get(data)
    if prob is None:
        prob = _CACHE[data] = _Problem(data)
    return prob


def log_density(params: dict, data: LatentModelData) -> torch.Tensor:
    """The Stan program's log density (with constants) at unconstrained `params`.

    params: b (..., G), mu (..., N), gamma_free (..., S-1, G), nu (..., R, G) as
    float64 tensors; a leading batch shape, if any, is kept in the result.
    Differentiable; the fit itself uses hand-written gradients of the same model.
    """
    t = _problem(data)
    b, mu, gamma_free, nu = (params[k] for k in ("b", "mu", "gamma_free", "nu"))
    gamma = _gamma_levels(gamma_free, t.random_walk)
    eta = b[..., t.obs_group] + mu[..., t.case] + gamma.flatten(-2)[..., t.sg_pos] + nu.flatten(-2)[..., t.rg_pos]
    lp = 0.0
    # Stan's centred mu: its deviation from the prior mean is what has the N(0, sd) prior.
    centred = {"b": b, "mu": mu - t.case_effects({**params, "mu": torch.zeros_like(mu)}) if t.by_class else mu,
               "gamma_free": gamma_free, "nu": nu, "delta": params.get("delta")}
    for name in t.names:
        x, sd = centred[name], t.prior_sd[name]
        event_dims = tuple(range(-len(t.shapes[name]), 0))
        lp = lp + (-0.5 * (x / sd) ** 2 - math.log(sd) - _HALF_LOG_2PI).sum(event_dims)
    # z*log_inv_logit(eta) + (1-z)*log1m_inv_logit(eta) == z*eta - softplus(eta);
    # with z in {0, 1} this is also bernoulli_logit_lpmf.
    return lp + (t.z_data * eta - torch.nn.functional.softplus(eta)).sum(-1)


class _Adam:
    """Adam ascent on (mean, log_sd); hand-rolled because the gradient is too."""

    def __init__(self, *params: torch.Tensor, beta1: float = 0.9, beta2: float = 0.999):
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.beta1, self.beta2, self.k = beta1, beta2, 0

    def step(self, grads, lr: float) -> None:
        self.k += 1
        c1, c2 = 1.0 - self.beta1**self.k, 1.0 - self.beta2**self.k
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            p.add_(lr / c1 * m / ((v / c2).sqrt() + 1e-8))


def fit_advi(data: LatentModelData, settings: FitSettings, progress: Callable[[str], None]) -> Fit:
    """Mean-field ADVI in PyTorch, run until the ELBO has stopped improving."""
    start_time = time.perf_counter()
    prob = _problem(data)
    gen = torch.Generator().manual_seed(int(settings.seed))
    mean = torch.zeros(prob.P, dtype=_DTYPE)
    # Start each sd near a Laplace guess, 1/sqrt(prior precision + n/4), instead
    # of Stan's sd = 1: it saves the iterations the log-sds would need to get there.
    log_sd = -0.5 * torch.log(1.0 / prob.prior_var + prob.counts() / 4.0)
    adam = _Adam(mean, log_sd)

    def step(lr: float) -> float:
        # float32 normals: generating them is the costliest part of a step, and
        # their precision does not matter (the arithmetic stays in float64).
        eps = torch.randn(data.n_predictions, generator=gen, dtype=torch.float32).to(_DTYPE)
        elbo, g_mean, g_log_sd = prob.elbo_and_gradient(mean, log_sd, eps)
        adam.step((g_mean, g_log_sd), lr)
        prob.ridge_step(mean)
        return elbo

    max_iter = int(settings.max_iterations)
    tol = float(settings.tolerance)
    progress(f"torch ADVI: {data.n_predictions} predictions, {prob.P} parameters")
    decay_min = min(_MIN_DECAY, max(max_iter // 4, 1))
    trace, vals, windows, quiet = [], [], [], 0
    converged, it = False, 0

    # Phase 1: constant step until the windowed ELBO has stopped rising: twice in
    # a row, consecutive window means differ by less than `tolerance` (relative)
    # or by less than twice the Monte Carlo standard error of their difference.
    while it < max_iter - decay_min:
        vals.append(step(_LR))
        it += 1
        if len(vals) < _WINDOW:
            continue
        w = np.asarray(vals)
        vals = []
        windows.append((w.mean(), w.var(ddof=1) / w.size, it))
        trace.append((it, w.mean()))
        if len(windows) % 10 == 0:
            progress(f"torch ADVI: iteration {it}, ELBO {w.mean():.1f}")
        if len(windows) < 2:
            continue
        (m1, v1, _), (m0, v0, _) = windows[-1], windows[-2]
        quiet = quiet + 1 if abs(m1 - m0) < max(tol * abs(m1), 2.0 * math.sqrt(v0 + v1)) else 0
        if quiet == 2:
            converged = True
            break
    rel = [abs(a[0] - b[0]) / abs(a[0]) for a, b in zip(windows[1:], windows[:-1])]
    if converged:
        seen = f"it stopped at iteration {it} (last relative changes {rel[-2]:.1e}, {rel[-1]:.1e})"
    else:
        last = f"; last relative change {rel[-1]:.1e}" if rel else ""
        seen = f"it had not stopped when the budget ran out at iteration {it}{last}"

    # Phase 2: the step decays linearly to zero, which averages out the Monte
    # Carlo jitter a constant step leaves in the variational means.
    decay_len = min(max(decay_min, it // 2), max_iter - it)
    snapshot_at = it + (3 * decay_len) // 4
    snapshot = mean.clone()
    for k in range(decay_len):
        vals.append(step(_LR * (1.0 - k / decay_len)))
        it += 1
        if len(vals) == _WINDOW:
            trace.append((it, float(np.mean(vals))))
            vals = []
        if it == snapshot_at:
            snapshot = mean.clone()
    sd = log_sd.exp()
    moved = ((mean - snapshot).abs() / sd).max().item()
    elbo = prob.elbo(mean, log_sd)

    draws_flat = mean + sd * torch.randn((int(settings.draws), prob.P), generator=gen, dtype=_DTYPE)
    parts = prob.split(draws_flat)
    draws = {
        "b": parts["b"].numpy(),
        "mu": prob.case_effects(parts).numpy(),
        "gamma": _gamma_levels(parts["gamma_free"], prob.random_walk).numpy(),
        "nu": parts["nu"].numpy(),
        **({"delta": parts["delta"].numpy()} if prob.by_class else {}),
    }
    note = (
        f"Adam (step {_LR}) ran until the mean ELBO estimate of consecutive {_WINDOW}-iteration windows "
        f"changed, twice in a row, by less than the tolerance {tol:g} (relative) or than twice its "
        f"Monte Carlo standard error: {seen}. The step then decayed linearly to zero over {decay_len} "
        f"iterations; in the last quarter of those the variational means moved at most {moved:.3f} "
        f"posterior sd. Final ELBO {elbo:.2f} (Gauss-Hermite quadrature, no Monte Carlo error)."
    )
    progress(f"torch ADVI: done after {it} iterations, ELBO {elbo:.1f}")
    return Fit(
        backend="torch",
        method="advi",
        parameterisation=data.parameterisation,
        draws=draws,
        elbo=float(elbo),
        converged=converged,
        convergence_note=note,
        elbo_trace=np.asarray(trace, dtype=float).reshape(-1, 2),
        diagnostics={"iterations": it, "max_mean_shift_sd": moved},
        seconds=time.perf_counter() - start_time,
    )
