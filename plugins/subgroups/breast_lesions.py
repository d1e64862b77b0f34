"""Breast-level lesion subgroups of the perception-comparison study.

Five mutually exclusive subgroups, so that every breast is used by the latent model:
microcalcifications (biopsied, visible only as calcifications), soft_tissue_lesions
(masses, asymmetries, architectural distortions only), mixed (both kinds), occult
(biopsied, nothing visible) and nonbiopsied.
"""

from __future__ import annotations

import difflib

import numpy as np
import pandas as pd

from perceptcore.data import short_repr
from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

SUBGROUPS = ("microcalcifications", "soft_tissue_lesions", "mixed", "occult", "nonbiopsied")
CALCIFICATION = "calcification"
SOFT_TISSUE = ("mass", "asymmetry", "architectural_distortion")
TRUE_WORDS = {"1", "true", "yes", "y", "t"}
FALSE_WORDS = {"0", "false", "no", "n", "f", ""}


class BreastLesions:
    name = "breast_lesions"
    subgroups = SUBGROUPS
    options_help = {
        "column": "an existing column holding one of the five subgroup names per breast "
        "(default: `subgroup` when the cases table has it)",
        "findings": "columns of the visible lesion types, mapping calcification / mass / asymmetry / "
        "architectural_distortion to column names (default: columns of those names)",
        "biopsied": "a yes/no column saying whether the breast was biopsied "
        "(default: `biopsied` when present, else label malignant or benign)",
    }

    def check_options(self, options: dict, where: str) -> None:
        """The options alone (called by `perceptcore validate` before any data is read): known keys,
        and column names as text."""
        for key, value in options.items():
            if key not in self.options_help:
                close = difflib.get_close_matches(str(key), list(self.options_help), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PerceptcoreError(f"unknown option {str(key)[:80]!r} for breast_lesions{hint}; expected "
                                       f"{', '.join(self.options_help)}", f"{where}.{str(key)[:80]}")
        for key in ("column", "biopsied"):
            if key in options and not isinstance(options[key], str):
                raise PerceptcoreError("expected the name of a column of the cases table", f"{where}.{key}")
        findings = options.get("findings", {})
        if not isinstance(findings, dict):
            raise PerceptcoreError("expected a mapping from lesion type to column", f"{where}.findings")
        for kind, column in findings.items():
            if kind not in (CALCIFICATION, *SOFT_TISSUE):
                close = difflib.get_close_matches(str(kind), [CALCIFICATION, *SOFT_TISSUE], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PerceptcoreError(f"unknown lesion type {str(kind)[:80]!r}{hint}; expected "
                                       f"{', '.join((CALCIFICATION, *SOFT_TISSUE))}", f"{where}.findings.{str(kind)[:80]}")
            if not isinstance(column, str):
                raise PerceptcoreError("expected the name of a column of the cases table", f"{where}.findings.{kind}")

    def assign(self, cases: pd.DataFrame, options: dict, where: str) -> np.ndarray:
        self.check_options(options, where)
        column = options.get("column", "subgroup" if "subgroup" in cases.columns and "findings" not in options else None)
        if column is not None:
            return self._from_column(cases, column, where)
        return self._from_findings(cases, options, where)

    def _from_column(self, cases, column, where):
        if column not in cases.columns:
            raise PerceptcoreError(
                f"the cases table has no column {column!r} (columns: {_columns(cases)})", f"{where}.column"
            )
        values = cases[column].astype(str).str.strip().to_numpy()
        bad = ~np.isin(values, SUBGROUPS)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PerceptcoreError(
                f"case {short_repr(cases['case'].iloc[i])} has subgroup {short_repr(values[i])} in column {column!r}; "
                f"expected one of {', '.join(SUBGROUPS)}",
                f"{where}.column",
            )
        return values

    def _from_findings(self, cases, options, where):
        columns = {kind: kind for kind in (CALCIFICATION, *SOFT_TISSUE)}
        columns.update(options.get("findings", {}))  # checked by check_options
        missing = [c for c in columns.values() if c not in cases.columns]
        if missing:
            raise PerceptcoreError(
                f"the cases table lacks finding column(s) {', '.join(map(repr, missing))} and no subgroup "
                f"column was given (columns: {_columns(cases)})",
                f"{where}.findings",
            )
        flags = {kind: _yes_no(cases, column, f"{where}.findings.{kind}") for kind, column in columns.items()}
        biopsied_column = options.get("biopsied", "biopsied" if "biopsied" in cases.columns else None)
        if biopsied_column is None:
            biopsied = cases["label"].isin(["malignant", "benign"]).to_numpy()
        elif biopsied_column not in cases.columns:
            raise PerceptcoreError(f"the cases table has no column {biopsied_column!r}", f"{where}.biopsied")
        else:
            biopsied = _yes_no(cases, biopsied_column, f"{where}.biopsied")
        calcified = flags[CALCIFICATION]
        soft = np.logical_or.reduce([flags[kind] for kind in SOFT_TISSUE])
        return np.select(
            [~biopsied, calcified & soft, calcified, soft],
            ["nonbiopsied", "mixed", "microcalcifications", "soft_tissue_lesions"],
            default="occult",
        )


def _yes_no(cases, column, where) -> np.ndarray:
    words = cases[column].astype(str).str.strip().str.lower()
    bad = ~words.isin(TRUE_WORDS | FALSE_WORDS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise PerceptcoreError(
            f"case {cases['case'].iloc[i]!r}: {str(cases[column].iloc[i])!r} in column {column!r} is not yes/no (1/0)",
            where,
        )
    return words.isin(TRUE_WORDS).to_numpy()


def _columns(cases: pd.DataFrame) -> str:
    """The cases table's columns for an error message, each cut short: a header can be junk."""
    return ", ".join(short_repr(str(c), 40).strip("'") for c in cases.columns[:30])


@hookimpl
def perceptcore_register_subgroups(register):
    register(BreastLesions())
