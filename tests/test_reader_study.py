"""Reader-study design (every reader reads every exam once; uniform or balanced severities) and
the import of filled worksheets, with its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from perceptcore.cli import main
from perceptcore.reader_study import assign

SEVERITIES = ["0", "0.17", "0.22", "0.33", "0.5", "0.67", "1", "2", "4"]


def exams(n):
    return [f"e{i:03d}" for i in range(n)]


@pytest.mark.parametrize("scheme", ["uniform", "balanced"])
def test_every_reader_reads_every_exam_exactly_once(scheme):
    table = assign(exams(50), ["a", "b", "c"], SEVERITIES, scheme, seed=3)
    for _, rows in table.groupby("reader"):
        assert sorted(rows.exam) == exams(50)
        assert sorted(rows.order) == list(range(1, 51))
    assert set(table.severity) <= set(SEVERITIES)


def test_uniform_draws_each_severity_with_equal_probability_independently():
    table = assign(exams(900), [f"r{i}" for i in range(10)], SEVERITIES, "uniform", seed=0)
    counts = table.severity.value_counts().reindex(SEVERITIES).to_numpy()
    assert stats.chisquare(counts).pvalue > 0.001
    # Readers draw independently: two readers agree on about 1/9 of the exams.
    wide = table.pivot(index="exam", columns="reader", values="severity")
    agreement = (wide["r0"] == wide["r1"]).mean()
    assert abs(agreement - 1 / 9) < 0.05
    # Uniform is not balanced: per-reader counts vary by more than one.
    per_reader = table[table.reader == "r0"].severity.value_counts()
    assert per_reader.max() - per_reader.min() > 1


@pytest.mark.parametrize("n_exams", [90, 95])
def test_balanced_gives_each_reader_each_severity_equally_often(n_exams):
    table = assign(exams(n_exams), [f"r{i}" for i in range(7)], SEVERITIES, "balanced", seed=1)
    for _, rows in table.groupby("reader"):
        counts = rows.severity.value_counts().reindex(SEVERITIES, fill_value=0)
        assert counts.max() - counts.min() <= (0 if n_exams % 9 == 0 else 1)
    totals = table.severity.value_counts().reindex(SEVERITIES, fill_value=0)
    assert totals.max() - totals.min() <= 1


def test_design_is_deterministic_given_the_seed():
    a = assign(exams(40), ["a", "b"], SEVERITIES, "uniform", seed=5)
    assert a.equals(assign(exams(40), ["a", "b"], SEVERITIES, "uniform", seed=5))
    assert not a.equals(assign(exams(40), ["a", "b"], SEVERITIES, "uniform", seed=6))


@pytest.fixture
def design(tmp_path):
    cases = pd.DataFrame({"exam": np.repeat(exams(12), 2), "case": [f"{e}/{s}" for e in exams(12) for s in ("left", "right")]})
    cases.to_csv(tmp_path / "cases.csv", index=False)
    out = tmp_path / "design"
    assert main(["design-reader-study", str(tmp_path / "cases.csv"), "--readers", "3", "--severities", "0", "1", "2",
                 "--scheme", "balanced", "--seed", "2", "--out", str(out)]) == 0
    return out


def fill(design: Path, reader: str, folder: Path, edit=None) -> Path:
    sheet = pd.read_csv(design / "worksheets" / f"{reader}.csv", dtype=str)
    sheet["call"] = [str(i % 2) for i in range(len(sheet))]
    if edit is not None:
        sheet = edit(sheet)
    path = folder / f"filled_{reader}_{len(list(folder.glob('filled_*')))}.csv"
    sheet.to_csv(path, index=False)
    return path


def test_worksheets_are_blinded_and_in_reading_order(design):
    assignment = pd.read_csv(design / "assignment.csv", dtype=str)
    sheet = pd.read_csv(design / "worksheets" / "reader02.csv", dtype=str)
    assert list(sheet.columns) == ["reader", "order", "exam", "case", "call"]  # no severity
    assert sheet.call.isna().all()
    mine = assignment[assignment.reader == "reader02"]
    assert list(dict.fromkeys(sheet.exam)) == list(mine.sort_values("order", key=lambda o: o.astype(int)).exam)
    assert len(sheet) == 24


def test_import_turns_calls_into_predictions_at_the_assigned_severity(design, tmp_path, capsys):
    files = [fill(design, f"reader0{i}", tmp_path) for i in (1, 2, 3)]
    out = tmp_path / "reads.csv"
    assert main(["import-reads", str(design), *map(str, files), "--out", str(out)]) == 0
    reads = pd.read_csv(out, dtype={"severity": str})
    assert list(reads.columns) == ["reader", "severity", "case", "prediction"]
    assignment = pd.read_csv(design / "assignment.csv", dtype=str)
    key = dict(zip(zip(assignment.reader, assignment.exam), assignment.severity))
    for row in reads.itertuples():
        assert row.severity == key[(row.reader, row.case.split("/")[0])]
    assert len(reads) == 3 * 24
    assert "72 calls of the 72" in capsys.readouterr().out


def _reject(design, tmp_path, capsys, edit, *fragments, calls="binary", files=None):
    files = files or [fill(design, "reader01", tmp_path, edit)]
    out = tmp_path / "reads.csv"
    code = main(["import-reads", str(design), *map(str, files), "--calls", calls, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()


def _set(row, column, value):
    def edit(sheet):
        sheet.loc[row, column] = value
        return sheet
    return edit


def test_import_rejects_a_duplicate_call(design, tmp_path, capsys):
    _reject(design, tmp_path, capsys, lambda s: pd.concat([s, s.iloc[[3]]]), "row 26", "called case", "twice")


def test_import_rejects_a_case_called_in_two_files(design, tmp_path, capsys):
    files = [fill(design, "reader01", tmp_path), fill(design, "reader01", tmp_path)]
    _reject(design, tmp_path, capsys, None, "filled_reader01_1.csv: row 2", "twice", files=files)


def test_import_rejects_an_unknown_exam(design, tmp_path, capsys):
    _reject(design, tmp_path, capsys, _set(4, "exam", "e999"), "row 6", "exam 'e999' was not assigned to reader 'reader01'")


def test_import_rejects_an_unknown_reader(design, tmp_path, capsys):
    _reject(design, tmp_path, capsys, _set(0, "reader", "reader99"), "row 2", "reader 'reader99' is not in the assignment")


def test_import_rejects_a_case_of_another_exam(design, tmp_path, capsys):
    def edit(sheet):
        sheet.loc[0, "case"] = sheet.loc[sheet.exam != sheet.exam[0], "case"].iloc[0]
        return sheet
    _reject(design, tmp_path, capsys, edit, "row 2", "is not a case of exam")


@pytest.mark.parametrize("call, message", [("2", "out of range: expected 0 or 1"), ("yes", "is not a number"),
                                           ("", "no call was entered")])
def test_import_rejects_bad_calls(design, tmp_path, capsys, call, message):
    _reject(design, tmp_path, capsys, _set(5, "call", call), "row 7", message)


def test_probability_calls(design, tmp_path, capsys):
    _reject(design, tmp_path, capsys, _set(5, "call", "1.2"), "row 7", "expected a probability in [0, 1]",
            calls="probability")
    path = fill(design, "reader01", tmp_path, _set(5, "call", "0.3"))
    assert main(["import-reads", str(design), str(path), "--calls", "probability", "--out", str(tmp_path / "p.csv")]) == 0


def test_design_refuses_to_overwrite_a_design(design, tmp_path, capsys):
    code = main(["design-reader-study", str(tmp_path / "cases.csv"), "--readers", "2", "--severities", "0", "1",
                 "--out", str(design)])
    assert code == 1 and "already exists" in capsys.readouterr().err


def test_design_errors(tmp_path, capsys):
    pd.DataFrame({"exam": ["a"], "breast": ["a/l"]}).to_csv(tmp_path / "c.csv", index=False)
    code = main(["design-reader-study", str(tmp_path / "c.csv"), "--readers", "2", "--severities", "0", "1",
                 "--out", str(tmp_path / "d")])
    assert code == 1 and "missing column(s) 'case'" in capsys.readouterr().err
    code = main(["design-reader-study", str(tmp_path / "c.csv"), "--case-column", "breast", "--readers", "2",
                 "--severities", "0", "1", "--scheme", "latin", "--out", str(tmp_path / "d")])
    assert code == 1 and "--scheme: unknown scheme 'latin'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_readers_get_their_perturbed_images_in_reading_order(tmp_path):
    import torch
    from PIL import Image

    from imaging import write_imaging_study
    from perceptcore.perturbation import ImageBatch
    from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass

    write_imaging_study(tmp_path / "study", size=64)
    manifest = pd.read_csv(tmp_path / "study" / "manifest.csv")
    manifest.assign(exam=manifest.case)[["exam", "case"]].to_csv(tmp_path / "exams.csv", index=False)
    out = tmp_path / "design"
    assert main(["design-reader-study", str(tmp_path / "exams.csv"), "--readers", "2", "--severities", "0", "0.5", "2",
                 "--images", str(tmp_path / "study" / "manifest.csv"), "--perturbation", "gaussian_lowpass",
                 "--option", "unit=mm", "--out", str(out)]) == 0
    assignment = pd.read_csv(out / "assignment.csv", dtype=str)
    files = sorted((out / "images" / "reader02").glob("*.png"))
    mine = assignment[assignment.reader == "reader02"].sort_values("order", key=lambda o: o.astype(int))
    assert [f.name.split("_")[1] for f in files] == list(mine.exam)  # named in reading order
    for path, row in zip(files, mine.itertuples()):
        source = manifest[manifest.case == row.exam].iloc[0]
        pixels = np.load(tmp_path / "study" / source.file)
        shown = np.asarray(Image.open(path))
        if row.severity == "0":
            assert np.array_equal(shown, pixels)
        else:
            batch = ImageBatch(torch.from_numpy(pixels.astype(np.float32))[None], torch.tensor([0.1]), 4095.0)
            expected = GaussianLowpass().perturb(batch, float(row.severity), GaussianLowpass.Options(), torch.Generator())
            assert np.array_equal(shown, np.rint(expected[0].numpy()).astype(np.uint16))


def test_reader_images_need_a_known_perturbation(tmp_path, capsys):
    from imaging import write_imaging_study

    write_imaging_study(tmp_path / "study", size=32)
    pd.DataFrame({"exam": ["c00"], "case": ["c00"]}).to_csv(tmp_path / "exams.csv", index=False)
    code = main(["design-reader-study", str(tmp_path / "exams.csv"), "--readers", "1", "--severities", "0", "1",
                 "--images", str(tmp_path / "study" / "manifest.csv"), "--perturbation", "gausian_lowpass",
                 "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 1 and "--perturbation: unknown perturbation 'gausian_lowpass'; did you mean 'gaussian_lowpass'?" in err
    assert not (tmp_path / "d").exists()
