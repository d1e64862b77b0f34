"""Hostile data files: each ends in one located error, quickly, or (for reordered exams keyed by
their id) in exactly the result of the well-formed file. Files are built small in tmp_path; the
published data is read in place and its tests skip when it is absent."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal

import numpy as np
import pandas as pd
import pytest

from perceptcore.cli import main
from perceptcore.data import load_array_pickle, load_cases, load_observer_group, load_roi_published, read_table
from perceptcore.errors import PerceptcoreError
from perceptcore.images import load_manifest, read_file
from perceptcore.spec import load_spec
from synthetic import write_study

LEVELS = ("0", "1", "2")
PUBLISHED_LEVELS = ("0", "0.17", "0.22", "0.33", "0.5", "0.67", "1", "2", "4")
WHERE = "observers[0].predictions"


@contextlib.contextmanager
def deadline(seconds=20):
    """Turn a hang into a test failure."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused(call, *fragments, where=None, seconds=20):
    with deadline(seconds), pytest.raises(PerceptcoreError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    if where is not None:
        assert info.value.where.endswith(where)
    return message


# --------------------------------------------------------------------------- pickles

def _nested(depth: int) -> bytes:
    """A protocol-2 pickle of `depth` lists, each holding the next, written opcode by opcode
    (pickle.dumps itself would overflow the stack)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _shared(depth: int, width: int = 2) -> bytes:
    """A list of `width` references to one list of `width` references to ... : a few hundred bytes
    that unfold into width**depth items."""
    x = [0.5]
    for _ in range(depth):
        x = [x] * width
    return pickle.dumps(x, protocol=4)


def _cyclic() -> bytes:
    x = []
    x.append(x)
    return pickle.dumps(x)


@pytest.mark.parametrize("data, fragment", [
    (_cyclic(), "nested more than 32 deep (or holding themselves)"),
    (_nested(100_000), "nested more than 32 deep"),
    (_nested(40), "nested more than 32 deep"),
    (_shared(40), "nested more than 32 deep"),
    (_shared(25), "lists of more than 1,000,000 items in all"),
    (_shared(4, 1000), "lists of more than 1,000,000 items in all"),
    (pickle.dumps([1, 10 ** 40]), "an integer of 133 bits"),
], ids=["cycle", "100k-nested", "40-nested", "shared-deep", "shared-2^25", "shared-1000^4", "big-int"])
def test_pickle_graphs_are_refused_quickly(tmp_path, data, fragment):
    path = tmp_path / "preds.pkl"
    path.write_bytes(data)
    assert len(data) < 20_000 or fragment.startswith("nested")
    refused(lambda: load_array_pickle(path, WHERE), str(path), fragment, where=WHERE, seconds=10)


def test_a_named_pipe_is_refused_not_read(tmp_path):
    for name, load in (("preds.pkl", lambda p: load_array_pickle(p, WHERE)),
                       ("cases.csv", lambda p: read_table(p, "cases.file")),
                       ("image.npy", lambda p: read_file(p, "images"))):
        path = tmp_path / name
        os.mkfifo(path)
        refused(lambda: load(path), str(path), "is a pipe, socket or device, not a regular file", seconds=5)


def test_ragged_lists_are_a_located_error(tmp_path):
    path = tmp_path / "preds.pkl"
    path.write_bytes(pickle.dumps([[[[0.5, 0.5]]], [[[0.5]]], [[[0.5]]]]))
    cases = _published_cases(tmp_path)
    refused(lambda: load_observer_group("dnns", path, "auto", {}, cases, LEVELS, WHERE), str(path),
            "not a regular array of numbers", where=WHERE)


# --------------------------------------------------------------------------- .npy images

def _npy_with_header(path, shape, data=b"\0" * 64):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": shape})
        f.write(data)


def test_npy_header_claiming_a_huge_array_is_refused_before_loading(tmp_path):
    path = tmp_path / "image.npy"
    _npy_with_header(path, (10 ** 6, 10 ** 6))
    fragments = ("the header claims a 1000000x1000000 array of uint16 (2,000,000,000,000 bytes)",
                 "the file holds 64 bytes")
    refused(lambda: read_file(path, "images"), str(path), *fragments)
    manifest = _manifest(tmp_path, "image.npy")
    refused(lambda: load_manifest(manifest, "images.manifest"), "row 2: column 'file'", *fragments)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (4, 0)])
def test_empty_npy_image_is_refused(tmp_path, shape):
    path = tmp_path / "image.npy"
    np.save(path, np.zeros(shape, np.uint16))
    refused(lambda: read_file(path, "images"), f"the image is empty ({shape[0]}x{shape[1]} pixels)")
    manifest = _manifest(tmp_path, "image.npy")
    refused(lambda: load_manifest(manifest, "images.manifest"), "row 2: column 'file'", "the image is empty")


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_empty_png_and_dicom_images_are_refused(tmp_path, kind):
    from test_images import png_bytes, write_dicom

    path = tmp_path / f"image.{kind}"
    if kind == "png":
        path.write_bytes(png_bytes(np.zeros((0, 4), np.uint16), 16, 0))
    else:
        write_dicom(path, np.zeros((0, 4), np.uint16), pixel_spacing=(0.1, 0.1))
    refused(lambda: read_file(path, "images"), str(path), "is empty")
    manifest = _manifest(tmp_path, path.name)
    refused(lambda: load_manifest(manifest, "images.manifest"), "row 2: column 'file'", "is empty")


def _manifest(folder, file):
    path = folder / "manifest.csv"
    pd.DataFrame([{"case": "c1", "view": "CC", "laterality": "L", "file": file, "pixel_spacing_mm": 0.1}]).to_csv(
        path, index=False)
    return path


# --------------------------------------------------------------------------- the published layout

def _exam_table(n=6):
    labels = [("malignant", "benign"), ("benign", "nonbiopsied"), ("nonbiopsied", "malignant"),
              ("malignant", "nonbiopsied"), ("benign", "benign"), ("nonbiopsied", "nonbiopsied")]
    subgroups = {"malignant": "microcalcifications", "benign": "soft_tissue_lesions", "nonbiopsied": "nonbiopsied"}
    return pd.DataFrame({
        "test_set_idx": [100 + 7 * e for e in range(n)],
        "y_l": [labels[e][0] for e in range(n)], "y_r": [labels[e][1] for e in range(n)],
        "subgroup_l": [subgroups[labels[e][0]] for e in range(n)],
        "subgroup_r": [subgroups[labels[e][1]] for e in range(n)],
    })


def _published_cases(folder, edit=None, name="exam_info.csv"):
    table = _exam_table()
    if edit is not None:
        table = edit(table)
    table.to_csv(folder / name, index=False)
    return load_cases(folder / name, ("case",), "label", "malignant", "cases.file")


def _radiologists(seed=0, readers=3, exams=6):
    """(pred, mask): every reader reads every exam at one severity, 0/1 calls; unread cells hold 0."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((readers, len(LEVELS), exams), np.int64)
    for r in range(readers):
        mask[r, rng.integers(len(LEVELS), size=exams), np.arange(exams)] = 1
    mask[:, 0, 0] = 1  # every reader reads something at the reference
    pred = (rng.random((readers, len(LEVELS), exams, 2)) < 0.5).astype(np.int64) * mask[..., None]
    return pred, mask


def _load(folder, cases, value, name="radiologists.pkl"):
    path = folder / name
    path.write_bytes(pickle.dumps(value))
    return load_observer_group("radiologists", path, "auto", {}, cases, LEVELS, WHERE)


@pytest.mark.parametrize("fill, fragment", [
    (-1, "read mask value -1.0 at [0, 0, 1] (reader01, severity '0', exam 1); the mask holds 1 (read) or 0 (not read)"),
    (2, "read mask value 2.0"),
    (np.nan, "read mask value nan"),
])
def test_read_mask_is_0_or_1(tmp_path, fill, fragment):
    pred, mask = _radiologists()
    group = _load(tmp_path, _published_cases(tmp_path), (pred, mask.astype(float)))
    assert int(np.isfinite(group.values).sum()) == int(mask.sum()) * 2 and not group.soft
    mask = mask.astype(float)
    mask[mask == 0] = fill  # e.g. -1 for "not read": read as True it would add every unread cell
    path = tmp_path / "radiologists.pkl"
    path.write_bytes(pickle.dumps((pred, mask)))
    cases = _published_cases(tmp_path)
    refused(lambda: load_observer_group("radiologists", path, "auto", {}, cases, LEVELS, WHERE), str(path), fragment,
            where=WHERE)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1.5])
