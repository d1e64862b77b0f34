"""Training model observers: one model per seed (and per severity, on filtered images), cached,
resumable to the same weights, used by the runner as observers; simulated readers read
through a sparse reader-study design; generated datasets."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from imaging import SEVERITIES, write_imaging_study, write_training_set
from perceptcore.cli import main
from perceptcore.dataset import with_generated_data
from perceptcore.errors import PerceptcoreError
from perceptcore.perturbation import ImageBatch
from perceptcore.plugins import hookimpl, load_registry
from perceptcore.reader_study import assign
from perceptcore.spec import load_spec
from perceptcore.training import trainings_of
from perceptcore_plugins.models.small_cnn import Options, SmallCnn
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass


def _training(name, **extra):
    return {"name": name, "model": "small_cnn", "options": {"input_size": 32},
            "images": {"manifest": "train/manifest.csv"}, "cases": {"file": "train/cases.csv"},
            "seeds": 2, "epochs": 3, "batch_size": 8, "learning_rate": 0.01, **extra}


def _study_with_training(folder: Path, **changes) -> Path:
    spec_path = write_imaging_study(folder)
    write_training_set(folder / "train")
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"] = [_training("cnn_unfiltered"), _training("cnn_filtered", per_severity=True)]
    spec["observers"] = [spec["observers"][0], {"name": "cnn", "trained": "cnn_unfiltered"},
                         {"name": "cnn_filtered", "trained": "cnn_filtered"}]
    spec.update(changes)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("training")
    spec = _study_with_training(folder)
    assert main(["run", str(spec), "--out", str(folder / "out")]) == 0
    return folder


def test_train_on_filtered_gives_one_model_per_severity_and_the_runner_uses_them(trained):
    out = trained / "out"
    log = pd.read_csv(out / "training.csv", dtype={"severity": str})
    assert list(log.columns) == ["training", "model", "severity", "reader", "epoch", "loss"]
    filtered = log[log.training == "cnn_filtered"]
    assert sorted(set(filtered.severity)) == sorted(SEVERITIES)
    assert len(filtered.groupby(["severity", "reader"])) == len(SEVERITIES) * 2
    # Severity 0 is unperturbed: that model is the unfiltered training's, trained once.
    cache = trained / ".perceptcore-cache" / "training"
    assert len(list(cache.glob("*.pt"))) == 2 + 2 * (len(SEVERITIES) - 1)
    table = pd.read_csv(out / "predictions" / "cnn_filtered.csv", dtype={"severity": str})
    assert set(table.reader) == {"seed_0", "seed_1"} and len(table) == 2 * len(SEVERITIES) * 24
    spec = load_spec(trained / "spec.yaml")
    jobs = {(job.level, job.reader): job for job in trainings_of(spec, load_registry())["cnn_filtered"].jobs}
    manifest = pd.read_csv(trained / "manifest.csv", keep_default_na=False)
    row = manifest[manifest.case == "c09"].iloc[0]
    pixels = torch.from_numpy(np.load(trained / row.file).astype(np.float32))
    model = SmallCnn()
    for level, label in enumerate(SEVERITIES):
        # The model trained at this severity predicts the images filtered at this severity.
        loaded = model.load(jobs[(level, "seed_1")].path, Options(input_size=32), "cpu")
        severity = float(label)
        image = pixels if severity == 0 else GaussianLowpass().perturb(
            ImageBatch(pixels[None], torch.tensor([0.1]), 4095.0), severity, GaussianLowpass.Options(),
            torch.Generator())[0]
        from perceptcore.runner import CaseImages, ViewImage
        with torch.no_grad():
            expected = model.predict(loaded, [CaseImages("c09", (ViewImage("CC", "left", image, 0.1, 4095.0),))])[0]
        got = table[(table.case == "c09") & (table.reader == "seed_1") & (table.severity == label)].prediction.item()
        assert got == pytest.approx(expected, abs=1e-6)
    # At severity 0 the filtered observer is the unfiltered one.
    unfiltered = pd.read_csv(out / "predictions" / "cnn.csv", dtype={"severity": str})
    first = lambda t: t[t.severity == SEVERITIES[0]].sort_values(["reader", "case"]).prediction.to_numpy()  # noqa: E731
    np.testing.assert_array_equal(first(table), first(unfiltered))
    assert not np.array_equal(table[table.severity == "2"].prediction, unfiltered[unfiltered.severity == "2"].prediction)


def test_the_report_draws_the_training_curves_of_the_run(trained):
    out = trained / "report"
    assert main(["run", str(trained / "spec.yaml"), "--out", str(out), "--set", "outputs.report=true"]) == 0
    assert "fig_training.png" in json.loads((out / "run.json").read_text())["outputs"]
    assert "<figure id='fig_training'>" in (out / "report.html").read_text()


def test_training_lowers_the_loss(tmp_path):
    spec_path = _study_with_training(tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"] = [_training("cnn_unfiltered", seeds=1, epochs=20, batch_size=24)]
    spec["observers"] = spec["observers"][:2]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["train", str(spec_path)]) == 0
    training = trainings_of(load_spec(spec_path), load_registry())["cnn_unfiltered"]
    losses = training.log().loss.to_numpy()
    assert len(losses) == 20
    assert losses[-3:].mean() < 0.6 * losses[:3].mean()


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    spec_path = _study_with_training(tmp_path / "a")
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"] = [_training("cnn_unfiltered", seeds=1, epochs=4)]
    spec["observers"] = spec["observers"][:2]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    registry = load_registry()
    [uninterrupted] = trainings_of(load_spec(spec_path), registry).values()
    uninterrupted.run(lambda message: None)
    expected = torch.load(uninterrupted.jobs[0].path, weights_only=True)

    spec_path = load_spec(spec_path, ["runner.cache=other-cache"])
    [training] = trainings_of(spec_path, registry).values()
    calls = {"n": 0}
    real_loss = SmallCnn.loss

    def interrupted(self, network, cases, labels):
        calls["n"] += 1
        if calls["n"] == 8:  # three batches an epoch: in the third epoch
            raise KeyboardInterrupt
        return real_loss(self, network, cases, labels)

    monkeypatch.setattr(SmallCnn, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.run(lambda message: None)
    job = training.jobs[0]
    assert not job.path.exists()
    assert len(torch.load(job.state, weights_only=True)["losses"]) == 2
    monkeypatch.setattr(SmallCnn, "loss", real_loss)
    messages = []
    training.run(messages.append)
    assert any("resuming after epoch 2" in m for m in messages)
    resumed = torch.load(job.path, weights_only=True)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    assert not job.state.exists()


def test_simulated_readers_read_through_a_sparse_design(tmp_path):
    spec_path = write_imaging_study(tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec["observers"][1]["reader_study"] = "balanced"
    spec["roi"] = None
    spec["perturbation"]["regions"] = ["entire_image"]
    spec["analyses"] = {"metrics": ["predictive_confidence", "ks_separability"]}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(spec_path), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "predictions" / "cnn.csv", dtype={"severity": str})
    # Every reader reads every case exactly once, at the severity the design assigned.
    assert len(table) == 2 * 24 and not table.duplicated(["reader", "case"]).any()
    design = assign([f"c{i:02d}" for i in range(24)], ["cnn_seed0", "cnn_seed1"], SEVERITIES, "balanced", 0)
    merged = table.merge(design.rename(columns={"exam": "case"}), on=["reader", "case"])
    assert (merged.severity_x == merged.severity_y).all()
    assert set(table.severity) == set(SEVERITIES)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["observers"][1].update(trained="cnn_unfiltred"),
     "observers[1].trained: no training named 'cnn_unfiltred' (did you mean 'cnn_unfiltered'?); trainings are cnn_unfiltered, cnn_filtered"),
    (lambda s: s["observers"][1].update(model="small_cnn"),
     "observers[1]: give one of predictions (a file), model"),
    (lambda s: s["observers"][1].update(checkpoints=["cnn_seed0.pt"]),
     "observers[1]: checkpoints and options belong to a model observer (a trained one takes its training's)"),
    (lambda s: s["training"][0].update(epochs=0), "training[0].epochs: must be at least 1"),
    (lambda s: s["training"][1].update(name="cnn_unfiltered"),
     "training[1].name: training name 'cnn_unfiltered' is used twice"),
    (lambda s: s["training"][0].update(model="smal_cnn"),
     "training[0].model: unknown model 'smal_cnn'; did you mean 'small_cnn'?"),
    (lambda s: s["training"][0].update(options={"input_size": 30}), "training[0].options"),
    (lambda s: s["training"][0]["cases"].update(file="missing.csv"), "training[0].cases.file"),
    (lambda s: s["observers"][1].update(reader_study="random"),
     "observers[1].reader_study: unknown scheme 'random'; expected uniform or balanced"),
])
def test_bad_training_specs_name_the_key(tmp_path, capsys, change, message):
    spec_path = _study_with_training(tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    change(spec)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["validate", str(spec_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / ".perceptcore-cache" / "training").exists()


def test_a_single_class_training_set_is_refused(tmp_path, capsys):
    spec_path = _study_with_training(tmp_path)
    cases = pd.read_csv(tmp_path / "train" / "cases.csv")
    cases.assign(label="malignant").to_csv(tmp_path / "train" / "cases.csv", index=False)
    assert main(["validate", str(spec_path)]) == 1
    assert "training[0].cases.file: every training case is malignant; a classifier needs both classes" \
        in capsys.readouterr().err


def test_a_model_without_training_methods_cannot_be_trained(tmp_path):
    plugin = type("P", (), {"perceptcore_register_models": staticmethod(hookimpl(lambda register: register(
        _Frozen())))})
    registry = load_registry(extra_plugins=[("frozen", plugin)])
    spec_path = _study_with_training(tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"][0]["model"] = "frozen_cnn"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PerceptcoreError, match=r"model 'frozen_cnn' cannot be trained: it provides neither "
                                               r"network, loss, checkpoint nor fit") as error:
        trainings_of(load_spec(spec_path), registry)
    assert error.value.where == "training[0].model"


class _Frozen:
    """A model that predicts but cannot be trained."""

    name = "frozen_cnn"
    Options = Options
    load = SmallCnn.load
    predict = SmallCnn.predict


@attrs.frozen
class _CountOptions:
    n: int = 3


class _Counting:
    """A dataset plugin for the test: writes n rows and counts its calls."""

    name = "counting"
    Options = _CountOptions
    calls = 0

    def generate(self, options, folder, seed, progress):
        type(self).calls += 1
        pd.DataFrame({"case": [f"c{i}" for i in range(options.n)], "seed": seed}).to_csv(folder / "cases.csv",
                                                                                      index=False)


def test_a_dataset_is_generated_once_into_the_cache_and_becomes_the_data_dir(tmp_path):
    plugin = type("P", (), {"perceptcore_register_datasets": staticmethod(hookimpl(lambda register: register(
        _Counting())))})
    registry = load_registry(extra_plugins=[("counting", plugin)])
    spec_path = write_imaging_study(tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec["dataset"] = {"name": "counting", "options": {"n": 5}}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    generated = with_generated_data(load_spec(spec_path), registry, lambda m: None)
    table = pd.read_csv(generated.path("cases.csv"))
    assert len(table) == 5 and (table.seed == 0).all()
    again = with_generated_data(load_spec(spec_path), registry, lambda m: None)
    assert again.data_dir == generated.data_dir and _Counting.calls == 1
    other = with_generated_data(load_spec(spec_path, ["dataset.options.n=6"]), registry, lambda m: None)
    assert other.data_dir != generated.data_dir and len(pd.read_csv(other.path("cases.csv"))) == 6
    with pytest.raises(PerceptcoreError, match="give data_dir or dataset, not both"):
        load_spec(spec_path, ["data_dir=elsewhere"])
    with pytest.raises(PerceptcoreError, match=r"dataset.options.m: unknown key 'm'; expected one of n"):
        with_generated_data(load_spec(spec_path, ["dataset.options.m=1"]), registry, lambda m: None)


def test_plugin_options_naming_files_resolve_against_the_data_dir(tmp_path, capsys):
    """Options declared as files (here dmv's patch_checkpoint) are found like the spec's own paths,
    checked before anything runs, and their contents key the prediction cache."""
    from perceptcore.runner import options_key
    from perceptcore.spec import structure_options
    from perceptcore_plugins.models.dmv import Options as DmvOptions

    spec_path = write_imaging_study(tmp_path)
    spec = yaml.safe_load(spec_path.read_text())
    spec["observers"][1].update(model="dmv", options={"channels": 3, "patch_checkpoint": "patches.pt"})
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["validate", str(spec_path)]) == 1
    assert f"observers[1].options.patch_checkpoint: file not found: {tmp_path / 'patches.pt'}" in capsys.readouterr().err

    (tmp_path / "patches.pt").write_bytes(b"one")
    options = structure_options(DmvOptions, {"channels": 3, "patch_checkpoint": "patches.pt"}, "options",
                                load_spec(spec_path))
    assert options.patch_checkpoint == str(tmp_path / "patches.pt")
    before = options_key(options)
    (tmp_path / "patches.pt").write_bytes(b"two")
    assert options_key(options) != before
