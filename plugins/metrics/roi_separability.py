"""ROI separability: class separability of observed predictions when only the ROI interior,
only its exterior, or the entire image was perturbed. No latent model is involved.

Every region is tested on the same unit, one KS statistic per network seed: for the ROI regions
the statistic is averaged over the annotators whose ROIs were perturbed. The annotators' versions
of one seed are the same network seeing the same cases, not independent observers; counting each
(annotator, seed) as a unit would pseudo-replicate (35 units for 7 annotators x 5 seeds against
the entire image's 5), shrinking the ROI p-values for want of independence and making them
incomparable with the entire image's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl
from perceptcore.stats import ks_statistic, separability_columns

KS_COLUMNS = ("ks_mean", "ks_sd", "ks_pvalue", "ks_pvalue_raised", "ks_pvalue_floor", "finding")
COLUMNS = ("observer", "subgroup", "region", "severity") + KS_COLUMNS


class RoiSeparability:
    name = "roi_separability"
    outputs = {"roi_separability": COLUMNS}

    def check_spec(self, spec, where):
        if spec.roi is None:
            raise PerceptcoreError("roi_separability needs a `roi` section with the ROI-perturbation predictions",
                                   where)

    def check(self, study, where):
        self.check_spec(study.spec, where)
        group = study.observers[study.spec.roi.observer]
        if not np.isfinite(group.values[..., study.roi.cases]).all():
            raise PerceptcoreError(f"observer group {group.name!r} lacks whole-image predictions on some ROI-study "
                                   "cases; the entire_image region needs every one", "roi.observer")

    def compute(self, study):
        roi = study.roi
        observer = study.spec.roi.observer
        entire = study.observers[observer].values[..., roi.cases]  # (seeds, severities, ROI cases)
        positive_all = study.cases.positive[roi.cases]
        split = study.groupings[0]
        rows = []
        for subgroup in split.analysed:
            positive = positive_all & split.members(subgroup)[roi.cases]
            if not positive.any():
                raise PerceptcoreError(f"no {study.cases.positive_label} case of subgroup {subgroup!r} is in the "
                                       "ROI study", "roi")
            # (seeds, severities) for every region: ROI regions averaged over annotators (see above).
            regions = {region: ks_statistic(values[..., positive], values[..., ~positive_all]).mean(axis=0)
                       for region, values in roi.values.items()}
            regions["entire_image"] = ks_statistic(entire[..., positive], entire[..., ~positive_all])
            for region, ks in regions.items():
                columns = separability_columns(ks, study.alpha)
                rows += [(observer, subgroup, region, label, *(columns[c][s] for c in KS_COLUMNS))
                         for s, label in enumerate(study.severities)]
        return {"roi_separability": pd.DataFrame(rows, columns=COLUMNS)}


@hookimpl
def perceptcore_register_metrics(register):
    register(RoiSeparability())
