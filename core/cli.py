"""The `perceptcore` command: run, validate, train, plugins, design-reader-study, import-reads."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import PerceptcoreError


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="perceptcore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"perceptcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a study spec and write its results")
    run.add_argument("spec", help="the study spec (YAML)")
    run.add_argument("--out", help="output folder (default: outputs.dir of the spec, else ./perceptcore-runs/<study>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec key, e.g. --set model.draws=200 or --set data_dir=/data (repeatable)")

    validate = commands.add_parser("validate", help="check a spec and its data without fitting anything")
    validate.add_argument("spec", help="the study spec (YAML)")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a spec key, e.g. --set model.draws=200 or --set data_dir=/data (repeatable)")

    train = commands.add_parser("train", help="train the spec's `training` models (run trains them too)")
    train.add_argument("spec", help="the study spec (YAML)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec key, e.g. --set model.draws=200 or --set data_dir=/data (repeatable)")

    commands.add_parser("plugins", help="list the loaded plugins")

    design = commands.add_parser("design-reader-study",
                                 help="assign each reader every exam once at a severity; write blinded worksheets")
    design.add_argument("cases", help="CSV with an exam column and a case column (e.g. the cases table)")
    design.add_argument("--readers", required=True, help="how many readers (named reader01, …) or their names, comma-separated")
    design.add_argument("--severities", required=True, nargs="+", help="severity levels, the unperturbed one first")
    design.add_argument("--scheme", default="uniform", help="uniform (a random severity per reader and exam, as "
                        "published) or balanced (each reader sees each severity equally often)")
    design.add_argument("--seed", type=int, default=0, help="seed of the assignment and reading order")
    design.add_argument("--exam-column", default="exam", help="the cases table's exam column")
    design.add_argument("--case-column", default="case", help="the cases table's case column")
    design.add_argument("--out", required=True, help="folder for assignment.csv, exams.csv and worksheets/")
    design.add_argument("--images", metavar="MANIFEST", help="also write each reader's perturbed images, in reading "
                        "order, from this image manifest")
    design.add_argument("--perturbation", help="the perturbation plugin for --images (e.g. gaussian_lowpass)")
    design.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the perturbation, e.g. --option unit=mm")

    reads = commands.add_parser("import-reads", help="turn filled worksheets into a tidy prediction table")
    reads.add_argument("design", help="the folder design-reader-study wrote")
    reads.add_argument("worksheets", nargs="+", help="filled worksheet CSVs")
    reads.add_argument("--calls", default="binary", choices=("binary", "probability"),
                       help="0/1 calls or probabilities in [0, 1]")
    reads.add_argument("--out", required=True, help="the prediction table to write (CSV)")

    args = parser.parse_args(argv)
    try:
        commands = {"run": _run, "validate": _validate, "train": _train, "plugins": _plugins,
                    "design-reader-study": _design_reader_study, "import-reads": _import_reads}
        return commands[args.command](args)
    except PerceptcoreError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no results were written (finished prediction work units stay in the cache)",
              file=sys.stderr)
        return 130


MAX_ERROR = 500  # characters of an error line: room for two long absolute paths


def one_line(message: str) -> str:
    """An error as one short printable line: control characters (a newline in a path or a value)
    escaped, and a message that still runs long cut in the middle, keeping where it is (the start)
    and how it ends."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    if len(text) > MAX_ERROR:
        head = MAX_ERROR * 2 // 3
        text = text[:head] + " … " + text[-(MAX_ERROR - head - 3):]
    return text


