"""A study's pipeline, top to bottom — and perceptcore's Python API (docs/api.md).

    import perceptcore

    study = perceptcore.load("spec.yaml", set={"model.draws": 200})
    study.validate()                      # what `perceptcore validate` does: checks, writes nothing
    results = study.run(out="runs/first")  # what `perceptcore run` does
    results.tables["predictive_confidence"]
    results.posterior("radiologists", "split")

The command line (core/cli.py) is a thin shell over this module: it parses arguments, calls
`load(...).run()`, `.validate()` or `.train()`, and prints what they return.

`Pipeline.run` is the whole run, in the order it happens:

1. data          the spec's generated data (`dataset`, core/dataset.py), made now unless cached; then
                 everything the run will use is checked before any work: the trainings, the image
                 manifest and models (core/runner.py), the robustness study (core/robustness.py)
2. training      the spec's `training` models (core/training.py), cached, resumable
3. predictions   model observers predict on perturbed images (core/runner.py), cached per work unit;
                 their tables replace the observers' `predictions` in the spec
4. calibration   the observers' tables and cases are loaded and calibrated (run.Study, core/calibration.py)
5. fits          the latent models the metrics ask for (run.Study.fit_all, core/latent_model.py, the
                 backend plugins), in parallel processes
6. analyses      every metric's tables (run.Study.compute_all, the metric plugins); the robustness
                 study predicts and computes its AUCs here
7. report        tables, posteriors, figures, report.html, run.json (run.write_run, core/report.py),
                 written to a staging folder and swapped into place only when all of it succeeded

Progress goes to a callback, `progress(message)`: by default the `[perceptcore m:ss] …` lines on
stderr (run.progress_to_stderr); `progress=logging.getLogger("perceptcore").info` sends them to the
`logging` module instead, and None silences them. Nothing here prints. Errors are
`PerceptcoreError`s naming where the problem is (the CLI prints them as one line and exits 1).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import attrs
import numpy as np
import pandas as pd

from . import plugins
from .dataset import generated, with_generated_data
from .errors import PerceptcoreError
from .plugins import Registry
from .resources import stage
from .robustness import Robustness
from .run import (Study, check_out_dir, claim_out_dir, default_out_dir, progress_to_stderr, release_out_dir,
                  write_run)
from .runner import ImageWork, Runner
from .spec import _CWD_RELATIVE, Spec, check_plugins, load_spec
from .training import TrainingLog, trainings_of

Progress = Callable[[str], None]


def load(spec_path: str | Path, set: Mapping | Iterable[str] | None = None) -> "Pipeline":
    """Read a study spec, with overrides, into a Pipeline (raises PerceptcoreError for a bad spec).

    `set` overrides spec keys as `--set` does: a mapping {"model.draws": 200, "data_dir": "/data"}
    (values are Python values: numbers, strings, lists, mappings) or a list of "key=value" strings
    (values are YAML, as on the command line). Dotted keys reach into sections, `[i]` into lists;
    `data_dir` and `outputs.dir` are paths relative to the current folder."""
    return Pipeline(load_spec(spec_path, _overrides(set)), str(spec_path))


def _quiet(message: str) -> None:
    pass


class Pipeline:
    """A study spec, read and checked, and what can be done with it: validate, train, run."""

    def __init__(self, spec: Spec, path: str):
        self.spec = spec  # core/spec.py's Spec, overrides applied
        self.path = path  # the spec's path as given

    def __repr__(self) -> str:
        return f"<perceptcore study {self.spec.study.name!r} from {self.spec.source}>"

    def out_dir(self, out: str | Path | None = None) -> Path:
        """Where `run(out)` writes: `out`, else the spec's outputs.dir, else ./perceptcore-runs/<study>."""
        return (Path(out) if out else default_out_dir(self.spec)).resolve()

    # ------------------------------------------------------------------ the run

    def run(self, out: str | Path | None = None, progress: Progress | None = progress_to_stderr) -> "Results":
        """Run the whole study and write its results into `out` (see `out_dir`); return them.

        An earlier run in `out` is replaced, anything else there is refused; nothing is written there
        unless everything succeeded. Generated data, trained models and predictions are cached
        beside the spec (runner.cache), so a rerun redoes only what changed."""
        progress = progress or _quiet
        started = time.perf_counter()
        spec = self.spec
        out = self.out_dir(out)
        claim_out_dir(out)  # before any work: lock `out`; refuse one that cannot be written or is not a run
        try:
            with _located(spec):
                registry = _checked_plugins(spec)  # before any data is generated, read, trained or predicted
                plan = self._plan(registry, progress)  # 1. data, and every part of the run checked
                for training in plan.trainings.values():  # 2. training
                    training.run(progress)
                log = TrainingLog(list(plan.trainings.values())) if plan.trainings else None
                parts = []
                if spec.perception:
                    observed = plan.runner.run(progress)  # 3. predictions: the spec reading the computed tables
                    parts.append(Study(observed, registry, progress, training_log=log))  # 4. data and calibration
                parts += [plan.robustness] if plan.robustness else []
                parts += [log] if log else []  # training.csv, and the report's training curves
            for part in parts:  # 5. fits and 6. analyses (and the robustness study's predictions)
                with stage("analyses"):  # a part's own stages (fits, predictions) count as theirs
                    part.compute()
            out = write_run(spec, out, parts)  # 7. the report and every file of the run, all at once
        except BaseException:
            release_out_dir(out)  # nothing was written: the next run may have `out`
            raise
        analysis = next((part for part in parts if isinstance(part, Study)), None)
        tables = {}  # every table at the top of the run folder, as written
        for part in parts:
            tables.update({"training": part.table()} if isinstance(part, TrainingLog) else part.tables())
        return Results(out=out, tables=tables, seconds=time.perf_counter() - started,
                       backend=analysis.backend.name if analysis else None,
                       method=spec.model.method if analysis else None)

    def _plan(self, registry: Registry, progress: Progress) -> "_Plan":
        """Step 1: the generated data (made now if not cached), and every part of the run built —
        which checks its inputs — before any work starts."""
        with stage("data"):  # timings.json: a generated dataset's time is the run's data stage
            spec = with_generated_data(self.spec, registry, progress)
        trainings = trainings_of(spec, registry)
        work = ImageWork.of(spec, registry, trainings)  # the image manifest, the model observers, the cache
        robustness = Robustness(spec, work, progress) if spec.robustness else None
        return _Plan(spec, trainings, Runner(spec, work), robustness)

    # ------------------------------------------------------------------ validate and train

    def validate(self, out: str | Path | None = None, progress: Progress | None = progress_to_stderr) -> "Validation":
        """Check the spec, its plugins, its data and the output folder as a run would, writing nothing
        (no dataset is generated, no cache entry stored); raise PerceptcoreError at the first problem.

        Data a run would generate or compute (a dataset, trained models, predictions) cannot be
        checked before they exist: the Validation says what the run will make instead."""
        progress = progress or _quiet
        spec = self.spec
        try:
            check_out_dir(self.out_dir(out))
        except PerceptcoreError as exc:  # the folder came from the spec: name its key too
            raise (exc.at(f"{spec.source}: outputs.dir" if spec.outputs.dir else spec.source)
                   if out is None else exc) from None
        with _located(spec):
            registry = _checked_plugins(spec)
            if not generated(spec, registry):  # validate generates nothing
                return Validation(spec.source, f"the run will generate dataset {spec.dataset.name!r}; the data "
                                  "are checked when they exist", pending=(f"dataset {spec.dataset.name!r}",))
            plan = self._plan(registry, progress)
            if plan.pending():
                return Validation(spec.source, f"the run will compute {', '.join(plan.pending())}; their analysis "
                                  "is checked when they exist", pending=tuple(plan.pending()))
            if not spec.perception:
                return Validation(spec.source, None)
            study = Study(plan.spec, registry, progress)  # loads the data and fits the calibration, in memory
        counts = {name: int(np.isfinite(group.values).sum()) for name, group in study.observers.items()}
        summary = (f"{len(study.cases)} cases, {len(study.severities)} severities, "
                   + ", ".join(f"{name}: {n} predictions" for name, n in counts.items())
                   + f"; backend {study.backend.name}")
        return Validation(spec.source, summary, cases=len(study.cases), severities=len(study.severities),
                          predictions=counts, backend=study.backend.name)

    def train(self, progress: Progress | None = progress_to_stderr) -> list["TrainedModel"]:
        """Train the spec's `training` models the cache lacks (a run trains them too); return every model."""
        progress = progress or _quiet
        with _located(self.spec):
            plan = self._plan(_checked_plugins(self.spec), progress)
            for training in plan.trainings.values():
                training.run(progress)
        if not plan.trainings:
            raise PerceptcoreError("the spec has no `training` section", self.path)
        return [TrainedModel(training.name, None if level is None else training.spec.severities.levels[level],
                             reader, path)
                for training in plan.trainings.values() for reader, path, _, level in training.checkpoints()]


