"""The reading station's commands: `perceptcore read`, `read-status` and `read-export`.

Every perceptcore invocation imports this module (to list the commands), so the web
framework and server are imported only when `read` serves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perceptcore.errors import PerceptcoreError
from perceptcore.plugins import hookimpl

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _design_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("design", help="the folder perceptcore design-reader-study wrote")


def _base_url(host: str, port: int) -> str:
    shown = DEFAULT_HOST if host in ("0.0.0.0", "::", "") else host  # a wildcard is no address to open
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"


class Read:
    name = "read"
    help = "serve a reader-study design as a browser reading station (this machine only by default)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _design_folder(parser)
        parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this "
                            "machine only; 0.0.0.0 serves the network)")
        parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")

    def run(self, args: argparse.Namespace) -> int:
        from .design import load_design

        loaded = load_design(Path(args.design))  # a broken design is reported before a bad port
        design, admin = loaded.folder, loaded.admin_token
        if not 0 < args.port < 65536:
            raise PerceptcoreError(f"{args.port} is not a port number (1-65535)", "--port")
        import uvicorn

        from .app import create_app

        app = create_app(loaded)
        base = _base_url(args.host, args.port)
        reach = ("this machine only; --host 0.0.0.0 serves the network" if args.host in ("127.0.0.1", "localhost", "::1")
                 else f"bound to {args.host}: other machines can reach it")
        print(f"serving {design} at {base} ({reach})", flush=True)
        print(f"admin: {base}/admin/{admin}  (readers' links: perceptcore read-status {design} --links)", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0


class ReadStatus:
    name = "read-status"
    help = "show each reader's progress in the reading station (and, with --links, their personal links)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _design_folder(parser)
        parser.add_argument("--links", action="store_true", help="also print each reader's link and the admin link")
        parser.add_argument("--base-url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}",
                            help="where the station is reached, for the links (default "
                            f"http://{DEFAULT_HOST}:{DEFAULT_PORT})")

    def run(self, args: argparse.Namespace) -> int:
        from .design import load_design
        from .store import progress, read_only

        design = load_design(args.design)
        with read_only(design.folder) as db:
            saved = progress(db) if db is not None else {}  # no database: nobody has saved anything yet
        base = args.base_url.rstrip("/")
        rows, finished = [("reader", "done", "answered cases", "last saved", "link")], 0
        for reader in design.readers:
            state, total = saved.get(reader, {}), len(design.worklists[reader])
            finished += state.get("done", 0) == total
            rows.append((reader, f"{state.get('done', 0)}/{total}", str(state.get("answered_cases", 0)),
                         state.get("last_saved") or "not started", f"{base}/r/{design.reader_tokens[reader]}"))
        if not args.links:
            rows = [row[:-1] for row in rows]
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        for row in rows:
            print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
        print(f"{finished} of {len(design.readers)} readers finished")
        if args.links:
            print(f"admin: {base}/admin/{design.admin_token}")
        return 0


class ReadExport:
    name = "read-export"
    help = "export the reading station's submitted exams as a predictions table (and ROI boxes as manifests)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _design_folder(parser)
        parser.add_argument("--out", required=True, help="the predictions table to write (CSV): reader, severity, "
                            "case, prediction — what a spec's observers[].predictions reads")
        parser.add_argument("--rois", metavar="FOLDER", help="also write each reader's ROI boxes as an image manifest "
                            "FOLDER/<reader>.csv (designs made with --roi)")

    def run(self, args: argparse.Namespace) -> int:
        from .export import export

        done = export(args.design, Path(args.out), Path(args.rois) if args.rois else None)
        print(f"wrote {args.out}: {done.calls} calls from {done.submitted} submitted exams; "
              f"{done.unsubmitted} exams not yet submitted (left out)")
        if args.rois:
            print(f"wrote {len(done.files) - 1} ROI manifests into {args.rois}")
        return 0


@hookimpl
def perceptcore_register_commands(register):
    for command in (Read(), ReadStatus(), ReadExport()):
        register(command)