def _study(args):
    from .dataset import generated, with_generated_data
    from .plugins import load_registry
    from .resources import stage
    from .robustness import Robustness
    from .run import Study, check_out_dir, claim_out_dir, default_out_dir, progress_to_stderr, release_out_dir
    from .runner import ImageWork, Runner
    from .spec import check_plugins, load_spec
    from .training import TrainingLog, trainings_of

    spec = load_spec(args.spec, args.overrides)
    if args.command == "run":  # before any work: lock --out; refuse one that cannot be written or is not a run
        claim_out_dir(_out_dir(args, spec))
    elif args.command == "validate":
        try:
            check_out_dir(default_out_dir(spec))
        except PerceptcoreError as exc:  # the folder came from the spec: name its key too
            raise exc.at(f"{spec.source}: outputs.dir" if spec.outputs.dir else spec.source) from None
    registry = load_registry()
    try:
        check_plugins(spec, registry)  # before any data is generated, read, trained or predicted
        if args.command == "validate" and not generated(spec, registry):  # validate generates nothing
            print(f"{spec.source}: ok — the run will generate dataset {spec.dataset.name!r}; the data are checked "
                  "when they exist")
            return []
        with stage("data"):  # timings.json: a generated dataset's time is the run's data stage
            spec = with_generated_data(spec, registry, progress_to_stderr)
        trainings = trainings_of(spec, registry)
        work = ImageWork.of(spec, registry, trainings)
        robustness = Robustness(spec, work, progress_to_stderr) if spec.robustness else None
        runner = Runner(spec, work)
        if args.command == "validate":
            planned = [f"{len(t.jobs)} models of training {t.name!r}" for t in trainings.values()]
            if runner.units:
                planned.append(f"{runner.n_predictions} predictions in {len(runner.units)} work units")
            if robustness:
                planned.append(f"the robustness study of {len(robustness.perturbations)} perturbations")
            if planned:
                print(f"{spec.source}: ok — the run will compute {', '.join(planned)}; their analysis is checked "
                      "when they exist")
                return []
        for training in trainings.values():
            training.run(progress_to_stderr)
        if args.command == "train":
            return list(trainings.values())
        log = TrainingLog(list(trainings.values())) if trainings else None  # the report draws its curves
        parts = [Study(runner.run(progress_to_stderr), registry, training_log=log)] if spec.perception else []
        parts += [robustness] if robustness else []
        return parts + ([log] if log else [])
    except PerceptcoreError as exc:
        if args.command == "run":
            release_out_dir(_out_dir(args, spec))  # nothing was written: the next run may have --out
        raise exc.at(spec.source) from None


def _train(args) -> int:
    trainings = _study(args)
    if not trainings:
        raise PerceptcoreError("the spec has no `training` section", args.spec)
    for training in trainings:
        for reader, path, _, level in training.checkpoints():
            severity = "" if level is None else f" severity {training.spec.severities.levels[level]}"
            print(f"{training.name}{severity} {reader}: {path}")
    return 0


def _out_dir(args, spec) -> Path:
    from .run import default_out_dir

    return Path(args.out).resolve() if args.out else default_out_dir(spec)


def _run(args) -> int:
    from .run import Study, write_run

    started = time.perf_counter()
    parts = _study(args)
    spec = parts[0].spec
    out = write_run(spec, _out_dir(args, spec), parts)
    studies = [part for part in parts if isinstance(part, Study)]
    if not studies:
        print(f"wrote {out} in {time.perf_counter() - started:.1f} s (robustness study)")
        return 0
    study = studies[0]
    records = study.fit_records()
    unconverged = records[~records["converged"]] if len(records) else records
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s "
          f"(backend {study.backend.name}, method {study.spec.model.method})")
    for _, row in unconverged.iterrows():
        print(f"warning: the fit of {row['observer']} ({row['grouping']}, {row['parameterisation']}) did not "
              f"converge or failed its own accuracy diagnostic: {row['convergence']}", file=sys.stderr)
    return 0


def _validate(args) -> int:
    parts = _study(args)
    if not parts:
        return 0
    study = parts[0]
    counts = {name: int(np.isfinite(group.values).sum()) for name, group in study.observers.items()}
    print(f"{study.spec.source}: ok — {len(study.cases)} cases, {len(study.severities)} severities, "
          + ", ".join(f"{name}: {n} predictions" for name, n in counts.items())
          + f"; backend {study.backend.name}")
    return 0


