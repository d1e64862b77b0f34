"""Whole runs of a small synthetic study: validate, determinism, outputs, selection, convergence flags."""

from __future__ import annotations

import json
import os

import arviz as az
import numpy as np
import pandas as pd
import pytest

from perceptcore.cli import main
from synthetic import write_study

TABLES = ("predictive_confidence", "class_separability", "class_separability_observed", "simpsons_paradox",
          "roi_separability")


def run(spec, out, *overrides):
    args = ["run", str(spec), "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    return main(args)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"), roi=True)


@pytest.fixture(scope="module")
def first_run(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "first"
    assert run(study, out, "outputs.report=true") == 0
    return out


def test_validate_checks_without_writing(study, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(study)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "radiologists:" in out and "dnns:" in out and "backend torch" in out
    assert list(tmp_path.iterdir()) == []


def test_same_spec_and_seed_give_identical_numbers(study, first_run, tmp_path):
    assert run(study, tmp_path / "again", "outputs.report=true") == 0
    for name in TABLES:
        assert (first_run / f"{name}.csv").read_bytes() == (tmp_path / "again" / f"{name}.csv").read_bytes(), name
    assert run(study, tmp_path / "seed1", "model.seed=1") == 0
    a = pd.read_csv(first_run / "predictive_confidence.csv")
    b = pd.read_csv(tmp_path / "seed1" / "predictive_confidence.csv")
    assert not np.allclose(a.gamma_mean, b.gamma_mean, rtol=0, atol=1e-9)


def test_manifest_lists_every_output_and_who_made_it(first_run):
    manifest = json.loads((first_run / "run.json").read_text())
    assert manifest["backend"] == "torch" and manifest["method"] == "laplace" and manifest["seed"] == 0
    written = sorted(str(p.relative_to(first_run)) for p in first_run.rglob("*") if p.is_file())
    assert manifest["outputs"] == written
    assert "report.html" in written and "fit_diagnostics.csv" in written


def test_saved_posterior_is_the_one_the_tables_summarise(first_run):
    confidence = pd.read_csv(first_run / "predictive_confidence.csv", dtype={"severity": str})
    posterior = az.from_netcdf(first_run / "posterior" / "radiologists_split.nc").posterior
    assert posterior.attrs["backend"] == "torch" and posterior.attrs["method"] == "laplace"
    groups = [str(g) for g in posterior.subgroup.values]
    severities = [str(s) for s in posterior.severity.values]
    gamma = posterior["gamma"].stack(sample=("chain", "draw")).transpose("sample", "severity", "subgroup").values
    assert gamma.shape == (40, len(severities), len(groups))
    assert np.all(gamma[:, 0, :] == 0)
    rows = confidence[(confidence.observer == "radiologists") & (confidence.subgroup == "microcalcifications")]
    g = groups.index("microcalcifications")
    expected = gamma[:, 1:, g].mean(axis=0)
    assert np.allclose(rows.gamma_mean.to_numpy(), expected, rtol=0, atol=1e-12)


def test_rerun_replaces_an_earlier_run_and_refuses_one_holding_other_files(study, first_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(study, out) == 0
    assert run(study, out, "model.seed=1") == 0  # a rerun replaces what perceptcore wrote
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    (out / "posterior" / "notes.txt").write_text("mine, not perceptcore's")
    capsys.readouterr()
    assert run(study, out) == 1
    err = capsys.readouterr().err
    assert "holds 'posterior/notes.txt', which perceptcore did not write" in err and "fitting" not in err, err
    assert (out / "posterior" / "notes.txt").read_text() == "mine, not perceptcore's"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder, backup or lock left


def test_the_parameterisation_with_the_highest_log_evidence_is_used(study, tmp_path):
    out = tmp_path / "run"
    assert run(study, out, "model.parameterisations=[random_walk, independent]") == 0
    fits = pd.read_csv(out / "fit_diagnostics.csv")
    assert len(fits) == 2 * 2 * 2  # observers x groupings x parameterisations
    for _, pair in fits.groupby(["observer", "grouping"]):
        assert pair.selected.sum() == 1
        assert pair.loc[pair.selected, "log_evidence"].item() == pair.log_evidence.max()
    chosen = fits[(fits.observer == "dnns") & (fits.grouping == "split") & fits.selected]
    posterior = az.from_netcdf(out / "posterior" / "dnns_split.nc").posterior
    assert posterior.attrs["parameterisation"] == chosen.parameterisation.item()


def test_a_fit_that_did_not_converge_is_flagged(study, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(study, out, "model.method=advi", "model.max_iterations=60", "outputs.report=true") == 0
    err = capsys.readouterr().err
    assert "warning: the fit of radiologists (split, random_walk) did not converge" in err
    assert json.loads((out / "run.json").read_text())["all_fits_converged"] is False
    assert not pd.read_csv(out / "fit_diagnostics.csv").converged.any()
    html = (out / "report.html").read_text()
    assert "did not converge" in html.lower()


def test_parallel_fits_give_the_same_numbers_as_sequential_ones(study, tmp_path):
    assert run(study, tmp_path / "one", "model.workers=1") == 0
    assert run(study, tmp_path / "two", "model.workers=2") == 0
    for name in TABLES:
        assert (tmp_path / "one" / f"{name}.csv").read_bytes() == (tmp_path / "two" / f"{name}.csv").read_bytes(), name
    one = pd.read_csv(tmp_path / "one" / "fit_diagnostics.csv")
    two = pd.read_csv(tmp_path / "two" / "fit_diagnostics.csv")
    assert len(two) == 2 * 2 and two.converged.all()
    columns = ["observer", "grouping", "parameterisation", "log_evidence", "selected"]
    assert one[columns].equals(two[columns])


def test_posterior_file_is_arviz_data_that_az_summary_reads(first_run):
    idata = az.from_netcdf(first_run / "posterior" / "radiologists_split.nc")
    assert {"posterior", "observed_data"} <= set(idata.groups())
    assert idata.posterior["gamma"].dims == ("chain", "draw", "severity", "subgroup")
    assert idata.posterior["nu"].dims == ("chain", "draw", "reader", "subgroup")
    summary = az.summary(idata, var_names=["gamma"], round_to="none")
    confidence = pd.read_csv(first_run / "predictive_confidence.csv", dtype={"severity": str})
    rows = confidence[(confidence.observer == "radiologists") & (confidence.subgroup == "microcalcifications")]
    for _, row in rows.iterrows():
        label = f"gamma[{row.severity}, microcalcifications]"
        assert summary.loc[label, "mean"] == pytest.approx(row.gamma_mean, abs=1e-12)
        assert summary.loc[label, "sd"] == pytest.approx(row.gamma_sd, rel=1e-3)  # ArviZ's sd uses ddof=0
    observed = idata.observed_data
    assert observed["prediction"].sizes["observation"] == len(observed.obs_reader)
    assert set(np.unique(observed["prediction"].values)) <= {0.0, 1.0}


def test_run_json_records_what_can_change_a_number(first_run):
    from importlib import metadata

    import torch

    environment = json.loads((first_run / "run.json").read_text())["environment"]
    for name in ("numpy", "scipy", "pandas", "torch", "arviz", "cmdstanpy", "pluggy", "pillow", "pydicom"):
        assert environment["packages"][name] == metadata.version(name)
    assert "cmdstan" in environment["packages"]  # None where CmdStan is not installed
    assert environment["plugin_packages"]["perceptcore"] == metadata.version("perceptcore")
    assert environment["cpu_count"] == os.cpu_count() and environment["torch_threads"] == torch.get_num_threads()
    assert environment["torch_interop_threads"] == torch.get_num_interop_threads()


def test_timings_record_wall_cpu_and_stage_seconds_with_the_workers_cpu(first_run):
    from perceptcore.resources import available_cores

    timings = json.loads((first_run / "timings.json").read_text())
    assert timings["seconds"] > 0 and timings["cpu_seconds"]["process"] > 0
    assert {"data", "fits", "analyses", "report"} <= set(timings["stages"])
    assert sum(timings["stages"].values()) <= timings["seconds"] + 0.5  # stages do not overlap (rounding)
    if json.loads((first_run / "run.json").read_text())["fit_workers"] < 2:
        pytest.skip(f"{available_cores()} core(s): the fits ran in this process, no worker to count")
    assert timings["cpu_seconds"]["children"] > 0  # the fit workers' CPU time, counted after they exit


def test_version_and_help_on_every_argument(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"perceptcore {metadata.version('perceptcore')}"
    for command in ("run", "validate", "train", "design-reader-study", "import-reads"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        lines = capsys.readouterr().out.splitlines()
        arguments = [line for line in lines if line.startswith("  ") and not line.startswith("   ")]
        # Every argument line (positional or option) carries its help text on the same or the next line.
        for i, line in enumerate(lines):
            if line in arguments and len(line.split("  ")) < 3 and line.strip() != "-h, --help":
                assert i + 1 < len(lines) and lines[i + 1].startswith("      "), (command, line)
