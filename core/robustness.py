"""The robustness study of model observers (paper 002): AUC per model and perturbation, and the
difference to a Gaussian-noise baseline of the same average L2 norm.

Every perturbation of the spec's `robustness` section is applied at its severity to every
image of the manifest. Its baseline adds N(0, sd^2) noise, not clipped, with

    sd = sum_i ||perturbed_i - image_i||_2 / sum_i c(n_i),

over every image i, c(n) being the expected norm of n standard normal draws (about
sqrt(n)): over the data set, the noise changes the images by as much, in L2 norm, as the
perturbation does. The models then predict on the unperturbed, perturbed and baseline
images (cached and resumable like every runner prediction). AUC is computed per checkpoint
(reader) over all cases, positive against the rest, and averaged over checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import pandas as pd

from . import images as image_io
from .errors import PerceptcoreError
from .perturbation import NoiseBaseline, expected_noise_norm, perturbation_norms
from .data import load_cases, write_csv
from .runner import Condition, ImageWork, perturb_image, plugin_version, stable_hash
from .spec import Spec
from .stats import auc

COLUMNS = ("model", "perturbation", "auc", "auc_baseline", "auc_difference")
UNPERTURBED = "unperturbed"


class Robustness:
    """Validates the robustness study on construction; compute() predicts, write_into() writes."""

    def __init__(self, spec: Spec, work: ImageWork, progress: Callable[[str], None]):
        self.spec = spec
        self.progress = progress
        self.work = work
        section = spec.cases
        self.cases = load_cases(spec.path(section.file), section.id, section.label, section.positive, "cases.file")
        known = set(self.cases.ids)
        missing = [case for case in self.work.manifest.cases if case not in known]
        if missing:
            raise PerceptcoreError(f"case {missing[0]!r} of the manifest is not in the cases table "
                                   f"({len(missing)} such cases)", "images.manifest")
        self.perturbations = []
        for i, item in enumerate(spec.robustness.perturbations):
            perturbation, options = self.work.perturbation(item.name, item.options, f"robustness.perturbations[{i}]")
            self.perturbations.append((item, perturbation, options))
        self.predictions: pd.DataFrame | None = None
        self.table: pd.DataFrame | None = None

    def compute(self) -> None:
        sds = self._baseline_sds()
        conditions, labels = [Condition(None, None, 0.0, UNPERTURBED)], [UNPERTURBED]
        for item, perturbation, options in self.perturbations:
            conditions.append(Condition(perturbation, options, item.severity, f"robustness|{item.name}"))
            labels.append(item.name)
            if item.baseline:
                conditions.append(Condition(NoiseBaseline(), NoiseBaseline.Options(), sds[item.name],
                                            f"robustness|{item.name}|noise_baseline"))
                labels.append(f"{item.name}:noise_baseline")
        units = self.work.units(tuple(conditions), ("entire_image",), "robustness")
        self.work.run(units, self.progress, "robustness")
        rows = []
        for unit in units:
            with np.load(unit.path) as stored:
                values = stored["predictions"][:, 0, :]  # (conditions, cases)
            model = unit.path.parent.parent.name
            for label, row in zip(labels, values):
                rows += [(model, unit.checkpoint.stem, label, case, float(v)) for case, v in zip(unit.cases, row)]
        self.predictions = pd.DataFrame(rows, columns=["model", "reader", "condition", "case", "prediction"])
        self.table = auc_table(self.predictions, self.cases, [(item.name, item.baseline) for item, _, _ in
                                                              self.perturbations])

    def _baseline_sds(self) -> dict:
        """The noise sd of each perturbation's baseline, matched over every image (cached)."""
        sds = {}
        for item, perturbation, options in self.perturbations:
            if not item.baseline:
                continue
            key = stable_hash([plugin_version(self.work.registry, "perturbation", item.name), item.name,
                         attrs.asdict(options, recurse=True), item.severity, self.spec.study.seed,
                         self.work.image_keys])
            path = self.work.cache / "robustness" / f"noise-sd-{key}.json"
            if not path.exists():
                self.progress(f"robustness: measuring how much {item.name} changes the images")
                import torch

                total_norm, total_expected = 0.0, 0.0
                for record in self.work.manifest:
                    image = image_io.read_image(record, "images.manifest")
                    pixels = torch.from_numpy(image.pixels.astype(np.float32))
                    changed = perturb_image(perturbation, options, record, pixels, image, item.severity,
                                            f"robustness|{item.name}", self.spec.study.seed)
                    total_norm += float(perturbation_norms(pixels[None], changed[None])[0])
                    total_expected += expected_noise_norm(pixels.numel())
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"sd": total_norm / total_expected}))
            sds[item.name] = json.loads(path.read_text())["sd"]
        return sds

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"robustness_auc": self.table}

    def write_into(self, staging: Path) -> list[str]:
        self.table.to_csv(staging / "robustness_auc.csv", index=False)
        files = ["robustness_auc.csv"]
        (staging / "predictions").mkdir(exist_ok=True)
        for model, rows in self.predictions.groupby("model", sort=False):
            name = f"predictions/{model}_robustness.csv"
            write_csv(rows.drop(columns="model"), staging / name)
            files.append(name)
        figure = _figure(self.table)
        import matplotlib
        import matplotlib.pyplot as plt

        from .report import FIXED_METADATA, STYLE

        for fmt in self.spec.outputs.figures:
            with matplotlib.rc_context({"svg.hashsalt": STYLE["svg.hashsalt"]}):  # byte-identical reruns
                figure.savefig(staging / f"fig_robustness.{fmt}", format=fmt, metadata=FIXED_METADATA.get(fmt))
            files.append(f"fig_robustness.{fmt}")

        plt.close(figure)
        return files

    def manifest(self) -> dict:
        return {"robustness_perturbations": [item.name for item, _, _ in self.perturbations]}