def test_read_cells_are_finite_probabilities(tmp_path, value):
    pred, mask = _radiologists()
    pred = pred.astype(float)
    pred[mask == 0] = value  # cells not read may hold anything
    group = _load(tmp_path, _published_cases(tmp_path), (pred, mask))
    assert int(np.isfinite(group.values).sum()) == int(mask.sum()) * 2
    r, s, e = (int(i) for i in np.argwhere(mask == 1)[3])
    pred[r, s, e, 1] = value
    path = tmp_path / "radiologists.pkl"
    path.write_bytes(pickle.dumps((pred, mask)))
    cases = _published_cases(tmp_path)
    refused(lambda: load_observer_group("radiologists", path, "auto", {}, cases, LEVELS, WHERE), str(path),
            f"prediction {float(value)!r} at [{r}, {s}, {e}, 1] (reader{r + 1:02d}, severity {LEVELS[s]!r}, exam {e}, "
            "right) is not a probability", where=WHERE)
    # Without a mask every cell is read: an inf among dense predictions is refused too.
    path.write_bytes(pickle.dumps(pred))
    pred[mask == 0] = 0.5
    path.write_bytes(pickle.dumps(pred))
    refused(lambda: load_observer_group("dnns", path, "auto", {}, cases, LEVELS, WHERE), "is not a probability")


