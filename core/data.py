"""Reading cases and predictions: the tidy long format and the published array layout.

Internally every observer group becomes an (observers x severities x cases) array of
predictions with NaN where nothing was observed (the sparse reader-study design).
Case ids are strings; the published layout's breast n of exam e is ``"e/left"`` or
``"e/right"``, as are tidy tables whose id columns are ``[exam_id, side]``.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import math
import os
import pickle
import stat
from pathlib import Path

import attrs
import numpy as np
import pandas as pd

from .errors import PerceptcoreError

SIDES = ("left", "right")
REGIONS = ("roi_interior", "roi_exterior")
# Labels of the published exam_info.csv (y_l, y_r).
PUBLISHED_LABELS = ("malignant", "benign", "nonbiopsied")
# A pickle holds arrays, lists, tuples and numbers. Lists nest at most as deep as an array's
# dimensions (NumPy's limit is 64; data needs a handful), and the items visited are bounded:
# pickles share sub-lists by reference, so 400 bytes can describe a list of 2**40 items that
# np.asarray would expand. Larger data belongs in NumPy arrays, which are not counted item by item.
MAX_PICKLE_DEPTH = 32
MAX_PICKLE_ITEMS = 1_000_000
# An observer group is held as a dense (observers x severities x cases) array, NaN where not
# observed: bounded (2 GiB of floats) so that a junk table, say a million distinct readers, is an
# error rather than tens of gigabytes of memory.
MAX_CELLS = 2 ** 28


# --------------------------------------------------------------------------- messages and files

def short_repr(value, limit: int = 60) -> str:
    """repr of a value from a data file, cut to `limit` characters (a junk cell can be megabytes)."""
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listing(items, limit: int = 12) -> str:
    """The first `limit` items, comma-separated, and how many there are in all."""
    items = list(items)
    shown = ", ".join(text if len(text) <= 60 else text[:59] + "…" for text in map(str, items[:limit]))
    return shown if len(items) <= limit else f"{shown}, … ({len(items)} in all)"


def regular_file(path: Path, where: str) -> int:
    """The size of `path`, which must be a regular file: reading a pipe or a device would block or never end."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise PerceptcoreError(f"file not found: {path}", where) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise PerceptcoreError(f"cannot read {short_repr(str(path))}: {getattr(exc, 'strerror', None) or exc}",
                               where) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, socket or device"
        raise PerceptcoreError(f"{path} is {kind}, not a regular file", where)
    return info.st_size


# --------------------------------------------------------------------------- pickles

def _numpy_reconstructors() -> dict:
    # Taken from NumPy itself so the allow-list survives the numpy.core -> numpy._core move.
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float64(0).__reduce__()[0]
    # Pickle protocol 5 (the default from Python 3.14) rebuilds arrays from their raw bytes.
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               # Protocols 0-2 store bytes as latin-1 text turned back by _codecs.encode.
               ("_codecs", "encode"): _latin1_bytes}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    return allowed


def _latin1_bytes(text, encoding="utf-8"):
    """`_codecs.encode` as old pickle protocols use it (text -> latin-1 bytes), and nothing more."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("refusing _codecs.encode other than the latin-1 bytes of old pickle protocols")
    return text.encode("latin1")


class _Refused(pickle.UnpicklingError):
    """The pickle names something other than a plain array, list, tuple or number."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, lists, tuples and numbers, and refuses every other global."""

    allowed = _numpy_reconstructors()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _Refused(
                f"refusing to load {module}.{name}: only NumPy arrays, lists and tuples are accepted"
            ) from None


def load_array_pickle(path: Path, where: str):
    """Load a pickle that holds only plain arrays/lists/tuples of numbers (never arbitrary objects)."""
    regular_file(path, where)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PerceptcoreError(f"cannot read {path}: {exc.strerror}", where) from None
    try:
        value = _ArrayUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise PerceptcoreError(f"{path}: not a plain-array pickle: {exc}", where) from None
    except Exception as exc:  # truncated or not a pickle at all
        raise PerceptcoreError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})", where) from None
    _check_plain(value, path, where)
    return value


