"""The `perceptcore` command: run, validate, train, plugins, design-reader-study, import-reads, and the
commands plugins register (the reading station's `read`, `read-status`, `read-export`)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from .errors import PerceptcoreError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands, subparsers = _parser()
    try:
        # Plugins are imported only for a command that is not built in, or to list them all in --help.
        word = next((a for a in argv if not a.startswith("-")), None)
        if word not in commands and not {"--version"} & set(argv):
            _add_plugin_commands(subparsers, commands)
    except PerceptcoreError as exc:
        if "--debug" in argv:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    try:
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


def _add_plugin_commands(subparsers, commands: dict) -> None:
    from .plugins import load_registry

    for item in load_registry().all("command"):
        if item.name in commands:
            raise PerceptcoreError(f"command {item.name!r} is built into perceptcore; rename the plugin's command",
                                   f"plugin {item.plugin!r} ({item.package})")
        try:
            item.obj.add_arguments(subparsers.add_parser(item.name, help=item.obj.help, description=item.obj.help))
        except Exception as exc:  # a broken third-party command must not look like our bug
            raise PerceptcoreError(f"command {item.name!r} could not declare its arguments: {type(exc).__name__}: "
                                   f"{exc}", f"plugin {item.plugin!r} ({item.package})") from exc
        commands[item.name] = item.obj.run


def _parser():
    """The argument parser of the built-in commands, {command: function}, and the sub-parsers."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="perceptcore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"perceptcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a study spec and write its results")
    run.add_argument("spec", help="the study spec (YAML)")
    run.add_argument("--out", help="output folder (default: outputs.dir of the spec, else ./perceptcore-runs/<study>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec key, e.g. --set model.draws=200 or --set data_dir=/data (repeatable)")

    validate = sub.add_parser("validate", help="check a spec and its data without fitting anything")
    validate.add_argument("spec", help="the study spec (YAML)")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a spec key, e.g. --set model.draws=200 or --set data_dir=/data (repeatable)")

    train = sub.add_parser("train", help="train the spec's `training` models (run trains them too)")
    train.add_argument("spec", help="the study spec (YAML)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec key, e.g. --set model.draws=200 or --set data_dir=/data (repeatable)")

    sub.add_parser("plugins", help="list the loaded plugins")

    design = sub.add_parser("design-reader-study",
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
    design.add_argument("--calls", default="probability", choices=("probability", "binary", "birads"),
                        help="what readers record per breast in the reading station: a probability of malignancy "
                        "0-100 %% (default, as published), a binary call or a BI-RADS category")
    design.add_argument("--roi", action="store_true", help="readers also draw up to 3 ROI boxes per view "
                        "(the annotation study; needs --images)")

    reads = sub.add_parser("import-reads", help="turn filled worksheets into a tidy prediction table")
    reads.add_argument("design", help="the folder design-reader-study wrote")
    reads.add_argument("worksheets", nargs="+", help="filled worksheet CSVs")
    reads.add_argument("--calls", default="binary", choices=("binary", "probability"),
                       help="0/1 calls or probabilities in [0, 1]")
    reads.add_argument("--out", required=True, help="the prediction table to write (CSV)")

    builtin = {"run": _run, "validate": _validate, "train": _train, "plugins": _plugins,
               "design-reader-study": _design_reader_study, "import-reads": _import_reads}
    return parser, builtin, sub


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


# run, validate and train are core/pipeline.py's Pipeline.run, .validate and .train; here they are printed.

def _train(args) -> int:
    from .pipeline import load

    for model in load(args.spec, args.overrides).train():
        severity = "" if model.severity is None else f" severity {model.severity}"
        print(f"{model.training}{severity} {model.reader}: {model.path}")
    return 0


def _run(args) -> int:
    from .pipeline import load

    started = time.perf_counter()
    results = load(args.spec, args.overrides).run(args.out)
    if results.backend is None:
        print(f"wrote {results.out} in {time.perf_counter() - started:.1f} s (robustness study)")
        return 0
    print(f"wrote {results.out} in {time.perf_counter() - started:.1f} s "
          f"(backend {results.backend}, method {results.method})")
    records = results.fit_diagnostics
    unconverged = records[~records["converged"]] if len(records) else records
    for _, row in unconverged.iterrows():
        print(f"warning: the fit of {row['observer']} ({row['grouping']}, {row['parameterisation']}) did not "
              f"converge or failed its own accuracy diagnostic: {row['convergence']}", file=sys.stderr)
    return 0


def _validate(args) -> int:
    from .pipeline import load

    validation = load(args.spec, args.overrides).validate()
    if validation.summary is not None:
        print(validation)
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
    import attrs

    from . import reader_study
    from .run import progress_to_stderr
    from .data import read_table, require_columns

    out = Path(args.out)
    if out.exists():
        raise PerceptcoreError("already exists; a design is written once (its assignment is the study's key)", str(out))
    if args.roi and not args.images:
        raise PerceptcoreError("ROI boxes are drawn on the readers' images: give --images and --perturbation too",
                               "--roi")
    path = Path(args.cases)
    table = read_table(path, str(path), text_columns=(args.exam_column, args.case_column))
    require_columns(table, [args.exam_column, args.case_column], path, str(path))
    cases_of_exam = reader_study.cases_by_exam(table, args.exam_column, args.case_column)
    readers = _reader_names(args.readers)
    imaging = _reader_images_setup(args) if args.images or args.perturbation else None
    assignment = reader_study.assign(list(cases_of_exam), readers, args.severities, args.scheme, args.seed)
    sheets = reader_study.worksheets(assignment, cases_of_exam)
    record = reader_study.design_record(
        calls=args.calls, roi=args.roi, severities=args.severities, perturbation=args.perturbation if imaging else None,
        options=attrs.asdict(imaging[2], recurse=True) if imaging else {},
        manifest=imaging[0].path if imaging else None, seed=args.seed, scheme=args.scheme, readers=readers)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "worksheets").mkdir(parents=True)
    try:  # everything goes to the staging folder, renamed when complete: never half a design
        if imaging is not None:
            images = reader_study.write_images(assignment, cases_of_exam, *imaging, args.seed, staging / "images",
                                               progress_to_stderr)
            images.to_csv(staging / "images.csv", index=False)
        assignment.to_csv(staging / "assignment.csv", index=False)
        pd.DataFrame([(e, c) for e, cs in cases_of_exam.items() for c in cs], columns=["exam", "case"]).to_csv(
            staging / "exams.csv", index=False)
        for reader, sheet in sheets.items():
            sheet.to_csv(staging / "worksheets" / f"{reader}.csv", index=False)
        reader_study.write_design_record(record, staging / "design.json")
        reader_study.write_tokens(readers, staging / "tokens.csv")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {out}: {len(readers)} readers x {len(cases_of_exam)} exams ({args.scheme}, seed {args.seed}; "
          f"{args.calls} calls{', ROI boxes' if args.roi else ''})")
    if imaging is not None:
        print(f"serve it to the readers with: perceptcore read {out}  (their links: perceptcore read-status {out} "
              "--links)")
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
