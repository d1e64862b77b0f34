"""Training model observers: the spec's `training` entries, one model per seed — and with
`per_severity`, one per seed and severity on images perturbed at that severity, as the
paper's "DNNs trained with filtered data".

A model plugin is trainable when it provides, besides `Options`, `load` and `predict`:

- gradient training: `network(options)` (a freshly initialised `torch.nn.Module`, of the
  kind `load` returns), `loss(network, cases, labels)` (the scalar training loss of a batch
  of `runner.CaseImages`; labels are float32 0/1 per case; the plugin preprocesses and
  augments, drawing randomness from torch's global generator, which is seeded here) and
  `checkpoint(network)` (what `torch.save` writes, in the layout `load` reads); or
- closed-form training: `fit(cases, labels, options, seed)`, returning the checkpoint's
  contents (tensors and plain numbers) from the whole training set at once.

Every training image is perturbed once per severity (one random draw per image, as a stored
filtered training set would be) and kept in memory while the models of that severity train.
Gradient training runs Adam over shuffled mini-batches for `epochs` epochs. After every
epoch the network, the optimiser and the losses are saved, so an interrupted training
resumes at the last finished epoch; each epoch's shuffling and the plugin's random draws are
seeded by (study seed, reader seed, epoch) alone, so a resumed training ends with exactly the
weights of an uninterrupted one. With a remote executor (`runner.executor: dask`) each model is a
task that trains from its start on images it perturbs itself, and returns the checkpoint for this
process to cache (docs/scale-out.md). Finished models are cached under a hash of everything they
depend on; a model trained on images at severity 0 (unperturbed) is the same model as one
trained without a perturbation, and is trained once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import pandas as pd

from . import __version__
from . import images as image_io
from .data import load_cases
from .devices import Placement, check_mixed_precision
from .errors import PerceptcoreError
from .executor import WHERE as EXECUTOR, executor_of, missing_files
from .plugins import Registry
from .resources import StageProgress, available_cores, budget, set_threads, stage
from .runner import (CaseImages, FileDigests, ViewImage, core_digest, options_key, perturb_image, plugin_version,
                     seed_of, severity_value, stable_hash)
from .spec import Spec, TrainingSection, structure, structure_options

GRADIENT = ("network", "loss", "checkpoint")


@attrs.frozen(eq=False)
class Job:
    """One model to train: a reader seed, at one severity level (None: unperturbed images)."""

    level: int | None
    severity: float
    seed: int
    key: str
    path: Path

    @property
    def reader(self) -> str:
        return f"seed_{self.seed}"

    @property
    def log(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def state(self) -> Path:
        return self.path.with_suffix(".state.pt")


def trains_by_gradient(model, section: TrainingSection, where: str) -> bool:
    """Whether the model trains by gradient (else it is fitted in closed form); raises, located, when
    it cannot be trained as the section asks. validate (spec.check_plugins) and Training both ask."""
    gradient = all(hasattr(model, name) for name in GRADIENT)
    if not gradient and not hasattr(model, "fit"):
        raise PerceptcoreError(f"model {section.model!r} cannot be trained: it provides neither "
                               f"{', '.join(GRADIENT)} nor fit", f"{where}.model")
    if section.init is not None and not gradient:
        raise PerceptcoreError(f"model {section.model!r} is fitted in closed form; there is nothing to fine-tune",
                               f"{where}.init")
    return gradient


class Training:
    """One `training` entry, validated on construction; `run` trains what the cache lacks."""

    def __init__(self, spec: Spec, registry: Registry, index: int):
        self.spec = spec
        self.section: TrainingSection = spec.training[index]
        self.where = where = f"training[{index}]"
        section = self.section
        self.model = registry.get("model", section.model, f"{where}.model")
        self.gradient = trains_by_gradient(self.model, section, where)
        self.placement = Placement.of(section, where)
        if section.mixed_precision:
            check_mixed_precision(self.model, f"{where}.mixed_precision", f"training {section.name!r}")
        self.options = structure_options(self.model.Options, section.options, f"{where}.options", spec)
        self.digests = FileDigests(Path(spec.base) / spec.runner.cache)
        self.manifest = image_io.load_manifest(spec.path(section.images.manifest), f"{where}.images.manifest",
                                               tuple(section.images.id))
        cases = load_cases(spec.path(section.cases.file), section.cases.id, section.cases.label,
                           section.cases.positive, f"{where}.cases.file")
        positive = dict(zip(cases.ids, cases.positive))
        self.case_ids = list(self.manifest.cases)
        missing = [c for c in self.case_ids if c not in positive]
        if missing:
            raise PerceptcoreError(f"case {missing[0]!r} of the manifest has no row in the cases table",
                                   f"{where}.images.manifest")
        self.labels = np.array([positive[c] for c in self.case_ids], dtype=np.float32)
        if self.labels.min() == self.labels.max():
            raise PerceptcoreError(f"every training case is {'' if self.labels[0] else 'not '}"
                                   f"{cases.positive_label}; a classifier needs both classes", f"{where}.cases.file")
        init_digest = None
        if section.init is not None:
            init = spec.path(section.init)
            if not init.is_file():
                raise PerceptcoreError(f"file not found: {init}", f"{where}.init")
            self.init, init_digest = init, self.digests(init)
        self.perturbation = self.perturbation_options = None
        levels: list = [(None, 0.0)]
        if section.per_severity:
            p = spec.perturbation
            self.perturbation = registry.get("perturbation", p.name, "perturbation.name")
            self.perturbation_options = structure(self.perturbation.Options, p.options, "perturbation.options")
            levels = [(i, severity_value(label, f"severities.levels[{i}]"))
                      for i, label in enumerate(spec.severities.levels)]
        # Contents, not paths: the file's name stays because it seeds the perturbation's draws.
        data_key = [[self.digests(r.file), r.file.name, r.view, r.laterality, r.pixel_spacing_mm, r.bits,
                     list(map(list, r.roi_boxes))] for r in self.manifest] + [self.case_ids, self.labels.tolist()]
        common = [__version__, core_digest(), self.model.name, plugin_version(registry, "model", self.model.name),
                  options_key(self.options), data_key, section.epochs, section.batch_size,
                  section.learning_rate, section.weight_decay, init_digest, spec.study.seed]
        perturbation = None
        if self.perturbation is not None:
            perturbation = [self.perturbation.name, plugin_version(registry, "perturbation", self.perturbation.name),
                            attrs.asdict(self.perturbation_options, recurse=True)]
        folder = Path(spec.base) / spec.runner.cache / "training"
        self.jobs = []
        for level, severity in levels:
            for seed in range(section.seeds):
                # Severity 0 is unperturbed by contract, so it shares the unperturbed model.
                parts = common + [perturbation if severity != 0 else None, severity, seed]
                placed = self.placement.key()  # None on the CPU in float32: the keys caches had before devices
                key = stable_hash(parts if placed is None else parts + [placed])
                self.jobs.append(Job(level, severity, seed, key, folder / f"{key}.pt"))
        # The executor (runner.executor), checked now, before any work: it runs the jobs when not local.
        self.executor = executor_of(spec, registry)

    @property
    def name(self) -> str:
        return self.section.name

    def run(self, progress: Callable[[str], None]) -> None:
        """Train every model the cache lacks."""
        self.digests.save()  # a run, not validate: remember the digests for the next run
        todo = [job for job in self.jobs if not job.path.exists()]
        progress(f"training {self.name}: {len(self.jobs)} models ({self.model.name}), "
                 f"{len(self.jobs) - len(todo)} already trained")
        # The units of the time-left estimate: epochs of gradient training, whole models fitted in closed form.
        per_job = self.section.epochs if self.gradient else 1
        labels = [f"{self.name} {n}/{len(todo)} ({self._severity_text(job)}, {job.reader})"
                  for n, job in enumerate(todo, start=1)]
        with stage("training"), StageProgress(progress, f"training {self.name}", len(todo) * per_job) as shown:
            if not todo:
                return
            executor, options = self.executor
            workers, threads = budget(self.spec.runner.workers)
            with executor.start(options, workers, threads, EXECUTOR) as session:
                if not session.local:
                    # Each job trains one model from its start where it runs, on images it prepares itself;
                    # the client stores what it returns (core/executor.py, docs/scale-out.md).
                    tasks = [(self, job, label, session.threads) for job, label in zip(todo, labels)]
                    for index, (contents, losses, seconds) in session.map(train_remotely, tasks):
                        job = todo[index]
                        if losses:
                            progress(f"training {labels[index]}: loss {losses[-1]:.4f} after epoch {len(losses)}")
                        self._store(job, contents, losses, seconds)
                        shown.done(per_job)
                    return
            set_threads(available_cores())  # one process: every core of the run's budget (core/resources.py)
            level, cases = object(), []
            for job, label in zip(todo, labels):
                if job.level != level:  # jobs come level by level: each level's images are perturbed once
                    preparing = time.monotonic()
                    level, cases = job.level, self._images(job)
                    shown.outside_units(time.monotonic() - preparing)
                started = time.monotonic()
                contents, losses = self._model(job, cases, label, progress, shown)
                self._store(job, contents, losses, time.monotonic() - started)

    def _model(self, job: Job, cases: list, label: str, progress, shown: StageProgress) -> tuple:
        """(checkpoint contents, losses per epoch) of one job, trained or fitted on `cases`."""
        if self.gradient:
            return self._train(job, cases, label, progress, shown)
        contents = self.model.fit(cases, self.labels.astype(int), self.options,
                                  _derived_seed(self.spec.study.seed, job.seed, "fit"))
        shown.done()
        return contents, []

    def _store(self, job: Job, contents, losses: list, seconds: float) -> None:
        job.path.parent.mkdir(parents=True, exist_ok=True)
        job.log.write_text(json.dumps({"training": self.name, "model": self.model.name, "severity":
                                       self._severity_label(job), "reader": job.reader, "losses": losses,
                                       "seconds": round(seconds, 1)}))
        _save_atomically(contents, job.path)  # last: its existence means the model is finished
        job.state.unlink(missing_ok=True)

    def checkpoints(self) -> list[tuple[str, Path, str, int | None]]:
        """(reader, checkpoint path, cache key, severity level or None) of every model."""
        return [(job.reader, job.path, job.key, job.level) for job in self.jobs]

    def log(self) -> pd.DataFrame:
        """Each trained model's loss per epoch (from the cache)."""
        rows = []
        for job in self.jobs:
            record = json.loads(job.log.read_text())
            losses = record["losses"] or [float("nan")]
            # Not the record's severity: a severity-0 model is shared with an unperturbed training.
            rows += [(self.name, self.model.name, self._severity_label(job), job.reader, epoch, loss)
                     for epoch, loss in enumerate(losses, start=1)]
        return pd.DataFrame(rows, columns=["training", "model", "severity", "reader", "epoch", "loss"])

    # ------------------------------------------------------------------ internals

    def _severity_label(self, job: Job) -> str:
        return "unperturbed" if job.level is None else self.spec.severities.levels[job.level]

    def _severity_text(self, job: Job) -> str:
        if job.level is None:
            return "unperturbed images"
        return f"severity {self.spec.severities.levels[job.level]} {self.spec.severities.unit}"

    def _images(self, job: Job) -> list:
        import torch

        cases = []
        for case in self.case_ids:
            views = []
            for record in self.manifest.for_case(case):
                image = image_io.read_image(record, f"{self.where}.images.manifest")
                pixels = torch.from_numpy(image.pixels.astype(np.float32))
                if job.severity != 0:
                    # Perturbed on the training's device, kept on the CPU: a whole training set of
                    # mammograms outgrows a GPU's memory; `_train` moves each batch there.
                    pixels = perturb_image(self.perturbation, self.perturbation_options, record,
                                           pixels.to(self.placement.device), image, job.severity, "training",
                                           self.spec.study.seed).cpu()
                views.append(ViewImage(record.view, record.laterality, pixels, image.pixel_spacing_mm,
                                       float(image.max_value), tuple(record.roi_boxes)))
            cases.append(CaseImages(case, tuple(views)))
        return cases

    def _train(self, job: Job, cases: list, label: str, progress, shown: StageProgress) -> list:
        import torch

        section = self.section
        placement = self.placement
        torch.manual_seed(_derived_seed(self.spec.study.seed, job.seed, "init"))
        # Initialised on the CPU, then moved: every device starts from the same weights.
        if section.init is not None:
            network = self.model.load(self.init, self.options, "cpu").to(placement.device)
        else:
            network = self.model.network(self.options).to(placement.device)
        optimiser = torch.optim.Adam(network.parameters(), lr=section.learning_rate,
                                     weight_decay=section.weight_decay)
        scaler = placement.grad_scaler()  # float16 only
        losses: list = []
        if job.state.exists():
            state = torch.load(job.state, map_location="cpu", weights_only=True)
            network.load_state_dict(state["network"])
            optimiser.load_state_dict(state["optimiser"])  # moves its state to the parameters' device
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            losses = list(state["losses"])
            progress(f"training {label}: resuming after epoch {len(losses)}")
            shown.total -= len(losses)  # epochs done by an earlier run are no work of this one
        labels = torch.from_numpy(self.labels).to(placement.device)
        for epoch in range(len(losses), section.epochs):
            seed = _derived_seed(self.spec.study.seed, job.seed, f"epoch {epoch}")
            torch.manual_seed(seed)
            order = np.random.default_rng(seed).permutation(len(cases))
            network.train()
            total = 0.0
            for start in range(0, len(order), section.batch_size):
                batch = order[start:start + section.batch_size]
                with placement.autocast():
                    loss = self.model.loss(network, [_placed(cases[i], placement.device) for i in batch],
                                           labels[batch])
                if not torch.isfinite(loss):
                    raise PerceptcoreError(f"the training loss became {float(loss)} in epoch {epoch + 1} of "
                                           f"{label}; lower learning_rate", f"{self.where}.learning_rate")
                optimiser.zero_grad()
                if scaler is None:
                    loss.backward()
                    optimiser.step()
                else:  # steps whose scaled gradients overflowed are skipped, and the scale lowered
                    scaler.scale(loss).backward()
                    scaler.step(optimiser)
                    scaler.update()
                total += float(loss.detach()) * len(batch)
            losses.append(total / len(order))
            state = {"network": network.state_dict(), "optimiser": optimiser.state_dict(), "losses": losses}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            _save_atomically(_on_cpu(state), job.state)
            shown.done()
        progress(f"training {label}: loss {losses[-1]:.4f} after epoch {len(losses)}")
        network.eval()
        return _on_cpu(self.model.checkpoint(network)), losses  # CPU tensors: the checkpoint loads anywhere