def _check_plain(value, path, where):
    """Arrays, lists, tuples and numbers only, walked without recursion: a list that holds itself,
    100,000 nested lists or a graph of shared sub-lists is refused, not followed."""
    todo, visited = [(value, 0)], 0
    while todo:
        item, depth = todo.pop()
        visited += 1
        if isinstance(item, (list, tuple)):
            if depth >= MAX_PICKLE_DEPTH:
                raise PerceptcoreError(f"{path}: lists nested more than {MAX_PICKLE_DEPTH} deep (or holding "
                                       "themselves); expected arrays", where)
            if visited + len(todo) + len(item) > MAX_PICKLE_ITEMS:
                raise PerceptcoreError(f"{path}: lists of more than {MAX_PICKLE_ITEMS:,} items in all (counting "
                                       "shared sub-lists each time they occur); store large data as NumPy arrays",
                                       where)
            todo.extend((x, depth + 1) for x in item)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind not in "biuf":
                raise PerceptcoreError(f"{path}: array of dtype {item.dtype} is not numeric", where)
        elif isinstance(item, int) and not -2**63 <= item < 2**64:
            raise PerceptcoreError(f"{path}: holds an integer of {item.bit_length()} bits, too large for an array",
                                   where)
        elif not isinstance(item, (int, float, np.integer, np.floating, np.bool_)):
            raise PerceptcoreError(f"{path}: holds a {type(item).__name__}, expected arrays", where)


def _as_array(value, path, where) -> np.ndarray:
    """A loaded pickle's content as one float array; ragged nesting is an error, not a traceback."""
    try:
        return np.asarray(value, dtype=float)
    except (ValueError, TypeError, OverflowError) as exc:
        raise PerceptcoreError(f"{path}: not a regular array of numbers ({short_repr(str(exc), 120)})", where) from None


# --------------------------------------------------------------------------- tables

def read_table(path: Path, where: str, text_columns=()) -> pd.DataFrame:
    """A CSV (or .tsv) table; `text_columns` are kept as written (a severity `2` stays "2", not 2.0)."""
    regular_file(path, where)
    try:
        table = pd.read_csv(path, sep=None if path.suffix == ".tsv" else ",", engine="python" if path.suffix == ".tsv" else "c",
                            dtype={c: str for c in text_columns})
    except pd.errors.EmptyDataError:
        raise PerceptcoreError(f"{path}: file is empty", where) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PerceptcoreError(f"{path}: not a readable CSV table: {short_repr(str(exc), 200)}", where) from None
    if table.empty:
        raise PerceptcoreError(f"{path}: table has no rows", where)
    return table


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write a table so that `path` never holds half of it: a partial file, then an atomic rename."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    table.to_csv(partial, index=False)
    partial.replace(path)


def require_columns(table: pd.DataFrame, columns, path: Path, where: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PerceptcoreError(
            f"{path}: missing column(s) {_listing(map(repr, missing))}; the table has "
            f"{_listing(map(repr, table.columns))}",
            where,
        )


def case_ids(table: pd.DataFrame, id_columns) -> pd.Series:
    """One string id per row, joining several id columns with '/'."""
    parts = [table[c].astype(str).str.strip() for c in id_columns]
    ids = parts[0]
    for part in parts[1:]:
        ids = ids + "/" + part
    return ids


# --------------------------------------------------------------------------- cases

@attrs.frozen(eq=False)
class Cases:
    """One row per case: `case` (id), `label`, `positive` (bool) and the subgroup attributes."""

    table: pd.DataFrame
    positive_label: str

    @property
    def ids(self) -> list[str]:
        return self.table["case"].tolist()

    @property
    def positive(self) -> np.ndarray:
        return self.table["positive"].to_numpy(bool)

    def index_of(self) -> dict[str, int]:
        return {case: i for i, case in enumerate(self.table["case"])}

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, positions) -> "Cases":
        """The cases at `positions` (in that order), renumbered from 0."""
        return Cases(self.table.iloc[np.asarray(positions, dtype=int)].reset_index(drop=True), self.positive_label)