def _plugins(args) -> int:
    from .plugins import load_registry

    items = load_registry().all()
    rows = [("name", "kind", "package", "version", "plugin")]
    rows += [(i.name, i.kind, i.package, i.version, i.plugin) for i in items]
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def _design_reader_study(args) -> int:
    from . import reader_study
    from .run import progress_to_stderr
    from .data import read_table, require_columns

    out = Path(args.out)
    if out.exists():
        raise PerceptcoreError("already exists; a design is written once (its assignment is the study's key)", str(out))
    path = Path(args.cases)
    table = read_table(path, str(path), text_columns=(args.exam_column, args.case_column))
    require_columns(table, [args.exam_column, args.case_column], path, str(path))
    cases_of_exam = reader_study.cases_by_exam(table, args.exam_column, args.case_column)
    readers = _reader_names(args.readers)
    imaging = _reader_images_setup(args) if args.images or args.perturbation else None
    assignment = reader_study.assign(list(cases_of_exam), readers, args.severities, args.scheme, args.seed)
    sheets = reader_study.worksheets(assignment, cases_of_exam)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "worksheets").mkdir(parents=True)
    if imaging is not None:
        try:
            reader_study.write_images(assignment, cases_of_exam, *imaging, args.seed, staging / "images",
                                      progress_to_stderr)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    assignment.to_csv(staging / "assignment.csv", index=False)
    pd.DataFrame([(e, c) for e, cs in cases_of_exam.items() for c in cs], columns=["exam", "case"]).to_csv(
        staging / "exams.csv", index=False)
    for reader, sheet in sheets.items():
        sheet.to_csv(staging / "worksheets" / f"{reader}.csv", index=False)
    staging.rename(out)
    print(f"wrote {out}: {len(readers)} readers x {len(cases_of_exam)} exams ({args.scheme}, seed {args.seed})")
    return 0


def _reader_images_setup(args):
    """Everything write_images needs, checked before any image is written."""
    import yaml

    from .images import load_manifest
    from .plugins import load_registry
    from .runner import severity_value
    from .spec import structure

    if not (args.images and args.perturbation):
        raise PerceptcoreError("give both --images and --perturbation to write the readers' images",
                               "--images" if not args.images else "--perturbation")
    manifest = load_manifest(Path(args.images), "--images")
    perturbation = load_registry().get("perturbation", args.perturbation, "--perturbation")
    raw = {}
    for option in args.options:
        key, sep, value = option.partition("=")
        if not sep:
            raise PerceptcoreError(f"expected key=value, got {option!r}", "--option")
        raw[key.strip()] = yaml.safe_load(value)
    options = structure(perturbation.Options, raw, "--option")
    severities = {label: severity_value(label, f"--severities[{i}]") for i, label in enumerate(args.severities)}
    return manifest, perturbation, options, severities


def _reader_names(text: str) -> list[str]:
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise PerceptcoreError("needs at least one reader", "--readers")
        return [f"reader{i + 1:02d}" for i in range(count)]
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise PerceptcoreError("reader names must be distinct", "--readers")
    return names


def _import_reads(args) -> int:
    from . import reader_study
    from .data import read_table, write_csv

    design = Path(args.design)
    assignment = read_table(design / "assignment.csv", str(design), text_columns=("reader", "exam", "severity"))
    exams = read_table(design / "exams.csv", str(design), text_columns=("exam", "case"))
    cases_of_exam = reader_study.cases_by_exam(exams, "exam", "case")
    predictions = reader_study.import_reads(assignment, cases_of_exam, args.worksheets, args.calls)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(predictions, out)
    expected = sum(len(cases_of_exam[e]) for e in assignment["exam"].astype(str))
    print(f"wrote {out}: {len(predictions)} calls of the {expected} the design asks for")
    return 0


if __name__ == "__main__":
    sys.exit(main())
