"""Reading cases and predictions: the tidy long format and the published array layout.

Internally every observer group becomes an (observers x severities x cases) array of
predictions with NaN where nothing was observed (the sparse reader-study design).
Case ids are strings; the published layout's breast n of exam e is ``"e/left"`` or
``"e/right"``, as are tidy tables whose id columns are ``[exam_id, side]``.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import attrs
import numpy as np
import pandas as pd

from .errors import PerceptcoreError

SIDES = ("left", "right")
REGIONS = ("roi_interior", "roi_exterior")


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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PerceptcoreError(f"file not found: {path}", where) from None
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
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, path, where)
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise PerceptcoreError(f"{path}: array of dtype {value.dtype} is not numeric", where)
    elif not isinstance(value, (int, float, np.number)):
        raise PerceptcoreError(f"{path}: holds a {type(value).__name__}, expected arrays", where)


# --------------------------------------------------------------------------- tables

def read_table(path: Path, where: str, text_columns=()) -> pd.DataFrame:
    """A CSV (or .tsv) table; `text_columns` are kept as written (a severity `2` stays "2", not 2.0)."""
    if not path.is_file():
        raise PerceptcoreError(f"file not found: {path}", where)
    try:
        table = pd.read_csv(path, sep=None if path.suffix == ".tsv" else ",", engine="python" if path.suffix == ".tsv" else "c",
                            dtype={c: str for c in text_columns})
    except pd.errors.EmptyDataError:
        raise PerceptcoreError(f"{path}: file is empty", where) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PerceptcoreError(f"{path}: not a readable CSV table: {exc}", where) from None
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
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; the table has "
            f"{', '.join(map(repr, table.columns))}",
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
    if {"y_l", "y_r"} <= set(table.columns):
        table = _breasts_from_published_exams(table)
        id_columns, label_column = ("case",), "label"
    require_columns(table, [*id_columns, label_column], path, where)
    ids = case_ids(table, id_columns)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        row = duplicated.index[0]
        raise PerceptcoreError(f"{path}: row {row + 2}: case id {duplicated.iloc[0]!r} appears twice", where)
    labels = table[label_column].astype(str).str.strip()
    if positive_label not in set(labels):
        raise PerceptcoreError(
            f"{path}: no case has label {positive_label!r} in column {label_column!r} "
            f"(labels present: {', '.join(sorted(set(labels)))})",
            where,
        )
    out = table.drop(columns=[c for c in ("case", "label", "positive") if c in table.columns])
    out.insert(0, "case", ids.to_numpy())
    out.insert(1, "label", labels.to_numpy())
    out.insert(2, "positive", (labels == positive_label).to_numpy())
    return Cases(out.reset_index(drop=True), positive_label)


def _breasts_from_published_exams(exams: pd.DataFrame) -> pd.DataFrame:
    """The published exam_info.csv (one row per exam, `_l`/`_r` columns) as one row per breast."""
    rows = []
    for side, suffix in zip(SIDES, ("_l", "_r")):
        part = pd.DataFrame({"exam": np.arange(len(exams)), "side": side})
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
            f"{path}: row {row + 2}: severity {values.iloc[row]!r} is not one of the spec's severities "
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
            f"{path}: row {row + 2}: case {ids.iloc[row]!r} is not in the cases table "
            f"({int(unknown.sum())} row(s) name unknown cases)",
            where,
        )
    return positions.to_numpy(int)


def _check_predictions(values: np.ndarray, path, where, rows=None) -> None:
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        place = f"row {rows[i] + 2}: " if rows is not None else ""
        raise PerceptcoreError(
            f"{path}: {place}prediction {float(values[i])!r} is not a probability or 0/1 call in [0, 1]", where
        )


def _tidy_prediction_values(table: pd.DataFrame, column: str, path, where) -> np.ndarray:
    """The prediction column as floats; a bad cell is reported as written in the file."""
    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if pd.isna(raw.iloc[i]):
            raise PerceptcoreError(f"{path}: row {i + 2}: prediction is missing", where)
        shown = raw.iloc[i] if isinstance(raw.iloc[i], str) else float(values[i])
        raise PerceptcoreError(
            f"{path}: row {i + 2}: prediction {shown!r} is not a probability or 0/1 call in [0, 1]", where
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
        readers, values = _published_predictions(path, cases, len(levels), where)
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
            f"{path}: rows {row + 2} and {again + 2}: reader {readers_col.iloc[row]!r} has more than one prediction "
            f"for case {case_ids(table, id_columns).iloc[row]!r} at severity {table[names['severity']].iloc[row]!r}",
            where,
        )
    values = np.full((len(readers), len(levels), len(cases)), np.nan)
    values[r, s, n] = prediction
    return readers, values


def _published_predictions(path, cases, n_levels, where):
    """(readers, severities, exams, 2 sides) predictions, optionally as a (pred, mask) tuple."""
    loaded = load_array_pickle(path, where)
    if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
        pred, mask = (np.asarray(a) for a in loaded)
    else:
        pred, mask = np.asarray(loaded), None
    if pred.ndim != 4 or pred.shape[3] != 2 or pred.shape[1] != n_levels:
        raise PerceptcoreError(
            f"{path}: expected predictions of shape (observers, {n_levels} severities, exams, 2 sides), "
            f"got {pred.shape}",
            where,
        )
    if mask is not None and mask.shape != pred.shape[:3]:
        raise PerceptcoreError(f"{path}: mask of shape {mask.shape} does not match predictions {pred.shape}", where)
    values = pred.astype(float)
    if mask is not None:
        values[~mask.astype(bool)] = np.nan
    _check_predictions(values[np.isfinite(values)], path, where)
    n_exams = pred.shape[2]
    order = _published_case_positions(range(n_exams), cases, path, where)
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
    exam_list = load_array_pickle(exams, f"{where}.exams")
    exam_list = [int(e) for e in np.asarray(exam_list).ravel()]
    values = {}
    for region, path in zip(REGIONS, (interior, exterior)):
        key = f"{where}.{region.removeprefix('roi_')}"
        array = np.asarray(load_array_pickle(path, key), dtype=float)
        if array.ndim != 5 or array.shape[2] != n_levels or array.shape[3] != len(exam_list) or array.shape[4] != 2:
            raise PerceptcoreError(
                f"{path}: expected shape (annotators, seeds, {n_levels} severities, {len(exam_list)} exams, 2 sides), "
                f"got {array.shape}",
                key,
            )
        _check_predictions(array.ravel(), path, key)
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
            f"{path}: row {row + 2}: region {regions.iloc[row]!r} is not one of {', '.join(REGIONS)}", where
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
            f"{path}: rows {row + 2} and {again + 2}: annotator {table[names['annotator']].astype(str).iloc[row]!r}, "
            f"reader {table[names['reader']].astype(str).iloc[row]!r} has more than one {regions.iloc[row]} "
            f"prediction for case {case_ids(table, id_columns).iloc[row]!r} at severity "
            f"{table[names['severity']].iloc[row]!r}",
            where,
        )
    roi_cases, local = np.unique(n, return_inverse=True)
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
