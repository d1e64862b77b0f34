"""Loaders, the safe unpickler, subgroup derivation, the KS statistics and spec parsing."""

from __future__ import annotations

import codecs
import collections
import datetime
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from perceptcore.data import (load_array_pickle, load_cases, load_observer_group, load_roi_published,
                              load_roi_tidy)
from perceptcore.errors import PerceptcoreError
from perceptcore.spec import load_spec
from perceptcore.stats import ks_statistic, separability_summary
from perceptcore_plugins.subgroups.breast_lesions import BreastLesions
from synthetic import write_study

LEVELS = ("0", "0.17", "0.22", "0.33", "0.5", "0.67", "1", "2", "4")
TIDY_COLUMNS = {"severity": "severity_mm", "case": ["exam_id", "side"]}


# --------------------------------------------------------------------------- tidy vs published (shared data)

@pytest.fixture(scope="module")
def both_layouts(shared_data):
    root = shared_data / "perception_comparison"
    published = load_cases(root / "published" / "exam_info.csv", ("case",), "label", "malignant", "cases.file")
    tidy = load_cases(root / "tidy" / "cases.csv", ("exam_id", "side"), "label", "malignant", "cases.file")
    return root, published, tidy


def test_cases_are_the_same_in_both_layouts(both_layouts):
    _, published, tidy = both_layouts
    assert len(published) == len(tidy) == 1440
    assert published.ids == tidy.ids
    assert published.ids[:3] == ["0/left", "0/right", "1/left"]
    np.testing.assert_array_equal(published.positive, tidy.positive)
    np.testing.assert_array_equal(published.table["label"], tidy.table["label"])
    np.testing.assert_array_equal(published.table["subgroup"], tidy.table["subgroup"])
    # The subgroup-column path of breast_lesions reads that same column in both layouts.
    for cases in (published, tidy):
        assigned = BreastLesions().assign(cases.table, {}, "subgroups.options")
        np.testing.assert_array_equal(assigned, cases.table["subgroup"])


@pytest.mark.parametrize("observer, pickle_path", [
    ("radiologists", "perturbation_study/radiologists.pkl"),
    ("gmic_trained_unperturbed", "perturbation_study/dnns/gmic/unperturbed.pkl"),
    ("gmic_trained_filtered", "perturbation_study/dnns/gmic/filtered.pkl"),
])
def test_predictions_are_the_same_in_both_layouts(both_layouts, observer, pickle_path):
    root, published_cases, tidy_cases = both_layouts
    published = load_observer_group(observer, root / "published" / "observed_predictions" / pickle_path, "auto", {},
                                    published_cases, LEVELS, "observers[0].predictions")
    tidy = load_observer_group(observer, root / "tidy" / f"{observer}.csv", "auto", TIDY_COLUMNS, tidy_cases, LEVELS,
                               "observers[0].predictions")
    assert published.values.shape == tidy.values.shape
    assert published.values.shape[1:] == (9, 1440)
    np.testing.assert_array_equal(published.values, tidy.values)  # NaN (unread) cells in the same places
    assert published.soft == tidy.soft == (observer != "radiologists")
    assert published.dense == tidy.dense == (observer != "radiologists")


def test_roi_predictions_are_the_same_in_both_layouts(both_layouts):
    root, published_cases, tidy_cases = both_layouts
    roi = root / "published" / "observed_predictions" / "annotation_study" / "gmic"
    published = load_roi_published(roi / "roi_interior.pkl", roi / "roi_exterior.pkl",
                                   root / "published" / "annotation_study_idxs.pkl", published_cases, 9, "roi")
    tidy = load_roi_tidy(root / "tidy" / "gmic_roi.csv", TIDY_COLUMNS, tidy_cases, LEVELS, "roi.predictions")
    assert len(published.annotators) == len(tidy.annotators) == 7
    assert len(published.readers) == len(tidy.readers) == 5
    # Published cases come in the exam list's order, tidy ones sorted: align, then compare.
    order = np.argsort(published.cases)
    np.testing.assert_array_equal(published.cases[order], tidy.cases)
    assert len(tidy.cases) == 240
    for region in ("roi_interior", "roi_exterior"):
        np.testing.assert_array_equal(published.values[region][..., order], tidy.values[region])


# --------------------------------------------------------------------------- the safe unpickler

