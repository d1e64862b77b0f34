"""Designing a sparse perturbation reader study, and reading its filled-in worksheets back.

Every reader reads every exam exactly once, at one severity: drawn uniformly at random
for each reader and exam (as in the published study), or balanced so that each reader
sees each severity equally often (to within one when the exams do not divide evenly).
The reading order is shuffled per reader. Worksheets are blinded (no severity); the
assignment file is the key that `import_reads` uses to turn calls into predictions.

A design folder also holds what the reading station (`perceptcore read`) needs: design.json
(how the design was made and what readers are asked: the call type, ROI boxes or not),
tokens.csv (each reader's and the study team's secret link token, owner-only) and, with
images, images.csv (one row per written image: whose, which exam, case and view, its size,
bit depth and the source's DICOM window).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .data import read_table, require_columns, short_repr
from .errors import PerceptcoreError

SCHEMES = ("uniform", "balanced")
ASSIGNMENT_COLUMNS = ("reader", "order", "exam", "severity")
WORKSHEET_COLUMNS = ("reader", "order", "exam", "case", "call")
CALLS = ("probability", "binary", "birads")  # probability: 0-100 %, as in the published study
MAX_BOXES = 3  # ROI boxes a reader may draw per view
DESIGN_VERSION = 1
TOKEN_COLUMNS = ("role", "reader", "token")
IMAGE_COLUMNS = ("reader", "order", "exam", "case", "laterality", "view", "file", "bits", "height", "width",
                 "window_center", "window_width")


def assign(exams: Sequence[str], readers: Sequence[str], severities: Sequence[str], scheme: str, seed: int) -> pd.DataFrame:
    """Which reader reads which exam at which severity, and in what order (1 = first)."""
    if scheme not in SCHEMES:
        raise PerceptcoreError(f"unknown scheme {scheme!r}; expected {' or '.join(SCHEMES)}", "--scheme")
    if not exams or not readers or len(severities) < 2:
        raise PerceptcoreError("a reader study needs exams, readers and at least two severities")
    rng = np.random.default_rng(seed)
    n, s = len(exams), len(severities)
    frames = []
    for r, reader in enumerate(readers):
        if scheme == "uniform":
            levels = rng.integers(0, s, size=n)
        else:
            # n // s of every severity; the n % s left over rotate across readers so that
            # no severity is favoured over the whole study either.
            leftover = (np.arange(n % s) + r * (n % s)) % s
            levels = rng.permutation(np.concatenate([np.repeat(np.arange(s), n // s), leftover]))
        order = rng.permutation(n) + 1
        frames.append(pd.DataFrame({"reader": reader, "order": order, "exam": list(exams),
                                    "severity": [severities[i] for i in levels]}))
    return pd.concat(frames).sort_values(["reader", "order"], kind="stable").reset_index(drop=True)


def worksheets(assignment: pd.DataFrame, cases_of_exam: dict) -> dict:
    """One blinded worksheet per reader: a row per case of every exam, in reading order, `call` empty."""
    sheets = {}
    for reader, rows in assignment.groupby("reader", sort=False):
        lines = [(reader, order, exam, case, "") for order, exam in zip(rows["order"], rows["exam"])
                 for case in cases_of_exam[exam]]
        sheets[reader] = pd.DataFrame(lines, columns=WORKSHEET_COLUMNS)
    return sheets


def import_reads(assignment: pd.DataFrame, cases_of_exam: dict, files: Sequence[Path], calls: str = "binary") -> pd.DataFrame:
    """Filled worksheets as a tidy prediction table: reader, severity, case, prediction.

    `calls` is "binary" (0/1) or "probability" (in [0, 1]). Rejects readers and exams
    that are not in the assignment, cases that do not belong to their exam, calls out
    of range or missing, and any case a reader called twice (across files too).
    """
    severity_of = {(r, e): s for r, e, s in zip(assignment["reader"].astype(str), assignment["exam"].astype(str),
                                                 assignment["severity"].astype(str))}
    readers = set(assignment["reader"].astype(str))
    seen: dict = {}
    out = []
    for path in files:
        path = Path(path)
        table = read_table(path, str(path), text_columns=("reader", "exam", "case"))
        require_columns(table, WORKSHEET_COLUMNS, path, str(path))
        for i, row in enumerate(table.itertuples(index=False)):
            where = f"{path}: row {i + 2}"
            reader, exam, case = str(row.reader), str(row.exam), str(row.case)
            if reader not in readers:
                raise PerceptcoreError(f"reader {short_repr(reader)} is not in the assignment", where)
            if (reader, exam) not in severity_of:
                raise PerceptcoreError(f"exam {short_repr(exam)} was not assigned to reader {reader!r}", where)
            if case not in cases_of_exam.get(exam, ()):
                raise PerceptcoreError(f"case {short_repr(case)} is not a case of exam {exam!r}", where)
            value = _call(row.call, calls, where)
            key = (reader, case)
            if key in seen:
                raise PerceptcoreError(f"reader {reader!r} called case {case!r} twice (first at {seen[key]})", where)
            seen[key] = where
            out.append((reader, severity_of[(reader, exam)], case, value))
    return pd.DataFrame(out, columns=["reader", "severity", "case", "prediction"])


def _call(value, calls: str, where: str) -> float:
    text = "" if pd.isna(value) else str(value).strip()
    if not text:
        raise PerceptcoreError("no call was entered", where)
    try:
        number = float(text)
    except ValueError:
        raise PerceptcoreError(f"call {short_repr(text)} is not a number", where) from None
    allowed = number in (0.0, 1.0) if calls == "binary" else 0.0 <= number <= 1.0
    if not allowed:
        expected = "0 or 1" if calls == "binary" else "a probability in [0, 1]"
        raise PerceptcoreError(f"call {short_repr(text)} is out of range: expected {expected}", where)
    return number


def write_images(assignment: pd.DataFrame, cases_of_exam: dict, manifest, perturbation, options, severities: dict,
                 seed: int, folder: Path, progress) -> pd.DataFrame:
    """Each reader's images, perturbed at the assigned severity, named in reading order.

    `severities` maps each severity label to its number. The images are exactly those the
    runner gives the models at that severity (same perturbation, same per-image seed), as
    16-bit PNGs: `<folder>/<reader>/<order>_<exam>_<case>_<laterality>_<view>.png`.
    Returns the images.csv table, `file` relative to the parent of `folder` (the design).
    """
    import torch
    from PIL import Image

    from .images import read_image
    from .runner import perturb_image

    labels = list(severities)
    rows = []
    for n, row in enumerate(assignment.itertuples(index=False), start=1):
        out = folder / _safe(row.reader)
        out.mkdir(parents=True, exist_ok=True)
        for case in cases_of_exam[row.exam]:
            records = manifest.for_case(case)
            if not records:
                raise PerceptcoreError(f"case {case!r} of exam {row.exam!r} has no image in the manifest",
                                       str(manifest.path))
            for record in records:
                image = read_image(record, str(manifest.path))
                pixels = torch.from_numpy(image.pixels.astype(np.float32))
                shown = perturb_image(perturbation, options, record, pixels, image, severities[row.severity],
                                      labels.index(row.severity), seed)
                grey = np.clip(np.rint(shown.cpu().numpy()), 0, image.max_value).astype(np.uint16)
                name = "_".join(_safe(str(x)) for x in (f"{int(row.order):04d}", row.exam, case, record.laterality,
                                                         record.view))
                Image.fromarray(grey).save(out / f"{name}.png")
                center, width = dicom_window(record, image)
                rows.append((row.reader, int(row.order), row.exam, case, record.laterality, record.view,
                             f"{folder.name}/{out.name}/{name}.png", image.bits, grey.shape[0], grey.shape[1],
                             center, width))
        if n % 50 == 0 or n == len(assignment):
            progress(f"reader images: {n}/{len(assignment)} readings written")
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def dicom_window(record, image) -> tuple:
    """(centre, width) of the source's first DICOM VOI window, in the grey levels perceptcore reads
    (stored values, MONOCHROME1 inverted), or (None, None) when it is not DICOM or has no window.

    DICOM windows apply after the modality rescale, so they are mapped back through
    RescaleSlope/RescaleIntercept to the stored values the readers' PNGs hold."""
    from .images import image_format

    if image_format(record.file) != "dicom":
        return None, None
    import pydicom

    ds = pydicom.dcmread(record.file, stop_before_pixels=True)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None, None
    slope, intercept = _first(ds.get("RescaleSlope")) or 1.0, _first(ds.get("RescaleIntercept")) or 0.0
    center, width = (center - intercept) / slope, width / abs(slope)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        center = image.max_value - center
    return round(center, 6), round(width, 6)


