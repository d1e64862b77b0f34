"""From images to predictions: the prediction runner behind model observers.

For every model observer (a model plugin and its checkpoints, one reader each), every
case of the image manifest is perturbed at every severity and in every region of the
spec's `perturbation` section, and the model predicts P(positive) per case. The result
is the tidy prediction table (and the ROI table) the analyses read, so a study can start
from images.

Work is split into units of (observer, checkpoint, chunk of `runner.batch_size` cases).
Each unit loads its images once, perturbs them at every severity and composites each
region, and predicts the whole chunk at once. A finished unit is stored in the cache under
a hash of everything it depends on (model and perturbation code, checkpoint contents, options,
the images' contents, ROIs, severities, seed), so a rerun — after an interruption or of the same
spec — skips it. A unit always holds the same cases, so resumed and uninterrupted runs
compute every prediction identically. Units run in `runner.workers` processes, within the run's
thread budget (core/resources.py), or as tasks of another executor (`runner.executor`, core/executor.py:
a Dask cluster), whose workers return each unit's cache file for this process to write.

Images without an ROI have an empty ROI: perturbing the interior leaves them unchanged,
perturbing the exterior perturbs all of them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import attrs
import numpy as np
import pandas as pd

from . import __version__
from . import images as image_io
from .data import write_csv
from .devices import Placement
from .errors import PerceptcoreError
from .executor import WHERE as EXECUTOR, executor_of, missing_files
from .perturbation import ImageBatch, restrict
from .plugins import Registry
from .resources import StageProgress, budget, exit_with_parent, set_threads, stage, worker_pool  # noqa: F401 (exit_with_parent: old home)
from .spec import Spec, structure, structure_options


@attrs.frozen(eq=False)
class ViewImage:
    """One perturbed image of a case: float32 grey levels (H, W), its spacing and grey-level range.

    `roi_boxes` are the manifest's ROI boxes (row0, col0, row1, col1), half-open: training may
    use them (a closed-form observer learns what a lesion looks like); predicting must not."""

    view: str
    laterality: str
    pixels: object  # torch.Tensor
    spacing_mm: float
    max_value: float
    roi_boxes: tuple = ()


@attrs.frozen(eq=False)
class CaseImages:
    case: str
    images: tuple  # of ViewImage


@runtime_checkable
class Model(Protocol):
    """name; Options, an attrs class of typed options (all with defaults);
    load(checkpoint, options, device) -> a loaded model; predict(loaded, cases) -> P(positive) per case."""

    name: str
    Options: type

    def load(self, checkpoint: Path, options, device: str):
        """The model with the checkpoint's weights, ready to predict (never unpickles arbitrary objects)."""

    def predict(self, loaded, cases: list) -> np.ndarray:
        """P(positive) for each CaseImages, as a float array of len(cases)."""


@attrs.frozen(eq=False)
class Condition:
    """One way a work unit's images are shown: `perturbation` at `severity` (no perturbation:
    unperturbed), its random draws seeded by `seed_key`; every region of the unit is then
    composited from it."""

    perturbation: object  # a Perturbation, or None
    options: object
    severity: float
    seed_key: str
    level: int | None = None  # the perception study's severity index; a per-severity model sees only its own


@attrs.frozen
class Checkpoint:
    """One reader of a model observer: its weights, their content key, and — for models trained
    per severity — the one severity level it predicts (None: every condition)."""

    reader: str
    path: Path
    digest: str
    level: int | None = None


@attrs.frozen(eq=False)
class _Unit:
    """Everything one work unit needs, picklable for the worker processes."""

    key: str
    path: Path
    model: object
    options: object
    checkpoint: Path
    reader: str
    conditions: tuple
    regions: tuple
    records: tuple  # ImageRecord of the unit's cases
    cases: tuple
    seed: int
    threads: int
    placement: Placement = Placement()  # the device to perturb and predict on, and mixed precision