@attrs.frozen(eq=False)
class _Plan:
    """Every part of a run, built and checked, before any work."""

    spec: Spec  # with data_dir at the generated data, if any
    trainings: dict  # name -> training.Training
    runner: Runner  # the perception study's predictions from images
    robustness: Robustness | None

    def pending(self) -> list[str]:
        """What the run will compute before its analyses can be checked."""
        planned = [f"{len(t.jobs)} models of training {t.name!r}" for t in self.trainings.values()]
        if self.runner.units:
            planned.append(f"{self.runner.n_predictions} predictions in {len(self.runner.units)} work units")
        if self.robustness:
            planned.append(f"the robustness study of {len(self.robustness.perturbations)} perturbations")
        return planned


def _checked_plugins(spec: Spec) -> Registry:
    """The loaded plugins, checked against the spec before any data is generated, read, trained or predicted."""
    registry = plugins.load_registry()  # looked up when called: a test may put other plugins in its place
    check_plugins(spec, registry)
    return registry


@contextlib.contextmanager
def _located(spec: Spec):
    """Errors inside are located in the spec file (`spec.yaml: observers[1].predictions: …`)."""
    try:
        yield
    except PerceptcoreError as exc:
        raise exc.at(spec.source) from None


# ---------------------------------------------------------------------- what the calls return