PLAIN = [
    np.arange(12.0).reshape(3, 4),
    np.arange(6, dtype=np.int32).reshape(2, 3),
    np.array([True, False, True]),
    np.arange(10, dtype=np.uint8)[::3],  # not contiguous
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.float32(2.5) * np.ones((2, 2, 2), np.float32),
    np.array(3.0),  # 0-d
    np.float64(0.25),
    [np.zeros(3), np.ones(2)],
    (np.arange(4).reshape(2, 2), np.array([[1, 0], [0, 1]], dtype=np.int8)),
    [1, 2.5, (3, [4.0, np.int64(5)])],
]


def _same(a, b):
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert type(a) is type(b)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("value", PLAIN, ids=range(len(PLAIN)))
def test_safe_unpickler_round_trips_plain_arrays(tmp_path, value, protocol):
    path = tmp_path / "value.pkl"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    _same(value, load_array_pickle(path, "observers[0].predictions"))


class _CodecCall:
    def __reduce__(self):
        return codecs.encode, ("payload", "rot13")


@pytest.mark.parametrize("value, refused", [
    (collections.OrderedDict(a=1), "collections.OrderedDict"),
    (datetime.date(2022, 5, 1), "datetime.date"),
    (pd.DataFrame({"a": [1.0]}), "pandas."),
    (Fraction(1, 3), "fractions.Fraction"),
    (complex(1, 2), "builtins.complex"),
    (_CodecCall(), "_codecs.encode other than the latin-1 bytes"),
])
def test_safe_unpickler_refuses_other_globals(tmp_path, value, refused):
    path = tmp_path / "value.pkl"
    path.write_bytes(pickle.dumps(value))
    with pytest.raises(PerceptcoreError) as info:
        load_array_pickle(path, "roi.interior")
    assert info.value.where == "roi.interior"
    assert f"{path}: not a plain-array pickle: refusing" in info.value.message
    assert refused in info.value.message


@pytest.mark.parametrize("value, message", [
    ({"a": np.zeros(2)}, "holds a dict, expected arrays"),
    ([np.zeros(2), "text"], "holds a str, expected arrays"),
    (np.array([1, None], dtype=object), "array of dtype object is not numeric"),
    (np.array(["a", "b"]), "array of dtype <U1 is not numeric"),
])
def test_safe_unpickler_refuses_non_numeric_content(tmp_path, value, message):
    path = tmp_path / "value.pkl"
    path.write_bytes(pickle.dumps(value))
    with pytest.raises(PerceptcoreError, match=message):
        load_array_pickle(path, "roi.exams")


# --------------------------------------------------------------------------- breast_lesions

def _findings_table(rows, biopsied=None):
    columns = ["calcification", "mass", "asymmetry", "architectural_distortion", "label"]
    table = pd.DataFrame(rows, columns=columns)
    table.insert(0, "case", [f"c{i}" for i in range(len(table))])
    if biopsied is not None:
        table["biopsied"] = biopsied
    return table


# (calcification, mass, asymmetry, architectural_distortion, label) -> subgroup
FINDINGS_RULES = [
    ((1, 0, 0, 0, "malignant"), "microcalcifications"),
    ((1, 0, 0, 0, "benign"), "microcalcifications"),
    ((0, 1, 0, 0, "malignant"), "soft_tissue_lesions"),
    ((0, 0, 1, 0, "benign"), "soft_tissue_lesions"),
    ((0, 0, 0, 1, "malignant"), "soft_tissue_lesions"),
    ((0, 1, 1, 1, "malignant"), "soft_tissue_lesions"),
    ((1, 1, 0, 0, "malignant"), "mixed"),
    ((1, 0, 0, 1, "benign"), "mixed"),
    ((1, 1, 1, 1, "malignant"), "mixed"),
    ((0, 0, 0, 0, "malignant"), "occult"),
    ((0, 0, 0, 0, "benign"), "occult"),
    ((0, 0, 0, 0, "nonbiopsied"), "nonbiopsied"),
    ((1, 0, 0, 0, "nonbiopsied"), "nonbiopsied"),  # not biopsied wins over a visible finding
    ((0, 1, 0, 0, "nonbiopsied"), "nonbiopsied"),
]


def test_breast_lesions_from_findings_follow_the_rules():
    table = _findings_table([row for row, _ in FINDINGS_RULES])
    assigned = BreastLesions().assign(table, {}, "subgroups.options")
    assert list(assigned) == [expected for _, expected in FINDINGS_RULES]


