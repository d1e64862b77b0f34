"""The one rule that turns evidence about a severity's effect into a finding.

Every table column `finding`, every sentence of the report, the Simpson's-paradox check and the
README use `finding()` (posterior analyses through `posterior_finding()`, on the draws themselves),
so a raised effect is "raised" everywhere and no two statements disagree.

A finding is two-sided: the effect is *lowered* when the evidence against "not lowered" is below
alpha / 2, *raised* when the evidence against "not raised" is, and otherwise either *unchanged*
(a positive statement: the effect lies within the equivalence margin with probability at least
1 - alpha; only posterior analyses can say this), *no detectable change* (the data could have shown
an effect at this level but did not), or *cannot be detected* (the design cannot reach alpha / 2 at
all, e.g. a KS test across three observers).
"""

from __future__ import annotations

import math

LOWERED = "lowered"
RAISED = "raised"
UNCHANGED = "unchanged"
NO_CHANGE = "no detectable change"
UNDETECTABLE = "cannot be detected"
CHANGED = (LOWERED, RAISED)


def finding(p_lower: float, p_raise: float, alpha: float, p_floor: float = 0.0,
            p_outside_margin: float = math.nan) -> str:
    """The finding for one effect.

    p_lower: evidence that the effect is *not* lowered (a one-sided p-value, or the posterior
    probability P(effect >= 0)); p_raise: likewise for raised. p_floor: the smallest value p_lower
    and p_raise can take in this design (0 for posteriors). p_outside_margin: the posterior
    probability that the effect lies outside the equivalence margin (NaN where not defined).
    """
    if p_lower < alpha / 2:
        return LOWERED
    if p_raise < alpha / 2:
        return RAISED
    if p_outside_margin < alpha:
        return UNCHANGED
    if p_floor >= alpha / 2:
        return UNDETECTABLE
    return NO_CHANGE


def posterior_finding(draws, alpha: float, margin: float) -> str:
    """The finding for posterior draws of an effect whose 0 means "no change" (gamma, or a change of
    separability): the same rule, with P(effect >= 0), P(effect <= 0) and P(|effect| >= margin) counted
    over the draws. Every posterior finding (tables, report, Simpson's check) comes from here."""
    import numpy as np

    draws = np.asarray(draws, dtype=float)
    return finding(float(np.mean(draws >= 0)), float(np.mean(draws <= 0)), alpha, 0.0,
                   float(np.mean(np.abs(draws) >= margin)))
