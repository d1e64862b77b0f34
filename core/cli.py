"""The `perceptcore` command: run, validate, plugins."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .errors import PerceptcoreError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="perceptcore", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a study spec and write its results")
    run.add_argument("spec")
    run.add_argument("--out", help="output folder (default: outputs.dir of the spec, else ./perceptcore-runs/<study>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec key, e.g. --set model.draws=200 or --set data_dir=/data")

    validate = commands.add_parser("validate", help="check a spec and its data without fitting anything")
    validate.add_argument("spec")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    commands.add_parser("plugins", help="list the loaded plugins")

    args = parser.parse_args(argv)
    try:
        return {"run": _run, "validate": _validate, "plugins": _plugins}[args.command](args)
    except PerceptcoreError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def _study(args):
    from .plugins import load_registry
    from .run import Study
    from .spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    registry = load_registry()
    try:
        return Study(spec, registry)
    except PerceptcoreError as exc:
        raise exc.at(spec.source) from None


def _run(args) -> int:
    from .run import default_out_dir

    started = time.perf_counter()
    study = _study(args)
    out = Path(args.out) if args.out else default_out_dir(study.spec)
    out = study.write(out)
    records = study.fit_records()
    unconverged = records[~records["converged"]] if len(records) else records
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s "
          f"(backend {study.backend.name}, method {study.spec.model.method})")
    for _, row in unconverged.iterrows():
        print(f"warning: the fit of {row['observer']} ({row['grouping']}, {row['parameterisation']}) did not "
              f"converge: {row['convergence']}", file=sys.stderr)
    return 0


def _validate(args) -> int:
    study = _study(args)
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


if __name__ == "__main__":
    sys.exit(main())
