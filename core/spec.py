"""The YAML study spec: one frozen attrs class per section, strict parsing, located errors.

Errors read ``spec.yaml: observers[2].predictions: file not found: …``. Severity levels
keep the text they were written with (``0.50`` stays ``"0.50"``), because they label
every output row.
"""

from __future__ import annotations

import typing
from pathlib import Path

import attrs
import yaml

from .errors import PerceptcoreError
from .latent_model import METHODS, PARAMETERISATIONS, Priors
from .perturbation import REGIONS

DEFAULT_METRICS = ("predictive_confidence", "ks_separability", "simpsons_paradox", "roi_separability")
FIGURE_FORMATS = ("png", "svg", "pdf")


@attrs.frozen
class StudySection:
    name: str
    seed: int = 0
    description: str = ""


@attrs.frozen
class CasesSection:
    """The cases table: one row per case (a breast), or the published one-row-per-exam table."""

    file: str
    id: tuple = ("case",)  # column(s) forming the case id
    label: str = "label"
    positive: str = "malignant"


@attrs.frozen
class ObserverSection:
    """One observer group: its predictions (a tidy CSV or a published pickle), or a model plugin
    whose predictions the runner computes from the images, one reader per checkpoint."""

    name: str
    predictions: typing.Optional[str] = None
    likelihood: str = "auto"  # auto: binary when every prediction is 0 or 1
    columns: dict = attrs.field(factory=dict)  # tidy column names: reader, severity, case, prediction
    model: typing.Optional[str] = None
    checkpoints: tuple = ()
    options: dict = attrs.field(factory=dict)  # the model plugin's options


@attrs.frozen
class ImagesSection:
    """The case manifest: one row per image (case, view, laterality, file, pixel spacing, ROIs)."""

    manifest: str
    id: tuple = ("case",)


@attrs.frozen
class PerturbationSection:
    """The perturbation the runner applies at every severity, and where in the image."""

    name: str
    options: dict = attrs.field(factory=dict)
    regions: tuple = ("entire_image",)


@attrs.frozen
class RobustnessPerturbation:
    """One perturbation of the robustness study, at one severity, compared with its noise baseline."""

    name: str
    severity: float
    options: dict = attrs.field(factory=dict)
    baseline: bool = True  # also predict on Gaussian noise matched to this perturbation's average L2 norm


@attrs.frozen
class RobustnessSection:
    """The robustness study of model observers (paper 002): AUC per model and perturbation."""

    perturbations: tuple


@attrs.frozen
class RunnerSection:
    batch_size: int = 8  # cases per work unit
    workers: int = 1  # processes computing predictions in parallel
    cache: str = ".perceptcore-cache"  # relative to the spec's folder; finished work units are kept here


@attrs.frozen
class RoiSection:
    """Observed predictions with perturbation restricted to ROI interior / exterior."""

    observer: str  # the observer group whose whole-image predictions are the `entire_image` region
    # For a model observer, give nothing else: the runner perturbs the manifest's ROIs itself.
    predictions: typing.Optional[str] = None  # tidy: one CSV with a region column
    interior: typing.Optional[str] = None  # published layout: two pickles and the exam list
    exterior: typing.Optional[str] = None
    exams: typing.Optional[str] = None
    columns: dict = attrs.field(factory=dict)


@attrs.frozen
class SeveritiesSection:
    unit: str
    levels: tuple  # as written; the first is the unperturbed reference
    perturbation: str = "the perturbation"  # what the severities grade, as the findings should name it


@attrs.frozen
class SubgroupsSection:
    definition: str
    analyse: tuple
    options: dict = attrs.field(factory=dict)


@attrs.frozen
class ModelSection:
    backend: str = "auto"
    method: str = "advi"
    parameterisations: tuple = ("random_walk",)
    draws: int = 1000
    seed: typing.Optional[int] = None  # default: study.seed
    max_iterations: int = 20000
    tolerance: float = 1e-4
    chains: int = 4
    warmup: int = 1000
    workers: typing.Optional[int] = None  # fits run in parallel processes; default: one per CPU core
    priors: Priors = Priors()  # the latent model's prior sds are themselves the section


@attrs.frozen
class AnalysesSection:
    metrics: tuple = DEFAULT_METRICS
    alpha: float = 0.05  # threshold behind the plain-words findings and the Simpson's-paradox check


@attrs.frozen
class OutputsSection:
    dir: typing.Optional[str] = None
    figures: tuple = ("png", "svg")
    report: bool = True