def load_cases(path: Path, id_columns, label_column: str, positive_label: str, where: str) -> Cases:
    table = read_table(path, where)
    published = {"y_l", "y_r"} <= set(table.columns)
    if published:
        table = _breasts_from_published_exams(table, path, where)
        id_columns, label_column = ("case",), "label"
    require_columns(table, [*id_columns, label_column], path, where)
    for column in id_columns:
        empty = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if empty.any():
            raise PerceptcoreError(f"{path}: row {int(np.flatnonzero(empty.to_numpy())[0]) + 2}: "
                                   f"column {column!r} is empty", where)
    ids = case_ids(table, id_columns)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        row = duplicated.index[0]
        raise PerceptcoreError(f"{path}: row {row + 2}: case id {short_repr(duplicated.iloc[0])} appears twice", where)
    # A missing cell is an empty label (refused below), not a float NaN among the strings.
    labels = table[label_column].fillna("").astype(str).str.strip()
    present = labels.unique().tolist()
    if positive_label not in present:
        close = difflib.get_close_matches(positive_label, present[:1000], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PerceptcoreError(
            f"{path}: no case has label {positive_label!r} in column {label_column!r} "
            f"(labels present: {_listing(sorted(present))}){hint}",
            where,
        )
    if not published:
        _check_labels(table[label_column], labels, present, positive_label, path, label_column, where)
    out = table.drop(columns=[c for c in ("case", "label", "positive") if c in table.columns])
    out.insert(0, "case", ids.to_numpy())
    out.insert(1, "label", labels.to_numpy())
    out.insert(2, "positive", (labels == positive_label).to_numpy())
    return Cases(out.reset_index(drop=True), positive_label)


def _slip_of(label: str, positive: str) -> bool:
    """Whether `label` looks like a mistyped positive label (other case, a letter or two off), which
    would silently make its case negative. A label containing the other (normal, abnormal) is a class."""
    if label == positive or abs(len(label) - len(positive)) > 2:
        return False
    if label.casefold() == positive.casefold():
        return True
    if positive in label or label in positive:
        return False
    return difflib.SequenceMatcher(None, label, positive).ratio() >= 0.8


def _check_labels(raw: pd.Series, labels: pd.Series, present, positive: str, path, column, where) -> None:
    """Tidy labels: none empty, none a slip of the positive label."""
    empty = raw.isna().to_numpy() | (labels == "").to_numpy()
    if empty.any():
        raise PerceptcoreError(f"{path}: row {int(np.flatnonzero(empty)[0]) + 2}: column {column!r} is empty; "
                               "every case needs its label", where)
    for label in present:
        if _slip_of(label, positive):
            row = int(np.flatnonzero((labels == label).to_numpy())[0])
            raise PerceptcoreError(
                f"{path}: row {row + 2}: label {short_repr(label)} in column {column!r} looks like a slip of the "
                f"positive label {positive!r}; it would count as a negative case: correct it", where)


def _check_published_labels(exams: pd.DataFrame, path, where) -> None:
    for column in ("y_l", "y_r"):
        raw = exams[column]
        text = raw.astype(str).str.strip()
        bad = (raw.isna() | ~text.isin(PUBLISHED_LABELS)).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            if pd.isna(raw.iloc[i]) or not text.iloc[i]:
                problem = "is empty"
            else:
                close = difflib.get_close_matches(text.iloc[i].casefold(), PUBLISHED_LABELS, n=1, cutoff=0.6)
                problem = f"label {short_repr(text.iloc[i])} is not one of {', '.join(PUBLISHED_LABELS)}" + (
                    f"; did you mean {close[0]!r}?" if close else "")
            raise PerceptcoreError(f"{path}: row {i + 2}: column {column!r} {problem}", where)
        exams[column] = text


# The published arrays index exams by the rows of the released exam_info.csv: only the file's row
# order records which exam is which. Digests of its test_set_idx column (as listed, and sorted)
# recognise a reordered copy, which would otherwise give every exam another exam's predictions.
_PUBLISHED_EXAMS_ORDERED = "3ea8fb50e428c7e8774bd94cee722895572e0feb2e24fc4ec8e814ca68b3922a"
_PUBLISHED_EXAMS_SORTED = "f67b33deefba3f878a19bd5727fbab7ef7ab5263ba5b59dc562993f36d0d4017"


def _digest(values) -> str:
    return hashlib.sha256(" ".join(values).encode()).hexdigest()


def _published_exam_positions(exams: pd.DataFrame, path, where) -> np.ndarray:
    """Each row's exam, i.e. its index in the published arrays: the `exam_id` column when there is one
    (rows then in any order), else the row number."""
    if "exam_id" not in exams.columns:
        if "test_set_idx" in exams.columns:
            ids = exams["test_set_idx"].astype(str).str.strip().tolist()
            if _digest(ids) != _PUBLISHED_EXAMS_ORDERED and _digest(sorted(ids)) == _PUBLISHED_EXAMS_SORTED:
                raise PerceptcoreError(
                    f"{path}: the released exams in another order; the arrays index exams by row: restore the "
                    "order, or add an exam_id column (each exam's index in the arrays)", where)
        return np.arange(len(exams))
    raw = exams["exam_id"]
    number = _as_floats(raw)
    bad = ~np.isfinite(number) | (number < 0) | (number % 1 != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PerceptcoreError(f"{path}: row {i + 2}: exam_id {short_repr(raw.iloc[i])} is not the exam's index in the "
                               "published arrays (a whole number from 0)", where)
    positions = number.astype(np.int64)
    repeat = _first_repeat(positions)
    if repeat is not None:
        raise PerceptcoreError(f"{path}: rows {repeat[0] + 2} and {repeat[1] + 2}: exam_id {positions[repeat[0]]} "
                               "appears twice", where)
    return positions


def _breasts_from_published_exams(exams: pd.DataFrame, path, where) -> pd.DataFrame:
    """The published exam_info.csv (one row per exam, `_l`/`_r` columns) as one row per breast."""
    exams = exams.copy()
    _check_published_labels(exams, path, where)
    positions = _published_exam_positions(exams, path, where)
    rows = []
    for side, suffix in zip(SIDES, ("_l", "_r")):
        part = pd.DataFrame({"exam": positions, "side": side})
        for column in exams.columns:
            if column.endswith(suffix):
                part[column[: -len(suffix)]] = exams[column].to_numpy()
            elif not column.endswith(("_l", "_r")):
                part[column] = exams[column].to_numpy()
        rows.append(part)
    breasts = pd.concat(rows).sort_values(["exam", "side"], kind="stable").reset_index(drop=True)
    breasts.insert(0, "case", breasts["exam"].astype(str) + "/" + breasts["side"])
    return breasts.rename(columns={"y": "label"}).drop(columns=["exam"])


# --------------------------------------------------------------------------- predictions

@attrs.frozen(eq=False)
class ObserverGroup:
    """One observer group's predictions: values (observers x severities x cases), NaN = not observed."""

    name: str
    readers: tuple
    values: np.ndarray
    soft: bool

    @property
    def dense(self) -> bool:
        return not np.isnan(self.values).any()


def severity_lookup(levels) -> dict:
    """Map a severity as written in a data file (text or number) to its index."""
    lookup = {}
    for i, label in enumerate(levels):
        lookup[str(label)] = i
        try:
            lookup[float(label)] = i
        except ValueError:
            pass
    return lookup


def _severity_index(values: pd.Series, levels, path, where) -> np.ndarray:
    lookup = severity_lookup(levels)
    text = values.astype(str).str.strip()
    resolved = {}
    for key in text.unique():  # a handful of distinct severities, however many rows
        index = lookup.get(key)
        if index is None:
            try:
                index = lookup.get(float(key))
            except ValueError:
                pass
        resolved[key] = -1 if index is None else index
    out = text.map(resolved).to_numpy(int)
    if (out < 0).any():
        row = int(np.flatnonzero(out < 0)[0])
        raise PerceptcoreError(
            f"{path}: row {row + 2}: severity {short_repr(values.iloc[row])} is not one of the spec's severities "
            f"({', '.join(map(str, levels))})",
            where,
        )
    return out


def _case_index(ids: pd.Series, cases: Cases, path, where) -> np.ndarray:
    index = cases.index_of()
    positions = ids.map(index)
    unknown = positions.isna()
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise PerceptcoreError(
            f"{path}: row {row + 2}: case {short_repr(ids.iloc[row])} is not in the cases table "
            f"({int(unknown.sum())} row(s) name unknown cases)",
            where,
        )
    return positions.to_numpy(int)


def _check_size(sizes: dict, path, where) -> None:
    """`sizes` ({"readers": 10, ...}) of a dense prediction array within MAX_CELLS."""
    cells = math.prod(sizes.values())
    if cells > MAX_CELLS:
        shape = " x ".join(f"{n:,} {name}" for name, n in sizes.items())
        raise PerceptcoreError(f"{path}: {shape} make {cells:,} prediction cells, more than the {MAX_CELLS:,} "
                               "perceptcore holds; do the columns hold what they should?", where)


def _check_cells(values: np.ndarray, read, path, where, describe) -> None:
    """Every read cell of an array a probability or 0/1 call (NaN and inf included in the refusal);
    `describe(index)` names the first bad one."""
    bad = read & ~((values >= 0) & (values <= 1))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise PerceptcoreError(f"{path}: prediction {float(values[index])!r} at {describe(index)} is not a "
                               "probability or 0/1 call in [0, 1]", where)


def _as_floats(raw: pd.Series) -> np.ndarray:
    """A column as floats, NaN where a cell is not a number. Via text: pandas reads a 400-digit cell
    as a Python int, which to_numeric cannot convert even when told to coerce (OverflowError)."""
    text = raw.astype(str) if raw.dtype == object else raw
    return pd.to_numeric(text, errors="coerce").to_numpy(float)


def _tidy_prediction_values(table: pd.DataFrame, column: str, path, where) -> np.ndarray:
    """The prediction column as floats; a bad cell is reported as written in the file."""
    raw = table[column]
    values = _as_floats(raw)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if pd.isna(raw.iloc[i]):
            raise PerceptcoreError(f"{path}: row {i + 2}: prediction is missing", where)
        shown = raw.iloc[i] if isinstance(raw.iloc[i], (str, int)) else float(values[i])
        raise PerceptcoreError(
            f"{path}: row {i + 2}: prediction {short_repr(shown)} is not a probability or 0/1 call in [0, 1]", where
        )
    return values


def _first_repeat(cell: np.ndarray):
    """(first row, repeating row) of the earliest repeated value of `cell`, or None."""
    _, inverse, counts = np.unique(cell, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    if not len(repeated):
        return None
    later = repeated[inverse[repeated] == inverse[repeated[0]]]
    return int(later[0]), int(later[1])


def _likelihood_is_soft(values: np.ndarray, likelihood: str, path, where) -> bool:
    observed = values[np.isfinite(values)]
    binary = bool(np.isin(observed, (0.0, 1.0)).all())
    if likelihood == "binary" and not binary:
        raise PerceptcoreError(f"{path}: likelihood is 'binary' but predictions are not all 0 or 1", where)
    return likelihood == "soft" or (likelihood == "auto" and not binary)


def load_observer_group(name, path: Path, likelihood, columns: dict, cases: Cases, levels, where) -> ObserverGroup:
    """Predictions of one observer group from a tidy CSV or a published-layout pickle."""
    if path.suffix == ".pkl":
        readers, values = _published_predictions(path, cases, levels, where)
    else:
        readers, values = _tidy_predictions(path, columns, cases, levels, where)
    soft = _likelihood_is_soft(values, likelihood, path, where)
    if np.isnan(values[:, 0, :]).all():
        raise PerceptcoreError(f"{path}: no predictions at the reference severity {levels[0]!r}", where)
    return ObserverGroup(name, tuple(readers), values, soft)


def _tidy_predictions(path, columns, cases, levels, where):
    names = {"reader": "reader", "severity": "severity", "case": "case", "prediction": "prediction", **columns}
    table = read_table(path, where, text_columns=[names["severity"]])
    id_columns = [names["case"]] if isinstance(names["case"], str) else list(names["case"])
    require_columns(table, [names["reader"], names["severity"], *id_columns, names["prediction"]], path, where)
    readers_col = table[names["reader"]].astype(str)
    readers = list(dict.fromkeys(readers_col))
    r = readers_col.map({reader: i for i, reader in enumerate(readers)}).to_numpy(int)
    s = _severity_index(table[names["severity"]], levels, path, where)
    n = _case_index(case_ids(table, id_columns), cases, path, where)
    prediction = _tidy_prediction_values(table, names["prediction"], path, where)
    repeat = _first_repeat((r * len(levels) + s) * len(cases) + n)
    if repeat is not None:
        row, again = repeat
        raise PerceptcoreError(
            f"{path}: rows {row + 2} and {again + 2}: reader {short_repr(readers_col.iloc[row])} has more than one "
            f"prediction for case {short_repr(case_ids(table, id_columns).iloc[row])} at severity "
            f"{short_repr(table[names['severity']].iloc[row])}",
            where,
        )
    _check_size({"readers": len(readers), "severities": len(levels), "cases": len(cases)}, path, where)
    values = np.full((len(readers), len(levels), len(cases)), np.nan)
    values[r, s, n] = prediction
    return readers, values


def _published_predictions(path, cases, levels, where):
    """(readers, severities, exams, 2 sides) predictions, optionally as a (pred, mask) tuple whose
    mask (readers, severities, exams) is 1 where the reader read the exam at the severity, else 0."""
    n_levels = len(levels)
    loaded = load_array_pickle(path, where)
    if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
        pred, mask = (_as_array(a, path, where) for a in loaded)
    else:
        pred, mask = _as_array(loaded, path, where), None
    if pred.ndim != 4 or pred.shape[3] != 2 or pred.shape[1] != n_levels:
        raise PerceptcoreError(
            f"{path}: expected predictions of shape (observers, {n_levels} severities, exams, 2 sides), "
            f"got {pred.shape}",
            where,
        )
    if mask is not None and mask.shape != pred.shape[:3]:
        raise PerceptcoreError(f"{path}: mask of shape {mask.shape} does not match predictions {pred.shape}", where)

    def cell(index):
        return (f"[{', '.join(map(str, index))}] (reader{index[0] + 1:02d}, severity {levels[index[1]]!r}, "
                f"exam {index[2]}" + (f", {SIDES[index[3]]})" if len(index) == 4 else ")"))

    if mask is None:
        read = np.ones(pred.shape[:3], dtype=bool)
    else:
        bad = ~np.isin(mask, (0, 1))
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise PerceptcoreError(f"{path}: read mask value {float(mask[index])!r} at {cell(index)}; the mask holds 1 "
                                   "(read) or 0 (not read)", where)
        read = mask == 1
    _check_cells(pred, read[..., None], path, where, cell)  # cells not read may hold anything
    values = np.where(read[..., None], pred, np.nan)
    n_exams = pred.shape[2]
    order = _published_case_positions(range(n_exams), cases, path, where)
    _check_size({"observers": pred.shape[0], "severities": n_levels, "cases": len(cases)}, path, where)
    out = np.full((pred.shape[0], n_levels, len(cases)), np.nan)
    out[:, :, order] = values.reshape(pred.shape[0], n_levels, n_exams * 2)
    readers = [f"reader{i + 1:02d}" for i in range(pred.shape[0])]
    return readers, out


def _published_case_positions(exams, cases, path, where) -> np.ndarray:
    """Positions in `cases` of breasts (exam e, left), (e, right), ... for the given exams."""
    index = cases.index_of()
    positions = []
    for e in exams:
        for side in SIDES:
            case = f"{e}/{side}"
            if case not in index:
                raise PerceptcoreError(
                    f"{path}: exam {e} ({case}) of the published array layout is not in the cases table; "
                    "published arrays need the published exam_info.csv (or case ids 'exam/side')",
                    where,
                )
            positions.append(index[case])
    return np.asarray(positions, dtype=int)


# --------------------------------------------------------------------------- ROI study

@attrs.frozen(eq=False)
class RoiPredictions:
    """Observed predictions with ROI-restricted perturbation.

    values[region] is (annotators x readers x severities x ROI cases); `cases` are
    positions in the study's cases table.
    """

    annotators: tuple
    readers: tuple
    cases: np.ndarray
    values: dict


def load_roi_published(interior: Path, exterior: Path, exams: Path, cases: Cases, n_levels, where) -> RoiPredictions:
    exam_list = _as_array(load_array_pickle(exams, f"{where}.exams"), exams, f"{where}.exams").ravel()
    bad = ~np.isfinite(exam_list) | (exam_list < 0) | (exam_list % 1 != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PerceptcoreError(f"{exams}: item {i}: {short_repr(exam_list[i])} is not an exam index (a row of the "
                               "exam table)", f"{where}.exams")
    exam_list = exam_list.astype(np.int64)
    repeat = _first_repeat(exam_list)
    if repeat is not None:
        raise PerceptcoreError(f"{exams}: items {repeat[0]} and {repeat[1]}: exam {exam_list[repeat[0]]} is listed "
                               "twice", f"{where}.exams")
    exam_list = exam_list.tolist()
    values = {}
    for region, path in zip(REGIONS, (interior, exterior)):
        key = f"{where}.{region.removeprefix('roi_')}"
        array = _as_array(load_array_pickle(path, key), path, key)
        if array.ndim != 5 or array.shape[2] != n_levels or array.shape[3] != len(exam_list) or array.shape[4] != 2:
            raise PerceptcoreError(
                f"{path}: expected shape (annotators, seeds, {n_levels} severities, {len(exam_list)} exams, 2 sides), "
                f"got {array.shape}",
                key,
            )
        _check_cells(array, True, path, key, lambda i: (
            f"[{', '.join(map(str, i))}] (annotator{i[0] + 1}, reader{i[1] + 1:02d}, severity index {i[2]}, "
            f"exam {exam_list[i[3]]}, {SIDES[i[4]]})"))
        values[region] = array.reshape(*array.shape[:3], -1)
    shapes = {v.shape for v in values.values()}
    if len(shapes) != 1:
        raise PerceptcoreError(f"interior and exterior arrays differ in shape: {sorted(shapes)}", where)
    a, r = next(iter(shapes))[:2]
    positions = _published_case_positions(exam_list, cases, exams, f"{where}.exams")
    return RoiPredictions(
        tuple(f"annotator{i + 1}" for i in range(a)), tuple(f"reader{i + 1:02d}" for i in range(r)), positions, values
    )


def load_roi_tidy(path: Path, columns: dict, cases: Cases, levels, where) -> RoiPredictions:
    names = {"annotator": "annotator", "reader": "reader", "severity": "severity", "case": "case",
             "region": "region", "prediction": "prediction", **columns}
    table = read_table(path, where, text_columns=[names["severity"]])
    id_columns = [names["case"]] if isinstance(names["case"], str) else list(names["case"])
    require_columns(table, [names[k] for k in ("annotator", "reader", "severity", "region", "prediction")] + id_columns,
                    path, where)
    regions = table[names["region"]].astype(str)
    unknown = ~regions.isin(REGIONS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise PerceptcoreError(
            f"{path}: row {row + 2}: region {short_repr(regions.iloc[row])} is not one of {', '.join(REGIONS)}", where
        )
    annotators = list(dict.fromkeys(table[names["annotator"]].astype(str)))
    readers = list(dict.fromkeys(table[names["reader"]].astype(str)))
    a = table[names["annotator"]].astype(str).map({k: i for i, k in enumerate(annotators)}).to_numpy(int)
    r = table[names["reader"]].astype(str).map({k: i for i, k in enumerate(readers)}).to_numpy(int)
    s = _severity_index(table[names["severity"]], levels, path, where)
    n = _case_index(case_ids(table, id_columns), cases, path, where)
    prediction = _tidy_prediction_values(table, names["prediction"], path, where)
    region_index = regions.map({region: i for i, region in enumerate(REGIONS)}).to_numpy(int)
    repeat = _first_repeat((((a * len(readers) + r) * len(levels) + s) * len(cases) + n) * len(REGIONS) + region_index)
    if repeat is not None:
        row, again = repeat
        raise PerceptcoreError(
            f"{path}: rows {row + 2} and {again + 2}: annotator "
            f"{short_repr(table[names['annotator']].astype(str).iloc[row])}, reader "
            f"{short_repr(table[names['reader']].astype(str).iloc[row])} has more than one {regions.iloc[row]} "
            f"prediction for case {short_repr(case_ids(table, id_columns).iloc[row])} at severity "
            f"{short_repr(table[names['severity']].iloc[row])}",
            where,
        )
    roi_cases, local = np.unique(n, return_inverse=True)
    _check_size({"annotators": len(annotators), "readers": len(readers), "severities": len(levels),
                 "cases": len(roi_cases)}, path, where)
    values = {}
    for region in REGIONS:
        rows = (regions == region).to_numpy()
        array = np.full((len(annotators), len(readers), len(levels), len(roi_cases)), np.nan)
        array[a[rows], r[rows], s[rows], local[rows]] = prediction[rows]
        if np.isnan(array).any():
            raise PerceptcoreError(
                f"{path}: region {region} does not have a prediction for every annotator, reader, severity and case",
                where,
            )
        values[region] = array
    return RoiPredictions(tuple(annotators), tuple(readers), roi_cases, values)