class TrainingLog:
    """The run-output part for trainings: `training.csv`, each model's loss per epoch."""

    def __init__(self, trainings: list):
        self.trainings = trainings

    def compute(self) -> None:
        pass  # trained before the predictions were computed

    def table(self) -> pd.DataFrame:
        """The rows of training.csv (the report draws the training curves from them)."""
        return pd.concat([t.log() for t in self.trainings], ignore_index=True)

    def write_into(self, staging: Path) -> list[str]:
        from .data import write_csv

        write_csv(self.table(), staging / "training.csv")
        return ["training.csv"]

    def manifest(self) -> dict:
        return {"trained_models": {t.name: len(t.jobs) for t in self.trainings}}


def trainings_of(spec: Spec, registry: Registry) -> dict:
    """Every training entry of the spec, validated, by name."""
    return {t.name: Training(spec, registry, i) for i, t in enumerate(spec.training)}


def train_remotely(task: tuple) -> tuple:
    """One training job where the cache may be out of reach (a Dask worker): (checkpoint contents, losses,
    seconds) for the client to store. The model is trained from its start on images the task prepares
    itself; its epoch states go to a folder of its own and are gone with it, since a worker that dies
    has its task run again from the start elsewhere."""
    import tempfile

    training, job, label, threads = task
    set_threads(threads)
    init = [training.init] if training.section.init is not None else []
    missing_files(init + [p for r in training.manifest for p in (r.file, r.roi_mask)])
    with tempfile.TemporaryDirectory(prefix="perceptcore-training-") as folder:
        here = attrs.evolve(job, path=Path(folder) / job.path.name)
        cases = training._images(here)
        started = time.monotonic()
        # A StageProgress that is never entered prints nothing; the client reports the job's progress.
        contents, losses = training._model(here, cases, label, lambda message: None,
                                           StageProgress(lambda message: None, label, training.section.epochs))
        return contents, losses, time.monotonic() - started


