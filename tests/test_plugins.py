"""The hook specs, the registry's checks, the `plugins` command, a custom metric in a run,
and the rule that the core imports no plugin."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import attrs
import numpy as np
import pandas as pd
import pytest

import perceptcore.plugins
from perceptcore.cli import main
from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import KINDS, HookSpecs, Registry, hookimpl, load_registry
from synthetic import write_study

CORE = Path(perceptcore.plugins.__file__).resolve().parent
DIRECT = "(registered directly)"


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A module whose functions are the given hook implementations."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        function.__name__ = hook_name
        setattr(module, hook_name, hookimpl(function))
    return module


# --------------------------------------------------------------------------- one object of every kind

class BoxBlur:
    name = "box_blur"
    severity_unit = "pixels"

    @attrs.frozen
    class Options:
        pass

    def perturb(self, batch, severity, options, generator):
        return batch.pixels


class ConstantModel:
    name = "constant_model"

    @attrs.frozen
    class Options:
        pass

    def load(self, checkpoint, options, device):
        return None

    def predict(self, loaded, cases):
        return np.full(len(cases), 0.5)


class HalfSplit:
    name = "half_split"
    subgroups = ("first", "second")

    def assign(self, cases, options, where):
        return np.where(np.arange(len(cases)) < len(cases) // 2, "first", "second")


class CountMetric:
    name = "count_metric"
    outputs = {"counts": ("observer", "n")}

    def compute(self, study):
        return {"counts": pd.DataFrame({"observer": list(study.observers), "n": 0})}


class NullBackend:
    name = "null_backend"
    methods = ("advi",)
    priority = -100

    def unavailable_reason(self):
        return "it is only a test"

    def fit(self, data, settings, progress):
        raise NotImplementedError


class EmptyDataset:
    name = "empty_dataset"

    @attrs.frozen
    class Options:
        n: int = 1

    def generate(self, options, folder, seed, progress):
        (folder / "cases.csv").write_text("case,label\n")


class EchoCommand:
    name = "echo-words"
    help = "print the words given"

    def add_arguments(self, parser):
        parser.add_argument("words", nargs="+")

    def run(self, args):
        print(" ".join(args.words))
        return 0


class InlineExecutor:
    name = "inline_executor"

    @attrs.frozen
    class Options:
        pass

    def start(self, options, workers, threads, where):
        raise NotImplementedError  # registration only; tests/test_executors.py runs executors


EXAMPLES = {
    "command": EchoCommand(),
    "executor": InlineExecutor(),
    "perturbation": BoxBlur(),
    "model": ConstantModel(),
    "subgroups": HalfSplit(),
    "metric": CountMetric(),
    "backend": NullBackend(),
    "dataset": EmptyDataset(),
}


def _hook_for(kind, obj):
    def hook(register):
        register(obj)

    return KINDS[kind][0], hook


def test_every_hook_spec_has_a_one_line_docstring_and_a_kind():
    specs = [name for name in dir(HookSpecs) if name.startswith("perceptcore_")]
    assert len(specs) == 8
    for name in specs:
        doc = inspect.getdoc(getattr(HookSpecs, name))
        assert doc, f"{name} has no docstring"
        assert "\n" not in doc.strip(), f"{name}'s docstring is not one line"
    assert sorted(hook for hook, _ in KINDS.values()) == sorted(specs)
    assert sorted(EXAMPLES) == sorted(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_plugin_of_every_kind_is_registered(kind):
    hook_name, hook = _hook_for(kind, EXAMPLES[kind])
    registry = load_registry(extra_plugins=[(f"test_{kind}", plugin_module(f"test_{kind}", **{hook_name: hook}))])
    mine = [item for item in registry.all(kind) if item.plugin == f"test_{kind}"]
    assert len(mine) == 1
    item = mine[0]
    assert (item.kind, item.name, item.package) == (kind, EXAMPLES[kind].name, DIRECT)
    assert item.obj is EXAMPLES[kind]
    assert registry.get(kind, EXAMPLES[kind].name, "somewhere") is EXAMPLES[kind]
    # It is listed beside the bundled plugins, not instead of them.
    assert "breast_lesions" in registry.names("subgroups")
    assert {"torch", "stan"} <= set(registry.names("backend"))


def test_one_plugin_may_register_several_kinds_and_objects():
    module = plugin_module(
        "multi",
        perceptcore_register_metrics=lambda register: (register(CountMetric()), register(_named(CountMetric, "other"))),
        perceptcore_register_perturbations=lambda register: register(BoxBlur()),
    )
    registry = load_registry(extra_plugins=[("multi", module)])
    assert {i.name for i in registry.all("metric") if i.plugin == "multi"} == {"count_metric", "other"}
    assert [i.name for i in registry.all("perturbation") if i.plugin == "multi"] == ["box_blur"]


def _named(cls, name):
    obj = cls()
    obj.name = name
    return obj


class _NoCompute:
    name = "half_metric"
    outputs = {"t": ("a",)}


@pytest.mark.parametrize("hook, message", [
    (lambda register: register(_NoCompute()), "metric 'half_metric' lacks compute"),
    (lambda register: register(_named(CountMetric, "Bad-Name")),
     "registered a metric whose name 'Bad-Name' is not a lower-case identifier"),
    (lambda register: register(object()), "registered a metric whose name None is not a lower-case identifier"),
    (lambda register: 1 / 0, "failed while registering metrics: ZeroDivisionError: division by zero"),
])
def test_registration_errors_name_the_plugin(hook, message):
    module = plugin_module("faulty", perceptcore_register_metrics=hook)
    with pytest.raises(PerceptcoreError) as info:
        load_registry(extra_plugins=[("faulty", module)])
    assert info.value.where == "plugin 'faulty'"
    assert message in info.value.message


def test_unknown_hook_names_the_plugin():
    module = plugin_module("typo", perceptcore_register_metric=lambda register: None)
    with pytest.raises(PerceptcoreError) as info:
        load_registry(extra_plugins=[("typo", module)])
    assert info.value.where == "plugin 'typo'"
    assert "perceptcore_register_metric" in info.value.message


def test_hook_with_wrong_arguments_names_the_plugin():
    module = plugin_module("wrong_args", perceptcore_register_metrics=lambda register, extra: None)
    with pytest.raises(PerceptcoreError) as info:
        load_registry(extra_plugins=[("wrong_args", module)])
    assert info.value.where == "plugin 'wrong_args'"
    assert "extra" in info.value.message


def test_duplicate_names_name_both_plugins():
    first = plugin_module("first_plugin", perceptcore_register_metrics=lambda register: register(_named(CountMetric, "twin")))
    second = plugin_module("second_plugin", perceptcore_register_metrics=lambda register: register(_named(CountMetric, "twin")))
    with pytest.raises(PerceptcoreError) as info:
        load_registry(extra_plugins=[("first_plugin", first), ("second_plugin", second)])
    message = info.value.message
    assert info.value.where == "plugins"
    assert "metric 'twin' is registered by both" in message
    assert "plugin 'first_plugin'" in message and "plugin 'second_plugin'" in message


def test_duplicate_of_a_bundled_plugin_names_both():
    copycat = plugin_module("copycat",
                            perceptcore_register_metrics=lambda register: register(_named(CountMetric, "ks_separability")))
    with pytest.raises(PerceptcoreError) as info:
        load_registry(extra_plugins=[("copycat", copycat)])
    message = info.value.message
    assert "metric 'ks_separability' is registered by both" in message
    assert "plugin 'ks_separability' (perceptcore)" in message and "plugin 'copycat'" in message


def test_same_plugin_name_twice_is_an_error():
    a = plugin_module("same", perceptcore_register_perturbations=lambda register: register(BoxBlur()))
    b = plugin_module("same", perceptcore_register_models=lambda register: register(ConstantModel()))
    with pytest.raises(PerceptcoreError) as info:
        load_registry(extra_plugins=[("same", a), ("same", b)])
    assert info.value.where == "plugin 'same'"


def install_fake_distribution(folder: Path, name: str, version: str, entry_points: dict) -> None:
    """A distribution's metadata (dist-info) and modules in `folder`, as pip would leave them."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"{plugin} = {target}" for plugin, target in entry_points.items()]
    (info / "entry_points.txt").write_text("[perceptcore]\n" + "\n".join(lines) + "\n")
    for target in entry_points.values():
        (folder / f"{target}.py").write_text('"""A plugin module registering nothing."""\n')


