"""What every bundled perturbation checks the same way."""

from __future__ import annotations

import math

from perceptcore.errors import PerceptcoreError


def check_severity(name: str, severity: float) -> float:
    severity = float(severity)
    if not math.isfinite(severity) or severity < 0:
        raise PerceptcoreError(f"severity must be a finite number >= 0 (0 = unperturbed), got {severity!r}",
                               f"perturbation {name!r}")
    return severity


def one_of(*choices: str):
    """An attrs validator with a one-line message (attrs' own `in_` puts a tuple in its ValueError)."""

    def validate(instance, attribute, value):
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}; got {value!r}")

    return validate
