"""Devices and mixed precision: `runner.device` / `training[i].device` resolved and checked before any
work, the CPU path unchanged bit for bit (same cache keys, same numbers), mixed precision within a
stated tolerance of float32 and under its own cache keys, and — where CUDA exists — GPU results
within a stated tolerance of the CPU's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from imaging import write_imaging_study, write_training_set
from perceptcore import __version__
from perceptcore.cli import main
from perceptcore.devices import Placement, resolve
from perceptcore.errors import PerceptcoreError
from perceptcore.perturbation import ImageBatch, restrict
from perceptcore.plugins import load_registry
from perceptcore.runner import (CaseImages, ImageWork, Runner, ViewImage, compute_unit, core_digest, options_key,
                                plugin_version, stable_hash)
from perceptcore.spec import load_spec
from perceptcore.training import _on_cpu, trainings_of
from perceptcore_plugins.models.small_cnn import Options, SmallCnn
from perceptcore_plugins.perturbations.gaussian_lowpass import GaussianLowpass

# bfloat16 keeps 8 significant bits; on the small CNN of these tests predictions moved by at most
# 3e-4 (measured over all 12 units of the imaging study), so 1e-2 leaves a wide margin.
MIXED_TOLERANCE = 1e-2
# Another device computes the same float32 arithmetic in another order (and cuDNN may use TF32).
CUDA_TOLERANCE = 2e-3

REGISTRY = load_registry()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return write_imaging_study(tmp_path_factory.mktemp("devices"))


def _runner(spec_path, *overrides) -> Runner:
    spec = load_spec(spec_path, list(overrides))
    return Runner(spec, ImageWork.of(spec, REGISTRY, {}))


def _no_gpus(monkeypatch, cuda=False, count=0, mps=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


# ---------------------------------------------------------------------- resolving and checking devices

@pytest.mark.parametrize("text", ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "", " cpu", "cuda 0", 3])
def test_a_malformed_device_is_an_error_at_its_key(text):
    with pytest.raises(PerceptcoreError, match="expected cpu, cuda, cuda:N, mps or auto") as error:
        resolve(text, "runner.device")
    assert error.value.where == "runner.device"


def test_devices_this_machine_lacks_are_errors_at_their_key(monkeypatch):
    _no_gpus(monkeypatch)
    for text in ("cuda", "cuda:0"):
        with pytest.raises(PerceptcoreError, match="CUDA is not available here") as error:
            resolve(text, "training[2].device")
        assert error.value.where == "training[2].device"
    with pytest.raises(PerceptcoreError, match="MPS.*not available here"):
        resolve("mps", "runner.device")
    _no_gpus(monkeypatch, cuda=True, count=2)
    assert resolve("cuda:1", "runner.device") == "cuda:1"
    with pytest.raises(PerceptcoreError, match=r"device 'cuda:3': this machine has 2 CUDA devices \(cuda:0 … cuda:1\)"):
        resolve("cuda:3", "runner.device")


def test_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch):
    _no_gpus(monkeypatch)
    assert resolve("auto", "runner.device") == "cpu"
    _no_gpus(monkeypatch, mps=True)
    assert resolve("auto", "runner.device") == "mps"
    _no_gpus(monkeypatch, cuda=True, count=1, mps=True)
    assert resolve("auto", "runner.device") == "cuda"


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_auto_is_the_cpu_here():
    assert resolve("auto", "runner.device") == "cpu"


def test_placements_key_the_device_type_and_precision_only_off_the_default():
    assert Placement().key() is None and Placement("cpu", False).key() is None
    assert Placement("cpu", True).key() == {"device": "cpu", "precision": "bfloat16"}
    # The index is not in the key: every CUDA device computes the same numbers.
    assert Placement("cuda:1").key() == Placement("cuda").key() == {"device": "cuda", "precision": "float32"}
    assert Placement("cuda", True).key() == {"device": "cuda", "precision": "float16"}
    assert Placement("mps", True).key() == {"device": "mps", "precision": "float16"}


@pytest.mark.parametrize("overrides, message", [
    (["runner.device=gpu"], "runner.device: unknown device 'gpu'; expected cpu, cuda, cuda:N, mps or auto"),
    (["runner.device=cuda"], "runner.device: device 'cuda': CUDA is not available here"),
    (["runner.device=cuda:3"], "runner.device: device 'cuda:3': CUDA is not available here"),
    (["runner.device=mps"], "runner.device: device 'mps': Apple's Metal (MPS) backend is not available here"),
    (["runner.mixed_precision=true", "observers[1].model=cho_reader", "observers[1].options={}"],
     "runner.mixed_precision: model 'cho_reader' (observer 'cnn') computes in full precision only"),
])
@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_validate_refuses_devices_before_any_work(study, capsys, overrides, message):
    args = ["validate", str(study)]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"spec.yaml: {message}" in err and "Traceback" not in err
    assert err.count("\n") == 1  # one error, one line


def _training_spec(folder: Path, **training) -> Path:
    spec_path = write_imaging_study(folder)
    write_training_set(folder / "train")
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"] = [{"name": "cnn", "model": "small_cnn", "options": {"input_size": 32},
                         "images": {"manifest": "train/manifest.csv"}, "cases": {"file": "train/cases.csv"},
                         "seeds": 1, "epochs": 2, "batch_size": 8, "learning_rate": 0.01, **training}]
    spec["observers"][1] = {"name": "cnn", "trained": "cnn"}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_cli_exits_1_naming_the_training_key(tmp_path, capsys):
    spec_path = _training_spec(tmp_path)
    done = subprocess.run([sys.executable, "-m", "perceptcore.cli", "validate", str(spec_path),
                           "--set", "training[0].device=cuda:1"], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "training[0].device: device 'cuda:1': CUDA is not available" in done.stderr
    assert "Traceback" not in done.stderr
    assert main(["validate", str(spec_path), "--set", "training[0].device=tpu"]) == 1
    assert "training[0].device: unknown device 'tpu'" in capsys.readouterr().err
    spec = yaml.safe_load(spec_path.read_text())
    spec["training"][0].update(model="cho_reader", options={}, mixed_precision=True)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PerceptcoreError, match=r"model 'cho_reader' \(training 'cnn'\) computes in full precision "
                                               r"only") as error:
        trainings_of(load_spec(spec_path), REGISTRY)
    assert error.value.where == "training[0].mixed_precision"
    assert not (tmp_path / ".perceptcore-cache").exists()


# ---------------------------------------------------------------------- the CPU path, unchanged

def test_cpu_cache_keys_are_the_keys_without_devices(study):
    default, cpu, auto = (_runner(study, *o) for o in ([], ["runner.device=cpu"], ["runner.device=auto"]))
    keys = [u.key for u in default.units]
    assert keys == [u.key for u in cpu.units]
    if resolve("auto", "runner.device") == "cpu":
        assert keys == [u.key for u in auto.units]
    # The key as it was computed before devices existed, term by term.
    work, unit = default.work, default.units[0]
    [(_, model, options, checkpoints)] = work.models
    [checkpoint] = [c for c in checkpoints if c.path == unit.checkpoint]
    described = [[c.perturbation and (c.perturbation.name, plugin_version(REGISTRY, "perturbation", c.perturbation.name)),
                  c.options and attrs.asdict(c.options, recurse=True), c.severity, c.seed_key] for c in unit.conditions]
    assert unit.key == stable_hash([__version__, core_digest(), plugin_version(REGISTRY, "model", model.name),
                                    model.name, options_key(options), checkpoint.digest, described, list(unit.regions),
                                    default.spec.study.seed, list(unit.cases),
                                    [work.image_keys[c] for c in unit.cases]])


def test_cpu_predictions_equal_a_direct_computation_bit_for_bit(study):
    [unit] = _runner(study).units[:1]
    compute_unit(unit)
    with np.load(unit.path) as stored:
        got = stored["predictions"]
    model, filter_ = SmallCnn(), GaussianLowpass()
    loaded = model.load(unit.checkpoint, Options(input_size=32), "cpu")
    manifest = pd.read_csv(study.parent / "manifest.csv", keep_default_na=False).set_index("case")
    images = {}
    for case in unit.cases:
        row = manifest.loc[case]
        pixels = torch.from_numpy(np.load(study.parent / row.file).astype(np.float32))
        inside = torch.zeros(pixels.shape, dtype=torch.bool)
        if row.roi_boxes:
            r0, c0, r1, c1 = map(int, row.roi_boxes.split())
            inside[r0:r1, c0:c1] = True
        images[case] = pixels, inside
    for c, condition in enumerate(unit.conditions):
        for r, region in enumerate(unit.regions):
            cases = []
            for case, (pixels, inside) in images.items():
                # The gaussian low-pass draws nothing at random: any generator gives the same image.
                whole = filter_.perturb(ImageBatch(pixels[None], torch.tensor([0.1]), 4095.0), condition.severity,
                                        filter_.Options(), torch.Generator())[0]
                cases.append(CaseImages(case, (ViewImage("CC", "L", restrict(pixels, whole, region, inside), 0.1,
                                                         4095.0),)))
            with torch.no_grad():  # the whole unit at once, as the runner predicts it
                expected = model.predict(loaded, cases)
            assert np.array_equal(got[c, r], expected), (condition.severity, region)


def test_cpu_state_and_checkpoints_are_saved_as_they_were():
    network = SmallCnn().network(Options(input_size=32))
    state = {"network": network.state_dict(), "losses": [0.5], "optimiser": {"state": {}, "param_groups": [{}]}}
    assert _on_cpu(state) is state  # the very objects: torch.save writes the same bytes


# ---------------------------------------------------------------------- mixed precision on the CPU

def test_mixed_precision_on_the_cpu_is_close_to_float32_and_keyed_apart(study):
    full, mixed = _runner(study), _runner(study, "runner.mixed_precision=true")
    assert not {u.key for u in full.units} & {u.key for u in mixed.units}
    assert mixed.units[0].placement == Placement("cpu", True)
    for unit in (full.units[0], mixed.units[0]):
        compute_unit(unit)
    with np.load(full.units[0].path) as a, np.load(mixed.units[0].path) as b:
        float32, bfloat16 = a["predictions"], b["predictions"]
    assert np.abs(float32 - bfloat16).max() <= MIXED_TOLERANCE
    assert not np.array_equal(float32, bfloat16)  # autocast did compute in bfloat16


def test_mixed_precision_training_on_the_cpu(tmp_path):
    spec_path = _training_spec(tmp_path)
    [full] = trainings_of(load_spec(spec_path), REGISTRY).values()
    [cpu] = trainings_of(load_spec(spec_path, ["training[0].device=cpu"]), REGISTRY).values()
    [mixed] = trainings_of(load_spec(spec_path, ["training[0].mixed_precision=true"]), REGISTRY).values()
    assert [j.key for j in cpu.jobs] == [j.key for j in full.jobs]
    assert not {j.key for j in mixed.jobs} & {j.key for j in full.jobs}
    full.run(lambda message: None)
    mixed.run(lambda message: None)
    a, b = (torch.load(t.jobs[0].path, weights_only=True) for t in (full, mixed))
    assert a.keys() == b.keys() and all(v.device.type == "cpu" for v in b.values())
    losses = [t.log().loss.to_numpy() for t in (full, mixed)]
    # Two epochs from the same initial weights and batches: bfloat16 moves the mean loss a little.
    assert np.allclose(losses[0], losses[1], rtol=0.05), losses
    assert not np.array_equal(losses[0], losses[1])


# ---------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_predictions_and_training_equal_the_cpus_within_tolerance(study, tmp_path):
    cpu, gpu = _runner(study), _runner(study, "runner.device=cuda")
    assert gpu.units[0].key != cpu.units[0].key
    for unit in (cpu.units[0], gpu.units[0]):
        compute_unit(unit)
    with np.load(cpu.units[0].path) as a, np.load(gpu.units[0].path) as b:
        assert np.abs(a["predictions"] - b["predictions"]).max() <= CUDA_TOLERANCE

    spec_path = _training_spec(tmp_path)
    trainings = [next(iter(trainings_of(load_spec(spec_path, overrides), REGISTRY).values()))
                 for overrides in ([], ["training[0].device=cuda"], ["training[0].device=cuda",
                                                                      "training[0].mixed_precision=true"])]
    for training in trainings:
        training.run(lambda message: None)
    weights = [torch.load(t.jobs[0].path, weights_only=True) for t in trainings]
    assert all(v.device.type == "cpu" for w in weights[1:] for v in w.values())  # loads anywhere
    losses = [t.log().loss.to_numpy() for t in trainings]
    assert np.allclose(losses[0], losses[1], rtol=CUDA_TOLERANCE), losses
    assert np.allclose(losses[0], losses[2], rtol=0.05), losses  # float16 with a gradient scaler
    for key, value in weights[0].items():
        if value.is_floating_point():
            assert torch.allclose(value, weights[1][key], atol=1e-2, rtol=1e-2), key
