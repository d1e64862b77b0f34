"""A small synthetic imaging study for the runner's tests: phantom images with lesions, a
manifest with ROI boxes, CNN checkpoints, simulated sparse radiologist calls, and a spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from perceptcore_plugins.models.small_cnn import Options, SmallCnnNetwork

KINDS = ["microcalcifications"] * 8 + ["soft_tissue_lesions"] * 8 + ["nonbiopsied"] * 8
SEVERITIES = ["0", "0.5", "2"]


def phantom(rng, kind: str, size: int):
    """12-bit noise texture; specks (high frequency) or a smooth blob (low frequency) in a box."""
    image = 1500 + 300 * rng.standard_normal((size, size))
    box = None
    if kind != "nonbiopsied":
        r, c = rng.integers(size // 4, size // 2, size=2)
        box = (int(r), int(c), int(r) + size // 4, int(c) + size // 4)
        if kind == "microcalcifications":
            for _ in range(12):
                y, x = rng.integers(box[0] + 2, box[2] - 2), rng.integers(box[1] + 2, box[3] - 2)
                image[y - 1:y + 1, x - 1:x + 1] = 3800
        else:
            yy, xx = np.mgrid[:size, :size]
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            image += 900 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * (size / 16) ** 2))
    return np.clip(image, 0, 4095).astype(np.uint16), box


def write_imaging_study(folder: Path, *, size: int = 96, batch_size: int = 4, workers: int = 1, seed: int = 0) -> Path:
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest, cases = [], []
    for i, kind in enumerate(KINDS):
        pixels, box = phantom(rng, kind, size)
        np.save(folder / "images" / f"case{i:02d}.npy", pixels)
        manifest.append({"case": f"c{i:02d}", "view": "CC", "laterality": "L", "file": f"images/case{i:02d}.npy",
                         "pixel_spacing_mm": 0.1, "roi_boxes": " ".join(map(str, box)) if box else ""})
        label = "nonbiopsied" if kind == "nonbiopsied" else ("malignant" if i % 8 < 5 else "benign")
        cases.append({"case": f"c{i:02d}", "label": label, "subgroup": kind})
    pd.DataFrame(manifest).to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame(cases).to_csv(folder / "cases.csv", index=False)
    reads = []
    for r in range(4):  # each reader each case once, at a random severity
        for i, case in enumerate(cases):
            s = int(rng.integers(len(SEVERITIES)))
            p = 0.85 if case["label"] == "malignant" else 0.15
            if case["subgroup"] == "microcalcifications" and case["label"] == "malignant":
                p -= 0.3 * s
            reads.append((f"radiologist{r}", SEVERITIES[s], case["case"], int(rng.random() < p)))
    pd.DataFrame(reads, columns=["reader", "severity", "case", "prediction"]).to_csv(folder / "reads.csv", index=False)
    for k in range(2):
        torch.manual_seed(k)
        torch.save(SmallCnnNetwork(Options(input_size=32)).state_dict(), folder / f"cnn_seed{k}.pt")
    spec = {
        "study": {"name": "imaging", "seed": 0},
        "cases": {"file": "cases.csv"},
        "images": {"manifest": "manifest.csv"},
        "perturbation": {"name": "gaussian_lowpass", "regions": ["entire_image", "roi_interior", "roi_exterior"]},
        "observers": [
            {"name": "radiologists", "predictions": "reads.csv"},
            {"name": "cnn", "model": "small_cnn", "checkpoints": ["cnn_seed0.pt", "cnn_seed1.pt"],
             "options": {"input_size": 32}},
        ],
        "roi": {"observer": "cnn"},
        "severities": {"unit": "mm", "levels": SEVERITIES},
        "subgroups": {"definition": "breast_lesions", "analyse": ["microcalcifications", "soft_tissue_lesions"]},
        "model": {"backend": "torch", "draws": 40, "max_iterations": 400},
        "runner": {"batch_size": batch_size, "workers": workers},
        "outputs": {"figures": ["png"], "report": False},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_training_set(folder: Path) -> None:
    """A learnable training set in `folder` (train/ beside a study): an imaging study of another seed
    whose lesions are all malignant (a study's test set keeps benign look-alikes)."""
    write_imaging_study(folder, seed=1)
    cases = pd.read_csv(folder / "cases.csv")
    cases.loc[cases.subgroup != "nonbiopsied", "label"] = "malignant"
    cases.to_csv(folder / "cases.csv", index=False)
