"""Hostile spec files and `--set` values through `perceptcore validate` (issue 11, items 1 and 4;
issue 12, "validate misses what run later rejects"): each cause ends in one short located
`error:` line and exit code 1 — no traceback, no hang, no silent acceptance, no printed
internals — and what `run` would reject is rejected before any data is read or generated."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from perceptcore.cli import main, one_line
from synthetic import write_study

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def validate(capsys, spec, *sets):
    args = ["validate", str(spec)]
    for value in sets:
        args += ["--set", value]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_located(code, err, *fragments):
    """Exit 1 and one short `error:` line holding every fragment."""
    assert code == 1, err
    assert "Traceback" not in err and "object at 0x" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert len(lines[0]) <= 507, len(lines[0])  # "error: " + at most 500
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def spec(tmp_path):
    """A valid predictions-only study."""
    return write_study(tmp_path / "study")


def with_text(spec: Path, old: str, new: str) -> Path:
    text = spec.read_text()
    assert old in text, old
    spec.write_text(text.replace(old, new, 1))
    return spec


def edited(spec: Path, edit) -> Path:
    raw = yaml.safe_load(spec.read_text())
    edit(raw)
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


# --------------------------------------------------------------------------- YAML that does not parse

@pytest.mark.parametrize("value", ["[1", "\tx", "@x", "*alias", "!tag x", "{a: 1", "'open", "!!int x",
                                   "!!float ''", "!!bool maybe", "!!timestamp 2020-13-45", "!!python/object:os.system x"])
def test_set_value_that_is_not_yaml(spec, capsys, value):
    assert_located(*validate(capsys, spec, f"model.draws={value}")[::2], "--set model.draws: ")


@pytest.mark.parametrize("value, line", [("!!int x", "!!int value 'x'"), ("!!float ''", "!!float value ''"),
                                         ("!!bool maybe", "!!bool value 'maybe'"),
                                         ("!!timestamp 2020-13-45", "!!timestamp value '2020-13-45'")])
def test_typed_scalar_with_bad_content_names_the_line(spec, capsys, value, line):
    with_text(spec, "draws: 40", f"draws: {value}")
    number = spec.read_text().splitlines().index(f"  draws: {value}") + 1
    assert_located(*validate(capsys, spec)[::2], f"spec.yaml: line {number}: not valid YAML: {line}")


def test_key_given_twice_is_refused(spec, capsys):
    with_text(spec, "draws: 40", "draws: 40\n  draws: 4000")
    assert_located(*validate(capsys, spec)[::2], "not valid YAML: key 'draws' is given twice")


# --------------------------------------------------------------------------- what a value can make expensive

@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_nesting(spec, capsys, depth):
    with_text(spec, "draws: 40", f"draws: {'[' * depth}{']' * depth}")
    assert_located(*validate(capsys, spec)[::2], "spec.yaml: ", "nested ")


def test_deep_nesting_in_set_value(spec, capsys):
    assert_located(*validate(capsys, spec, f"subgroups.options={'[' * 5000}{']' * 5000}")[::2],
                   "--set subgroups.options: ", "nested ")


def test_recursive_alias(spec, capsys):
    with_text(spec, "subgroups:\n", "subgroups:\n  options: &loop {column: *loop}\n")
    assert_located(*validate(capsys, spec)[::2], "spec.yaml: subgroups.options", "recursive YAML alias")


BOMB = "".join([f"  b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]\n" for i in range(1, 9)])


@pytest.mark.parametrize("where", ["subgroups", "observers[1]"])
def test_alias_bomb_in_a_free_form_mapping(spec, capsys, where):
    # 10^8 values once expanded, in `subgroups.options` or `observers[1].columns`.
    key = "options" if where == "subgroups" else "columns"
    bomb = f"{key}:\n    b0: &b0 x\n" + BOMB.replace("  b", "    b")
    if where == "subgroups":
        with_text(spec, "subgroups:\n", f"subgroups:\n  {bomb}")
    else:
        with_text(spec, "  predictions: dnns.csv\n", f"  predictions: dnns.csv\n  {bomb}")
    started = time.perf_counter()
    line = assert_located(*validate(capsys, spec)[::2], "spec.yaml: ", "values once YAML aliases are expanded")
    assert time.perf_counter() - started < 10
    assert key in line


@pytest.mark.parametrize("key, value, message", [
    ("calibration.bins", "1000000000000", "calibration.bins: must be at most 1000"),
    ("calibration.folds", "1000000000", "calibration.folds: must be at most 100"),
    ("model.draws", "1000000000000", "model.draws: must be at most 100000"),
    ("model.chains", "100000", "model.chains: must be at most 64"),
    ("study.seed", str(2**64), "study.seed: must be at most 4294967295"),
    ("study.seed", "-1", "study.seed: must be at least 0"),
    ("model.seed", str(2**40), "model.seed: must be at most 4294967295"),
    ("runner.workers", "100000", "runner.workers: must be at most 256"),
    ("severities.levels", str([str(i) for i in range(101)]), "severities.levels: lists 101 items"),
])
def test_bounds_on_what_a_value_makes_expensive(spec, capsys, key, value, message):
    assert_located(*validate(capsys, spec, f"{key}={value}")[::2], f"spec.yaml: {message}")


@pytest.mark.parametrize("name", ["/abs/path", "../up", "a/b", "..", ".hidden", "x" * 65, "with space", "a\\b"])
def test_study_name_is_a_plain_name(spec, capsys, name):
    assert_located(*validate(capsys, spec, f"study.name={yaml.safe_dump(name).splitlines()[0]}")[::2],
                   "spec.yaml: study.name: study name ", "must be a plain name")


def test_long_observer_name(spec, capsys):
    line = assert_located(*validate(capsys, spec, f"observers[1].name={'n' * 10000}")[::2],
                          "spec.yaml: observers[1].name: observer name 'nnn", "…")
    assert len(line) < 250


@pytest.mark.parametrize("key, value", [("model.priors.b", ".nan"), ("model.priors.nu", ".inf"),
                                        ("training", "[{name: t, model: small_cnn, images: {manifest: m.csv}, "
                                                     "cases: {file: c.csv}, weight_decay: .nan}]")])
def test_nan_and_infinite_numbers(spec, capsys, key, value):
    where = "training[0].weight_decay" if key == "training" else key
    assert_located(*validate(capsys, spec, f"{key}={value}")[::2], f"spec.yaml: {where}: ")


# --------------------------------------------------------------------------- wrong kinds of values

@pytest.mark.parametrize("columns, fragment", [
    ({"case": {"a": 1}}, "observers[1].columns.case: expected text, got {a: 1}"),
    ({"prediction": ["p", "q"]}, "observers[1].columns.prediction: expected text, got ['p', 'q']"),
    ({"case": []}, "observers[1].columns.case: name at least one id column"),
])
def test_columns_hold_column_names(spec, capsys, columns, fragment):
    edited(spec, lambda raw: raw["observers"][1].update(columns=columns))
    assert_located(*validate(capsys, spec)[::2], f"spec.yaml: {fragment}")


@pytest.mark.parametrize("options, fragment", [
    ({"column": ["subgroup"]}, "subgroups.options.column: expected the name of a column"),
    ({"findings": {"mass": ["a"]}}, "subgroups.options.findings.mass: expected the name of a column"),
    ({"findings": {"masses": "mass"}}, "unknown lesion type 'masses' (did you mean 'mass'?)"),
])
def test_subgroup_options_hold_column_names(spec, capsys, options, fragment):
    edited(spec, lambda raw: raw["subgroups"].update(options=options))
    assert_located(*validate(capsys, spec)[::2], f"spec.yaml: ", fragment)


def test_nul_byte_in_a_path(spec, capsys):
    with_text(spec, "predictions: dnns.csv", 'predictions: "dnns\\0.csv"')
    assert_located(*validate(capsys, spec)[::2], "spec.yaml: observers[1].predictions: ", "NUL character")


def test_nul_byte_in_data_dir_set(spec, capsys):
    assert_located(*validate(capsys, spec, "data_dir=a\0b")[::2], "--set data_dir: ", "NUL character")


def test_numbers_and_numeric_keys_print_as_written(spec, capsys):
    line = assert_located(*validate(capsys, spec, "model.draws={1.50: 2.0e+3, 0x1F: [1.0]}")[::2],
                          "spec.yaml: model.draws: expected a whole number, got {1.50: 2.0e+3, 0x1F: [1.0]}")
    assert "_Number" not in line
    assert_located(*validate(capsys, spec, "model.1.50=3")[::2], "spec.yaml: model.1: unknown key '1'")
    with_text(spec, "draws: 40", "draws: 40\n  0.50: 1")
    assert_located(*validate(capsys, spec)[::2], "spec.yaml: model.0.50: unknown key '0.50'")


def test_long_bad_value_is_truncated(spec, capsys):
    line = assert_located(*validate(capsys, spec, f"model.method={'x' * 10000}")[::2],
                          "spec.yaml: model.method: unknown method 'xxx", "…")
    assert "x" * 80 not in line


def test_error_line_stays_one_line():
    assert one_line("a.yaml: file not found: /x\ny") == "a.yaml: file not found: /x\\ny"
    long = one_line("where: " + "p" * 1000 + " is missing")
    assert len(long) == 500 and long.startswith("where: ppp") and long.endswith("is missing")


def test_set_key_with_non_ascii_digit(spec, capsys):
    # "²".isdigit() is true but int("²") raises.
    assert_located(*validate(capsys, spec, "observers[²].name=x")[::2], "--set observers[²].name", "no such list item")


# --------------------------------------------------------------------------- strict at every depth

@pytest.mark.parametrize("section, key, suggestion", [
    ("observers", "reder", "reader"), ("observers", "severity_column", None), ("roi", "regoin", "region")])
def test_unknown_key_in_a_columns_mapping(tmp_path, capsys, section, key, suggestion):
    spec = write_study(tmp_path / "study", roi=True)

    def edit(raw):
        (raw["observers"][1] if section == "observers" else raw["roi"])["columns"] = {key: "x"}

    edited(spec, edit)
    where = "observers[1]" if section == "observers" else "roi"
    line = assert_located(*validate(capsys, spec)[::2], f"spec.yaml: {where}.columns.{key}: unknown key '{key}'")
    if suggestion:
        assert f"(did you mean '{suggestion}'?)" in line
    assert "expected one of" in line and "prediction" in line


@pytest.mark.parametrize("section, fragment", [
    ({"perturbation": {"name": "nope"}}, "perturbation.name: unknown perturbation 'nope'"),
    ({"perturbation": {"name": "gaussian_lowpass", "options": {"unit": "cm"}}}, "perturbation.options: "),
    ({"perturbation": {"name": "gaussian_lowpass", "options": {"sigma": 1}}}, "perturbation.options.sigma: unknown key"),
    ({"dataset": {"name": "mammography_phantoms", "options": {"casez": 1}}}, "dataset.options.casez: unknown key"),
])
def test_sections_the_run_does_not_use_are_checked(spec, capsys, section, fragment):
    edited(spec, lambda raw: raw.update(section))
    assert_located(*validate(capsys, spec)[::2], f"spec.yaml: {fragment}")


# --------------------------------------------------------------------------- validate catches what run rejects

def example(tmp_path, name: str) -> Path:
    """An example spec copied alone into an empty folder (its data absent)."""
    source = next(EXAMPLES.glob(f"*/{name}"))
    folder = tmp_path / "example"
    folder.mkdir()
    shutil.copy(source, folder / name)
    return folder / name


# (override, located fragment): each passed `validate` before and failed `run` only late, or never.
PERCEPTION = [
    ("model.backend=stna", "model.backend: unknown backend 'stna'; did you mean 'stan'?"),
    ("subgroups.analyse=[microcalcification]", "subgroups.analyse[0]: 'breast_lesions' has no subgroup "
                                               "'microcalcification' (did you mean 'microcalcifications'?)"),
    ("subgroups.analyse=[microcalcifications]", "analyses.metrics[3]: the Simpson's-paradox check needs"),
    ("analyses.metrics=[predictive_confidence, ks_separabilty]", "analyses.metrics[1]: unknown metric"),
    ("subgroups.definition=breast_lesion", "subgroups.definition: unknown subgroups 'breast_lesion'"),
    ("subgroups.options={colum: subgroup}", "subgroups.options.colum: unknown option 'colum'"),
    ("perturbation.name=gaussian_lowpas", "perturbation.name: unknown perturbation 'gaussian_lowpas'"),
]
CASES = {
    "demo.yaml": PERCEPTION + [
        ("model.method=nuts", "model.method: backend 'torch' does not run method 'nuts'"),
        ("perturbation.options={unit: furlong}", "perturbation.options: "),
        ("training[0].model=cho", "training[0].model: unknown model 'cho'"),
        ("training[1].options={input_siz: 64}", "training[1].options.input_siz: unknown key"),
        ("training[0].init=x.pt", "training[0].init: model 'cho_reader' is fitted in closed form"),
        ("severities.levels=['0', mild]", "severities.levels[1]: severity 'mild' is not a number >= 0"),
    ],
    # Predictions-only: the backend and metric names were checked before the (absent) data.
    "gmic.yaml": PERCEPTION[1:3] + PERCEPTION[4:],
    "dmv.yaml": PERCEPTION[1:3] + PERCEPTION[4:],
    "robustness.yaml": [
        ("robustness.perturbations[1].name=ideal_lowpas", "robustness.perturbations[1].name: unknown perturbation"),
        ("observers[0].options={input_siz: 64}", "observers[0].options.input_siz: unknown key"),
        ("model.backend=stna", "model.backend: unknown backend 'stna'"),
        ("analyses.metrics=[predictive_confidence, nope]", "analyses.metrics[1]: unknown metric 'nope'"),
        ("robustness.perturbations[0].severity=.inf", "robustness.perturbations[0].severity: must be a finite"),
    ],
}


@pytest.mark.parametrize("name, override, fragment",
                         [(name, *case) for name, cases in CASES.items() for case in cases])
def test_validate_fails_fast_on_what_run_rejects(tmp_path, capsys, name, override, fragment):
    """Per example spec, a mutated key that `run` rejected only after loading, generating or
    training (or never checked): `validate` now fails at once, naming the key, leaving nothing behind."""
    spec = example(tmp_path, name)
    before = sorted(p.name for p in spec.parent.iterdir())
    started = time.perf_counter()
    code, _, err = validate(capsys, spec, override)
    assert time.perf_counter() - started < 30
    assert_located(code, err, f"{name}: {fragment}")
    assert sorted(p.name for p in spec.parent.iterdir()) == before, "validate left files behind"


def test_outputs_dir_that_is_not_a_run_names_the_key(spec, capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert_located(*validate(capsys, spec, f"outputs.dir={tmp_path / 'taken'}")[::2],
                   "spec.yaml: outputs.dir: ", "exists and is not an earlier perceptcore run")


@pytest.mark.parametrize("override", [f"model.{'k' * 1000}=1", f"subgroups.options={{{'k' * 1000}: '\"a\\0b\"'}}",
                                      "dataset={name: mammography_phantoms, options: {nope: 1}}"])
def test_long_keys_and_long_listings_stay_short(spec, capsys, override):
    line = assert_located(*validate(capsys, spec, override)[::2], "spec.yaml: ")
    assert len(line.split("spec.yaml: ", 1)[1]) <= 300, line
