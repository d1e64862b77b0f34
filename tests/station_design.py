"""A small reading-station design for the station's tests, made by the real CLI.

`make_design(folder)` writes synthetic 16-bit mammograms (two breasts per exam, views CC and
MLO per breast; a case is a breast, ids like "E1/left"), a cases table with labels and
breast_lesions subgroups, an image manifest, and runs `perceptcore design-reader-study` on
them with --images and --perturbation gaussian_lowpass. It returns the design folder, inside
`folder` beside `cases.csv`, `manifest.csv` and `images/`. `tokens(design)` reads the links'
tokens; `write_reads_spec` writes a tiny study spec that analyses an exported reads table
(`perceptcore read-export`), so a test can `perceptcore run` on what readers recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from perceptcore.cli import main

SEVERITIES = ["0", "0.5", "2"]
VIEWS = ("CC", "MLO")
SIDES = ("left", "right")
PIXEL_SPACING_MM = 0.1
# Per breast, cycling: the breast_lesions subgroup and the label; every third breast is normal.
KINDS = [("microcalcifications", "malignant"), ("soft_tissue_lesions", "benign"), ("nonbiopsied", "nonbiopsied"),
         ("soft_tissue_lesions", "malignant"), ("microcalcifications", "benign"), ("nonbiopsied", "nonbiopsied")]


def synthetic_view(rng: np.random.Generator, size: tuple[int, int], bits: int, lesion: str | None):
    """Noise texture at mid-grey, with specks or a smooth blob in a box for a lesion: (pixels, box)."""
    height, width = size
    top = 2 ** bits - 1
    image = top * (0.35 + 0.07 * rng.standard_normal((height, width)))
    box = None
    if lesion is not None:
        r, c = int(rng.integers(height // 4, height // 2)), int(rng.integers(width // 4, width // 2))
        box = (r, c, r + height // 4, c + width // 4)
        if lesion == "microcalcifications":
            for _ in range(6):
                y, x = rng.integers(box[0] + 1, box[2] - 1), rng.integers(box[1] + 1, box[3] - 1)
                image[y - 1:y + 1, x - 1:x + 1] = top * 0.9
        else:
            yy, xx = np.mgrid[:height, :width]
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            image += top * 0.2 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * (min(size) / 10) ** 2))
    return np.clip(np.rint(image), 0, top).astype(np.uint16), box


def write_cases_and_images(folder: Path, exams: int = 3, size=(64, 48), bits: int = 12, seed: int = 0) -> tuple:
    """cases.csv (exam, case, label, subgroup), manifest.csv and images/*.png (16-bit); their paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases, manifest = [], []
    for e in range(1, exams + 1):
        for s, side in enumerate(SIDES):
            subgroup, label = KINDS[(2 * (e - 1) + s) % len(KINDS)]
            case = f"E{e}/{side}"
            cases.append({"exam": f"E{e}", "case": case, "label": label, "subgroup": subgroup})
            for view in VIEWS:
                pixels, box = synthetic_view(rng, size, bits, None if subgroup == "nonbiopsied" else subgroup)
                file = f"images/E{e}_{side}_{view}.png"
                Image.fromarray(pixels).save(folder / file)
                manifest.append({"case": case, "view": view, "laterality": side[0].upper(), "file": file,
                                 "pixel_spacing_mm": PIXEL_SPACING_MM, "bits": bits,
                                 "roi_boxes": " ".join(map(str, box)) if box else ""})
    pd.DataFrame(cases).to_csv(folder / "cases.csv", index=False)
    pd.DataFrame(manifest).to_csv(folder / "manifest.csv", index=False)
    return folder / "cases.csv", folder / "manifest.csv"


def make_design(folder: Path, readers=2, exams: int = 3, calls: str = "probability", roi: bool = True,
                size=(64, 48), bits: int = 12, severities=SEVERITIES, seed: int = 0, scheme: str = "uniform") -> Path:
    """A design folder `folder/design` made by `perceptcore design-reader-study` (size is (height, width);
    readers a count or comma-separated names, as --readers takes them)."""
    folder = Path(folder)
    cases, manifest = write_cases_and_images(folder, exams, size, bits, seed)
    design = folder / "design"
    argv = ["design-reader-study", str(cases), "--readers", str(readers), "--severities", *severities,
            "--scheme", scheme, "--seed", str(seed), "--images", str(manifest), "--perturbation", "gaussian_lowpass",
            "--option", "unit=mm", "--calls", calls, "--out", str(design)]
    code = main(argv + (["--roi"] if roi else []))
    assert code == 0, f"design-reader-study failed with exit code {code}"
    return design


def tokens(design: Path) -> dict:
    """{reader: token, ..., "admin": token} from the design's tokens.csv."""
    table = pd.read_csv(Path(design) / "tokens.csv", dtype=str, keep_default_na=False)
    found = {row.reader: row.token for row in table.itertuples() if row.role == "reader"}
    found["admin"] = table.loc[table.role == "admin", "token"].iloc[0]
    return found


def write_reads_spec(folder: Path, reads: Path, cases: Path, severities=SEVERITIES, name: str = "reads.yaml") -> Path:
    """A spec analysing an exported reads table (`reader, severity, case, prediction`) against the
    cases table (labels and breast_lesions subgroups); returns its path (written into `folder`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "study": {"name": "reading-station", "seed": 0},
        "cases": {"file": str(Path(cases).resolve())},
        "observers": [{"name": "radiologists", "predictions": str(Path(reads).resolve())}],
        "severities": {"unit": "mm", "levels": list(severities)},
        "subgroups": {"definition": "breast_lesions", "analyse": ["microcalcifications", "soft_tissue_lesions"]},
        "model": {"backend": "torch", "method": "laplace", "draws": 40},
        "analyses": {"metrics": ["predictive_confidence", "ks_separability"]},
        "outputs": {"figures": ["png"], "report": False},
    }
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


DEMO_SPEC = Path(__file__).resolve().parents[1] / "examples" / "demo" / "reading_station.yaml"


def demo_design(folder: Path, readers=2, roi: bool = True) -> tuple[Path, Path]:
    """The demo's tiny design (examples/demo/reading_station.yaml): its phantoms generated, then
    `design-reader-study` with the spec's perturbation and severities. Returns (spec, design); the
    spec is copied into `folder` so that its data cache stays out of the source tree."""
    import shutil

    from perceptcore.dataset import with_generated_data
    from perceptcore.plugins import load_registry
    from perceptcore.spec import load_spec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = Path(shutil.copy(DEMO_SPEC, folder / DEMO_SPEC.name))
    spec = with_generated_data(load_spec(spec_path), load_registry(), lambda message: None)
    data = Path(spec.data_dir)
    options = [f"--option={key}={value}" for key, value in spec.perturbation.options.items()]
    design = folder / "design"
    argv = ["design-reader-study", str(data / "cases.csv"), "--exam-column", "case", "--readers", str(readers),
            "--severities", *spec.severities.levels, "--images", str(data / "manifest.csv"),
            "--perturbation", spec.perturbation.name, *options, "--seed", str(spec.study.seed),  # the runner's seed
            "--out", str(design)]
    code = main(argv + (["--roi"] if roi else []))
    assert code == 0, f"design-reader-study failed with exit code {code}"
    return spec_path, design
