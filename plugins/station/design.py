"""A reader-study design folder, read and checked once, as the reading station serves it.

Files (written by `perceptcore design-reader-study --images ...`):
    design.json     calls (probability / binary / birads), roi, max_boxes, readers, manifest.
    tokens.csv      role, reader, token: one row per reader and one admin row (reader empty).
    assignment.csv  reader, order, exam, severity: each reader's worklist. `load_design` drops
                    the severities, so nothing the station holds in memory can leak them; only
                    `export_key` (for read-export) returns them, with the source manifest.
    exams.csv       exam, case: the cases (breasts) of each exam.
    images.csv      reader, order, exam, case, laterality, view, file, bits, height, width,
                    window_center, window_width: one row per image a reader is shown.

Positions are a reader's reading order (1..n); a reader addresses exams only by position.
A view's `id` is its row in images.csv (0 = the first data row): unique across readers and
stable across restarts, which is what `station.sqlite` keys ROI boxes by. Views are in the
hanging order R-CC, L-CC, R-MLO, L-MLO (view names matched ignoring case), then any other
views in file order. Every `file` must resolve (symbolic links followed) to a regular PNG file
inside the design folder, and its header must agree with the row's height and width.
Rows are reported as CSV line numbers (header = line 1).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path, PurePath

import attrs

from perceptcore.data import regular_file, short_repr
from perceptcore.errors import PerceptcoreError

CALLS = ("probability", "binary", "birads")
HANGING_ORDER = (("right", "CC"), ("left", "CC"), ("right", "MLO"), ("left", "MLO"))
SIDES = {"left": "left", "l": "left", "right": "right", "r": "right"}
DEFAULT_MAX_BOXES = 3
# Tokens travel in URLs (/r/<token>) and cookies: URL-safe characters only, and long enough
# that guessing one is hopeless (secrets.token_urlsafe(24) gives 32 characters).
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,256}")
POSITIVE_INTEGER = re.compile(r"[0-9]+")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

IMAGE_COLUMNS = ("reader", "order", "exam", "case", "laterality", "view", "file", "bits", "height", "width",
                 "window_center", "window_width")


@attrs.frozen
class View:
    id: int
    case: str
    laterality: str  # "left" or "right"
    view: str
    label: str  # "R-CC"
    file: Path  # resolved, inside the design folder
    bits: int
    height: int
    width: int
    window_center: float
    window_width: float


@attrs.frozen
class Case:
    case: str
    laterality: str
    label: str  # "Right breast"


@attrs.frozen
class Reading:
    """One exam of one reader's worklist."""

    position: int
    exam: str
    cases: tuple  # of Case, right breast first
    views: tuple  # of View, in hanging order


@attrs.frozen(eq=False)
class Design:
    folder: Path
    calls: str
    roi: bool
    max_boxes: int
    readers: tuple  # names, in design.json order
    reader_tokens: dict  # reader -> token
    admin_token: str
    worklists: dict  # reader -> tuple of Reading, by position

    def reading(self, reader: str, position: int) -> Reading | None:
        readings = self.worklists.get(reader, ())
        return readings[position - 1] if 1 <= position <= len(readings) else None