@pytest.mark.parametrize("label, fragment", [
    ("malignnt", "label 'malignnt' is not one of malignant, benign, nonbiopsied; did you mean 'malignant'?"),
    ("Malignant", "label 'Malignant' is not one of malignant, benign, nonbiopsied; did you mean 'malignant'?"),
    ("bening", "did you mean 'benign'?"),
    ("", "column 'y_r' is empty"),
    ("x" * 5000, "label 'xxxxx"),
])
def test_published_labels_come_from_the_known_set(tmp_path, label, fragment):
    def edit(table):
        table.loc[3, "y_r"] = label
        return table
    message = refused(lambda: _published_cases(tmp_path, edit), "exam_info.csv: row 5: column 'y_r'", fragment,
                      where="cases.file")
    assert len(message) < 400


@pytest.mark.parametrize("label, fragment", [
    ("malignnt", "label 'malignnt' in column 'label' looks like a slip of the positive label 'malignant'"),
    ("Malignant", "label 'Malignant' in column 'label' looks like a slip"),
    ("", "column 'label' is empty"),
])
def test_tidy_labels_that_slip_are_refused(tmp_path, label, fragment):
    table = pd.DataFrame({"case": ["a", "b", "c", "d"], "label": ["malignant", "benign", label, "benign"]})
    table.to_csv(tmp_path / "cases.csv", index=False)
    refused(lambda: load_cases(tmp_path / "cases.csv", ("case",), "label", "malignant", "cases.file"),
            "cases.csv: row 4:", fragment, where="cases.file")
    # A label holding the positive one (or held in it) is a class of its own, not a slip.
    table = pd.DataFrame({"case": list("abcd"), "label": ["abnormal", "normal", "abnormal", "normal"]})
    table.to_csv(tmp_path / "cases.csv", index=False)
    cases = load_cases(tmp_path / "cases.csv", ("case",), "label", "abnormal", "cases.file")
    assert cases.positive.tolist() == [True, False, True, False]


def test_empty_case_id_is_refused(tmp_path):
    table = pd.DataFrame({"exam_id": [0, 1, None], "side": ["left", "left", "left"],
                          "label": ["malignant", "benign", "benign"]})
    table.to_csv(tmp_path / "cases.csv", index=False)
    refused(lambda: load_cases(tmp_path / "cases.csv", ("exam_id", "side"), "label", "malignant", "cases.file"),
            "cases.csv: row 4: column 'exam_id' is empty")


def test_exams_keyed_by_exam_id_give_the_same_result_in_any_row_order(tmp_path):
    pred, mask = _radiologists()
    plain = _published_cases(tmp_path, name="plain.csv")
    keyed = _published_cases(tmp_path, lambda t: t.assign(exam_id=range(len(t))), name="keyed.csv")
    shuffled = _published_cases(tmp_path, lambda t: t.assign(exam_id=range(len(t))).sample(frac=1, random_state=3),
                                name="shuffled.csv")
    assert pd.read_csv(tmp_path / "shuffled.csv")["exam_id"].tolist() != list(range(6))
    pd.testing.assert_frame_equal(shuffled.table, keyed.table)
    pd.testing.assert_frame_equal(keyed.table.drop(columns=["exam_id"]), plain.table)
    reference = _load(tmp_path, plain, (pred, mask)).values
    np.testing.assert_array_equal(_load(tmp_path, shuffled, (pred, mask)).values, reference)


