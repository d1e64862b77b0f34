"""The Simpson's-paradox check: do findings on the merged subgroups differ from those per subgroup?"""

from __future__ import annotations

import pandas as pd

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

COLUMNS = ("observer", "analysis", "subgroup", "merged_subgroup", "split_finding", "merged_finding", "differs")
# Each analysis and the column whose small values mean "the perturbation lowered it".
ANALYSES = (("predictive_confidence", "p_gamma_gt0"), ("class_separability", "ks_pvalue"))


def finding(pvalues: pd.Series, alpha: float) -> str:
    """'lowered' if any severity lowers it at level alpha, else 'invariant' (one-sided, as published)."""
    return "lowered" if (pvalues < alpha).any() else "invariant"


class SimpsonsParadox:
    name = "simpsons_paradox"
    outputs = {"simpsons_paradox": COLUMNS}

    def check(self, study, where):
        if len(study.spec.subgroups.analyse) < 2:
            raise PerceptcoreError("the Simpson's-paradox check needs at least two analysed subgroups to merge",
                                   where)

    def compute(self, study):
        merged = study.grouping("merged").analysed[0]
        rows = []
        for table_name, column in ANALYSES:
            table = study.table(table_name)
            for observer in study.observers:
                mine = table[table["observer"] == observer]
                merged_finding = finding(mine.loc[mine["subgroup"] == merged, column], study.alpha)
                for subgroup in study.groupings[0].analysed:
                    split_finding = finding(mine.loc[mine["subgroup"] == subgroup, column], study.alpha)
                    rows.append((observer, table_name, subgroup, merged, split_finding, merged_finding,
                                 split_finding != merged_finding))
        return {"simpsons_paradox": pd.DataFrame(rows, columns=COLUMNS)}


@hookimpl
def perceptcore_register_metrics(register):
    register(SimpsonsParadox())
