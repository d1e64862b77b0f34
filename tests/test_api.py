"""The Python API (core/pipeline.py, docs/api.md): the guide's example runs as written, and a run
from Python writes exactly what `perceptcore run` writes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import arviz as az
import numpy as np
import pytest

import perceptcore
from perceptcore.cli import main
from perceptcore.errors import PerceptcoreError
from perceptcore.pipeline import Results
from synthetic import write_study

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
DEMO_LINE = 'spec = "examples/demo/demo.yaml"'


def guide_example() -> str:
    """The guide's one Python block, as written there."""
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)
    assert len(blocks) == 1, "docs/api.md has one example, and this test runs it"
    return blocks[0]


def test_the_guides_example_runs_and_writes_what_the_command_writes(tmp_path, monkeypatch, capsys, caplog):
    spec = write_study(tmp_path / "study")
    code = guide_example()
    # The one change: a small synthetic study instead of the demo (minutes of training).
    assert code.count(DEMO_LINE) == 1
    code = code.replace(DEMO_LINE, f"spec = {str(spec)!r}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's temporary folder
    caplog.set_level(logging.INFO, logger="perceptcore")
    namespace = {"__name__": "docs_api_example"}
    exec(compile(code, str(GUIDE), "exec"), namespace)
    results, study = namespace["results"], namespace["study"]
    assert results.out.parent.parent == tmp_path and (results.out / "run.json").is_file()
    printed = capsys.readouterr()
    assert f"{spec}: ok — 60 cases" in printed.out and str(results.out) in printed.out
    # Progress went to the callback (here `logging`), not to stdout or stderr.
    assert "[perceptcore" not in printed.out + printed.err
    messages = [r.getMessage() for r in caplog.records if r.name == "perceptcore"]
    assert any(m.startswith("fitting ") for m in messages) and any("drawing figures" in m for m in messages)

    # The command, on the same spec with the same overrides.
    overrides = ["model.draws=200"]
    assert perceptcore.load(spec, overrides).spec == study.spec  # the example's `set` is this `--set`
    cli = tmp_path / "cli"
    assert main(["run", str(spec), "--out", str(cli), *(f"--set={o}" for o in overrides)]) == 0
    assert f"wrote {cli}" in capsys.readouterr().out

    files = sorted(str(p.relative_to(cli)) for p in cli.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(results.out)) for p in results.out.rglob("*") if p.is_file())
    csvs = [name for name in files if name.endswith(".csv")]
    assert {"predictive_confidence.csv", "class_separability.csv", "simpsons_paradox.csv",
            "fit_diagnostics.csv"} <= set(csvs)
    for name in files:
        if name != "timings.json":  # wall-clock seconds: the one file that differs between identical runs
            assert (cli / name).read_bytes() == (results.out / name).read_bytes(), name

    # results.tables are the top-level CSVs, as written.
    assert sorted(f"{name}.csv" for name in results.tables) == sorted(n for n in csvs if "/" not in n)
    for name, table in results.tables.items():
        assert table.to_csv(index=False).encode() == (cli / f"{name}.csv").read_bytes(), name
    assert results.backend == "torch" and results.method == "laplace" and results.report_path is None

    # The posterior the example read is the one the command wrote.
    written = az.from_netcdf(cli / "posterior" / "radiologists_split.nc").posterior["gamma"].values
    assert np.array_equal(namespace["posterior"].posterior["gamma"].values, written)
    assert np.array_equal(namespace["gamma"].values, written.mean(axis=(0, 1)))


def test_set_takes_python_values_or_the_commands_strings(tmp_path):
    spec = write_study(tmp_path / "study")
    as_dict = perceptcore.load(spec, set={"model.draws": 120, "severities.levels": ["0", "0.5", "1"],
                                         "analyses.alpha": 1e-3, "outputs.figures": ("svg",),
                                         "outputs.dir": tmp_path / "runs"})
    as_strings = perceptcore.load(spec, ["model.draws=120", "severities.levels=['0', '0.5', '1']",
                                         "analyses.alpha=0.001", "outputs.figures=[svg]",
                                         f"outputs.dir={tmp_path / 'runs'}"])
    assert as_dict.spec == as_strings.spec
    assert as_dict.spec.model.draws == 120 and as_dict.spec.analyses.alpha == 0.001
    assert as_dict.out_dir() == (tmp_path / "runs").resolve()
    assert perceptcore.load(spec, {"study.name": "yes"}).spec.study.name == "yes"  # a string stays a string
    with pytest.raises(PerceptcoreError, match=r"spec.yaml: model.draw: unknown key 'draw' \(did you mean 'draws'\?\)"):
        perceptcore.load(spec, {"model.draw": 3})


def test_validate_writes_nothing_and_raises_where_the_command_exits(tmp_path, monkeypatch):
    spec = write_study(tmp_path / "study", radiologists_edit=lambda t: t.drop(columns="prediction"))
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(PerceptcoreError) as raised:
        perceptcore.load(spec).validate(progress=None)
    assert str(raised.value).startswith(f"{spec}: observers[0].predictions: ")
    assert sorted(tmp_path.rglob("*")) == before
    good = write_study(tmp_path / "good")
    validation = perceptcore.load(good).validate(progress=None)
    assert validation.cases == 60 and validation.severities == 3 and validation.backend == "torch"
    assert validation.predictions == {"radiologists": 180, "dnns": 360} and validation.pending == ()
    assert str(validation) == (f"{good}: ok — 60 cases, 3 severities, radiologists: 180 predictions, dnns: 360 "
                               "predictions; backend torch")


def test_a_failed_run_raises_and_leaves_out_unlocked(tmp_path):
    spec = write_study(tmp_path / "study", dnns_edit=lambda t: t.assign(prediction=2.0))
    out = tmp_path / "out"
    with pytest.raises(PerceptcoreError, match=re.escape(f"{spec}: observers[1].predictions")):
        perceptcore.load(spec).run(out=out, progress=None)
    assert not out.exists() and list(tmp_path.glob(".out.*")) == []  # no lock, no staging folder left
    (out / "mine.txt").parent.mkdir()
    (out / "mine.txt").write_text("not a run")
    with pytest.raises(PerceptcoreError, match="exists and is not an earlier perceptcore run"):
        perceptcore.load(spec).run(out=out, progress=None)
    assert (out / "mine.txt").read_text() == "not a run"


def test_posterior_names_what_a_run_holds(tmp_path):
    (tmp_path / "posterior").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"outputs": ["posterior/dnns_split.nc", "run.json"]}))
    results = Results(out=tmp_path, tables={}, seconds=0.0, backend="torch", method="laplace")
    with pytest.raises(PerceptcoreError, match="no posterior of 'radiologists' \\(merged\\) in this run; it has "
                                               "dnns_split"):
        results.posterior("radiologists", "merged")


def test_importing_perceptcore_stays_light():
    code = ("import sys, perceptcore; heavy = [m for m in ('numpy', 'pandas', 'torch', 'perceptcore.pipeline') "
            "if m in sys.modules]; print(heavy, perceptcore.__version__, callable(perceptcore.load), "
            "'load' in dir(perceptcore))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", perceptcore.__version__, "True", "True"]