class ImageWork:
    """The manifest, the model observers and the cache that every image-based computation shares."""

    @classmethod
    def of(cls, spec: Spec, registry: Registry, trainings: dict) -> "ImageWork | None":
        """Built once per run, when the spec has model observers (the runner and the robustness study
        share it); `trainings` (name -> training.Training) provide the trained observers' models."""
        observers = [(i, o) for i, o in enumerate(spec.observers) if o.computed]
        return cls(spec, registry, observers, trainings) if observers else None

    def __init__(self, spec: Spec, registry: Registry, observers, trainings: dict):
        self.spec = spec
        self.registry = registry
        self.manifest = image_io.load_manifest(spec.path(spec.images.manifest), "images.manifest",
                                               tuple(spec.images.id))
        self.cache = Path(spec.base) / spec.runner.cache
        self.digests = FileDigests(self.cache)
        # Threads x processes within the cores: see core/resources.py.
        self.workers, self.threads = budget(spec.runner.workers)
        self.placement = Placement.of(spec.runner, "runner")  # resolved once: `auto` is the same in every unit
        self.by_case = {case: tuple(self.manifest.for_case(case)) for case in self.manifest.cases}
        self.chunks = self.chunked(list(self.by_case))
        # Contents, not paths: the file's name stays because it seeds the perturbation's draws.
        self.image_keys = {case: [[self.digests(r.file), r.file.name, list(map(list, r.roi_boxes)),
                                   self.digests(r.roi_mask) if r.roi_mask else None,
                                   r.view, r.laterality, r.pixel_spacing_mm, r.bits]
                                  for r in records] for case, records in self.by_case.items()}
        self.models = []  # (observer, model, options, [Checkpoint])
        for i, observer in observers:
            if observer.trained is not None:
                training = trainings[observer.trained]
                # The key stands for the weights: they are a deterministic function of it.
                checkpoints = [Checkpoint(reader, path, key, level) for reader, path, key, level in training.checkpoints()]
                self.models.append((observer, training.model, training.options, checkpoints))
                continue
            model = registry.get("model", observer.model, f"observers[{i}].model")
            options = structure_options(model.Options, observer.options, f"observers[{i}].options", spec)
            checkpoints = []
            for j, checkpoint in enumerate(observer.checkpoints):
                path = spec.path(checkpoint)
                if not path.is_file():
                    raise PerceptcoreError(f"file not found: {path}", f"observers[{i}].checkpoints[{j}]")
                checkpoints.append(Checkpoint(path.stem, path, self.digests(path)))
            if len({c.reader for c in checkpoints}) != len(checkpoints):
                raise PerceptcoreError("checkpoint file names must differ: each names a reader",
                                       f"observers[{i}].checkpoints")
            self.models.append((observer, model, options, checkpoints))
        # The executor (runner.executor), checked now, before any work; `run` starts it.
        self.executor = executor_of(spec, registry)

    def perturbation(self, name: str, options: dict, where: str):
        """A registered perturbation and its checked options."""
        perturbation = self.registry.get("perturbation", name, f"{where}.name")
        return perturbation, structure(perturbation.Options, options, f"{where}.options")

    def units(self, conditions: tuple, regions: tuple, folder: str, *, regions_of=None, design=None) -> list:
        """Work units of every model observer x checkpoint x chunk of cases for these conditions.

        `regions_of(observer name)` may narrow the regions per observer; `design(observer name)` may
        give {(reader, severity level): cases} so that each reader predicts only the cases a sparse
        reader-study design gives it at each severity."""
        units = []
        for observer, model, options, checkpoints in self.models:
            where = regions_of(observer.name) if regions_of else regions
            assigned = design(observer.name) if design else None
            for checkpoint in checkpoints:
                mine = tuple(c for c in conditions if checkpoint.level is None or c.level == checkpoint.level)
                # A reader of a design sees each case at one severity: a unit per severity then.
                batches = ([((c,), self.chunked(assigned[(checkpoint.reader, c.level)])) for c in mine]
                           if assigned is not None else [(mine, self.chunks)] if mine else [])
                for unit_conditions, chunks in batches:
                    units += self._units_of(observer, model, options, checkpoint, unit_conditions, chunks, where,
                                            folder)
        return units

    def chunked(self, cases: list) -> list:
        size = self.spec.runner.batch_size
        return [cases[i:i + size] for i in range(0, len(cases), size)]

    def _units_of(self, observer, model, options, checkpoint, mine, chunks, regions, folder) -> list:
        units = []
        described = [[c.perturbation and (c.perturbation.name, plugin_version(
            self.registry, "perturbation", c.perturbation.name)), c.options and attrs.asdict(
            c.options, recurse=True), c.severity, c.seed_key] for c in mine]
        for chunk in chunks:
            # The plugins' code is in the key: an edited model or perturbation must not reuse old results.
            parts = [__version__, core_digest(), plugin_version(self.registry, "model", model.name), model.name,
                     options_key(options), checkpoint.digest, described, regions,
                     self.spec.study.seed, chunk, [self.image_keys[c] for c in chunk]]
            placed = self.placement.key()  # None on the CPU in float32: the keys caches had before devices
            key = stable_hash(parts if placed is None else parts + [placed])
            units.append(_Unit(
                key=key, path=self.cache / observer.name / folder / f"{key}.npz", model=model, options=options,
                checkpoint=checkpoint.path, reader=checkpoint.reader, conditions=mine, regions=regions,
                records=tuple(r for c in chunk for r in self.by_case[c]), cases=tuple(chunk),
                seed=self.spec.study.seed, threads=self.threads, placement=self.placement))
        return units

    def run(self, units: list, progress: Callable[[str], None], what: str = "predicting") -> None:
        """Compute the units the cache lacks, `runner.workers` at a time (at most one per core)."""
        self.digests.save()  # a run, not validate: remember the digests for the next run
        sweep_partials(self.cache)
        todo = [u for u in units if not u.path.exists()]
        done = len(units) - len(todo)
        progress(f"{what}: {len(units)} work units, {done} already in the cache ({self.cache})")
        workers = min(self.workers, max(len(todo), 1))
        with stage("predictions"), StageProgress(progress, what, len(todo)) as shown:
            if not todo:  # nothing to start an executor (a cluster) for
                return
            executor, options = self.executor
            with executor.start(options, workers, self.threads, EXECUTOR) as session:
                if session.local:  # the tasks see this machine's cache: each unit writes its own file
                    for _ in session.map(compute_unit, todo):
                        shown.done()
                    return
                # Workers may not reach the cache: they return each unit's file, written here (core/executor.py).
                remote = [attrs.evolve(unit, threads=session.threads) for unit in todo]
                for index, contents in session.map(unit_remotely, remote):
                    _write_atomically(todo[index].path, todo[index].key, contents)
                    shown.done()


