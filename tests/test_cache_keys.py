"""Nothing one run computes is read by another unless its content key matches: parallel sweeps sharing
a cache keep their own predictions, and keys follow the images' contents and the plugins' code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from imaging import write_imaging_study
from perceptcore.plugins import load_registry
from perceptcore.runner import ImageWork, Runner
from perceptcore.spec import load_spec


def quiet(message):
    pass


def runner_of(spec_path, registry=None, *overrides) -> Runner:
    spec = load_spec(spec_path, overrides)
    registry = registry or load_registry()
    return Runner(spec, ImageWork.of(spec, registry, {}))


def missing(runner: Runner) -> list:
    return [unit for unit in runner.units if not unit.path.exists()]


def test_two_specs_with_one_observer_name_keep_their_own_predictions(tmp_path):
    """Interleaved as parallel runs can be: B computes its predictions between A's and A's analysis."""
    spec = write_imaging_study(tmp_path / "study")
    a = runner_of(spec).run(quiet)
    a_table = open(a.observer("cnn").predictions).read()
    b = runner_of(spec, None, "perturbation.name=ideal_lowpass").run(quiet)
    assert open(a.observer("cnn").predictions).read() == a_table
    assert open(b.observer("cnn").predictions).read() != a_table
    assert open(a.roi.predictions).read() != open(b.roi.predictions).read()


def test_parallel_runs_sharing_a_cache_end_with_their_own_results(tmp_path):
    spec = write_imaging_study(tmp_path / "study")
    sweep = {"lowpass": [], "ideal": ["--set", "perturbation.name=ideal_lowpass"]}

    def command(name, *extra):
        return [sys.executable, "-m", "perceptcore.cli", "run", str(spec), "--out", str(tmp_path / name),
                *sweep[name.split("_")[0]], *extra]

    running = [subprocess.Popen(command(name), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for name in sweep]
    for process in running:
        assert process.wait(timeout=600) == 0, process.stderr.read()
        process.stderr.close()
    for name in sweep:  # each alone, with a cache of its own
        alone = subprocess.run(command(f"{name}_alone", "--set", f"runner.cache={tmp_path / name / 'cache'}"),
                               capture_output=True, text=True, timeout=600)
        assert alone.returncode == 0, alone.stderr
        for table in ("predictions/cnn.csv", "predictions/cnn_roi.csv", "predictive_confidence.csv"):
            assert (tmp_path / name / table).read_bytes() == (tmp_path / f"{name}_alone" / table).read_bytes(), table
    assert (tmp_path / "lowpass" / "predictions" / "cnn.csv").read_bytes() != \
        (tmp_path / "ideal" / "predictions" / "cnn.csv").read_bytes()


def test_image_units_are_keyed_by_contents(tmp_path):
    spec = write_imaging_study(tmp_path / "study")
    runner_of(spec).run(quiet)
    images = sorted((tmp_path / "study" / "images").iterdir())
    for image in images:  # touched, same contents: every unit is still in the cache
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert missing(runner_of(spec)) == []
    pixels = np.load(images[0])
    np.save(images[0], pixels[::-1].copy())  # same size, other contents
    assert {unit.cases for unit in missing(runner_of(spec))} == {("c00", "c01", "c02", "c03")}


PLUGIN = '''
import attrs

from perceptcore.plugins import hookimpl

from ._kernel import shift


class Brighten:
    """A test perturbation: adds `shift(severity)` grey levels."""

    name = "brighten"
    severity_unit = "levels"

    @attrs.frozen
    class Options:
        pass

    def perturb(self, batch, severity, options, generator):
        return batch.pixels + shift(severity)


@hookimpl
def perceptcore_register_perturbations(register):
    register(Brighten())
'''


def test_editing_a_plugins_code_misses_the_cache(tmp_path, monkeypatch):
    """A third-party plugin whose version never changes: editing its package-private helper must
    recompute the predictions it made."""
    package = tmp_path / "site" / "brighten_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (package / "_kernel.py").write_text("def shift(severity):\n    return 100.0 * severity\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import brighten_plugin

    registry = load_registry([("brighten_plugin", brighten_plugin)])
    spec = write_imaging_study(tmp_path / "study")
    overrides = ("perturbation.name=brighten", "perturbation.regions=[entire_image]", "roi=null")
    runner_of(spec, registry, *overrides).run(quiet)
    assert missing(runner_of(spec, registry, *overrides)) == []
    (package / "_kernel.py").write_text("def shift(severity):\n    return 200.0 * severity  # edited\n")
    again = runner_of(spec, registry, *overrides)
    assert len(missing(again)) == len(again.units) > 0
    sys.modules.pop("brighten_plugin", None)
    sys.modules.pop("brighten_plugin._kernel", None)


def test_editing_the_cores_image_code_misses_the_cache(tmp_path, monkeypatch):
    """perceptcore's own version never changes in a checkout: the source of the core modules that
    load, perturb and predict is in the key too. Here images.py is edited (a copy it is read from)."""
    import perceptcore.images

    spec = write_imaging_study(tmp_path / "study")
    runner_of(spec).run(quiet)
    assert missing(runner_of(spec)) == []
    original = Path(perceptcore.images.__file__)
    (tmp_path / "core").mkdir()
    copy = tmp_path / "core" / "images.py"
    for name in ("images.py", "__init__.py"):  # the package-private modules beside it count too
        (tmp_path / "core" / name).write_text((original.parent / name).read_text())
    monkeypatch.setattr(perceptcore.images, "__file__", str(copy))
    assert missing(runner_of(spec)) == []  # the same source, read from elsewhere: still a hit
    copy.write_text(copy.read_text() + "\n# edited\n")
    again = runner_of(spec)
    assert len(missing(again)) == len(again.units) > 0