def load_design(folder) -> Design:
    """Read and check a design folder; any problem is a PerceptcoreError naming the file and row."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PerceptcoreError("is not a design folder (made by perceptcore design-reader-study)", str(folder))
    settings = _settings(folder / "design.json")
    readers = settings["readers"]
    reader_tokens, admin_token = _tokens(folder / "tokens.csv", readers)
    cases_of_exam = _exams(folder / "exams.csv")
    exam_at, _ = _assignment(folder / "assignment.csv", readers, cases_of_exam)  # the severities stay here
    views = _images(folder, exam_at, cases_of_exam)
    worklists = {}
    for reader in readers:
        worklists[reader] = tuple(
            _reading(folder / "images.csv", reader, position, exam, cases_of_exam[exam],
                     views.get((reader, position), []))
            for position, exam in sorted(exam_at[reader].items()))
    return Design(folder, settings["calls"], settings["roi"], settings["max_boxes"], tuple(readers), reader_tokens,
                  admin_token, worklists)


# --------------------------------------------------------------------------- files

def _settings(path: Path) -> dict:
    where = str(path)
    regular_file(path, where)
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PerceptcoreError(f"not readable JSON ({short_repr(str(exc), 200)})", where) from None
    if not isinstance(settings, dict):
        raise PerceptcoreError("expected a JSON object", where)
    if settings.get("version") != 1:
        raise PerceptcoreError(f"version {short_repr(settings.get('version'))} is not supported; expected 1", where)
    if settings.get("calls") not in CALLS:
        raise PerceptcoreError(f"calls {short_repr(settings.get('calls'))} is not one of {', '.join(CALLS)}", where)
    if not isinstance(settings.get("roi"), bool):
        raise PerceptcoreError(f"roi {short_repr(settings.get('roi'))} is not true or false", where)
    max_boxes = settings.get("max_boxes", DEFAULT_MAX_BOXES)
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or not 1 <= max_boxes <= 100:
        raise PerceptcoreError(f"max_boxes {short_repr(max_boxes)} is not a whole number from 1 to 100", where)
    readers = settings.get("readers")
    if (not isinstance(readers, list) or not readers
            or not all(isinstance(r, str) and r.strip() == r and r for r in readers)):
        raise PerceptcoreError("readers must be a non-empty list of reader names", where)
    if len(set(readers)) != len(readers):
        raise PerceptcoreError("readers are not distinct", where)
    manifest = settings.get("manifest")
    if manifest is not None and (not isinstance(manifest, str) or not manifest.strip()):
        raise PerceptcoreError(f"manifest {short_repr(manifest)} is not a path or null", where)
    return {"calls": settings["calls"], "roi": settings["roi"], "max_boxes": max_boxes, "readers": readers,
            "manifest": Path(manifest) if manifest else None}


def _rows(path: Path, columns) -> list:
    """[(line number, {column: stripped text})] of a CSV file that has at least `columns`."""
    where = str(path)
    regular_file(path, where)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise PerceptcoreError(f"missing column(s) {', '.join(map(repr, missing))}; the header is "
                                       f"{short_repr(','.join(header), 200)}", where)
            if len(set(header)) != len(header):
                raise PerceptcoreError("the header names a column twice", where)
            for record in reader:
                if not record:  # a blank line; pandas skips these too, so view ids (row indices) agree
                    continue
                if len(record) != len(header):
                    raise PerceptcoreError(f"row {reader.line_num}: {len(record)} fields, the header has "
                                           f"{len(header)}", where)
                rows.append((reader.line_num, dict(zip(header, (cell.strip() for cell in record)))))
    except UnicodeDecodeError:
        raise PerceptcoreError("not UTF-8 text", where) from None
    except csv.Error as exc:
        raise PerceptcoreError(f"not a readable CSV table: {short_repr(str(exc), 200)}", where) from None
    if not rows:
        raise PerceptcoreError("the table has no rows", where)
    return rows


def _tokens(path: Path, readers: list) -> tuple:
    where = str(path)
    reader_tokens, admin_token, seen = {}, None, {}
    for line, row in _rows(path, ("role", "reader", "token")):
        role, reader, token = row["role"], row["reader"], row["token"]
        if not TOKEN_PATTERN.fullmatch(token):
            raise PerceptcoreError(f"row {line}: the token must be 16 to 256 URL-safe characters "
                                   "(letters, digits, '-', '_')", where)
        if token in seen:
            raise PerceptcoreError(f"row {line}: the same token as row {seen[token]}", where)
        seen[token] = line
        if role == "admin":
            if reader:
                raise PerceptcoreError(f"row {line}: the admin row must leave reader empty", where)
            if admin_token is not None:
                raise PerceptcoreError(f"row {line}: a second admin row", where)
            admin_token = token
        elif role == "reader":
            if reader not in readers:
                raise PerceptcoreError(f"row {line}: reader {short_repr(reader)} is not in design.json", where)
            if reader in reader_tokens:
                raise PerceptcoreError(f"row {line}: reader {reader!r} has a second token", where)
            reader_tokens[reader] = token
        else:
            raise PerceptcoreError(f"row {line}: role {short_repr(role)} is not reader or admin", where)
    if admin_token is None:
        raise PerceptcoreError("no admin row", where)
    missing = [r for r in readers if r not in reader_tokens]
    if missing:
        raise PerceptcoreError(f"no token for reader(s) {', '.join(map(repr, missing))}", where)
    return reader_tokens, admin_token


def _exams(path: Path) -> dict:
    """{exam: [cases in file order]}; a case belongs to one exam."""
    where = str(path)
    cases_of_exam, exam_of_case = {}, {}
    for line, row in _rows(path, ("exam", "case")):
        exam, case = row["exam"], row["case"]
        if not exam or not case:
            raise PerceptcoreError(f"row {line}: {'exam' if not exam else 'case'} is empty", where)
        if case in exam_of_case:
            raise PerceptcoreError(f"row {line}: case {short_repr(case)} is listed twice (first under exam "
                                   f"{exam_of_case[case]!r})", where)
        exam_of_case[case] = exam
        cases_of_exam.setdefault(exam, []).append(case)
    return cases_of_exam


def _assignment(path: Path, readers: list, cases_of_exam: dict) -> tuple:
    """({reader: {position: exam}}, {(reader, position): severity}): every reader reads each of their
    exams once, at positions 1..n, at a severity."""
    where = str(path)
    exam_at, severity_at = {reader: {} for reader in readers}, {}
    for line, row in _rows(path, ("reader", "order", "exam", "severity")):
        reader, order, exam, severity = row["reader"], row["order"], row["exam"], row["severity"]
        if reader not in exam_at:
            raise PerceptcoreError(f"row {line}: reader {short_repr(reader)} is not in design.json", where)
        if not POSITIVE_INTEGER.fullmatch(order) or int(order) < 1:
            raise PerceptcoreError(f"row {line}: order {short_repr(order)} is not a whole number from 1", where)
        if exam not in cases_of_exam:
            raise PerceptcoreError(f"row {line}: exam {short_repr(exam)} is not in exams.csv", where)
        positions = exam_at[reader]
        if int(order) in positions:
            raise PerceptcoreError(f"row {line}: reader {reader!r} has a second exam at order {int(order)}", where)
        if exam in positions.values():
            raise PerceptcoreError(f"row {line}: reader {reader!r} reads exam {exam!r} twice", where)
        if not severity:
            raise PerceptcoreError(f"row {line}: severity is empty", where)
        positions[int(order)] = exam
        severity_at[(reader, int(order))] = severity
    for reader, positions in exam_at.items():
        if not positions:
            raise PerceptcoreError(f"reader {reader!r} has no exams", where)
        gaps = sorted(set(range(1, len(positions) + 1)) - set(positions))
        if gaps:
            raise PerceptcoreError(f"reader {reader!r}'s orders are not 1..{len(positions)}: {gaps[0]} is missing",
                                   where)
    return exam_at, severity_at


@attrs.frozen
class ExportKey:
    """What only read-export needs, kept out of `Design` so that the station never holds it."""

    severity_at: dict  # (reader, position) -> severity, as assignment.csv writes it
    manifest: Path | None  # the source image manifest, as design.json names it (None: it names none)


def export_key(design: Design) -> ExportKey:
    """The severities and the source manifest of a design `load_design` has read (same files, same checks)."""
    _, severity_at = _assignment(design.folder / "assignment.csv", list(design.readers),
                                 _exams(design.folder / "exams.csv"))
    return ExportKey(severity_at, _settings(design.folder / "design.json")["manifest"])


def _images(folder: Path, exam_at: dict, cases_of_exam: dict) -> dict:
    """{(reader, position): [View]} in file order."""
    path = folder / "images.csv"
    where = str(path)
    if not path.exists():
        raise PerceptcoreError("has no images.csv, so there is nothing to show readers: make the design with "
                               "--images MANIFEST --perturbation NAME", str(folder))
    root = folder.resolve()
    views, seen = {}, {}
    for index, (line, row) in enumerate(_rows(path, IMAGE_COLUMNS)):
        def bad(column, problem):
            return PerceptcoreError(f"row {line}: column {column!r}: {problem}", where)

        reader, order, exam, case = row["reader"], row["order"], row["exam"], row["case"]
        if reader not in exam_at:
            raise bad("reader", f"{short_repr(reader)} is not in design.json")
        if not POSITIVE_INTEGER.fullmatch(order) or int(order) not in exam_at[reader]:
            raise bad("order", f"{short_repr(order)} is not a position in reader {reader!r}'s worklist")
        position = int(order)
        if exam != exam_at[reader][position]:
            raise bad("exam", f"{short_repr(exam)} is not the exam reader {reader!r} reads at order {position}")
        if case not in cases_of_exam[exam]:
            raise bad("case", f"{short_repr(case)} is not a case of exam {exam!r} in exams.csv")
        side = SIDES.get(row["laterality"].lower())
        if side is None:
            raise bad("laterality", f"{short_repr(row['laterality'])} is not left or right")
        name = row["view"]
        if not name:
            raise bad("view", "is empty")
        bits = _integer(row["bits"], 1, 16, lambda problem: bad("bits", problem))
        height = _integer(row["height"], 1, 2 ** 20, lambda problem: bad("height", problem))
        width = _integer(row["width"], 1, 2 ** 20, lambda problem: bad("width", problem))
        file = _image_file(row["file"], root, lambda problem: bad("file", problem))
        depth, file_height, file_width = _png_header(file, lambda problem: bad("file", problem))
        if (file_height, file_width) != (height, width):
            raise bad("file", f"{row['file']} is {file_height}x{file_width} (rows x columns), the row says "
                              f"{height}x{width}")
        if depth < bits:
            raise bad("bits", f"{bits} bits do not fit the {depth}-bit PNG {row['file']}")
        center, window = _window(row, bits, bad)
        key = (reader, position, case, side, name.upper())
        if key in seen:
            raise PerceptcoreError(f"row {line}: the same view as row {seen[key]} (reader {reader!r}, order "
                                   f"{position}, case {case!r}, {side} {name})", where)
        seen[key] = line
        label = f"{'R' if side == 'right' else 'L'}-{name.upper()}"
        view = View(index, case, side, name, label, file, bits, height, width, center, window)
        views.setdefault((reader, position), []).append(view)
    return views


def _integer(text: str, low: int, high: int, bad) -> int:
    if not POSITIVE_INTEGER.fullmatch(text) or not low <= int(text) <= high:
        raise bad(f"{short_repr(text)} is not a whole number from {low} to {high}")
    return int(text)


def _image_file(text: str, root: Path, bad) -> Path:
    """The row's file, resolved; it must stay inside the design folder whatever `..` or links it holds."""
    if not text:
        raise bad("is empty")
    if PurePath(text).is_absolute() or "\x00" in text:
        raise bad(f"{short_repr(text)} must be a path relative to the design folder")
    try:
        file = (root / text).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        raise bad(f"{short_repr(text)} cannot be resolved ({exc})") from None
    if not file.is_relative_to(root):
        raise bad(f"{short_repr(text)} lies outside the design folder")
    if not file.is_file():
        raise bad(f"{short_repr(text)} is not a file in the design folder")
    return file