def _derived_seed(study_seed: int, reader_seed: int, purpose: str) -> int:
    # Not the training's name nor the severity: every severity's model of a reader starts from the
    # same initial weights and sees the same batches, so only the perturbation differs between them.
    return seed_of(study_seed, reader_seed, purpose)


def _placed(case: CaseImages, device: str) -> CaseImages:
    """A training case with its images on the training's device (on the CPU: the case itself)."""
    if device == "cpu":
        return case
    return attrs.evolve(case, images=tuple(attrs.evolve(view, pixels=view.pixels.to(device)) for view in case.images))


def _on_cpu(contents):
    """Checkpoint or state contents with every tensor on the CPU; CPU tensors are returned as they are,
    so a CPU training saves exactly what it saved before devices existed."""
    import torch

    if isinstance(contents, torch.Tensor):
        return contents if contents.device.type == "cpu" else contents.cpu()
    if isinstance(contents, dict):
        moved = {key: _on_cpu(value) for key, value in contents.items()}
        if all(moved[key] is value for key, value in contents.items()):
            return contents
        copy = type(contents)(moved)
        if hasattr(contents, "_metadata"):  # a state dict's module versions, which load_state_dict reads
            copy._metadata = contents._metadata
        return copy
    if isinstance(contents, (list, tuple)) and not hasattr(contents, "_fields"):
        moved = [_on_cpu(value) for value in contents]
        return contents if all(a is b for a, b in zip(moved, contents)) else type(contents)(moved)
    return contents


def _save_atomically(contents, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(contents, partial)
    partial.replace(path)