@attrs.frozen
class Validation:
    """What `validate` found: `str()` is the line `perceptcore validate` prints."""

    source: str  # the spec file
    summary: str | None  # None: nothing to summarise
    cases: int | None = None  # the analysed cases (the test cases, with a calibration)
    severities: int | None = None
    predictions: dict = attrs.Factory(dict)  # observer group -> number of predictions
    backend: str | None = None
    pending: tuple = ()  # what the run will generate or compute first, so that it could not be checked yet

    def __str__(self) -> str:
        return f"{self.source}: ok" + (f" — {self.summary}" if self.summary else "")


@attrs.frozen
class TrainedModel:
    """One model `train` trained (or found in the cache)."""

    training: str  # the training entry's name
    severity: str | None  # the severity label of its training images; None: unperturbed images
    reader: str  # seed_<n>
    path: Path  # its checkpoint


@attrs.frozen(eq=False)
class Results:
    """A finished run: the tables as DataFrames, and the folder it was written to."""

    out: Path  # the run folder
    tables: dict  # name -> DataFrame: every `<name>.csv` at the top of the folder, as written
    seconds: float  # wall-clock seconds of run()
    backend: str | None  # the latent model's backend and method (None: a robustness-only study)
    method: str | None

    @property
    def report_path(self) -> Path | None:
        """report.html (None when the spec turned the report off: outputs.report: false)."""
        path = self.out / "report.html"
        return path if path.exists() else None

    @property
    def fit_diagnostics(self) -> pd.DataFrame | None:
        return self.tables.get("fit_diagnostics")

    def posterior(self, observer: str, grouping: str = "split"):
        """The selected latent-model fit of an observer group as ArviZ InferenceData, read (into memory)
        from posterior/<observer>_<grouping>.nc; grouping is "split" (the subgroups) or "merged"."""
        path = self.out / "posterior" / f"{observer}_{grouping}.nc"
        if not path.is_file():
            written = json.loads((self.out / "run.json").read_text())["outputs"]
            have = [Path(name).stem for name in written if name.startswith("posterior/")]
            raise PerceptcoreError(f"no posterior of {observer!r} ({grouping}) in this run; it has "
                                   f"{', '.join(have) if have else 'none'}", str(self.out))
        import arviz

        with arviz.rc_context({"data.load": "eager"}):  # not tied to the file: a rerun may replace it
            return arviz.from_netcdf(str(path))


def _overrides(values) -> list[str]:
    """`load`'s `set`, as the `key=value` strings of `--set`."""
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    if isinstance(values, Mapping):
        # Python values, written as the YAML `--set` reads; paths (data_dir, outputs.dir) as written.
        return [f"{key}={value if str(key) in _CWD_RELATIVE else _yaml(_plain(value))}"
                for key, value in values.items()]
    return [str(value) for value in values]


def _yaml(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=float("inf"))
    return text[:-len("...\n")] if text.endswith("\n...\n") else text


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # a NumPy scalar
        return value.item()
    return value
