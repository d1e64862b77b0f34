"""Executors (runner.executor): the local default, Dask (a LocalCluster of processes, one worker killed
mid-run), a third-party executor through the hook; the tables and trained models equal a local run's
byte for byte; workers lacking a file or a plugin give one error naming the worker."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
import yaml

import perceptcore.plugins
from imaging import write_imaging_study, write_training_set
from perceptcore.cli import main
from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl, load_registry
from perceptcore.runner import ImageWork, Runner
from perceptcore.spec import load_spec
from perceptcore.training import trainings_of

distributed = pytest.importorskip("distributed")

# The tables a run writes from the predictions without fitting latent models (fits are not the executor's).
METRICS = ["roi_separability"]
TABLES = ("roi_separability.csv", "predictions/cnn.csv", "predictions/cnn_roi.csv")


def _edit(spec_path: Path, **changes) -> Path:
    spec = yaml.safe_load(spec_path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            spec.setdefault(section, {})[name] = value
        else:
            spec[section] = value
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


def _study(folder: Path, **changes) -> Path:
    spec = write_imaging_study(folder, workers=2)
    return _edit(spec, analyses={"metrics": METRICS}, **changes)


def _training_study(folder: Path, **changes) -> Path:
    """Per-severity training (a model per severity) of one seed, whose models are the ROI observer."""
    spec = _study(folder)
    write_training_set(folder / "train")
    raw = yaml.safe_load(spec.read_text())
    raw["training"] = [{"name": "cnn_filtered", "model": "small_cnn", "options": {"input_size": 32},
                        "images": {"manifest": "train/manifest.csv"}, "cases": {"file": "train/cases.csv"},
                        "seeds": 1, "epochs": 2, "batch_size": 8, "learning_rate": 0.01, "per_severity": True}]
    raw["observers"] = [raw["observers"][0], {"name": "cnn", "trained": "cnn_filtered"}]
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return _edit(spec, **changes)


def _run(spec: Path, out: Path, *overrides: str) -> None:
    args = ["run", str(spec), "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0


def _same_tables(a: Path, b: Path, names=TABLES) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _checkpoints(spec: Path, cache: str) -> dict:
    """Every trained model's checkpoint contents, by job key, from a cache."""
    [training] = trainings_of(load_spec(spec, [f"runner.cache={cache}"]), load_registry()).values()
    return {job.key: torch.load(job.path, weights_only=True) for job in training.jobs}