@attrs.frozen
class Spec:
    study: StudySection
    cases: CasesSection
    observers: tuple
    severities: typing.Optional[SeveritiesSection] = None  # optional only in a robustness-only study
    subgroups: typing.Optional[SubgroupsSection] = None
    data_dir: str = "."
    roi: typing.Optional[RoiSection] = None
    images: typing.Optional[ImagesSection] = None
    perturbation: typing.Optional[PerturbationSection] = None
    runner: RunnerSection = RunnerSection()
    robustness: typing.Optional[RobustnessSection] = None
    model: ModelSection = ModelSection()
    analyses: AnalysesSection = AnalysesSection()
    outputs: OutputsSection = OutputsSection()
    # Where the spec came from: not a YAML key.
    source: str = attrs.field(default="spec", metadata={"internal": True})
    base: str = attrs.field(default=".", metadata={"internal": True})

    def path(self, relative: str) -> Path:
        """A data path from the spec, resolved against data_dir (itself relative to the spec's folder)."""
        return (Path(self.base) / self.data_dir / relative).resolve()

    @property
    def fit_seed(self) -> int:
        return self.study.seed if self.model.seed is None else self.model.seed

    def observer(self, name: str) -> ObserverSection:
        return next(o for o in self.observers if o.name == name)

    @property
    def perception(self) -> bool:
        """Whether the spec asks for the perception comparison (severities and subgroups), not
        only the robustness study."""
        return self.severities is not None or self.subgroups is not None


LIST_OF = {("Spec", "observers"): ObserverSection, ("RobustnessSection", "perturbations"): RobustnessPerturbation}


# --------------------------------------------------------------------------- YAML with text kept

class _Text(str):
    """A scalar that YAML read as a number, remembered as written."""


class _Loader(yaml.SafeLoader):
    pass


def _keep_text(loader, node):
    value = loader.construct_scalar(node)
    number = yaml.SafeLoader.yaml_constructors[node.tag](loader, node)
    return _Number(number, value)


class _Number:
    """A YAML number that also remembers its text; unwrapped while parsing."""

    def __init__(self, value, text):
        self.value, self.text = value, text


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
    _Loader.add_constructor(_tag, _keep_text)


def _plain(value):
    """Strip the remembered text where a section does not need it (free-form options)."""
    if isinstance(value, _Number):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- parsing