def _png_header(path: Path, bad) -> tuple:
    """(bit depth, height, width) of a grey-level PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as exc:
        raise bad(f"{path.name}: cannot read: {exc.strerror}") from None
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise bad(f"{path.name} is not a PNG file")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, colour = head[24], head[25]
    if colour != 0 or depth not in (8, 16):
        raise bad(f"{path.name} is not an 8- or 16-bit greyscale PNG")
    return depth, height, width


def _window(row: dict, bits: int, bad) -> tuple:
    """The default window: the DICOM tags when images.csv has them, else the whole bit range."""
    center_text, width_text = row["window_center"], row["window_width"]
    if not center_text and not width_text:
        return float(2 ** (bits - 1)), float(2 ** bits)
    values = []
    for column, text in (("window_center", center_text), ("window_width", width_text)):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise bad(column, f"{short_repr(text)} is not a number (give both window columns or neither)")
        values.append(value)
    if values[1] <= 0:
        raise bad("window_width", f"{width_text!r} is not positive")
    return values[0], values[1]


def _reading(path: Path, reader: str, position: int, exam: str, cases: list, views: list) -> Reading:
    where = str(path)
    if not views:
        raise PerceptcoreError(f"no image for reader {reader!r}'s exam {exam!r} (order {position})", where)
    sides = {}
    for view in views:
        sides.setdefault(view.case, set()).add(view.laterality)
    for case in cases:
        if case not in sides:
            raise PerceptcoreError(f"no image of case {case!r} for reader {reader!r} (order {position}); every "
                                   "case a reader is asked about needs an image", where)
        if len(sides[case]) > 1:
            raise PerceptcoreError(f"case {case!r} has images of both breasts; the station asks for one call "
                                   "per breast, so each case must be one breast", where)
    in_order = sorted(cases, key=lambda c: (0 if sides[c] == {"right"} else 1, cases.index(c)))
    per_side = {}
    for case in in_order:
        per_side.setdefault(next(iter(sides[case])), []).append(case)
    case_items = []
    for case in in_order:
        side = next(iter(sides[case]))
        label = f"{side.capitalize()} breast"
        if len(per_side[side]) > 1:
            label += f" ({case})"
        case_items.append(Case(case, side, label))
    return Reading(position, exam, tuple(case_items), tuple(sorted(views, key=_hanging_rank)))


def _hanging_rank(view: View) -> tuple:
    key = (view.laterality, view.view.upper())
    return (HANGING_ORDER.index(key), view.id) if key in HANGING_ORDER else (len(HANGING_ORDER), view.id)
