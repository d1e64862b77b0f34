"""Dirichlet calibration of binary probabilities (Kull et al., NeurIPS 2019), as the papers use it.

For two classes Dirichlet calibration is a logistic regression on the features
``[log p, log(1 - p)]``: ``q = sigmoid(w1 log p + w2 log(1 - p) + b)``. The map is fitted on
validation cases with an L2 penalty on the two weights (the intercept is free), the
penalty strength chosen by stratified k-fold cross-validation inside the validation set
on the class-wise expected calibration error, then refitted on the whole validation set.

The identity map is ``w = (1, -1), b = 0``; a network whose logits are ``k`` times too large
and shifted by ``c`` is corrected by ``w = (1/k, -1/k), b = -c/k``.
"""

from __future__ import annotations

import attrs
import numpy as np

from .errors import PerceptcoreError

EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before their logarithms are taken
DEFAULT_STRENGTHS = tuple(float(s) for s in np.logspace(-4, 2, 13))
DEFAULT_FOLDS = 10
DEFAULT_BINS = 15


@attrs.frozen
class DirichletCalibrator:
    """A fitted binary Dirichlet map: ``q = sigmoid(weights . [log p, log(1 - p)] + intercept)``."""

    weights: tuple  # (on log p, on log(1 - p))
    intercept: float
    strength: float  # the L2 penalty it was fitted with

    def apply(self, p) -> np.ndarray:
        """Calibrated probabilities; NaN (not observed) stays NaN."""
        p = np.asarray(p, dtype=float)
        out = np.full(p.shape, np.nan)
        seen = np.isfinite(p)
        out[seen] = _sigmoid(features(p[seen]) @ np.asarray(self.weights) + self.intercept)
        return out


@attrs.frozen(eq=False)
class DirichletFit:
    """The calibrator refitted on every validation case, and the cross-validation behind its strength."""

    calibrator: DirichletCalibrator
    strengths: tuple  # every strength tried
    cv_ece: np.ndarray  # class-wise ECE of the out-of-fold predictions, one per strength

    @property
    def chosen_cv_ece(self) -> float:
        return float(self.cv_ece[self.strengths.index(self.calibrator.strength)])


@attrs.frozen(eq=False)
class Reliability:
    """Equal-width bins of P(positive): centre, observed frequency of positives, mean predicted
    probability and count per bin (frequency and confidence are NaN in empty bins)."""

    centres: np.ndarray
    frequency: np.ndarray
    confidence: np.ndarray
    counts: np.ndarray


def features(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.stack([np.log(p), np.log1p(-p)], axis=-1)


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


# --------------------------------------------------------------------------- calibration error

def reliability(p, y, bins: int = DEFAULT_BINS) -> Reliability:
    p = np.asarray(p, dtype=float)
    y = np.asarray(y, dtype=float)
    # Bin b holds [b/bins, (b+1)/bins); the last bin also holds 1.
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        frequency = np.bincount(index, weights=y, minlength=bins) / counts
        confidence = np.bincount(index, weights=p, minlength=bins) / counts
    return Reliability((np.arange(bins) + 0.5) / bins, frequency, confidence, counts)


def _ece(p, y, bins: int) -> float:
    """Expected calibration error of P(y = 1): sum over bins of |frequency - confidence|, weighted by bin share."""
    r = reliability(p, y, bins)
    seen = r.counts > 0
    return float(np.sum(r.counts[seen] * np.abs(r.frequency[seen] - r.confidence[seen])) / r.counts.sum())


def classwise_ece(p, y, bins: int = DEFAULT_BINS) -> float:
    """Mean over the two classes of the ECE of that class's probability (p for positives, 1 - p for negatives)."""
    p = np.asarray(p, dtype=float)
    y = np.asarray(y, dtype=float)
    return 0.5 * (_ece(p, y, bins) + _ece(1 - p, 1 - y, bins))


# --------------------------------------------------------------------------- fitting

def objective(params, x, y, strength: float) -> float:
    """Penalised negative log-likelihood: sum of log losses + strength / 2 * |weights|^2."""
    z = x @ params[:2] + params[2]
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * strength * params[:2] @ params[:2])


def gradient(params, x, y, strength: float) -> np.ndarray:
    residual = _sigmoid(x @ params[:2] + params[2]) - y
    return np.r_[x.T @ residual + strength * params[:2], residual.sum()]


def fit_logistic(p, y, strength: float, tolerance: float = 1e-10, max_iterations: int = 100) -> DirichletCalibrator:
    """The penalised logistic regression on [log p, log(1 - p)] at one strength, by damped Newton steps.

    The objective is strictly convex (the penalty bounds the weights, and with both classes
    present the intercept is bounded too), so Newton with backtracking reaches its unique
    minimum; it stops when the largest gradient component is below `tolerance` times the
    number of cases.
    """
    y = np.asarray(y, dtype=float)
    if strength <= 0:
        raise ValueError("the L2 strength must be positive")
    if not (0 < y.sum() < len(y)):
        raise ValueError("calibration needs cases of both classes")
    x = features(p)
    design = np.column_stack([x, np.ones(len(y))])
    ridge = np.diag([strength, strength, 0.0])
    rate = y.mean()
    params = np.array([0.0, 0.0, np.log(rate / (1 - rate))])
    value = objective(params, x, y, strength)
    for _ in range(max_iterations):
        g = gradient(params, x, y, strength)
        if np.max(np.abs(g)) < tolerance * len(y):
            break
        q = _sigmoid(design @ params)
        hessian = design.T @ (design * (q * (1 - q))[:, None]) + ridge
        step = np.linalg.solve(hessian, g)
        decrement = g @ step  # twice the objective's predicted decrease
        t = 1.0
        # Far from the minimum, backtrack until the objective falls enough. Near it the predicted
        # decrease is below the objective's rounding, a line search would stall, and the full
        # Newton step is safe (quadratic convergence).
        if decrement > 1e-10 * (1 + abs(value)):
            while objective(params - t * step, x, y, strength) > value - 1e-4 * t * decrement and t > 1e-10:
                t /= 2
        params = params - t * step
        value = objective(params, x, y, strength)
    else:
        raise RuntimeError(f"Newton's method did not converge in {max_iterations} iterations")
    return DirichletCalibrator((float(params[0]), float(params[1])), float(params[2]), float(strength))