def _equal_contents(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


# ---------------------------------------------------------------- a third-party executor through the hook

class PickledInline:
    """An executor whose tasks run in this process but as a remote executor's would: function and items
    are pickled and unpickled, results come back, and nothing of the cache is shared (local = False)."""

    name = "pickled_inline"

    @attrs.frozen
    class Options:
        pass

    def __init__(self):
        self.tasks = []

    def start(self, options, workers, threads, where):
        executor = self

        class Session:
            local = False

            def __init__(self):
                self.threads = threads  # as local training: torch's sums depend on the thread count

            def map(self, function, items):
                for index, item in reversed(list(enumerate(items))):  # any order: the client must not care
                    function, item = pickle.loads(pickle.dumps((function, item)))
                    executor.tasks.append(function.__name__)
                    yield index, function(item)

        import contextlib
        return contextlib.nullcontext(Session())


def _with_executor(monkeypatch, executor) -> None:
    module = type(sys)("pickled_inline_plugin")
    module.perceptcore_register_executors = hookimpl(lambda register: register(executor))
    module.perceptcore_register_executors.__name__ = "perceptcore_register_executors"
    real = perceptcore.plugins.load_registry
    monkeypatch.setattr(perceptcore.plugins, "load_registry",
                        lambda extra_plugins=(): real([("pickled_inline_plugin", module), *extra_plugins]))


def test_the_bundled_executors_are_listed(capsys):
    registry = load_registry()
    assert {"local", "dask"} <= set(registry.names("executor"))
    assert main(["plugins"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["dask", "executor"] == next(line[:2] for line in lines if line[:1] == ["dask"])


def test_a_third_party_executor_runs_training_and_predictions_as_a_local_run_does(tmp_path, monkeypatch):
    spec = _training_study(tmp_path / "study", runner={"batch_size": 4, "workers": 1})
    _run(spec, tmp_path / "local")
    executor = PickledInline()
    _with_executor(monkeypatch, executor)
    _run(spec, tmp_path / "remote", "runner.cache=remote-cache", "runner.executor.name=pickled_inline")
    # Every job and unit went through it: 3 models (one per severity), each predicting 6 chunks of 4 cases.
    assert executor.tasks.count("train_remotely") == 3 and executor.tasks.count("unit_remotely") == 18
    _same_tables(tmp_path / "local", tmp_path / "remote", TABLES[:2] + ("training.csv",))
    _equal_contents(_checkpoints(spec, ".perceptcore-cache"), _checkpoints(spec, "remote-cache"))
    # The client wrote the cache; no epoch state is left anywhere.
    assert not list((tmp_path / "study" / "remote-cache").rglob("*.state.pt"))


@pytest.mark.parametrize("overrides, where, fragment", [
    (["runner.executor.name=dusk"], "runner.executor.name", "did you mean 'dask'"),
    (["runner.executor.name=dask", "runner.executor.options={adress: x}"], "runner.executor.options.adress",
     "unknown key"),
    (["runner.executor.name=dask", "runner.executor.options={threads: 0}"], "runner.executor.options", "threads"),
    (["runner.executor.name=dask", "runner.executor.options={address: 'tcp://127.0.0.1:9'}"],
     "runner.executor.options.address", "cannot reach a Dask scheduler"),
])
def test_executor_errors_name_the_key(tmp_path, capsys, monkeypatch, overrides, where, fragment):
    monkeypatch.setenv("PERCEPTCORE_DASK_TIMEOUT", "1s")
    spec = _study(tmp_path / "study")
    args = ["run", str(spec), "--out", str(tmp_path / "out")]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"spec.yaml: {where}:" in err and fragment in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- Dask

class KillOnce(distributed.WorkerPlugin):
    """Kills the worker process it runs in (SIGKILL, as an out-of-memory killer or a lost machine would)
    as it starts its second task, once per cluster: `marker` records the kill."""

    def __init__(self, marker: str):
        self.marker = marker
        self.finished = 0

    def transition(self, key, start, finish, **kwargs):
        if not str(key).startswith("perceptcore-"):
            return
        if finish == "memory":
            self.finished += 1
        elif finish == "executing" and self.finished >= 1:
            try:
                descriptor = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(descriptor, str(os.getpid()).encode())
            os.close(descriptor)
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread (restarted by their nannies when killed), and a client of the test's."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            distributed.Client(lc, set_as_default=False) as client:
        client.wait_for_workers(2)
        yield lc, client


def _dask(cluster) -> str:
    return f"runner.executor={{name: dask, options: {{address: '{cluster[0].scheduler_address}', threads: 1}}}}"


def test_dask_with_a_worker_killed_midway_gives_the_local_tables(tmp_path, cluster):
    lc, client = cluster
    spec = _study(tmp_path / "study", runner={"batch_size": 2, "workers": 2})
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce(str(marker)), name="kill-once")
    try:
        started = time.monotonic()
        _run(spec, tmp_path / "dask", _dask(cluster), "runner.cache=dask-cache")
        seconds = time.monotonic() - started
    finally:
        client.unregister_worker_plugin("kill-once")
    assert marker.exists(), "no worker was killed"
    killed = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)
    # Every unit is in the client's cache: 2 checkpoints x 12 chunks of 2 cases.
    assert len(list((tmp_path / "study" / "dask-cache" / "cnn").glob("*.npz"))) == 24
    _run(spec, tmp_path / "local")  # the same units in local processes
    _same_tables(tmp_path / "local", tmp_path / "dask")
    print(f"dask run with a killed worker: {seconds:.1f} s")


def _stopped_study(folder: Path, cluster, **changes):
    """A study's runner, built (its inputs checked and hashed) on this machine, ready to run on the cluster."""
    spec_path = _study(folder, **changes)
    registry = load_registry()
    spec = load_spec(spec_path, [_dask(cluster)])
    return Runner(spec, ImageWork.of(spec, registry, {})), spec


def test_a_worker_without_an_image_names_itself_and_the_file(tmp_path, cluster):
    runner, spec = _stopped_study(tmp_path / "study", cluster)
    image = tmp_path / "study" / "images" / "case05.npy"
    image.unlink()  # present when the client checked it: as on a worker that cannot see the client's disk
    with pytest.raises(PerceptcoreError) as info:
        runner.run(lambda message: None)
    workers = set(cluster[1].scheduler_info()["workers"])
    assert info.value.where == "runner.executor"
    assert str(image) in info.value.message and "at the paths the client uses" in info.value.message
    assert any(address in info.value.message for address in workers), info.value.message


class WrongCount:
    """A model plugin that breaks its contract: the core's PerceptcoreError is raised inside the task."""

    name = "wrong_count"

    @attrs.frozen
    class Options:
        input_size: int = 32

    def load(self, checkpoint, options, device):
        return None

    def predict(self, loaded, cases):
        return np.full(len(cases) + 1, 0.5)


def test_an_error_inside_a_task_keeps_its_message_and_where(tmp_path, cluster, capsys, monkeypatch):
    module = type(sys)("wrong_count_plugin")
    module.perceptcore_register_models = hookimpl(lambda register: register(WrongCount()))
    module.perceptcore_register_models.__name__ = "perceptcore_register_models"
    real = perceptcore.plugins.load_registry
    monkeypatch.setattr(perceptcore.plugins, "load_registry",
                        lambda extra_plugins=(): real([("wrong_count_plugin", module)]))
    spec = _study(tmp_path / "study")
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--set", "observers[1].model=wrong_count",
                 "--set", _dask(cluster)]) == 1
    err = capsys.readouterr().err
    assert "spec.yaml: observers.model: model 'wrong_count' returned 5 values for 4 cases" in err, err
    assert "(on Dask worker " in err and "Traceback" not in err