@pytest.mark.parametrize("exam_id, fragment", [
    ([0, 1, 2, 3, 4, 4], "rows 6 and 7: exam_id 4 appears twice"),
    ([0, 1, 2, 3, 4, -5], "row 7: exam_id -5 is not the exam's index"),
    ([0, 1, 2, 3, 4, 5.5], "row 7: exam_id 5.5 is not the exam's index"),
    ([0, 1, 2, 3, 4, None], "row 7: exam_id nan is not the exam's index"),
])
def test_bad_exam_ids_are_refused(tmp_path, exam_id, fragment):
    refused(lambda: _published_cases(tmp_path, lambda t: t.assign(exam_id=exam_id)), "exam_info.csv: ", fragment)


@pytest.mark.parametrize("exams, fragment", [
    ([0, 1, float("nan")], "item 2: nan is not an exam index"),
    ([0, 1, 1.5], "item 2: 1.5 is not an exam index"),
    ([0, 2, 2], "items 1 and 2: exam 2 is listed twice"),
])
def test_bad_annotation_exam_lists_are_refused(tmp_path, exams, fragment):
    cases = _published_cases(tmp_path)
    roi = np.full((2, 2, len(LEVELS), len(exams), 2), 0.5)
    for name, value in (("exams.pkl", exams), ("interior.pkl", roi), ("exterior.pkl", roi)):
        (tmp_path / name).write_bytes(pickle.dumps(value))
    refused(lambda: load_roi_published(tmp_path / "interior.pkl", tmp_path / "exterior.pkl", tmp_path / "exams.pkl",
                                       cases, len(LEVELS), "roi"), "exams.pkl: ", fragment, where="roi.exams")


def test_roi_cells_are_located(tmp_path):
    cases = _published_cases(tmp_path)
    roi = np.full((2, 2, len(LEVELS), 3, 2), 0.5)
    roi[1, 0, 2, 1, 0] = np.inf
    for name, value in (("exams.pkl", [4, 0, 2]), ("interior.pkl", np.full_like(roi, 0.5)), ("exterior.pkl", roi)):
        (tmp_path / name).write_bytes(pickle.dumps(value))
    refused(lambda: load_roi_published(tmp_path / "interior.pkl", tmp_path / "exterior.pkl", tmp_path / "exams.pkl",
                                       cases, len(LEVELS), "roi"),
            "exterior.pkl: prediction inf at [1, 0, 2, 1, 0] (annotator2, reader01, severity index 2, exam 0, left)",
            where="roi.exterior")


# --------------------------------------------------------------------------- the published data, in place

@pytest.fixture(scope="module")
def published(shared_data):
    folder = shared_data / "perception_comparison" / "published"
    if not (folder / "exam_info.csv").exists():
        pytest.skip(f"the published data is not at {folder}")
    return folder


def test_published_exams_reordered_are_refused(published, tmp_path):
    exams = pd.read_csv(published / "exam_info.csv").sample(frac=1, random_state=0)
    exams.to_csv(tmp_path / "exam_info.csv", index=False)
    refused(lambda: load_cases(tmp_path / "exam_info.csv", ("case",), "label", "malignant", "cases.file"),
            "the released exams in another order; the arrays index exams by row", "add an exam_id column")