def stratified_folds(y, folds: int, seed: int) -> np.ndarray:
    """Fold number per case: each class shuffled (seeded) and dealt round-robin, so every fold
    holds each class in nearly the same proportion."""
    y = np.asarray(y).astype(bool)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    dealt = 0
    for members in (np.flatnonzero(~y), np.flatnonzero(y)):
        members = rng.permutation(members)
        fold[members] = (np.arange(len(members)) + dealt) % folds  # continue where the last class stopped
        dealt += len(members)
    return fold


def fit_dirichlet(p, y, strengths=DEFAULT_STRENGTHS, folds: int = DEFAULT_FOLDS, bins: int = DEFAULT_BINS,
                  seed: int = 0) -> DirichletFit:
    """Choose the L2 strength by stratified k-fold cross-validation on the class-wise ECE of the
    pooled out-of-fold predictions (ties go to the stronger penalty), then refit on all cases."""
    p = np.asarray(p, dtype=float)
    y = np.asarray(y).astype(float)
    strengths = tuple(float(s) for s in strengths)
    if not strengths:
        raise ValueError("give at least one L2 strength")
    positives = int(y.sum())
    if min(positives, len(y) - positives) < 2:
        raise ValueError(f"calibration needs at least 2 cases of each class; got {positives} positive and "
                         f"{len(y) - positives} negative")
    if folds < 2 or folds > len(y):
        raise ValueError(f"cannot split {len(y)} cases into {folds} folds")
    fold = stratified_folds(y, folds, seed)
    scores = np.empty(len(strengths))
    for i, strength in enumerate(strengths):
        out_of_fold = np.empty(len(y))
        for k in range(folds):
            held = fold == k
            out_of_fold[held] = fit_logistic(p[~held], y[~held], strength).apply(p[held])
        # Scored pooled: 15 bins would mean little on a fold of a few cases.
        scores[i] = classwise_ece(out_of_fold, y, bins)
    best = scores.min()
    chosen = max(s for s, score in zip(strengths, scores) if score <= best + 1e-12)
    return DirichletFit(fit_logistic(p, y, chosen), strengths, scores)


# --------------------------------------------------------------------------- an observer group of a study

COLUMNS = ("observer", "reader", "fitted_at", "strength", "ece_validation_cv", "ece_test_before", "ece_test_after",
           "n_validation", "n_test")


@attrs.frozen(eq=False)
class StudyCalibration:
    """What calibrating a study did: one table row per fitted map, and the calibrated observers'
    predictions on the test cases before calibration (their calibrated ones are the study's)."""

    table: object  # pandas DataFrame with COLUMNS
    before: dict  # observer -> (readers x severities x test cases), uncalibrated
    n_validation: int


def calibrate_group(name: str, readers, values: np.ndarray, positive: np.ndarray, validation: np.ndarray,
                    severities, per_severity: bool, strengths, folds: int, bins: int, seed: int, where: str):
    """Fit one map per reader on the validation cases and apply it to all of that reader's predictions.

    `values` is (readers x severities x cases) with NaN where nothing was observed; `validation`
    marks the validation cases. The map is fitted at the reference severity and applied at every
    severity, so the perturbation's effect on confidence survives calibration; with
    `per_severity` (a separate model per severity) each severity gets its own map.
    Returns the calibrated values and one row (as a dict of COLUMNS) per map.
    """
    calibrated = values.copy()
    rows = []
    fitted_at = range(len(severities)) if per_severity else (0,)
    test = ~validation
    for r, reader in enumerate(readers):
        for s in fitted_at:
            seen = np.isfinite(values[r, s])
            fit_on = seen & validation
            label = severities[s]
            counts = int(positive[fit_on].sum()), int((~positive[fit_on]).sum())
            if min(counts) < 2:
                raise PerceptcoreError(f"reader {reader!r} of {name!r} has {counts[0]} positive and {counts[1]} "
                                       f"negative validation cases with a prediction at severity {label!r}; "
                                       "calibration needs at least 2 of each class", where)
            try:
                fit = fit_dirichlet(values[r, s, fit_on], positive[fit_on], strengths, min(folds, int(fit_on.sum())),
                                    bins, seed)
            except (ValueError, RuntimeError) as exc:
                raise PerceptcoreError(f"calibrating reader {reader!r} of {name!r} at severity {label!r}: {exc}",
                                       where) from None
            targets = slice(None) if not per_severity else slice(s, s + 1)
            calibrated[r, targets] = fit.calibrator.apply(values[r, targets])
            scored = seen & test
            before, after = values[r, s, scored], calibrated[r, s, scored]
            has_both = 0 < positive[scored].sum() < scored.sum()
            rows.append({
                "observer": name, "reader": reader, "fitted_at": label, "strength": fit.calibrator.strength,
                "ece_validation_cv": fit.chosen_cv_ece,
                "ece_test_before": classwise_ece(before, positive[scored], bins) if has_both else np.nan,
                "ece_test_after": classwise_ece(after, positive[scored], bins) if has_both else np.nan,
                "n_validation": int(fit_on.sum()), "n_test": int(scored.sum()),
            })
    return calibrated, rows