def _first(element) -> float | None:
    """A DICOM value as a number: the first of a multi-valued one; None when absent or not numeric."""
    value = getattr(element, "value", element)
    if value is None or isinstance(value, (str, bytes)) and not str(value).strip():
        return None
    if not isinstance(value, (str, bytes, int, float)):
        value = next(iter(value), None)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def design_record(*, calls: str, roi: bool, severities: Sequence[str], perturbation: str | None, options: dict,
                  manifest: Path | None, seed: int, scheme: str, readers: Sequence[str]) -> dict:
    """The contents of design.json: how the design was made and what the readers are asked."""
    if calls not in CALLS:
        raise PerceptcoreError(f"unknown call type {calls!r}; expected {', '.join(CALLS)}", "--calls")
    return {"version": DESIGN_VERSION, "calls": calls, "roi": bool(roi), "max_boxes": MAX_BOXES,
            "severities": list(severities), "perturbation": perturbation, "options": options,
            "manifest": str(Path(manifest).resolve()) if manifest is not None else None,
            "seed": int(seed), "scheme": scheme, "readers": list(readers)}


def write_design_record(record: dict, path: Path) -> None:
    # Options may hold paths (a plugin's file options): written as text.
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def write_tokens(readers: Sequence[str], path: Path) -> dict:
    """A secret link token per reader and one for the study team (role admin), owner-only.

    Returns {reader: token, ...} with the admin's under the key None."""
    tokens = {reader: secrets.token_urlsafe(24) for reader in readers}
    tokens[None] = secrets.token_urlsafe(24)
    rows = [("reader", reader, token) for reader, token in tokens.items() if reader is not None]
    rows.append(("admin", "", tokens[None]))
    # Created 0600 (not chmod-ed afterwards), so the tokens are never readable by others.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(descriptor, 0o600)  # whatever the umask
    with os.fdopen(descriptor, "w", newline="") as f:
        pd.DataFrame(rows, columns=TOKEN_COLUMNS).to_csv(f, index=False)
    return tokens


def _safe(text: str) -> str:
    """A file-name-safe version of an id ('12/left' -> '12-left')."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def cases_by_exam(table: pd.DataFrame, exam_column: str, case_column: str) -> dict:
    """{exam: [its cases, in first-seen order]} from any table with exam and case columns."""
    grouped: dict = {}
    for exam, case in zip(table[exam_column].astype(str), table[case_column].astype(str)):
        cases = grouped.setdefault(exam, [])
        if case not in cases:
            cases.append(case)
    return grouped