def test_two_packages_declaring_one_plugin_name_is_an_error_naming_both(tmp_path, monkeypatch):
    """Not a silent drop of whichever comes second on sys.path."""
    install_fake_distribution(tmp_path, "acme-subgroups", "1.2.0", {"lesion_types": "acme_lesion_types"})
    install_fake_distribution(tmp_path, "other-subgroups", "0.3.1", {"lesion_types": "other_lesion_types"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PerceptcoreError) as info:
        load_registry()
    message = info.value.message
    assert info.value.where == "plugins"
    assert "plugin name 'lesion_types' is declared by both" in message
    assert "acme-subgroups 1.2.0 (acme_lesion_types)" in message and "other-subgroups 0.3.1 (other_lesion_types)" in message


COMMAND_PLUGIN = '''"""A third-party command."""
from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl


class Shout:
    name = "{name}"
    help = "shout a word"

    def add_arguments(self, parser):
        parser.add_argument("word")

    def run(self, args):
        if args.word == "bad":
            raise PerceptcoreError("not a word to shout", "word")
        print(args.word.upper())
        return 0


@hookimpl
def perceptcore_register_commands(register):
    register(Shout())
'''


def test_a_plugin_command_runs_through_the_cli(tmp_path, monkeypatch, capsys):
    install_fake_distribution(tmp_path, "shouting", "0.2.0", {"shout": "shout_plugin"})
    (tmp_path / "shout_plugin.py").write_text(COMMAND_PLUGIN.format(name="shout"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["shout", "hello"]) == 0
    assert capsys.readouterr().out == "HELLO\n"
    assert main(["shout", "bad"]) == 1
    assert capsys.readouterr().err == "error: word: not a word to shout\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "shout a word" in capsys.readouterr().out
    assert main(["plugins"]) == 0
    assert parse_listing(capsys.readouterr().out)["shout"]["kind"] == "command"


def test_a_plugin_command_may_not_take_a_built_in_name(tmp_path, monkeypatch, capsys):
    install_fake_distribution(tmp_path, "impostor", "0.1.0", {"impostor": "impostor_plugin"})
    (tmp_path / "impostor_plugin.py").write_text(COMMAND_PLUGIN.format(name="train"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["something-else"]) == 1
    assert capsys.readouterr().err == ("error: plugin 'impostor' (impostor): command 'train' is built into perceptcore; "
                                       "rename the plugin's command\n")


def test_a_plugin_name_taken_by_the_bundled_plugins_is_an_error(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, "copycat-metrics", "0.1.0", {"ks_separability": "copycat_ks"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PerceptcoreError, match=r"'ks_separability' is declared by both package perceptcore .*"
                                               r"and package copycat-metrics 0\.1\.0 \(copycat_ks\)|"
                                               r"'ks_separability' is declared by both package copycat-metrics"):
        load_registry()


def test_one_distribution_seen_twice_on_sys_path_is_loaded_once(tmp_path, monkeypatch):
    for copy in ("first", "second"):
        install_fake_distribution(tmp_path / copy, "acme-subgroups", "1.2.0", {"lesion_types": "acme_lesion_types"})
        monkeypatch.syspath_prepend(str(tmp_path / copy))
    load_registry()  # no error: the same package, twice visible


def test_unknown_name_lists_what_exists_and_suggests():
    registry = load_registry()
    with pytest.raises(PerceptcoreError) as info:
        registry.get("metric", "predictive_confidance", "analyses.metrics[0]")
    assert info.value.where == "analyses.metrics[0]"
    assert "did you mean 'predictive_confidence'?" in info.value.message
    with pytest.raises(PerceptcoreError, match=r"unknown perturbation 'gaussian_lowpas'; did you mean 'gaussian_lowpass'\? "
                                               r"available: .*gaussian_noise"):
        registry.get("perturbation", "gaussian_lowpas", "x")
    with pytest.raises(PerceptcoreError, match=r"unknown perturbation 'blur'; available: none \(is a plugin missing\?\)"):
        Registry().get("perturbation", "blur", "x")


# --------------------------------------------------------------------------- the plugins command

BUNDLED = {
    "breast_lesions": "subgroups",
    "predictive_confidence": "metric",
    "ks_separability": "metric",
    "simpsons_paradox": "metric",
    "roi_separability": "metric",
    "stan": "backend",
    "torch": "backend",
    "small_cnn": "model",
    "gaussian_lowpass": "perturbation",
    "ideal_lowpass": "perturbation",
    "ideal_highpass": "perturbation",
    "gaussian_noise": "perturbation",
    "patch_shuffle": "perturbation",
}


def parse_listing(text: str) -> dict:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["name", "kind", "package", "version", "plugin"]
    rows = {}
    for line in lines[1:]:
        name, kind, package, version, plugin = line.split()
        rows[name] = {"kind": kind, "package": package, "version": version, "plugin": plugin}
    return rows


def test_plugins_command_lists_the_bundled_plugins(capsys):
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    rows = parse_listing(captured.out)
    version = metadata.version("perceptcore")
    for name, kind in BUNDLED.items():
        assert name in rows, f"{name} is not listed"
        assert rows[name]["kind"] == kind
        assert rows[name]["package"] == "perceptcore"
        assert rows[name]["version"] == version


# --------------------------------------------------------------------------- a custom metric in a run

class ObservedMean:
    """Mean observed prediction per observer, analysed subgroup and severity, beside gamma's mean."""

    name = "observed_mean"
    outputs = {"observed_mean": ("observer", "subgroup", "severity", "mean_prediction", "n_predictions", "gamma_mean")}

    def compute(self, study):
        confidence = study.table("predictive_confidence")  # another metric's table
        rows = []
        for subgroup in study.groupings[0].analysed:
            members = study.subgroup == subgroup
            for observer, group in study.observers.items():
                for s, severity in enumerate(study.severities):
                    values = group.values[:, s, members]
                    values = values[np.isfinite(values)]
                    match = confidence[(confidence["observer"] == observer) & (confidence["subgroup"] == subgroup)
                                       & (confidence["severity"] == severity)]
                    gamma = float(match["gamma_mean"].iloc[0]) if len(match) else np.nan
                    rows.append((observer, subgroup, severity, values.mean(), len(values), gamma))
        return {"observed_mean": pd.DataFrame(rows, columns=self.outputs["observed_mean"])}


def test_custom_metric_table_is_written_by_a_run(tmp_path, capsys, monkeypatch):
    spec = write_study(tmp_path / "study")
    module = plugin_module("observed_mean_plugin", perceptcore_register_metrics=lambda register: register(ObservedMean()))
    real = perceptcore.plugins.load_registry
    monkeypatch.setattr(perceptcore.plugins, "load_registry", lambda extra_plugins=(): real([("observed_mean_plugin", module)]))
    out = tmp_path / "out"
    code = main(["run", str(spec), "--out", str(out), "--set", "analyses.metrics=[predictive_confidence, observed_mean]",
                 "--set", "model.draws=30", "--set", "model.max_iterations=300"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    table = pd.read_csv(out / "observed_mean.csv", dtype={"severity": str})
    assert list(table.columns) == list(ObservedMean.outputs["observed_mean"])
    assert "observed_mean.csv" in json.loads((out / "run.json").read_text())["outputs"]

    # Independently: join the prediction files to the cases table and average.
    folder = tmp_path / "study"
    cases = pd.read_csv(folder / "cases.csv")
    expected = []
    for observer in ("radiologists", "dnns"):
        predictions = pd.read_csv(folder / f"{observer}.csv", dtype={"severity": str}).merge(cases, on="case")
        summary = predictions.groupby(["subgroup", "severity"])["prediction"].agg(["mean", "size"]).reset_index()
        summary.insert(0, "observer", observer)
        expected.append(summary)
    expected = pd.concat(expected)
    expected = expected[expected["subgroup"].isin(["microcalcifications", "soft_tissue_lesions"])]
    merged = table.merge(expected, on=["observer", "subgroup", "severity"], how="outer", indicator=True)
    assert (merged["_merge"] == "both").all()
    assert len(merged) == 2 * 2 * 3
    np.testing.assert_allclose(merged["mean_prediction"], merged["mean"], rtol=1e-12)
    np.testing.assert_array_equal(merged["n_predictions"], merged["size"])

    # The gamma_mean column came from the predictive_confidence table of the same run.
    confidence = pd.read_csv(out / "predictive_confidence.csv", dtype={"severity": str})
    joined = table.merge(confidence, on=["observer", "subgroup", "severity"], suffixes=("", "_pc"))
    assert len(joined) == 2 * 2 * 2  # every perturbed severity
    np.testing.assert_allclose(joined["gamma_mean"], joined["gamma_mean_pc"], rtol=1e-12)
    assert table.loc[table["severity"] == "0", "gamma_mean"].isna().all()


# --------------------------------------------------------------------------- the core imports no plugin

def test_core_source_imports_no_plugin():
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"^\s*(from|import)\s+perceptcore_plugins\b", line) or \
                    re.search(r"import_module\(\s*['\"]perceptcore_plugins", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert CORE.name == "core" and len(list(CORE.glob("*.py"))) >= 8
    assert offenders == []


def test_importing_the_core_loads_no_plugin():
    code = ("import sys, perceptcore.cli, perceptcore.run, perceptcore.spec, perceptcore.data, perceptcore.stats, "
            "perceptcore.latent_model, perceptcore.plugins; "
            "print([m for m in sys.modules if m.startswith('perceptcore_plugins')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@attrs.frozen
class _NewStyleOptions:
    path: str | None = None  # PEP 604 unions, as plugins written for Python >= 3.10 spell Optional
    count: int | None = None


def test_plugin_options_may_spell_optional_fields_as_pep_604_unions():
    from perceptcore.spec import structure

    assert structure(_NewStyleOptions, {"path": "a.pt", "count": 3}, "options") == _NewStyleOptions("a.pt", 3)
    with pytest.raises(PerceptcoreError, match=r"options.count: expected a whole number, got 'many'"):
        structure(_NewStyleOptions, {"count": "many"}, "options")
