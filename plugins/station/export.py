"""What readers recorded in the reading station, out of `<design>/station.sqlite`.

`export` turns the submitted exams into the tidy predictions table a spec's
`observers[].predictions` reads (`reader, severity, case, prediction`; the severity comes
from the design's assignment.csv, which the station never serves) and, optionally, each
reader's ROI boxes into an image manifest per reader that the ROI analysis reads.
Calls become predictions as follows: probability (0-100 %) / 100; binary as is; BI-RADS
category c -> 1 if c >= 4 else 0 (4 and 5: biopsy recommended), the category kept in `call`.
Exams not yet submitted are left out: a reader may still change them. Rows follow the design's
readers, each reader's reading order and, within an exam, the order the station shows its cases.

The design folder is read by `design.load_design` (and `design.export_key`: the severities and
the source manifest), the database by `store.read_only` (never written, so exporting while the
station serves is safe); every file is written under a temporary name and renamed when all are
complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import pandas as pd

from perceptcore.data import require_columns, short_repr
from perceptcore.errors import PerceptcoreError
from perceptcore.images import parse_boxes

from .design import Design, ExportKey, export_key, load_design
from .store import FILE_NAME, read_only

PREDICTION_COLUMNS = ["reader", "severity", "case", "prediction"]
BIRADS_POSITIVE = 4  # BI-RADS 4 and 5 recommend a biopsy: a positive call


# --------------------------------------------------------------------------- export

def prediction_of(value: float, calls: str) -> float:
    if calls == "probability":
        return value / 100.0
    if calls == "birads":
        return 1.0 if value >= BIRADS_POSITIVE else 0.0
    return value


def _check_value(value, calls: str, where: str) -> float:
    allowed = {"probability": lambda v: 0 <= v <= 100, "binary": lambda v: v in (0, 1),
               "birads": lambda v: v == int(v) and 1 <= v <= 5}[calls]
    if value is None or not isinstance(value, (int, float)) or not allowed(value):
        raise PerceptcoreError(f"{where}: value {value!r} is not a valid {calls} call", "station.sqlite")
    return float(value)


def predictions(design: Design, key: ExportKey, db) -> tuple[pd.DataFrame, list]:
    """The submitted exams' calls as a tidy predictions table, and the submitted (reader, Reading)
    in the design's reader order and each reader's reading order."""
    submitted = []
    for reader, position, exam in db.execute("SELECT reader, position, exam FROM submissions"):
        reading = design.reading(str(reader), int(position))
        if reading is None or reading.exam != str(exam):
            raise PerceptcoreError(f"a submission of reader {short_repr(reader)} at position {position} "
                                   f"(exam {short_repr(exam)}) is not in the design's assignment", _database(design))
        submitted.append((str(reader), reading))
    submitted.sort(key=lambda s: (design.readers.index(s[0]), s[1].position))
    answers = {}
    for reader, position, case, value in db.execute("SELECT reader, position, case_id, value FROM answers"):
        answers[(str(reader), int(position), str(case))] = value
    rows = []
    for reader, reading in submitted:
        severity = key.severity_at[(reader, reading.position)]
        for case in (c.case for c in reading.cases):
            where = f"reader {reader!r}, exam {reading.exam!r}, case {case!r}"
            if (reader, reading.position, case) not in answers:
                raise PerceptcoreError(f"{where}: the exam was submitted without this case's call", _database(design))
            value = _check_value(answers[(reader, reading.position, case)], design.calls, where)
            rows.append((reader, severity, case, prediction_of(value, design.calls), int(value)))
    table = pd.DataFrame(rows, columns=[*PREDICTION_COLUMNS, "call"])
    if design.calls != "birads":
        table = table[PREDICTION_COLUMNS]
    return table, submitted


def roi_manifests(design: Design, key: ExportKey, submitted: list, db) -> dict:
    """{reader: manifest table}: the source manifest's rows of every submitted case, `file` absolute,
    `roi_boxes` the boxes that reader drew on that view ("" for none) and no `roi_mask`."""
    if not design.roi:
        raise PerceptcoreError("the design asks for no ROI boxes (made without --roi)", "--rois")
    if key.manifest is None:
        raise PerceptcoreError("names no source manifest", str(design.folder / "design.json"))
    source = _source_manifest(key.manifest)
    # The k-th image of a case in images.csv is the k-th manifest row of that case (write_images).
    rows_of_case: dict = {}
    for i, case in enumerate(source["case"]):
        rows_of_case.setdefault(case, []).append(i)
    drawn = {}
    for reader, position, view_id, text in db.execute("SELECT reader, position, view_id, boxes FROM boxes"):
        drawn[(str(reader), int(position), int(view_id))] = text
    tables = {}
    for reader in design.readers:
        picked = []
        for _, reading in (s for s in submitted if s[0] == reader):
            seen: dict = {}
            for view in sorted(reading.views, key=lambda v: v.id):  # images.csv order
                k = seen[view.case] = seen.get(view.case, -1) + 1
                candidates = rows_of_case.get(view.case, [])
                if k >= len(candidates) or _side(source["laterality"].iloc[candidates[k]]) != view.laterality \
                        or source["view"].iloc[candidates[k]].strip() != view.view:
                    raise PerceptcoreError(f"no longer lists image {k + 1} of case {view.case!r} as "
                                           f"{view.laterality} {view.view}: the manifest changed after "
                                           "the design was made", str(key.manifest))
                boxes = _boxes_text(drawn.get((reader, reading.position, view.id)), reader, reading.exam, design)
                picked.append((candidates[k], boxes))
        table = source.iloc[[i for i, _ in picked]].copy()
        table["roi_boxes"] = [boxes for _, boxes in picked]
        if "roi_mask" in table:
            table["roi_mask"] = ""  # the reader's boxes are the ROI; the source's mask is not theirs
        tables[reader] = table.reset_index(drop=True)
    return tables


def _source_manifest(path: Path) -> pd.DataFrame:
    """The manifest as written (every column text), its files made absolute for a manifest elsewhere."""
    if not path.is_file():
        raise PerceptcoreError("the design's source manifest (design.json) is gone", str(path))
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    require_columns(table, ["case", "view", "laterality", "file"], path, str(path))
    table["case"] = table["case"].str.strip()
    table["file"] = [str(Path(f.strip()) if Path(f.strip()).is_absolute() else (path.parent / f.strip()).resolve())
                     for f in table["file"]]
    return table


def _side(text: str) -> str:
    from perceptcore.images import LATERALITIES

    return LATERALITIES.get(text.strip().lower(), text)


def _boxes_text(text, reader: str, exam: str, design: Design) -> str:
    """JSON boxes [[row0, col0, row1, col1], ...] as the manifest's "row0 col0 row1 col1;..." (checked)."""
    if text is None:
        return ""
    where = f"boxes of reader {reader!r}, exam {exam!r}"
    try:
        boxes = json.loads(text)
        if not isinstance(boxes, list) or not all(isinstance(box, list) for box in boxes):
            raise ValueError("expected a list of [row0, col0, row1, col1]")
        written = ";".join(" ".join(str(v) for v in box) for box in boxes)
        if written:
            parse_boxes(written)  # whole numbers, row0 < row1, col0 < col1, as the manifest requires
    except (ValueError, json.JSONDecodeError) as exc:
        raise PerceptcoreError(f"{where}: {short_repr(str(text), 80)}: {exc}", _database(design)) from None
    return written


