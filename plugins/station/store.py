"""The readers' answers, ROI boxes and submissions: SQLite in `<design>/station.sqlite`.

Write-ahead log with synchronous=FULL: a write is on disk before its request returns, so a
closed tab, a crash or a killed server loses at most the request in flight, and reading never
blocks the writer. Every call opens its own connection (a sqlite3 connection must not be
shared between the server's threads). A write that depends on a check (the exam is not
submitted yet; every case has a value) runs check and write in one BEGIN IMMEDIATE
transaction, so two requests cannot interleave between them.

Within the server, write transactions queue on a lock. SQLite alone makes a waiting writer
sleep in growing steps and poll, which with 10 readers saving at once left some answers
waiting 1-2 s while others went through; with the lock the database passes straight to the
next writer (slowest of 300 such writes about 0.15 s, and more writes per second).
busy_timeout (10 s) still covers other processes, such as an export reading the database.

Other processes (read-status, read-export) read through `read_only`: SQLite URI mode=ro, so they
never create or write the database and are safe beside a serving station. `progress` is the one
progress summary, for the admin page and read-status alike.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from perceptcore.errors import PerceptcoreError

FILE_NAME = "station.sqlite"
BUSY_TIMEOUT_MS = 10_000
SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    reader TEXT NOT NULL, position INTEGER NOT NULL, exam TEXT NOT NULL, case_id TEXT NOT NULL,
    value REAL NOT NULL, saved_at TEXT NOT NULL, PRIMARY KEY (reader, position, case_id));
CREATE TABLE IF NOT EXISTS boxes (
    reader TEXT NOT NULL, position INTEGER NOT NULL, view_id INTEGER NOT NULL, boxes TEXT NOT NULL,
    saved_at TEXT NOT NULL, PRIMARY KEY (reader, position, view_id));
CREATE TABLE IF NOT EXISTS submissions (
    reader TEXT NOT NULL, position INTEGER NOT NULL, exam TEXT NOT NULL, submitted_at TEXT NOT NULL,
    PRIMARY KEY (reader, position));
"""


class Locked(Exception):
    """The exam is submitted: its answers and boxes no longer change."""


class Incomplete(Exception):
    """Submitting an exam with cases that have no value yet."""

    def __init__(self, missing: list):
        super().__init__(missing)
        self.missing = missing


class Store:
    def __init__(self, design_folder: Path):
        self.path = Path(design_folder) / FILE_NAME
        self._writing = threading.Lock()
        try:
            with self._connect() as db:
                # The journal mode is a property of the file: set once, kept by every later connection.
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(SCHEMA)
        except sqlite3.Error as exc:  # a read-only folder, or a file that is not a database
            raise PerceptcoreError(f"cannot open the station's database: {exc}", str(self.path)) from None

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA synchronous = FULL")  # per connection, not stored in the file
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self):
        with self._connect() as db, self._writing:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _check_open(db, reader: str, position: int) -> None:
        if db.execute("SELECT 1 FROM submissions WHERE reader = ? AND position = ?", (reader, position)).fetchone():
            raise Locked()

    # ----------------------------------------------------------------------- writes

    def save_answer(self, reader: str, position: int, exam: str, case: str, value: float) -> str:
        """Store a case's value (replacing an earlier one); the time saved. Locked once submitted."""
        now = _now()
        with self._transaction() as db:
            self._check_open(db, reader, position)
            db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                       (reader, position, exam, case, float(value), now))
        return now

    def save_boxes(self, reader: str, position: int, view_id: int, boxes: list) -> str:
        """Replace a view's ROI boxes ([[row0, col0, row1, col1], ...]); the time saved."""
        now = _now()
        with self._transaction() as db:
            self._check_open(db, reader, position)
            db.execute("INSERT OR REPLACE INTO boxes VALUES (?, ?, ?, ?, ?)",
                       (reader, position, view_id, json.dumps(boxes), now))
        return now

    def submit(self, reader: str, position: int, exam: str, cases) -> str:
        """Lock an exam whose `cases` all have a value; the time submitted."""
        now = _now()
        with self._transaction() as db:
            self._check_open(db, reader, position)
            answered = {case for (case,) in db.execute(
                "SELECT case_id FROM answers WHERE reader = ? AND position = ?", (reader, position))}
            missing = [case for case in cases if case not in answered]
            if missing:
                raise Incomplete(missing)
            db.execute("INSERT INTO submissions VALUES (?, ?, ?, ?)", (reader, position, exam, now))
        return now

    # ----------------------------------------------------------------------- reads

    def exam_state(self, reader: str, position: int) -> tuple:
        """({case: value}, {view id: [[row0, col0, row1, col1], ...]}, submitted_at or None) of one exam,
        read in one snapshot."""
        with self._connect() as db, _snapshot(db):
            answers = dict(db.execute("SELECT case_id, value FROM answers WHERE reader = ? AND position = ?",
                                      (reader, position)))
            boxes = {view_id: json.loads(text) for view_id, text in db.execute(
                "SELECT view_id, boxes FROM boxes WHERE reader = ? AND position = ?", (reader, position))}
            row = db.execute("SELECT submitted_at FROM submissions WHERE reader = ? AND position = ?",
                             (reader, position)).fetchone()
        return answers, boxes, row[0] if row else None

    def worklist_state(self, reader: str) -> tuple:
        """({position: cases answered}, {submitted positions}) of one reader, read in one snapshot."""
        with self._connect() as db, _snapshot(db):
            answered = dict(db.execute("SELECT position, COUNT(*) FROM answers WHERE reader = ? GROUP BY position",
                                       (reader,)))
            submitted = {position for (position,) in db.execute(
                "SELECT position FROM submissions WHERE reader = ?", (reader,))}
        return answered, submitted

    def progress(self) -> dict:
        """`progress` of this database, in one snapshot."""
        with self._connect() as db, _snapshot(db):
            return progress(db)


@contextmanager
def _snapshot(db):
    """One read transaction: every query in it sees the same committed state."""
    db.execute("BEGIN")
    yield db
    db.execute("COMMIT")


@contextmanager
def read_only(design_folder: Path):
    """A read-only connection to a design's database, in one snapshot, for a process beside the server;
    None when there is no database (nobody has saved anything yet)."""
    path = Path(design_folder) / FILE_NAME
    if not path.is_file():
        yield None
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                             isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            with _snapshot(db):
                yield db
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise PerceptcoreError(f"cannot read the station's database: {exc}", str(path)) from None


def progress(db) -> dict:
    """{reader: {"done": exams submitted, "answered_cases": int, "last_saved": time or None}} of every reader
    who has saved anything (a reader not listed has not started), on a connection in a snapshot."""
    summary: dict = {}

    def entry(reader):
        return summary.setdefault(reader, {"done": 0, "answered_cases": 0, "last_saved": None})

    def latest(item, when):
        if when is not None and (item["last_saved"] is None or when > item["last_saved"]):
            item["last_saved"] = when

    for reader, count, when in db.execute("SELECT reader, COUNT(*), MAX(saved_at) FROM answers GROUP BY reader"):
        entry(reader)["answered_cases"] = count
        latest(entry(reader), when)
    for reader, when in db.execute("SELECT reader, MAX(saved_at) FROM boxes GROUP BY reader"):
        latest(entry(reader), when)
    for reader, count, when in db.execute(
            "SELECT reader, COUNT(*), MAX(submitted_at) FROM submissions GROUP BY reader"):
        entry(reader)["done"] = count
        latest(entry(reader), when)
    return summary


def _now() -> str:
    """UTC, ISO 8601 with milliseconds: sorts as text."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