def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> Spec:
    """Read, override (`key=value`, dotted keys, `[i]` for list items) and parse a spec file."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PerceptcoreError(f"spec file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PerceptcoreError(f"cannot read spec file: {exc}", where) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise PerceptcoreError(f"{line}not valid YAML: {getattr(exc, 'problem', exc)}", where) from None
    if not isinstance(raw, dict):
        raise PerceptcoreError("a spec is a mapping of sections (study, cases, observers, …)", where)
    for override in overrides:
        _apply_override(raw, override)
    try:
        spec = structure(Spec, raw, "")
    except PerceptcoreError as exc:
        raise exc.at(where) from None
    spec = attrs.evolve(spec, source=where, base=str(path.parent.resolve()))
    try:
        _check(spec)
    except PerceptcoreError as exc:
        raise exc.at(where) from None
    return spec


# Paths given on the command line are relative to where the command runs.
_CWD_RELATIVE = {"data_dir", "outputs.dir"}


def _apply_override(raw: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise PerceptcoreError(f"expected key=value, got {override!r}", "--set")
    key = key.strip()
    parsed = yaml.load(value, Loader=_Loader) if value.strip() else ""
    if key in _CWD_RELATIVE:
        parsed = str(Path(value.strip()).resolve())
    parts = key.replace("]", "").replace("[", ".").split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise PerceptcoreError(f"{'.'.join(parts[:i + 1])}: no such list item", f"--set {key}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise PerceptcoreError(f"{'.'.join(parts[:i])} is not a section", f"--set {key}")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise PerceptcoreError(f"{key}: no such list item", f"--set {key}")
        node[int(last)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise PerceptcoreError(f"{'.'.join(parts[:-1])} is not a section", f"--set {key}")


def _join(where: str, key) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def structure(cls, raw, where: str):
    """An attrs class (a spec section, a plugin's Options) from a spec mapping: unknown keys and
    wrong types are errors at `where`."""
    if not isinstance(raw, dict):
        raise PerceptcoreError(f"expected a mapping with keys {', '.join(_keys(cls))}", where or None)
    fields = {f.name: f for f in attrs.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise PerceptcoreError(
            f"unknown key {unknown[0]!r}; expected one of {', '.join(fields)}", _join(where, unknown[0])
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        here = _join(where, name)
        if name not in raw or raw[name] is None:
            if field.default is attrs.NOTHING:
                raise PerceptcoreError("required key is missing", here)
            continue
        values[name] = _convert(hints[name], raw[name], here, (cls.__name__, name))
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # a plugin's Options validators
        raise PerceptcoreError(str(exc), where or None) from None


def _keys(cls):
    return [f.name for f in attrs.fields(cls) if not f.metadata.get("internal")]


def _convert(hint, value, where, field_id):
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if attrs.has(hint):
        return structure(hint, value, where)
    if hint is tuple:
        items = value if isinstance(value, list) else [value]
        item_cls = LIST_OF.get(field_id)
        if item_cls is not None:
            if not isinstance(value, list) or not value:
                raise PerceptcoreError(f"expected a non-empty list of {item_cls.__name__.removesuffix('Section').lower()}s", where)
            return tuple(structure(item_cls, item, _join(where, i)) for i, item in enumerate(items))
        return tuple(_scalar(str, item, _join(where, i)) for i, item in enumerate(items))
    if hint is dict:
        if not isinstance(value, dict):
            raise PerceptcoreError("expected a mapping", where)
        return _plain(value)
    return _scalar(hint, value, where)


def _scalar(kind, value, where):
    text = value.text if isinstance(value, _Number) else None
    plain = value.value if isinstance(value, _Number) else value
    if kind is str:
        if isinstance(plain, (dict, list)) or isinstance(plain, bool):
            raise PerceptcoreError(f"expected text, got {plain!r}", where)
        return text if text is not None else str(plain)
    if kind is bool:
        if not isinstance(plain, bool):
            raise PerceptcoreError(f"expected true or false, got {plain!r}", where)
        return plain
    if kind is int:
        if isinstance(plain, bool) or not isinstance(plain, int):
            raise PerceptcoreError(f"expected a whole number, got {plain!r}", where)
        return plain
    if kind is float:
        if isinstance(plain, bool) or not isinstance(plain, (int, float)):
            raise PerceptcoreError(f"expected a number, got {plain!r}", where)
        return float(plain)
    raise TypeError(kind)


# --------------------------------------------------------------------------- checks needing no data

def _check(spec: Spec) -> None:
    def fail(message, where):
        raise PerceptcoreError(message, where)

    if spec.robustness is None or spec.perception:
        for section in ("severities", "subgroups"):
            if getattr(spec, section) is None:
                fail("required key is missing", section)
    names = [o.name for o in spec.observers]
    for i, name in enumerate(names):
        if not name.replace("_", "").replace("-", "").isalnum():
            fail(f"observer name {name!r} may hold only letters, digits, '_' and '-'", f"observers[{i}].name")
        if names.index(name) != i:
            fail(f"observer name {name!r} is used twice", f"observers[{i}].name")
        observer = spec.observers[i]
        if (observer.predictions is None) == (observer.model is None):
            fail("give either predictions (a file) or model (a model plugin with checkpoints)", f"observers[{i}]")
        if observer.model is not None:
            if not observer.checkpoints:
                fail("a model observer needs at least one checkpoint (each is one reader)", f"observers[{i}].checkpoints")
            for section in ("images", "perturbation") if spec.perception else ("images",):
                if getattr(spec, section) is None:
                    fail(f"observer {name!r} is computed by a model, which needs an `{section}` section",
                         f"observers[{i}].model")
        elif not spec.perception:
            fail("a robustness-only study (no severities and subgroups) takes model observers only",
                 f"observers[{i}].predictions")
        if spec.observers[i].likelihood not in ("auto", "binary", "soft"):
            fail(f"unknown likelihood {spec.observers[i].likelihood!r}; expected auto, binary or soft",
                 f"observers[{i}].likelihood")
    for key in ("batch_size", "workers"):
        if getattr(spec.runner, key) < 1:
            fail("must be at least 1", f"runner.{key}")
    for i, fmt in enumerate(spec.outputs.figures):
        if fmt not in FIGURE_FORMATS:
            fail(f"unknown figure format {fmt!r}; expected {', '.join(FIGURE_FORMATS)}", f"outputs.figures[{i}]")
    if spec.robustness is not None:
        _check_robustness(spec, fail)
    if not spec.perception:
        for section in ("roi", "perturbation"):
            if getattr(spec, section) is not None:
                fail("needs severities and subgroups: a robustness-only study has no use for it", section)
        return
    levels = spec.severities.levels
    if len(levels) < 2:
        fail("give at least two severities: the unperturbed reference first, then the perturbed ones",
             "severities.levels")
    seen = {}
    for i, level in enumerate(levels):
        # Data files may write a severity as a number, so "0.5" and "0.50" are the same level.
        try:
            key = float(level)
        except ValueError:
            key = level
        if key in seen:
            same = "" if levels[seen[key]] == level else f" (as {levels[seen[key]]!r})"
            fail(f"severity {level!r} is listed twice{same}", f"severities.levels[{i}]")
        seen[key] = i
    if not spec.severities.unit.strip():
        fail("name the unit of the severities (e.g. mm)", "severities.unit")
    analysed = spec.subgroups.analyse
    if not analysed:
        fail("name at least one subgroup to analyse", "subgroups.analyse")
    for i, name in enumerate(analysed):
        if analysed.index(name) != i:
            fail(f"subgroup {name!r} is listed twice", f"subgroups.analyse[{i}]")
    model = spec.model
    if model.method not in METHODS:
        fail(f"unknown method {model.method!r}; expected one of {', '.join(METHODS)}", "model.method")
    if not model.parameterisations:
        fail(f"name at least one of {', '.join(PARAMETERISATIONS)}", "model.parameterisations")
    for i, p in enumerate(model.parameterisations):
        if p not in PARAMETERISATIONS:
            fail(f"unknown parameterisation {p!r}; expected {' or '.join(PARAMETERISATIONS)}",
                 f"model.parameterisations[{i}]")
    if model.method == "nuts" and len(model.parameterisations) > 1:
        fail("parameterisations are chosen by ELBO, which NUTS does not give; list one (compare them with advi)",
             "model.parameterisations")
    for key in ("draws", "max_iterations", "chains", "warmup", "workers"):
        if getattr(model, key) is not None and getattr(model, key) < 1:
            fail("must be at least 1", f"model.{key}")
    if not 0 < model.tolerance < 1:
        fail("must lie between 0 and 1", "model.tolerance")
    for key in ("b", "mu", "gamma", "nu"):
        if getattr(model.priors, key) <= 0:
            fail("a prior standard deviation must be positive", f"model.priors.{key}")
    if not 0 < spec.analyses.alpha < 1:
        fail("must lie between 0 and 1", "analyses.alpha")
    if spec.perturbation is not None:
        for i, region in enumerate(spec.perturbation.regions):
            if region not in REGIONS:
                fail(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}", f"perturbation.regions[{i}]")
        if "entire_image" not in spec.perturbation.regions:
            fail("include entire_image: the whole-image predictions are what the latent model analyses",
                 "perturbation.regions")
    roi = spec.roi
    if roi is not None:
        if roi.observer not in names:
            fail(f"no observer group named {roi.observer!r}; observers are {', '.join(names)}", "roi.observer")
        published = (roi.interior, roi.exterior, roi.exams)
        modelled = spec.observer(roi.observer).model is not None
        if modelled:
            if roi.predictions is not None or any(p is not None for p in published):
                fail(f"{roi.observer!r} is a model observer: the runner computes its ROI predictions; give no files",
                     "roi")
            regions = spec.perturbation.regions if spec.perturbation else ()
            if not {"roi_interior", "roi_exterior"} <= set(regions):
                fail("the ROI analysis of a model observer needs perturbation.regions to include roi_interior "
                     "and roi_exterior", "roi")
        elif roi.predictions is None and None in published:
            fail("give either predictions (a tidy CSV) or interior, exterior and exams (published layout)", "roi")
        if roi.predictions is not None and any(p is not None for p in published):
            fail("give predictions or interior/exterior/exams, not both", "roi")


def _check_robustness(spec: Spec, fail) -> None:
    if not spec.robustness.perturbations:
        fail("name at least one perturbation", "robustness.perturbations")
    if not any(o.model is not None for o in spec.observers):
        fail("the robustness study needs model observers (model and checkpoints)", "robustness")
    names = [p.name for p in spec.robustness.perturbations]
    for i, name in enumerate(names):
        if names.index(name) != i:
            fail(f"perturbation {name!r} is listed twice", f"robustness.perturbations[{i}].name")