def _database(design: Design) -> str:
    return str(design.folder / FILE_NAME)


@attrs.frozen
class Exported:
    calls: int
    submitted: int
    unsubmitted: int
    files: list


def export(folder, out, rois=None) -> Exported:
    """Write the predictions table to `out` (and one ROI manifest per reader into `rois`): all checked
    first, then written under temporary names and renamed, so a failure leaves nothing half-written."""
    design = load_design(folder)
    key = export_key(design)
    with read_only(design.folder) as db:
        if db is None:
            raise PerceptcoreError(f"has no {FILE_NAME}: no reader has saved anything yet (serve it with perceptcore "
                                   "read)", str(design.folder))
        table, submitted = predictions(design, key, db)
        outputs = {Path(out): table}
        if rois is not None:
            outputs.update({Path(rois) / f"{reader}.csv": manifest
                            for reader, manifest in roi_manifests(design, key, submitted, db).items()})
    staged = []
    try:
        for path, frame in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            frame.to_csv(partial, index=False)
            staged.append((partial, path))
        for partial, path in staged:
            partial.replace(path)
    except OSError as exc:
        for partial, _ in staged:
            partial.unlink(missing_ok=True)
        raise PerceptcoreError(f"cannot write: {exc.strerror or exc}", str(exc.filename or out)) from None
    assigned = sum(len(readings) for readings in design.worklists.values())
    return Exported(len(table), len(submitted), assigned - len(submitted), list(outputs))