def test_a_worker_without_a_plugin_names_itself_and_the_module(tmp_path, cluster, monkeypatch):
    # A plugin importable here only: the workers started before its folder joined sys.path.
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "only_here_plugin.py").write_text(
        "import numpy as np\n"
        "import attrs\n"
        "from perceptcore.plugins import hookimpl\n\n"
        "class Half:\n"
        "    name = 'only_here'\n\n"
        "    @attrs.frozen\n"
        "    class Options:\n"
        "        input_size: int = 32\n\n"
        "    def load(self, checkpoint, options, device):\n"
        "        return None\n\n"
        "    def predict(self, loaded, cases):\n"
        "        return np.full(len(cases), 0.5)\n\n"
        "@hookimpl\n"
        "def perceptcore_register_models(register):\n"
        "    register(Half())\n")
    monkeypatch.syspath_prepend(str(folder))
    import only_here_plugin

    registry = load_registry([("only_here_plugin", only_here_plugin)])
    spec_path = _study(tmp_path / "study")
    spec = load_spec(spec_path, [_dask(cluster), "observers[1].model=only_here"])
    runner = Runner(spec, ImageWork.of(spec, registry, {}))
    with pytest.raises(PerceptcoreError) as info:
        runner.run(lambda message: None)
    assert info.value.where == "runner.executor"
    assert "cannot import module 'only_here_plugin'" in info.value.message
    assert "plugin packages installed" in info.value.message
    assert any(address in info.value.message for address in cluster[1].scheduler_info()["workers"])


@pytest.mark.slow
def test_training_on_a_dask_local_cluster_equals_local_training(tmp_path):
    """No address: the run starts a LocalCluster of its budget (runner.workers processes) and closes it."""
    spec = _training_study(tmp_path / "study", runner={"batch_size": 4, "workers": 1})
    _run(spec, tmp_path / "local")
    started = time.monotonic()
    _run(spec, tmp_path / "dask", "runner.executor.name=dask", "runner.cache=dask-cache")
    print(f"dask training and predictions on a LocalCluster: {time.monotonic() - started:.1f} s")
    _equal_contents(_checkpoints(spec, ".perceptcore-cache"), _checkpoints(spec, "dask-cache"))
    _same_tables(tmp_path / "local", tmp_path / "dask", TABLES + ("training.csv",))