def test_breast_lesions_biopsied_column_and_yes_no_words():
    rows = [
        (("yes", "no", "", "n", "benign"), "yes", "microcalcifications"),
        (("True", "False", "F", "0", "malignant"), "Y", "microcalcifications"),
        (("t", "1", "no", "no", "malignant"), "true", "mixed"),
        (("no", "no", "no", "no", "malignant"), "1", "occult"),
        (("no", "yes", "no", "no", "malignant"), "no", "nonbiopsied"),  # the column, not the label, decides
        (("no", "no", "no", "no", "nonbiopsied"), "0", "nonbiopsied"),
    ]
    table = _findings_table([r for r, _, _ in rows], biopsied=[b for _, b, _ in rows])
    assigned = BreastLesions().assign(table, {}, "subgroups.options")
    assert list(assigned) == [expected for _, _, expected in rows]


def test_breast_lesions_findings_mapped_to_other_columns():
    table = pd.DataFrame({"case": ["a", "b", "c", "d"], "label": ["malignant", "benign", "malignant", "benign"],
                          "calc": [1, 0, 1, 0], "has_mass": [0, 1, 1, 0], "asymmetry": 0,
                          "architectural_distortion": [0, 0, 0, 1], "subgroup": "occult", "was_biopsied": [1, 1, 1, 0]})
    options = {"findings": {"calcification": "calc", "mass": "has_mass"}, "biopsied": "was_biopsied"}
    # `findings` given: the findings decide even though a subgroup column exists.
    assigned = BreastLesions().assign(table, options, "subgroups.options")
    assert list(assigned) == ["microcalcifications", "soft_tissue_lesions", "mixed", "nonbiopsied"]


def test_breast_lesions_subgroup_column_path():
    table = pd.DataFrame({"case": ["a", "b", "c"], "label": ["malignant", "benign", "nonbiopsied"],
                          "subgroup": [" mixed", "occult", "nonbiopsied"],
                          "kind": ["microcalcifications", "soft_tissue_lesions", "nonbiopsied"]})
    assert list(BreastLesions().assign(table, {}, "w")) == ["mixed", "occult", "nonbiopsied"]
    assert list(BreastLesions().assign(table, {"column": "kind"}, "w")) == list(table["kind"])


@pytest.mark.parametrize("table, options, where, message", [
    (pd.DataFrame({"case": ["a"], "label": ["benign"], "subgroup": ["calcs"]}), {}, "subgroups.options.column",
     "case 'a' has subgroup 'calcs' in column 'subgroup'; expected one of microcalcifications, soft_tissue_lesions"),
    (pd.DataFrame({"case": ["a"], "label": ["benign"]}), {"column": "sg"}, "subgroups.options.column",
     "the cases table has no column 'sg' (columns: case, label)"),
    (pd.DataFrame({"case": ["a"], "label": ["benign"]}), {"colum": "sg"}, "subgroups.options.colum",
     "unknown option 'colum' for breast_lesions"),
    (_findings_table([(2, 0, 0, 0, "benign")]), {}, "subgroups.options.findings.calcification",
     "case 'c0': '2' in column 'calcification' is not yes/no (1/0)"),
    (_findings_table([(0, 0, 0, 0, "benign")]), {"findings": {"masses": "mass"}}, "subgroups.options.findings.masses",
     "unknown lesion type 'masses'"),
    (_findings_table([(0, 0, 0, 0, "benign")]).drop(columns="asymmetry"), {}, "subgroups.options.findings",
     "lacks finding column(s) 'asymmetry' and no subgroup column was given"),
])
def test_breast_lesions_errors_are_located(table, options, where, message):
    with pytest.raises(PerceptcoreError) as info:
        BreastLesions().assign(table, options, "subgroups.options")
    assert info.value.where == where
    assert message in info.value.message


# --------------------------------------------------------------------------- KS statistics

def _scipy_ks(a, b):
    out = np.empty(a.shape[:-1])
    for index in np.ndindex(out.shape):
        out[index] = stats.ks_2samp(a[index], b[index]).statistic
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("lead", [(), (5,), (3, 4)])
def test_ks_statistic_equals_scipy(ties, lead):
    rng = np.random.default_rng(7)
    n1, n2 = 13, 29
    if ties:
        a = rng.integers(0, 4, size=lead + (n1,)).astype(float)
        b = rng.integers(1, 5, size=lead + (n2,)).astype(float)
    else:
        a = rng.normal(0.3, 1, size=lead + (n1,))
        b = rng.normal(0.0, 1, size=lead + (n2,))
    got = ks_statistic(a, b)
    assert got.shape == lead
    np.testing.assert_allclose(got, _scipy_ks(a, b), rtol=0, atol=1e-12)


