"""ROI separability: class separability of observed predictions when only the ROI interior,
only its exterior, or the entire image was perturbed. No latent model is involved."""

from __future__ import annotations

import numpy as np
import pandas as pd

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl
from perceptcore.stats import ks_statistic, separability_summary

COLUMNS = ("observer", "subgroup", "region", "severity", "ks_mean", "ks_sd", "ks_pvalue")


class RoiSeparability:
    name = "roi_separability"
    outputs = {"roi_separability": COLUMNS}

    def check(self, study, where):
        if study.roi is None:
            raise PerceptcoreError("roi_separability needs a `roi` section with the ROI-perturbation predictions",
                                   where)
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
            regions = {region: values for region, values in roi.values.items()}
            regions["entire_image"] = entire
            for region, values in regions.items():
                # One KS statistic per (annotator, seed) for the ROI regions, per seed for the entire image.
                ks = ks_statistic(values[..., positive], values[..., ~positive_all])
                ks = ks.reshape(-1, ks.shape[-1])
                mean, sd, pvalue = separability_summary(ks)
                rows += [(observer, subgroup, region, label, mean[s], sd[s], pvalue[s])
                         for s, label in enumerate(study.severities)]
        return {"roi_separability": pd.DataFrame(rows, columns=COLUMNS)}


@hookimpl
def perceptcore_register_metrics(register):
    register(RoiSeparability())