def test_published_exams_keyed_by_exam_id_load_the_same_in_any_order(published, tmp_path):
    original = load_cases(published / "exam_info.csv", ("case",), "label", "malignant", "cases.file")
    exams = pd.read_csv(published / "exam_info.csv")
    exams.insert(0, "exam_id", range(len(exams)))
    exams.sample(frac=1, random_state=0).to_csv(tmp_path / "exam_info.csv", index=False)
    shuffled = load_cases(tmp_path / "exam_info.csv", ("case",), "label", "malignant", "cases.file")
    pd.testing.assert_frame_equal(shuffled.table.drop(columns=["exam_id"]), original.table)
    predictions = published / "observed_predictions" / "perturbation_study"
    for path in (predictions / "radiologists.pkl", predictions / "dnns" / "gmic" / "filtered.pkl"):
        a = load_observer_group("x", path, "auto", {}, original, PUBLISHED_LEVELS, WHERE)
        b = load_observer_group("x", path, "auto", {}, shuffled, PUBLISHED_LEVELS, WHERE)
        np.testing.assert_array_equal(a.values, b.values)
    roi = published / "observed_predictions" / "annotation_study" / "gmic"
    exam_list = published / "annotation_study_idxs.pkl"
    a, b = (load_roi_published(roi / "roi_interior.pkl", roi / "roi_exterior.pkl", exam_list, cases, 9, "roi")
            for cases in (original, shuffled))
    np.testing.assert_array_equal(a.cases, b.cases)
    for region in a.values:
        np.testing.assert_array_equal(a.values[region], b.values[region])


# --------------------------------------------------------------------------- severities and big tables

@pytest.mark.parametrize("levels, where, fragment", [
    ("[1, 0.5, 0]", "severities.levels[1]", "severity '0.5' does not exceed the one before it ('1')"),
    ("[0, 1, 0.5]", "severities.levels[2]", "severity '0.5' does not exceed the one before it ('1')"),
    ("[0, -0.5, 1]", "severities.levels[1]", "severity '-0.5' is not a number >= 0"),
    ("[0, null, 1]", "severities.levels[1]", "is not a number >= 0"),
    ("[0, mild, strong]", "severities.levels[1]", "severity 'mild' is not a number >= 0"),
])
def test_severity_levels_must_increase_from_the_reference(tmp_path, levels, where, fragment):
    spec = write_study(tmp_path)
    refused(lambda: load_spec(spec, [f"severities.levels={levels}"]), fragment, where=where)


def test_a_million_row_junk_table_gets_a_short_error(tmp_path, capsys):
    spec = write_study(tmp_path)
    rng = np.random.default_rng(0)
    junk = "\n".join(f"c{i},junk{v}" for i, v in enumerate(rng.integers(0, 10 ** 12, size=1_000_000)))
    (tmp_path / "cases.csv").write_text("case,label\n" + junk + "\n")
    with deadline(120):
        code = main(["validate", str(spec)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000, err[:2000]
    assert "no case has label 'malignant'" in err and "(1000000 in all)" in err


@pytest.mark.parametrize("column, value", [("call", "7" * 10_000), ("call", "x" * 10_000), ("case", "c" * 10_000)],
                         ids=["long-number", "long-text", "long-case"])
def test_worksheet_values_are_echoed_short(tmp_path, column, value):
    from perceptcore.reader_study import import_reads

    assignment = pd.DataFrame({"reader": ["r1"], "order": [1], "exam": ["e1"], "severity": ["0"]})
    row = {"reader": "r1", "order": 1, "exam": "e1", "case": "e1/left", "call": "1", column: value}
    pd.DataFrame([row]).to_csv(tmp_path / "r1.csv", index=False)
    message = refused(lambda: import_reads(assignment, {"e1": ["e1/left"]}, [tmp_path / "r1.csv"]), "r1.csv: row 2")
    assert len(message) < 300


def test_a_table_of_countless_readers_is_refused_before_allocating(tmp_path, monkeypatch):
    import perceptcore.data

    # The real bound is 2**28 cells; a smaller one keeps the test small (and fails without the bound).
    monkeypatch.setattr(perceptcore.data, "MAX_CELLS", 10_000, raising=False)
    table = pd.DataFrame({"case": [f"c{i}" for i in range(60)], "label": ["malignant", "benign"] * 30})
    table.to_csv(tmp_path / "cases.csv", index=False)
    cases = load_cases(tmp_path / "cases.csv", ("case",), "label", "malignant", "cases.file")
    junk = pd.DataFrame({"reader": [f"r{i}" for i in range(200)], "severity": "0", "case": "c1", "prediction": 0.5})
    junk.to_csv(tmp_path / "dnns.csv", index=False)
    refused(lambda: load_observer_group("dnns", tmp_path / "dnns.csv", "auto", {}, cases, LEVELS, WHERE),
            "dnns.csv: 200 readers x 3 severities x 60 cases make 36,000 prediction cells, more than the 10,000",
            where=WHERE)