def test_ks_statistic_with_values_shared_across_samples():
    # Ties *between* the two samples are where a naive ECDF comparison goes wrong.
    a = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    b = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    assert ks_statistic(a, a) == 0.0
    assert ks_statistic(np.zeros(3), np.ones(4)) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separability_summary_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    ks = rng.uniform(0.2, 0.8, size=(10, 6))
    if seed == 2:
        ks = np.round(ks, 1)  # tied KS statistics
    mean, sd, pvalue = separability_summary(ks)
    np.testing.assert_allclose(mean, ks.mean(axis=0))
    np.testing.assert_allclose(sd, ks.std(axis=0, ddof=1))
    assert np.isnan(pvalue[0])
    for s in range(1, ks.shape[1]):
        expected = stats.ks_2samp(ks[:, 0], ks[:, s], alternative="less").pvalue
        assert pvalue[s] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_separability_summary_direction():
    # Separability falling at every perturbed severity: the one-tailed p-value gets small.
    ks0 = np.linspace(0.7, 0.8, 10)
    ks = np.column_stack([ks0, ks0 - 0.3, ks0 + 0.3])
    _, _, pvalue = separability_summary(ks)
    assert pvalue[1] < 0.001 < 0.5 < pvalue[2]


# --------------------------------------------------------------------------- the spec

def test_severity_labels_keep_their_text(tmp_path):
    spec_path = write_study(tmp_path)
    text = spec_path.read_text()
    start = text.index("severities:")
    end = text.index("subgroups:")
    spec_path.write_text(text[:start] + "severities:\n  unit: mm\n  levels: [0, 0.50, 1.0, '2', 4]\n" + text[end:])
    spec = load_spec(spec_path)
    assert spec.severities.levels == ("0", "0.50", "1.0", "2", "4")
    assert all(isinstance(level, str) for level in spec.severities.levels)


def test_set_overrides(tmp_path):
    spec_path = write_study(tmp_path)
    spec = load_spec(spec_path, [
        "model.draws=77",
        "analyses.alpha=0.01",
        "observers[1].likelihood=soft",
        "model.priors.gamma=0.5",
        "severities.levels=[0, 0.50, 2]",
        "severities.levels[2]=4.0",
        "subgroups.analyse=[microcalcifications, mixed]",
        "study.name=123",
        "outputs.report=true",
    ])
    assert spec.model.draws == 77 and isinstance(spec.model.draws, int)
    assert spec.analyses.alpha == 0.01
    assert spec.observers[1].likelihood == "soft" and spec.observers[0].likelihood == "auto"
    assert spec.model.priors.gamma == 0.5 and spec.model.priors.mu == 1.0
    assert spec.severities.levels == ("0", "0.50", "4.0")
    assert spec.subgroups.analyse == ("microcalcifications", "mixed")
    assert spec.study.name == "123"
    assert spec.outputs.report is True


def test_data_dir_from_the_spec_is_relative_to_the_spec(tmp_path, monkeypatch):
    spec_path = write_study(tmp_path / "study")
    monkeypatch.chdir(tmp_path)
    spec = load_spec(spec_path)
    assert spec.path("cases.csv") == (tmp_path / "study" / "cases.csv").resolve()


def test_set_data_dir_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    spec_path = write_study(tmp_path / "study")
    elsewhere = tmp_path / "work" / "here"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    spec = load_spec(spec_path, ["data_dir=../data", "outputs.dir=runs/a"])
    assert Path(spec.data_dir) == (tmp_path / "work" / "data").resolve()
    assert spec.path("cases.csv") == (tmp_path / "work" / "data" / "cases.csv").resolve()
    assert Path(spec.outputs.dir) == (elsewhere / "runs" / "a").resolve()


@pytest.mark.parametrize("override, where, message", [
    ("model.draws=many", "model.draws", "expected a whole number, got 'many'"),
    ("observers[4].name=x", "--set observers[4].name", "no such list item"),
    ("study.name.first=x", "--set study.name.first", "study.name is not a section"),
    ("=3", "--set", "expected key=value, got '=3'"),
])
def test_bad_set_overrides_are_located(tmp_path, override, where, message):
    spec_path = write_study(tmp_path)
    with pytest.raises(PerceptcoreError) as info:
        load_spec(spec_path, [override])
    assert info.value.where.endswith(where)
    assert message in info.value.message
