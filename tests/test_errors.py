"""Bad inputs through the real command line: one located `error: ...` line, exit code 1,
no traceback, and no output folder written."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from perceptcore.cli import main
from perceptcore.errors import PerceptcoreError
from synthetic import write_study


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_error(code, err, out_dir, *fragments):
    """Exit code 1, exactly one line `error: ...` holding every fragment, no traceback, no output."""
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    if out_dir is not None:
        assert not Path(out_dir).exists(), "the output folder was created"
    return line


def run_bad(tmp_path, capsys, *fragments, set_=(), command="run", **study):
    spec = write_study(tmp_path / "study", **study)
    out = tmp_path / "out"
    args = [command, str(spec)]
    if command == "run":
        args += ["--out", str(out)]
    for override in set_:
        args += ["--set", override]
    code, _, err = run_cli(capsys, *args)
    return assert_error(code, err, out, *fragments)


def edit(**changes):
    """A spec_edit setting dotted keys (observers.1.likelihood) to values."""

    def apply(spec):
        for key, value in changes.items():
            *parents, last = key.split("__")
            node = spec
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if value is DELETE:
                del node[int(last) if isinstance(node, list) else last]
            elif isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value

    return apply


DELETE = object()


def row_edit(column, row, value):
    def apply(table):
        if isinstance(value, str):
            table[column] = table[column].astype(object)
        table.loc[row, column] = value
        return table

    return apply


# --------------------------------------------------------------------------- the spec file

def test_unknown_top_level_key(tmp_path, capsys):
    line = run_bad(tmp_path, capsys, "spec.yaml: colour: unknown key 'colour'",
                   spec_edit=edit(colour="red"))
    assert "expected one of study, cases, observers" in line


def test_unknown_nested_key(tmp_path, capsys):
    line = run_bad(tmp_path, capsys, "spec.yaml: model.drawz: unknown key 'drawz'", spec_edit=edit(model__drawz=10))
    assert "draws" in line.split("expected one of", 1)[1]


def test_missing_required_key(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1].name: required key is missing",
            spec_edit=edit(observers__1__name=DELETE))


def test_observer_without_predictions_or_model(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1]: give one of predictions (a file), model (a model plugin with checkpoints) or trained",
            spec_edit=edit(observers__1__predictions=DELETE))


def test_missing_required_section(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: severities: required key is missing", spec_edit=edit(severities=DELETE))


def test_wrong_type(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: model.draws: expected a whole number, got 'many'",
            spec_edit=edit(model__draws="many"))


def test_observers_not_a_list(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers: expected a non-empty list of observers",
            spec_edit=edit(observers={"name": "radiologists", "predictions": "radiologists.csv"}))


def test_spec_file_missing(tmp_path, capsys):
    missing = tmp_path / "nowhere.yaml"
    code, _, err = run_cli(capsys, "run", str(missing), "--out", str(tmp_path / "out"))
    assert_error(code, err, tmp_path / "out", f"spec file not found: {missing}")


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    spec = write_study(tmp_path / "study")
    lines = spec.read_text().splitlines()
    at = lines.index("severities:") + 1  # 0-based index of the line after it
    lines.insert(at, "  unit: mm: oops")
    spec.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "run", str(spec), "--out", str(tmp_path / "out"))
    assert_error(code, err, tmp_path / "out", f"spec.yaml: line {at + 1}: not valid YAML")


def test_severities_listed_twice(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: severities.levels[2]: severity '0.5' is listed twice",
            severities=("0", "0.5", "0.5"))


def test_severities_listed_twice_as_different_text(tmp_path, capsys):
    # "0.50" and "0.5" are the same severity in any data file that writes it as a number.
    spec = write_study(tmp_path / "study")
    text = spec.read_text().replace("- '1'", "- '0.50'")
    spec.write_text(text)
    assert "'0.50'" in text
    code, _, err = run_cli(capsys, "run", str(spec), "--out", str(tmp_path / "out"))
    assert_error(code, err, tmp_path / "out", "spec.yaml: severities.levels[2]: severity '0.50' is listed twice",
                 "'0.5'")


def test_unknown_figure_format(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: outputs.figures[1]: unknown figure format 'jpg'; expected png, svg, pdf",
            spec_edit=edit(outputs__figures=["png", "jpg"]))


def test_set_without_equals(tmp_path, capsys):
    line = run_bad(tmp_path, capsys, "--set", "expected key=value, got 'model.draws'", set_=["model.draws"])
    assert line == "error: --set: expected key=value, got 'model.draws'"


def test_set_of_missing_list_item(tmp_path, capsys):
    run_bad(tmp_path, capsys, "--set observers[5].likelihood", "no such list item",
            set_=["observers[5].likelihood=soft"])


# --------------------------------------------------------------------------- plugins named by the spec

def test_unknown_subgroup_definition_suggests(tmp_path, capsys):
    run_bad(tmp_path, capsys,
            "spec.yaml: subgroups.definition: unknown subgroups 'breast_lesion'; did you mean 'breast_lesions'?",
            spec_edit=edit(subgroups__definition="breast_lesion"))


def test_unknown_metric_suggests(tmp_path, capsys):
    line = run_bad(tmp_path, capsys,
                   "spec.yaml: analyses.metrics[1]: unknown metric 'ks_separabilty'; did you mean 'ks_separability'?",
                   spec_edit=edit(analyses__metrics=["predictive_confidence", "ks_separabilty"]))
    assert "available:" in line and "roi_separability" in line


def test_unknown_backend(tmp_path, capsys):
    line = run_bad(tmp_path, capsys, "spec.yaml: model.backend: unknown backend 'jax'",
                   spec_edit=edit(model__backend="jax"))
    assert "available:" in line and "torch" in line


def test_analysed_subgroup_not_in_definition(tmp_path, capsys):
    line = run_bad(tmp_path, capsys,
                   "spec.yaml: subgroups.analyse[1]: 'breast_lesions' has no subgroup 'masses'",
                   spec_edit=edit(subgroups__analyse=["microcalcifications", "masses"]))
    assert "microcalcifications, soft_tissue_lesions, mixed, occult, nonbiopsied" in line


def test_analysed_subgroup_without_cases(tmp_path, capsys):
    def no_mixed(cases):
        cases.loc[cases["subgroup"] == "mixed", "subgroup"] = "occult"

    run_bad(tmp_path, capsys, "spec.yaml: subgroups.analyse[1]: subgroup 'mixed' has no cases",
            cases_edit=no_mixed, spec_edit=edit(subgroups__analyse=["microcalcifications", "mixed"]))


def test_analysed_subgroup_without_malignant_cases(tmp_path, capsys):
    def all_benign(cases):
        cases.loc[cases["subgroup"] == "soft_tissue_lesions", "label"] = "benign"

    run_bad(tmp_path, capsys,
            "spec.yaml: subgroups.analyse[1]: subgroup 'soft_tissue_lesions' has no malignant cases",
            cases_edit=all_benign)


def test_roi_metric_without_roi_section(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: analyses.metrics[1]: roi_separability needs a `roi` section",
            metrics=["ks_separability", "roi_separability"])


def test_simpsons_paradox_with_one_subgroup(tmp_path, capsys):
    run_bad(tmp_path, capsys,
            "spec.yaml: analyses.metrics[2]: the Simpson's-paradox check needs at least two analysed subgroups",
            spec_edit=edit(subgroups__analyse=["microcalcifications"]))


# --------------------------------------------------------------------------- the cases table

def test_duplicate_case_ids(tmp_path, capsys):
    def duplicate(cases):
        cases.loc[5, "case"] = cases.loc[4, "case"]

    run_bad(tmp_path, capsys, "spec.yaml: cases.file: ", "cases.csv: row 7: case id 'c004' appears twice",
            cases_edit=duplicate)


def test_positive_label_absent(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: cases.file: ",
            "cases.csv: no case has label 'cancer' in column 'label' (labels present: benign, malignant, nonbiopsied)",
            spec_edit=edit(cases__positive="cancer"))


# --------------------------------------------------------------------------- prediction files

def test_predictions_file_not_found(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: file not found: ",
            str(tmp_path / "study" / "missing.csv"), spec_edit=edit(observers__1__predictions="missing.csv"))


def test_missing_column_lists_the_columns(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: ",
            "dnns.csv: missing column(s) 'prediction'; the table has 'reader', 'severity', 'case', 'score'",
            dnns_edit=lambda t: t.rename(columns={"prediction": "score"}))


def test_unknown_case_in_predictions(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: ",
            "dnns.csv: row 9: case 'c999' is not in the cases table", dnns_edit=row_edit("case", 7, "c999"))


def test_severity_not_in_spec(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[0].predictions: ",
            "radiologists.csv: row 6: severity '2' is not one of the spec's severities (0, 0.5, 1)",
            radiologists_edit=row_edit("severity", 4, "2"))


def test_prediction_outside_unit_interval(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: ",
            "dnns.csv: row 5: prediction 1.7 is not a probability or 0/1 call in [0, 1]",
            dnns_edit=row_edit("prediction", 3, 1.7))


def test_prediction_not_a_number(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: ", "dnns.csv: row 12: prediction",
            "'high'", dnns_edit=row_edit("prediction", 10, "high"))


def test_duplicate_prediction(tmp_path, capsys):
    def duplicate(table):
        return pd.concat([table, table.iloc[[2]]], ignore_index=True)

    # 180 rows (3 readers x 60 cases); radiologist1 read case c002 (row 4) at severity index 2.
    run_bad(tmp_path, capsys, "spec.yaml: observers[0].predictions: ",
            "radiologists.csv: rows 4 and 182: reader 'radiologist1' has more than one prediction "
            "for case 'c002' at severity '1'", radiologists_edit=duplicate)


def test_binary_likelihood_with_probabilities(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: ",
            "dnns.csv: likelihood is 'binary' but predictions are not all 0 or 1",
            spec_edit=edit(observers__1__likelihood="binary"))


def test_garbage_pickle(tmp_path, capsys):
    def garbage(spec):
        (tmp_path / "study" / "dnns.pkl").write_bytes(b"this is not a pickle at all \x00\xff" * 3)
        spec["observers"][1]["predictions"] = "dnns.pkl"

    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: ", "dnns.pkl: not a readable pickle (UnpicklingError",
            spec_edit=garbage)


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"

    def malicious(spec):
        (tmp_path / "study" / "dnns.pkl").write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
        spec["observers"][1]["predictions"] = "dnns.pkl"

    run_bad(tmp_path, capsys, "spec.yaml: observers[1].predictions: ",
            "dnns.pkl: not a plain-array pickle: refusing to load posix.system", spec_edit=malicious)
    assert not marker.exists(), "the pickle's command ran"
    # The same bytes through the ordinary unpickler do run it: the test would have noticed.
    pickle.loads((tmp_path / "study" / "dnns.pkl").read_bytes())
    assert marker.exists()


def test_duplicate_roi_prediction(tmp_path, capsys):
    # 720 rows: 2 annotators x 2 regions x 2 seeds x 3 severities x 30 cases; row 2 is repeated at the end.
    run_bad(tmp_path, capsys, "spec.yaml: roi.predictions: ",
            "roi.csv: rows 2 and 722: annotator 'annotator1', reader 'seed1' has more than one roi_interior "
            "prediction for case 'c000' at severity '0'",
            roi=True, roi_edit=lambda t: pd.concat([t, t.iloc[[0]]], ignore_index=True))


def test_unknown_roi_region(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: roi.predictions: ",
            "roi.csv: row 3: region 'roi_inside' is not one of roi_interior, roi_exterior",
            roi=True, roi_edit=row_edit("region", 1, "roi_inside"))


def test_roi_observer_unknown(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: roi.observer: no observer group named 'gmic'; observers are radiologists, dnns",
            roi=True, spec_edit=edit(roi__observer="gmic"))


# --------------------------------------------------------------------------- the output folder

def test_out_dir_that_is_not_an_earlier_run_is_left_alone(tmp_path, capsys):
    spec = write_study(tmp_path / "study")
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "run", str(spec), "--out", str(out))
    assert_error(code, err, None, f"error: {out}: exists and is not an earlier perceptcore run; choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results.")], "a staging folder was left"


def test_validate_reports_the_same_errors(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: model.draws: expected a whole number", command="validate",
            spec_edit=edit(model__draws=2.5))


# --------------------------------------------------------------------------- a real process, and --debug

def test_command_line_process_prints_one_line(tmp_path):
    spec = write_study(tmp_path / "study", spec_edit=edit(subgroups__definition="breast_lesion"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "perceptcore.cli", "run", str(spec), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {spec}: subgroups.definition: unknown subgroups 'breast_lesion'; did you mean 'breast_lesions'? "
        "available: breast_lesions"
    ]
    assert result.stdout == ""
    assert not out.exists()


def test_debug_raises_with_traceback(tmp_path, capsys):
    spec = write_study(tmp_path / "study", spec_edit=edit(model__draws="many"))
    with pytest.raises(PerceptcoreError, match=r"model\.draws: expected a whole number, got 'many'") as info:
        main(["--debug", "validate", str(spec)])
    assert info.value.where == f"{spec}: model.draws"
    assert info.traceback, "the exception carries its traceback"
    assert capsys.readouterr().err == ""


def test_debug_process_shows_traceback(tmp_path):
    spec = write_study(tmp_path / "study", spec_edit=edit(model__draws="many"))
    result = subprocess.run([sys.executable, "-m", "perceptcore.cli", "--debug", "validate", str(spec)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "PerceptcoreError" in result.stderr
    assert "model.draws: expected a whole number, got 'many'" in result.stderr


def test_nuts_with_several_parameterisations(tmp_path, capsys):
    run_bad(tmp_path, capsys, "spec.yaml: model.parameterisations: ", "NUTS does not give",
            set_=["model.method=nuts", "model.parameterisations=[random_walk, independent]"])


def test_a_400_digit_prediction_is_refused_as_written(tmp_path, capsys):
    """Found by tests/test_data_fuzz.py: pandas reads it as a Python int that to_numeric cannot convert."""
    run_bad(tmp_path, capsys, "radiologists.csv: row 2: prediction 99999", "is not a probability",
            command="validate", radiologists_edit=row_edit("prediction", 0, "9" * 400))


def test_a_missing_label_is_an_empty_label(tmp_path, capsys):
    """Found by tests/test_data_fuzz.py: a missing label cell reached the label suggestions as a float."""
    def only_missing_labels(table):
        table["label"] = None
        return table

    run_bad(tmp_path, capsys, "cases.csv", "no case has label 'malignant'", command="validate",
            cases_edit=only_missing_labels)


def test_a_junk_subgroup_cell_is_echoed_short(tmp_path, capsys):
    """Found by benchmarks/fuzz_spec.py --data: the subgroup plugin echoed a 400-character cell whole."""
    line = run_bad(tmp_path, capsys, "has subgroup '9999", "expected one of microcalcifications", command="validate",
                   cases_edit=row_edit("subgroup", 0, "9" * 400))
    assert "9" * 100 not in line, line


def test_a_junk_column_name_is_echoed_short(tmp_path, capsys):
    """Found by benchmarks/fuzz_spec.py --data: the subgroup plugin listed a 400-character header whole."""
    def junk_header(table):
        return table.rename(columns={"subgroup": "9" * 400})

    line = run_bad(tmp_path, capsys, "lacks finding column(s)", command="validate", cases_edit=junk_header)
    assert "9" * 100 not in line, line