def unit_remotely(unit: _Unit) -> bytes:
    """A work unit computed where the cache may be out of reach: its cache file's bytes, for the client
    to write. Its inputs are checked first, so a worker without them names the file it lacks."""
    import tempfile

    missing_files([unit.checkpoint] + [p for r in unit.records for p in (r.file, r.roi_mask)])
    with tempfile.TemporaryDirectory(prefix="perceptcore-unit-") as folder:
        here = attrs.evolve(unit, path=Path(folder) / unit.path.name)
        compute_unit(here)
        return here.path.read_bytes()


def _write_atomically(path: Path, key: str, contents: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{key}.{os.getpid()}.partial")  # as compute_unit: swept when its writer is gone
    partial.write_bytes(contents)
    partial.replace(path)


def sweep_partials(folder: Path) -> None:
    """Delete the `<name>.<pid>.partial` files of writers that no longer run: a killed run leaves its
    half-written files behind, which nothing reads but which would pile up. A live writer's stay."""
    for path in folder.rglob("*.partial"):
        try:
            pid = int(path.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:  # it exists, under another user
            pass


class Runner:
    """The perception study's predictions: every severity of the spec's perturbation, in every region.

    Validates everything on construction; `run` computes what the cache lacks."""

    def __init__(self, spec: Spec, work: ImageWork | None):
        self.spec = spec
        self.work = work
        self.units, self.severities, self.regions = [], (), ()
        if work is None or spec.perturbation is None:
            return
        p = spec.perturbation
        perturbation, options = self.work.perturbation(p.name, p.options, "perturbation")
        self.severities = tuple(severity_value(label, f"severities.levels[{i}]")
                                for i, label in enumerate(spec.severities.levels))
        self.regions = tuple(p.regions)
        if set(self.regions) - {"entire_image"} and not any(r.has_roi for r in self.work.manifest):
            raise PerceptcoreError("perturbation.regions asks for ROI regions but no manifest row has an ROI",
                                   "images.manifest")
        # The seed key is the severity's index: readers' images (reader_study) use the same.
        conditions = tuple(Condition(perturbation, options, value, str(s), level=s)
                           for s, value in enumerate(self.severities))
        # Only the ROI observer is shown the images perturbed inside or outside the ROIs.
        roi_observer = spec.roi.observer if spec.roi is not None else None
        self.units = self.work.units(
            conditions, self.regions, "",
            regions_of=lambda name: self.regions if name == roi_observer else ("entire_image",),
            design=self._design)

    def _design(self, observer: str) -> dict | None:
        """{(reader, level): cases} of a reader-study observer: each reader reads each case once, at the
        severity `reader_study.assign` draws, as simulated radiologists would."""
        scheme = self.spec.observer(observer).reader_study
        if scheme is None:
            return None
        from .reader_study import assign

        [checkpoints] = [c for o, _, _, c in self.work.models if o.name == observer]
        readers = [c.reader for c in checkpoints]
        labels = list(self.spec.severities.levels)
        table = assign(self.work.manifest.cases, readers, labels, scheme, self.spec.study.seed)
        cases = {(reader, level): [] for reader in readers for level in range(len(labels))}
        for reader, case, label in zip(table["reader"], table["exam"], table["severity"]):
            cases[(reader, labels.index(label))].append(case)
        order = {case: i for i, case in enumerate(self.work.by_case)}
        return {key: sorted(value, key=order.__getitem__) for key, value in cases.items()}

    @property
    def n_predictions(self) -> int:
        return sum(len(u.cases) * len(u.conditions) * len(u.regions) for u in self.units)

    def run(self, progress: Callable[[str], None]) -> Spec:
        """Compute the missing units and return the spec with the model observers' predictions filled in."""
        if not self.units:
            return self.spec
        self.work.run(self.units, progress)
        return self._tables()

    def _tables(self) -> Spec:
        spec = self.spec
        folder = self.work.cache / "tables"
        folder.mkdir(parents=True, exist_ok=True)
        observers = list(spec.observers)
        roi = spec.roi
        labels = spec.severities.levels
        for i, observer in enumerate(spec.observers):
            if not observer.computed:
                continue
            rows = []
            for unit in (u for u in self.units if u.path.parent.name == observer.name):
                with np.load(unit.path) as stored:
                    values = stored["predictions"]  # (conditions, regions, cases)
                for r, region in enumerate(unit.regions):
                    for c, condition in enumerate(unit.conditions):
                        rows += [(unit.reader, labels[condition.level], case, region, float(v))
                                 for case, v in zip(unit.cases, values[c, r])]
            table = pd.DataFrame(rows, columns=["reader", "severity", "case", "region", "prediction"])
            # Named by content (the units' keys, the severity labels): another spec, or this one with other
            # --set values, running at the same time with an observer of the same name writes its own file.
            key = stable_hash([labels, [u.key for u in self.units if u.path.parent.name == observer.name]])
            whole = folder / f"{observer.name}-{key}.csv"
            write_csv(table[table.region == "entire_image"].drop(columns="region"), whole)
            observers[i] = attrs.evolve(observer, predictions=str(whole), columns={})
            if roi is not None and roi.observer == observer.name:
                regional = table[table.region != "entire_image"].assign(annotator="manifest")
                path = folder / f"{observer.name}_roi-{key}.csv"
                write_csv(regional[["annotator", "reader", "severity", "case", "region", "prediction"]], path)
                roi = attrs.evolve(roi, predictions=str(path), columns={})
        return attrs.evolve(spec, observers=tuple(observers), roi=roi)


_LOADED: dict = {}  # per process: loaded models by (model, checkpoint, options)


def compute_unit(unit: _Unit) -> None:
    """Predict one work unit and store it atomically in the cache."""
    import torch

    if torch.get_num_threads() != unit.threads:
        set_threads(unit.threads)
    device = unit.placement.device
    model_key = (unit.model.name, str(unit.checkpoint), repr(unit.options), device)
    if model_key not in _LOADED:
        _LOADED.clear()  # one checkpoint at a time per process is enough and bounds memory
        _LOADED[model_key] = unit.model.load(unit.checkpoint, unit.options, device)
    loaded = _LOADED[model_key]
    views = []
    for record in unit.records:
        image = image_io.read_image(record, "images.manifest")
        # No ROI: an empty one, so the interior is never perturbed and the exterior is the whole image.
        inside = (torch.from_numpy(image_io.roi(record, image)) if record.has_roi
                  else torch.zeros(image.pixels.shape, dtype=torch.bool))
        # On the unit's device, so perturbing, compositing and predicting all run there (a no-op on the CPU).
        views.append((record, torch.from_numpy(image.pixels.astype(np.float32)).to(device), image, inside.to(device)))
    predictions = np.empty((len(unit.conditions), len(unit.regions), len(unit.cases)))
    for c, condition in enumerate(unit.conditions):
        perturbed = []
        for record, pixels, image, inside in views:
            whole = pixels if condition.perturbation is None else perturb_image(
                condition.perturbation, condition.options, record, pixels, image, condition.severity,
                condition.seed_key, unit.seed)
            perturbed.append((record, pixels, image, inside, whole))
        for r, region in enumerate(unit.regions):
            cases = []
            for case in unit.cases:
                mine = [p for p in perturbed if p[0].case == case]
                cases.append(CaseImages(case, tuple(
                    ViewImage(record.view, record.laterality, restrict(pixels, whole, region, inside),
                              image.pixel_spacing_mm, float(image.max_value))
                    for record, pixels, image, inside, whole in mine)))
            with torch.no_grad(), unit.placement.autocast():
                values = np.asarray(unit.model.predict(loaded, cases), dtype=float).reshape(-1)
            if values.shape != (len(cases),) or not np.all((values >= 0) & (values <= 1)):
                raise PerceptcoreError(f"model {unit.model.name!r} returned {values.shape[0]} values for {len(cases)} "
                                       "cases, or values outside [0, 1]", "observers.model")
            predictions[c, r] = values
    unit.path.parent.mkdir(parents=True, exist_ok=True)
    partial = unit.path.with_name(f"{unit.key}.{os.getpid()}.partial")
    with open(partial, "wb") as f:  # a file object, so NumPy does not append .npz to the name
        np.savez(f, predictions=predictions, cases=np.asarray(unit.cases))
    partial.replace(unit.path)  # atomic: an interrupted unit leaves nothing the next run would trust


def severity_value(label: str, where: str) -> float:
    """A severity label as the number a perturbation takes."""
    try:
        return float(label)
    except ValueError:
        raise PerceptcoreError(f"severity {label!r} must be a number to perturb images with it", where) from None


def seed_of(*parts) -> int:
    """A 63-bit seed determined by its parts alone (joined with "|" and hashed)."""
    text = "|".join(map(str, parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def perturb_image(perturbation, options, record, pixels, image, severity: float, seed_key, seed: int):
    """One manifest image (pixels: (H, W) tensor) perturbed at a severity, with a generator seeded
    by (study seed, image, seed_key) alone: the same result in any order, worker or batch, and
    the same image a reader is shown (reader_study.write_images, seed_key = severity index)."""
    import torch

    generator = torch.Generator().manual_seed(
        seed_of(seed, record.case, record.view, record.laterality, record.file.name, seed_key))
    batch = ImageBatch(pixels[None], torch.tensor([image.pixel_spacing_mm]), float(image.max_value))
    return perturbation.perturb(batch, severity, options, generator)[0]


def options_key(options) -> list:
    """A plugin's options as a cache key: their values, and the contents of the files they name."""
    files = [sha256_of(Path(getattr(options, f.name))) for f in attrs.fields(type(options))
             if f.metadata.get("file") and getattr(options, f.name) is not None]
    return [attrs.asdict(options, recurse=True), files]


def plugin_version(registry: Registry, kind: str, name: str) -> str:
    """What identifies a plugin's code in cache keys: its package, version and source digest.

    The version alone is not enough: in a checkout, or while a plugin is being written, the code
    changes and the version does not (perceptcore's own for the core's noise baseline)."""
    item = next((i for i in registry.all(kind) if i.name == name), None)
    package = f"{item.package} {item.version}" if item else f"perceptcore {__version__}"
    obj = item.obj if item else None
    return f"{package} {source_digest(obj)}" if obj is not None else package


_SOURCES: dict = {}  # per process: source file -> ((size, mtime), digest)


def core_digest() -> str:
    """The source of the core modules that load, perturb and predict on images and train models, for
    cache keys: in a checkout their version never changes while their code does."""
    from . import images, perturbation, training

    return stable_hash([source_digest(module) for module in (images, perturbation, sys.modules[__name__], training)])


def source_digest(obj) -> str:
    """SHA-256 over the source of the module defining `obj` (or of `obj`, a module) and of the
    package-private modules beside it (`_*.py`, the helpers a plugin computes with)."""
    module = sys.modules.get(obj.__name__ if inspect.ismodule(obj) else type(obj).__module__)
    source = getattr(module, "__file__", None)
    if source is None:
        return "no source"
    source = Path(source)
    digest = hashlib.sha256()
    for path in [source] + sorted(p for p in source.parent.glob("_*.py") if p != source):
        stat = path.stat()
        known = _SOURCES.get(path)
        if known is None or known[0] != (stat.st_size, stat.st_mtime_ns):
            known = _SOURCES[path] = ((stat.st_size, stat.st_mtime_ns), sha256_of(path))
        digest.update(f"{path.name} {known[1]}\n".encode())
    return digest.hexdigest()[:24]


class FileDigests:
    """SHA-256 of files' contents for cache keys, each file read once: a digest is remembered in the
    cache folder and reused while the file's path, size and modification time are unchanged.

    Only `save()` writes, and only runs call it, so `validate` leaves the cache as it found it."""

    def __init__(self, cache: Path):
        self.folder = Path(cache) / "file-digests"
        self.known: dict = {}  # record path -> entry, read or computed in this process
        self.new: dict = {}  # record path -> entry not yet saved

    def __call__(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        entry = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        record = self.folder / f"{stable_hash(str(path))}.json"
        known = self.known.get(record)
        if known is None:
            try:
                known = json.loads(record.read_text())
            except (OSError, ValueError):  # absent, or unreadable: compute it again
                known = {}
        if {k: known.get(k) for k in entry} != entry:
            known = self.new[record] = {**entry, "sha256": sha256_of(path)}
        self.known[record] = known
        return known["sha256"]

    def save(self) -> None:
        for record, entry in self.new.items():
            record.parent.mkdir(parents=True, exist_ok=True)
            partial = record.with_name(f".{record.name}.{os.getpid()}.partial")
            partial.write_text(json.dumps(entry))
            partial.replace(record)
        self.new.clear()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]
