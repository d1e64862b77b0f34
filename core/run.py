"""A study run: validated inputs, latent-model fits, analysis tables, and the files they become.

`Study` owns everything a run produces. Metrics (plugins) ask it for what they need —
posteriors, posterior-predictive probabilities, observed predictions, other metrics'
tables — and it computes each thing once, on demand.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import fcntl
import glob
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import pandas as pd

from . import __version__
from .calibration import COLUMNS as CALIBRATION_COLUMNS
from .calibration import StudyCalibration, calibrate_group
from .data import (Cases, RoiPredictions, case_ids, load_cases, load_observer_group, load_roi_published,
                   load_roi_tidy, read_table, require_columns)
from .errors import PerceptcoreError
from .latent_model import Fit, FitSettings, LatentModelData, inference_data, predictive_probability
from .plugins import Registry
from .resources import CLOCK, StageProgress, available_cores, budget, stage, worker_pool
from .spec import Spec, check_analysed_subgroups, resolve_backend


@attrs.frozen(eq=False)
class Grouping:
    """How cases are grouped for one latent-model fit.

    `split` keeps the definition's subgroups; `merged` joins the analysed ones into one
    (named with '+'), for the Simpson's-paradox check. `analysed` are the subgroups
    reported; `group_names[case_group[n]]` is case n's group.
    """

    name: str
    analysed: tuple
    group_names: tuple
    case_group: np.ndarray

    def members(self, subgroup: str) -> np.ndarray:
        return self.case_group == self.group_names.index(subgroup)


def progress_to_stderr(message: str) -> None:
    elapsed = CLOCK.elapsed()  # the whole run's time so far, beside each stage's own estimate
    when = "" if elapsed is None else f" {int(elapsed) // 60}:{int(elapsed) % 60:02d}"
    print(f"[perceptcore{when}] {message}", file=sys.stderr, flush=True)


class Study:
    """One study: its spec, its data, and every result computed from them."""

    def __init__(self, spec: Spec, registry: Registry, progress: Callable[[str], None] = progress_to_stderr,
                 training_log=None):
        """`training_log`: the run's training.TrainingLog, whose training curves the report draws."""
        self.spec = spec
        self.registry = registry
        self.progress = progress
        self.training_log = training_log
        with stage("data"):
            self._load()
        with stage("calibration"):
            self.calibration = self._calibrate() if spec.calibration is not None else None
        self.groupings = self._groupings()
        for i, metric in enumerate(self.metrics):
            check = getattr(metric, "check", None)
            if check is not None:
                check(self, f"analyses.metrics[{i}]")
        self._fits: dict = {}
        self._selected: dict = {}
        self._predictive: dict = {}
        self._tables: dict = {} if self.calibration is None else {"calibration": self.calibration.table}
        self._computing: set = set()

    def _load(self) -> None:
        spec, registry = self.spec, self.registry
        self.severities = spec.severities.levels
        self.alpha = spec.analyses.alpha
        self.metrics = [registry.get("metric", name, f"analyses.metrics[{i}]")
                        for i, name in enumerate(spec.analyses.metrics)]
        self.backend = resolve_backend(self.spec, self.registry)
        self.cases, self.subgroup = self._load_cases()
        self.observers = {
            o.name: load_observer_group(o.name, spec.path(o.predictions), o.likelihood, o.columns, self.cases,
                                        self.severities, f"observers[{i}].predictions")
            for i, o in enumerate(spec.observers)
        }
        self.roi = self._load_roi()

    # ------------------------------------------------------------------ loading

    def _load_cases(self) -> tuple[Cases, np.ndarray]:
        spec = self.spec
        section = spec.cases
        cases = load_cases(spec.path(section.file), section.id, section.label, section.positive, "cases.file")
        definition = self.registry.get("subgroups", spec.subgroups.definition, "subgroups.definition")
        subgroup = np.asarray(definition.assign(cases.table, dict(spec.subgroups.options), "subgroups.options"), dtype=str)
        if subgroup.shape != (len(cases),):
            raise PerceptcoreError(f"subgroup definition {definition.name!r} returned {subgroup.shape[0]} labels "
                                   f"for {len(cases)} cases", "subgroups.definition")
        known = tuple(definition.subgroups)
        unknown = sorted(set(subgroup) - set(known))
        if unknown:
            raise PerceptcoreError(f"subgroup definition {definition.name!r} produced unknown subgroup {unknown[0]!r}",
                                   "subgroups.definition")
        self._check_cases(cases, subgroup, definition)
        return cases, subgroup

    def _check_cases(self, cases: Cases, subgroup: np.ndarray, definition, among: str = "") -> None:
        """Every analysed subgroup has cases and positive cases, and not every case is positive."""
        check_analysed_subgroups(self.spec, definition)
        for i, name in enumerate(self.spec.subgroups.analyse):
            where = f"subgroups.analyse[{i}]"
            members = subgroup == name
            if not members.any():
                raise PerceptcoreError(f"subgroup {name!r} has no cases{among}", where)
            if not cases.positive[members].any():
                raise PerceptcoreError(f"subgroup {name!r} has no {cases.positive_label} cases{among}, so class "
                                       "separability is undefined", where)
        if cases.positive.all():
            raise PerceptcoreError(f"every case{among} is {cases.positive_label}; there is nothing to separate them "
                                   "from", "cases.file")

    def _load_roi(self) -> RoiPredictions | None:
        roi = self.spec.roi
        if roi is None:
            return None
        if roi.predictions is not None:
            return load_roi_tidy(self.spec.path(roi.predictions), roi.columns, self.cases, self.severities,
                                 "roi.predictions")
        return load_roi_published(self.spec.path(roi.interior), self.spec.path(roi.exterior),
                                  self.spec.path(roi.exams), self.cases, len(self.severities), "roi")

    # ------------------------------------------------------------------ calibration

    def _calibrate(self) -> StudyCalibration:
        """Fit each calibrated observer's maps on the validation cases and apply them; then keep only
        the test cases, for every observer group and the ROI study, so no analysis sees a case a
        calibration map was fitted on."""
        section = self.spec.calibration
        validation = self._validation_cases()
        where = "calibration.validation_cases" if section.validation_cases is not None else "calibration.validation"
        held_positive, label = self.cases.positive[validation], self.cases.positive_label
        if not validation.any():
            raise PerceptcoreError("holds out no case: the fraction of each (subgroup, class) stratum rounds to 0",
                                   where)
        if held_positive.all() or not held_positive.any():
            share = "all" if held_positive.all() else "none"
            raise PerceptcoreError(f"{share} of the {len(held_positive)} validation cases are {label}: fitting a "
                                   "calibration needs cases of both classes", where)
        test = np.flatnonzero(~validation)
        rows, before = [], {}
        for name in self._calibrated_observers():
            group = self.observers[name]
            values, fitted = calibrate_group(
                name, group.readers, group.values, self.cases.positive, validation, self.severities,
                _one_model_per_severity(self.spec, self.spec.observer(name)), section.strength_grid, section.folds,
                section.bins, self.spec.study.seed, where)
            rows += fitted
            before[name] = group.values[..., test]
            self.observers[name] = attrs.evolve(group, values=values)
        for name, group in list(self.observers.items()):
            kept = group.values[..., test]
            if np.isnan(kept[:, 0, :]).all():
                raise PerceptcoreError(f"observer group {name!r} has no prediction at the reference severity on the "
                                       "test cases (the others are held out for calibration)", where)
            self.observers[name] = attrs.evolve(group, values=kept)
        among = " among the test cases (the others are held out for calibration)"
        definition = self.registry.get("subgroups", self.spec.subgroups.definition, "subgroups.definition")
        self._check_cases(self.cases.subset(test), self.subgroup[test], definition, among)
        if self.roi is not None:
            self.roi = _roi_subset(self.roi, test, len(self.cases))
        self.cases, self.subgroup = self.cases.subset(test), self.subgroup[test]
        self.progress(f"calibrated {', '.join(before)} on {int(validation.sum())} validation cases; "
                      f"analysing the other {len(test)}")
        return StudyCalibration(pd.DataFrame(rows, columns=CALIBRATION_COLUMNS), before, int(validation.sum()))

    def _calibrated_observers(self) -> list[str]:
        listed = self.spec.calibration.observers
        if not listed:
            soft = [name for name, group in self.observers.items() if group.soft]
            if not soft:
                raise PerceptcoreError("no observer group predicts probabilities (every one gives 0/1 calls), so "
                                       "there is nothing to calibrate", "calibration")
            return soft
        for i, name in enumerate(listed):
            if not self.observers[name].soft:
                raise PerceptcoreError(f"observer {name!r} gives 0/1 calls; only probabilities can be calibrated",
                                       f"calibration.observers[{i}]")
        return list(listed)

    def _validation_cases(self) -> np.ndarray:
        """Which cases are held out to fit the calibration: those the file names, or a seeded share of
        every (subgroup, label) stratum, so each subgroup keeps its mix of classes in the test cases."""
        section = self.spec.calibration
        if section.validation_cases is not None:
            return _named_cases(self.spec.path(section.validation_cases), self.spec.cases.id, self.cases,
                                "calibration.validation_cases")
        rng = np.random.default_rng(self.spec.study.seed)
        validation = np.zeros(len(self.cases), bool)
        positive = self.cases.positive
        for subgroup, label in sorted(set(zip(self.subgroup, positive))):
            members = np.flatnonzero((self.subgroup == subgroup) & (positive == label))
            chosen = rng.permutation(members)[: int(np.floor(section.fraction * len(members) + 0.5))]
            validation[chosen] = True
        return validation

    def _groupings(self) -> list[Grouping]:
        definition = self.registry.get("subgroups", self.spec.subgroups.definition, "subgroups.definition")
        present = [name for name in definition.subgroups if (self.subgroup == name).any()]
        analysed = tuple(self.spec.subgroups.analyse)
        split = Grouping("split", analysed, tuple(present),
                         np.asarray([present.index(s) for s in self.subgroup]))
        groupings = [split]
        if len(analysed) > 1:
            merged_name = "+".join(analysed)
            names = [merged_name] + [s for s in present if s not in analysed]
            case_group = np.asarray([0 if s in analysed else names.index(s) for s in self.subgroup])
            groupings.append(Grouping("merged", (merged_name,), tuple(names), case_group))
        return groupings

    def grouping(self, name: str) -> Grouping:
        return next(g for g in self.groupings if g.name == name)

    # ------------------------------------------------------------------ the latent model

    def model_data(self, observer: str, grouping: Grouping, parameterisation: str) -> LatentModelData:
        group = self.observers[observer]
        r, s, n = np.nonzero(np.isfinite(group.values))
        return LatentModelData(
            n_cases=len(self.cases), n_readers=len(group.readers), n_severities=len(self.severities),
            n_groups=len(grouping.group_names), case_group=grouping.case_group,
            reader=r, severity=s, case=n, prediction=group.values[r, s, n], soft=group.soft,
            parameterisation=parameterisation, priors=self.spec.model.priors,
            case_positive=self.cases.positive if self.spec.model.case_effects == "by_class" else None,
        )

    def fit_settings(self) -> FitSettings:
        m = self.spec.model
        return FitSettings(method=m.method, draws=m.draws, seed=self.spec.fit_seed, max_iterations=m.max_iterations,
                           tolerance=m.tolerance, stan_tol_rel_obj=m.stan_tol_rel_obj, chains=m.chains,
                           warmup=m.warmup)

    def posterior(self, observer: str, grouping: Grouping) -> Fit:
        """The fit of the parameterisation with the highest ELBO (fitting every listed one once)."""
        key = (observer, grouping.name)
        if key not in self._selected:
            fits = []
            for parameterisation in self.spec.model.parameterisations:
                if key + (parameterisation,) not in self._fits:
                    self.progress(f"fitting {observer} ({grouping.name} subgroups, {parameterisation}) "
                                  f"with {self.backend.name} {self.spec.model.method}")
                    with stage("fits"):
                        fit = self.backend.fit(self.model_data(observer, grouping, parameterisation),
                                               self.fit_settings(), self.progress)
                    self._report_fit(key + (parameterisation,), fit)
                    self._fits[key + (parameterisation,)] = fit
                fits.append(self._fits[key + (parameterisation,)])
            self._selected[key] = max(fits, key=lambda f: f.selection_score)
        return self._selected[key]

    def _report_fit(self, key: tuple, fit: Fit) -> None:
        state = "trusted" if fit.converged else "NOT TRUSTED by its own diagnostic"
        score = f"log p(y) {fit.log_evidence:.1f}" if np.isfinite(fit.log_evidence) else f"ELBO {fit.elbo:.1f}"
        self.progress(f"  {key[0]} ({key[1]}, {key[2]}): {score}, {state}, {fit.seconds:.1f} s")

    def fit_all(self) -> None:
        """Fit every observer group x grouping x parameterisation now, `model.workers` at a time.

        Metrics ask for posteriors one by one; fitting them up front lets independent fits run
        in parallel processes. Each fit is seeded and self-contained, so its numbers do not
        depend on how many run at once.
        """
        jobs = [(o, g, p) for g in self.groupings for o in self.observers for p in self.spec.model.parameterisations
                if (o, g.name, p) not in self._fits]
        # At most one process per core, each with its share of the cores (core/resources.py).
        workers, threads = budget(min(self.spec.model.workers or available_cores(), max(len(jobs), 1)))
        if workers < 2:
            return  # posterior() fits them as they are asked for
        self.progress(f"fitting {len(jobs)} latent models with {self.backend.name} {self.spec.model.method}, "
                      f"{workers} at a time")
        # A backend running chains in parallel keeps within its share; the share does not change any number.
        settings = attrs.evolve(self.fit_settings(), cores=threads)
        with stage("fits"), worker_pool(workers, threads) as pool, \
                StageProgress(self.progress, "fitting", len(jobs)) as shown:
            futures = {(o, g.name, p): pool.submit(_fit, self.backend, self.model_data(o, g, p), settings)
                       for o, g, p in jobs}
            keys = {future: key for key, future in futures.items()}
            for future in concurrent.futures.as_completed(keys):
                self._report_fit(keys[future], future.result())
                shown.done()
        for key, future in futures.items():
            self._fits[key] = future.result()

    def predictive(self, observer: str, grouping: Grouping) -> np.ndarray:
        """Posterior-predictive P(positive call), (observers x severities x cases), from joint draws."""
        key = (observer, grouping.name)
        if key not in self._predictive:
            fit = self.posterior(observer, grouping)
            self._predictive[key] = predictive_probability(fit, self.model_data(observer, grouping, fit.parameterisation))
        return self._predictive[key]

    def fit_records(self) -> pd.DataFrame:
        """One row per fit: which backend/method/parameterisation, its ELBO, convergence, and selection."""
        rows = []
        for (observer, grouping, parameterisation), fit in sorted(self._fits.items(), key=self._fit_order):
            rows.append({
                "observer": observer, "grouping": grouping, "parameterisation": parameterisation,
                "backend": fit.backend, "method": fit.method, "elbo": fit.elbo, "log_evidence": fit.log_evidence,
                "selected": self._selected.get((observer, grouping)) is fit,
                "converged": fit.converged, "convergence": fit.convergence_note,
                **{k: v for k, v in fit.diagnostics.items() if np.isscalar(v)},
            })
        return pd.DataFrame(rows)

    def fits(self) -> dict:
        return dict(sorted(self._fits.items(), key=self._fit_order))

    def timings(self) -> dict:
        """Wall-clock seconds of each fit: for timings.json, the one output that differs between identical runs."""
        return {"fits": [{"observer": observer, "grouping": grouping, "parameterisation": parameterisation,
                          "seconds": round(fit.seconds, 2)}
                         for (observer, grouping, parameterisation), fit in self.fits().items()]}

    def _fit_order(self, item) -> tuple:
        """Spec order (grouping, observer, parameterisation), however the fits were asked for."""
        observer, grouping, parameterisation = item[0]
        return ([g.name for g in self.groupings].index(grouping), list(self.observers).index(observer),
                self.spec.model.parameterisations.index(parameterisation))

    # ------------------------------------------------------------------ analyses

    def table(self, name: str) -> pd.DataFrame:
        """An analysis table, computed (once) by the metric that declares it."""
        if name not in self._tables:
            metric = self._metric_for(name)
            if metric.name in self._computing:
                raise PerceptcoreError(f"metric {metric.name!r} depends on its own table {name!r}", "analyses.metrics")
            self._computing.add(metric.name)
            try:
                produced = metric.compute(self)
            finally:
                self._computing.discard(metric.name)
            for table_name, columns in metric.outputs.items():
                table = produced.get(table_name)
                if table is None or list(table.columns) != list(columns):
                    got = "nothing" if table is None else f"columns {list(table.columns)}"
                    raise PerceptcoreError(f"metric {metric.name!r} returned {got} for table {table_name!r}; "
                                           f"declared columns are {list(columns)}", "analyses.metrics")
                self._tables[table_name] = table.reset_index(drop=True)
        return self._tables[name]

    def _metric_for(self, table_name: str):
        for item in self.registry.all("metric"):
            if table_name in item.obj.outputs:
                return item.obj
        raise PerceptcoreError(f"no metric produces a table named {table_name!r}", "analyses.metrics")

    def compute_all(self) -> dict[str, pd.DataFrame]:
        if any(getattr(metric, "uses_posterior", False) for metric in self.metrics):
            self.fit_all()
        with stage("analyses"):
            for metric in self.metrics:
                for table_name in metric.outputs:
                    self.table(table_name)
        return dict(self._tables)

    # ------------------------------------------------------------------ outputs

    def compute(self) -> None:
        self.compute_all()

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the run folder's top level this study writes, by name: the metrics' (and the
        calibration's), the fits' diagnostics, and the models' (with model observers)."""
        from . import report  # matplotlib is imported only when a run writes figures

        tables = {**self._tables, "fit_diagnostics": self.fit_records()}
        models = report.model_table(self)
        if not models.empty:
            tables["models"] = models
        return tables

    def write_into(self, staging: Path) -> list[str]:
        """Tables, fit diagnostics, posteriors, computed predictions, figures and the report."""
        from . import report  # matplotlib is imported only when a run writes figures

        files = []
        tables = self.tables()
        for name, table in tables.items():
            table.to_csv(staging / f"{name}.csv", index=False)
            files.append(f"{name}.csv")
        fit_table = tables["fit_diagnostics"]
        files += self._write_posteriors(staging)
        files += self._copy_computed_predictions(staging)
        self.progress("drawing figures and the report")
        training = self.training_log.table() if self.training_log is not None else None
        files += report.write(self, dict(self._tables), fit_table, staging, training=training)
        return files

    def _write_posteriors(self, staging: Path) -> list[str]:
        """Each selected fit as ArviZ data (NetCDF): `az.from_netcdf` / `az.summary` read it."""
        folder = staging / "posterior"
        folder.mkdir()
        files = []
        for (observer, grouping), fit in self._selected.items():
            name = f"posterior/{observer}_{grouping}.nc"
            coords = {"reader": self.observers[observer].readers, "severity": self.severities,
                      "case": self.cases.ids,
                      "subgroup": self.grouping(grouping).group_names}
            data = self.model_data(observer, self.grouping(grouping), fit.parameterisation)
            inference_data(fit, data, coords).to_netcdf(str(staging / name))
            files.append(name)
        return files

    def _copy_computed_predictions(self, staging: Path) -> list[str]:
        """The prediction tables the runner computed from images belong with the results."""
        sources = {f"{o.name}.csv": o.predictions for o in self.spec.observers if o.computed}
        roi = self.spec.roi
        if roi is not None and self.spec.observer(roi.observer).computed:
            sources[f"{roi.observer}_roi.csv"] = roi.predictions
        for name, source in sources.items():
            (staging / "predictions").mkdir(exist_ok=True)
            shutil.copyfile(self.spec.path(source), staging / "predictions" / name)
        return [f"predictions/{name}" for name in sources]

    def manifest(self) -> dict:
        fits = self.fit_records()
        calibration = {} if self.calibration is None else {"calibration": {
            "observers": list(self.calibration.before), "validation_cases": self.calibration.n_validation,
            "test_cases": len(self.cases)}}
        return {**calibration,
            "backend": self.backend.name,
            "method": self.spec.model.method,
            "case_effects": self.spec.model.case_effects,
            "seed": self.spec.fit_seed,
            "parameterisations": list(self.spec.model.parameterisations),
            # Each fit runs on one torch thread; this many fit at once.
            "fit_workers": budget(min(self.spec.model.workers or available_cores(), max(len(self._fits), 1)))[0],
            "all_fits_converged": bool(fits["converged"].all()) if len(fits) else True,
        }


def write_run(spec: Spec, out_dir: Path, parts: list) -> Path:
    """Write every computed part (a Study, a robustness study, the training log) into out_dir.

    Each part has write_into(staging) -> file names, manifest() -> entries of run.json and
    optionally timings() -> entries of timings.json (pipeline.Pipeline.run has called each part's
    compute() before). Everything is written to a staging folder beside out_dir and swapped into
    place only when all of it succeeded (see `_swap_into_place`), so a failed or killed run leaves
    the previous results, never half-written ones. out_dir is locked from `claim_out_dir` (called
    here if the caller did not already) to the end.
    The run's clock (`resources.CLOCK`) runs from the claim on out_dir to its release.
    """
    out_dir = Path(out_dir).resolve()
    claim_out_dir(out_dir)
    try:
        # mkdir, not mkdtemp: the run folder gets the user's umask (mkdtemp's is owner-only).
        staging = out_dir.parent / f".{out_dir.name}.staging.{os.getpid()}.{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            files = []
            manifest = {"study": spec.study.name, "spec": spec.source, "perceptcore": __version__,
                        "python": platform.python_version(), "seed": spec.study.seed, "environment": environment()}
            timings = {}
            for part in parts:
                with stage("report"):
                    files += part.write_into(staging)
                manifest.update(part.manifest())
                timings.update(getattr(part, "timings", dict)())
            # Wall-clock seconds live here alone, so every other file is byte-identical between identical runs.
            # Wall time, CPU time of the run and of its worker processes, and each stage's share.
            timings = {**CLOCK.timings(), **timings}
            (staging / "timings.json").write_text(json.dumps(timings, indent=2))
            manifest["outputs"] = sorted(files + ["run.json", "timings.json"])
            (staging / "run.json").write_text(json.dumps(manifest, indent=2, default=str))
            _swap_into_place(staging, out_dir)
        except BaseException:
            _recover(out_dir)  # our staging folder goes, and an interrupted swap brings the old run back
            raise
    finally:
        release_out_dir(out_dir)
    return out_dir


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace out_dir by staging so that a kill at any point leaves a complete run at out_dir or
    beside it: the old run is renamed to its backup name, the new one renamed into place, and the
    backup deleted. `_recover` finishes or undoes a swap a kill interrupted."""
    backup = _beside(out_dir, "previous")
    if out_dir.exists():
        out_dir.rename(backup)
    staging.rename(out_dir)
    shutil.rmtree(backup, ignore_errors=True)


def _beside(out_dir: Path, what: str) -> Path:
    """The hidden names a run uses next to out_dir: its lock, its staging folders, the backup of the old run."""
    return out_dir.parent / f".{out_dir.name}.{what}"


# Longest name a run creates next to out_dir, beyond the name itself: ".{name}.staging.{pid}.XXXXXXXX".
_EXTRA_NAME = len("..staging.") + 7 + 1 + 8
_CLAIMED: dict = {}  # out_dir -> the open, locked lock file, while this process writes out_dir


def claim_out_dir(out_dir: Path) -> None:
    """Before any work: check that a run can write out_dir, lock it against other runs, and finish
    what a killed run left there (an interrupted swap, stale staging folders).

    The lock is an flock on a file beside out_dir, held until `release_out_dir` or the process ends
    (a killed run's lock goes with it). Claiming a folder this process holds does nothing."""
    out_dir = Path(out_dir).resolve()
    if out_dir in _CLAIMED:
        return
    _check_writable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PerceptcoreError(f"cannot create {out_dir.parent}: {exc.strerror}", "--out") from None
    lock = _lock(out_dir)
    try:
        _recover(out_dir)
        _check_existing(out_dir)
    except BaseException:
        _unlock(out_dir, lock)
        raise
    _CLAIMED[out_dir] = lock
    CLOCK.start()  # the run's work starts now: data, training and predictions come before write_run


def release_out_dir(out_dir: Path) -> None:
    lock = _CLAIMED.pop(Path(out_dir).resolve(), None)
    if lock is not None:
        _unlock(Path(out_dir).resolve(), lock)
        CLOCK.started = None  # the run is over: the next one starts its own clock


def _release_all() -> None:
    for out_dir in list(_CLAIMED):
        release_out_dir(out_dir)


atexit.register(_release_all)  # a run that failed before writing: its lock file goes when the process ends


def _lock(out_dir: Path):
    path = _beside(out_dir, "lock")
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise PerceptcoreError(f"another perceptcore run{f' (process {holder})' if holder else ''} is writing "
                                   "this folder; wait for it to finish or choose another --out", str(out_dir)) from None
        # The run before us removes the file when it is done; if it did after we opened it, lock the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            return handle
        handle.close()


def _unlock(out_dir: Path, handle) -> None:
    _beside(out_dir, "lock").unlink(missing_ok=True)  # while still holding it: see `_lock`
    handle.close()


def _recover(out_dir: Path) -> None:
    """Finish or undo what a killed run left (we hold the lock, so nothing else is writing here)."""
    backup = _beside(out_dir, "previous")
    if backup.exists():
        if out_dir.exists():  # killed after the new run was in place: only deleting the old one was left
            shutil.rmtree(backup)
        else:  # killed between the two renames: the old run comes back
            backup.rename(out_dir)
    for stale in out_dir.parent.glob(glob.escape(f".{out_dir.name}.staging.") + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def check_out_dir(out_dir: Path) -> None:
    """Whether a run could write out_dir, writing nothing that stays (validate calls it)."""
    out_dir = Path(out_dir).resolve()
    _check_writable(out_dir)
    _check_existing(out_dir)


def _check_writable(out_dir: Path) -> None:
    """Every name fits the file system, and the nearest existing folder takes a new entry (a probe)."""
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    shown = str(out_dir) if len(str(out_dir)) <= 200 else f"{str(out_dir)[:100]}…{str(out_dir)[-60:]}"
    if not ancestor.is_dir():
        raise PerceptcoreError(f"{shown} is under {ancestor}, which is a file, not a folder", "--out")
    limit = os.pathconf(ancestor, "PC_NAME_MAX")
    created = out_dir.relative_to(ancestor).parts
    for name in created:
        extra = _EXTRA_NAME if name == out_dir.name else 0
        if len(os.fsencode(name)) + extra > limit:
            raise PerceptcoreError(f"{shown}: the folder name {name[:40]!r}… is {len(name)} characters; this file "
                                   f"system allows {limit - extra} here", "--out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".perceptcore-probe-", dir=ancestor))
    except OSError as exc:
        raise PerceptcoreError(f"{shown} cannot be written: {ancestor}: {exc.strerror}", "--out") from None


def _check_existing(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier perceptcore run, and one holding files it did not write:
    a rerun replaces the whole folder, so those would be lost."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PerceptcoreError("exists and is not a folder; choose another --out", str(out_dir))
    found = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if not p.is_dir())
    if not found:
        return
    try:
        written = set(json.loads((out_dir / "run.json").read_text())["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PerceptcoreError("exists and is not an earlier perceptcore run; choose another --out",
                               str(out_dir)) from None
    foreign = [name for name in found if name not in written]
    if foreign:
        raise PerceptcoreError(f"holds {foreign[0]!r}, which perceptcore did not write ({len(foreign)} such files); "
                               "a rerun replaces the whole folder, so move them away or choose another --out",
                               str(out_dir))


# Every package whose version can change a number of the run.
# pillow and pydicom decode the pixels every model sees.
NUMERIC_PACKAGES = ("numpy", "scipy", "pandas", "torch", "arviz", "cmdstanpy", "pluggy", "matplotlib", "pillow",
                    "pydicom")


def environment() -> dict:
    """What a run's numbers depend on besides its inputs: package versions (CmdStan's where installed),
    the plugins' packages, the platform and the thread counts."""
    from importlib import metadata

    import torch

    versions = {}
    for name in NUMERIC_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import logging

        import cmdstanpy

        logging.getLogger("cmdstanpy").setLevel(logging.WARNING)  # "no CmdStan found" is not news here
        installed = cmdstanpy.cmdstan_version()
        versions["cmdstan"] = ".".join(map(str, installed)) if installed else None
    except Exception:  # CmdStan absent or unreadable: nothing ran on it
        versions["cmdstan"] = None
    from .plugins import load_registry

    plugins = {item.package: item.version for item in load_registry().all()}
    return {"packages": versions, "plugin_packages": dict(sorted(plugins.items())),
            "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "available_cores": available_cores(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def _one_model_per_severity(spec: Spec, observer) -> bool:
    """Whether an observer is a separate network at each severity (trained on perturbed images), so
    each severity needs its own calibration map."""
    trained = getattr(observer, "trained", None)
    if not trained:
        return False
    training = next((t for t in getattr(spec, "training", ()) if getattr(t, "name", None) == trained), None)
    return bool(getattr(training, "per_severity", True))


def _named_cases(path: Path, id_columns, cases: Cases, where: str) -> np.ndarray:
    """The cases a CSV names by the cases table's id column(s), as a mask over the cases."""
    table = read_table(path, where, text_columns=list(id_columns))
    require_columns(table, list(id_columns), path, where)
    ids = case_ids(table, id_columns)
    index = cases.index_of()
    mask = np.zeros(len(cases), bool)
    for row, case in enumerate(ids):
        if case not in index:
            raise PerceptcoreError(f"{path}: row {row + 2}: case {case!r} is not in the cases table", where)
        if mask[index[case]]:
            raise PerceptcoreError(f"{path}: row {row + 2}: case {case!r} is named twice", where)
        mask[index[case]] = True
    return mask


def _roi_subset(roi: RoiPredictions, keep: np.ndarray, n_cases: int) -> RoiPredictions:
    """The ROI study restricted to the cases at positions `keep`, renumbered as in the kept cases."""
    position = np.full(n_cases, -1)
    position[keep] = np.arange(len(keep))
    kept = position[roi.cases] >= 0
    if not kept.any():
        raise PerceptcoreError("no case of the ROI study is among the test cases (the others are held out for "
                               "calibration)", "roi")
    return attrs.evolve(roi, cases=position[roi.cases][kept],
                        values={region: values[..., kept] for region, values in roi.values.items()})


def _fit(backend, data: LatentModelData, settings: FitSettings) -> Fit:
    """One fit in a worker process (progress stays with the parent)."""
    return backend.fit(data, settings, lambda message: None)


def default_out_dir(spec: Spec) -> Path:
    if spec.outputs.dir:
        return Path(spec.base) / spec.outputs.dir
    return Path.cwd() / "perceptcore-runs" / spec.study.name