def auc_table(predictions: pd.DataFrame, cases, perturbations) -> pd.DataFrame:
    """AUC (mean over readers) per model and perturbation, with its noise baseline and the difference."""
    positive = dict(zip(cases.ids, cases.positive))
    aucs = {}
    for (model, condition), rows in predictions.groupby(["model", "condition"], sort=False):
        per_reader = []
        for _, mine in rows.groupby("reader", sort=False):
            is_positive = mine["case"].map(positive).to_numpy(bool)
            if is_positive.all() or not is_positive.any():
                raise PerceptcoreError("the AUC needs both positive and negative cases among the manifest's cases",
                                       "images.manifest")
            scores = mine["prediction"].to_numpy()
            per_reader.append(auc(scores[is_positive], scores[~is_positive]))
        aucs[model, condition] = float(np.mean(per_reader))
    rows = []
    for model in dict.fromkeys(predictions["model"]):
        rows.append((model, UNPERTURBED, aucs[model, UNPERTURBED], np.nan, np.nan))
        for name, has_baseline in perturbations:
            value = aucs[model, name]
            baseline = aucs[model, f"{name}:noise_baseline"] if has_baseline else np.nan
            rows.append((model, name, value, baseline, value - baseline))
    return pd.DataFrame(rows, columns=COLUMNS)


def _figure(table: pd.DataFrame):
    """Per model: AUC under each perturbation next to its noise baseline, the unperturbed AUC as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False, constrained_layout=True)
    for ax, model in zip(axes[0], models):
        rows = table[(table["model"] == model) & (table["perturbation"] != UNPERTURBED)]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, rows["auc"], 0.4, label="perturbed", color="#D55E00")
        ax.bar(x + 0.2, rows["auc_baseline"].fillna(0), 0.4, label="matched-noise baseline", color="#0072B2",
               alpha=0.7)
        for xi, difference in zip(x, rows["auc_difference"]):
            if np.isfinite(difference):
                ax.annotate(f"{difference:+.2f}", (xi, 1.0), ha="center", va="bottom", fontsize=8)
        unperturbed = table[(table["model"] == model) & (table["perturbation"] == UNPERTURBED)]["auc"].item()
        ax.axhline(unperturbed, color="0.3", ls="--", lw=1, label=f"unperturbed ({unperturbed:.2f})")
        ax.axhline(0.5, color="0.7", ls=":", lw=1)
        ax.set_xticks(x, [name.replace("_", " ") for name in rows["perturbation"]], rotation=20)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("AUC")
        ax.set_title(model.replace("$", r"\$"))
        ax.legend(fontsize=8, loc="lower left")
    return fig
