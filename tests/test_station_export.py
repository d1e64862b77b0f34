"""`perceptcore read-export` and `read-status`: the station's SQLite database (filled here directly,
as the contract's schema says) out to the tidy predictions table and per-reader ROI manifests."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from perceptcore.cli import main
from perceptcore.images import load_manifest
from station_design import demo_design, make_design, tokens, write_reads_spec

SCHEMA = """
CREATE TABLE answers(reader, position, exam, case_id, value REAL, saved_at TEXT, PRIMARY KEY(reader, position, case_id));
CREATE TABLE boxes(reader, position, view_id INTEGER, boxes TEXT, saved_at, PRIMARY KEY(reader, position, view_id));
CREATE TABLE submissions(reader, position, exam, submitted_at, PRIMARY KEY(reader, position));
"""


class Station:
    """The station's database, written the way the server writes it."""

    def __init__(self, design: Path):
        self.design = design
        self.connection = sqlite3.connect(design / "station.sqlite", isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.executescript(SCHEMA)
        self.assignment = pd.read_csv(design / "assignment.csv", dtype=str)
        exams = pd.read_csv(design / "exams.csv", dtype=str)
        self.cases = {exam: list(rows.case) for exam, rows in exams.groupby("exam", sort=False)}
        self.images = pd.read_csv(design / "images.csv", dtype=str)

    def exam(self, reader, position) -> str:
        rows = self.assignment[(self.assignment.reader == reader) & (self.assignment.order == str(position))]
        return rows.exam.iloc[0]

    def answer(self, reader, position, values, submit=True, saved_at="2024-05-01T10:00:00"):
        exam = self.exam(reader, position)
        for case, value in zip(self.cases[exam], values):
            self.connection.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                                    (reader, position, exam, case, value, saved_at))
        if submit:
            self.connection.execute("INSERT INTO submissions VALUES (?, ?, ?, ?)", (reader, position, exam, saved_at))

    def draw(self, reader, position, case, view, boxes) -> None:
        mine = self.images[(self.images.reader == reader) & (self.images.order == str(position))
                           & (self.images.case == case) & (self.images.view == view)]
        self.connection.execute("INSERT OR REPLACE INTO boxes VALUES (?, ?, ?, ?, ?)",
                                (reader, position, int(mine.index[0]), json.dumps(boxes), "2024-05-01T10:00:01"))


def expected_table(station: Station, answered: dict, rule) -> pd.DataFrame:
    """The export computed from the design files: {(reader, position): values} of submitted exams, each
    exam's cases in the order the station shows them (right breast first)."""
    rows = []
    for (reader, position), values in answered.items():
        exam = station.exam(reader, position)
        key = station.assignment[(station.assignment.reader == reader) & (station.assignment.exam == exam)]
        for case, value in sorted(zip(station.cases[exam], values), key=lambda pair: "/right" not in pair[0]):
            rows.append((reader, key.severity.iloc[0], case, *rule(value)))
    return rows


def read_export(path: Path) -> list:
    table = pd.read_csv(path, dtype={"severity": str, "case": str})
    return [tuple(row) for row in table.itertuples(index=False)]


@pytest.fixture
def probability_design(tmp_path):
    return make_design(tmp_path, readers=2, exams=3, calls="probability", roi=True)


def test_probability_calls_of_submitted_exams_become_predictions(probability_design, tmp_path, capsys):
    station = Station(probability_design)
    submitted = {("reader01", 1): [37.5, 100], ("reader01", 2): [0, 12], ("reader02", 1): [88, 3.25]}
    for (reader, position), values in submitted.items():
        station.answer(reader, position, values)
    station.answer("reader01", 3, [50, 60], submit=False)  # still open: the reader may change it
    station.answer("reader02", 2, [70], submit=False)
    out = tmp_path / "out" / "reads.csv"
    assert main(["read-export", str(probability_design), "--out", str(out)]) == 0
    assert list(pd.read_csv(out).columns) == ["reader", "severity", "case", "prediction"]
    assert read_export(out) == expected_table(station, submitted, lambda v: (v / 100,))
    printed = capsys.readouterr().out
    assert "6 calls from 3 submitted exams; 3 exams not yet submitted" in printed


def test_birads_categories_4_and_5_are_positive_and_kept_as_the_call(tmp_path):
    design = make_design(tmp_path, readers=1, exams=3, calls="birads", roi=False)
    station = Station(design)
    submitted = {("reader01", 1): [1, 4], ("reader01", 2): [3, 5], ("reader01", 3): [2, 2]}
    for (reader, position), values in submitted.items():
        station.answer(reader, position, values)
    assert main(["read-export", str(design), "--out", str(tmp_path / "reads.csv")]) == 0
    assert list(pd.read_csv(tmp_path / "reads.csv").columns) == ["reader", "severity", "case", "prediction", "call"]
    birads = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    assert read_export(tmp_path / "reads.csv") == expected_table(station, submitted, lambda v: (birads[v], v))


def test_binary_calls_are_exported_as_they_are(tmp_path):
    design = make_design(tmp_path, readers=2, exams=2, calls="binary", roi=False)
    station = Station(design)
    submitted = {("reader02", 2): [1, 0], ("reader01", 1): [0, 0]}
    for (reader, position), values in submitted.items():
        station.answer(reader, position, values)
    assert main(["read-export", str(design), "--out", str(tmp_path / "reads.csv")]) == 0
    in_design_order = dict(sorted(submitted.items()))  # readers as the design lists them, then reading order
    assert read_export(tmp_path / "reads.csv") == expected_table(station, in_design_order, lambda v: (v,))


def test_roi_boxes_become_one_manifest_per_reader(probability_design, tmp_path):
    station = Station(probability_design)
    station.answer("reader01", 1, [10, 20])
    station.answer("reader02", 1, [30, 40])
    station.answer("reader02", 2, [50, 60], submit=False)
    left, right = station.cases[station.exam("reader01", 1)]
    station.draw("reader01", 1, left, "CC", [[2, 3, 10, 12], [20, 1, 30, 9]])
    station.draw("reader01", 1, right, "MLO", [[0, 0, 64, 48]])
    station.draw("reader02", 2, station.cases[station.exam("reader02", 2)][0], "CC", [[1, 1, 5, 5]])  # not submitted
    rois = tmp_path / "rois"
    assert main(["read-export", str(probability_design), "--out", str(tmp_path / "reads.csv"),
                 "--rois", str(rois)]) == 0
    assert sorted(p.name for p in rois.iterdir()) == ["reader01.csv", "reader02.csv"]
    source = {(r.case, r.view, r.laterality): r for r in load_manifest(probability_design.parent / "manifest.csv", "m")}
    for reader, drawn in (("reader01", {(left, "CC"): ((2, 3, 10, 12), (20, 1, 30, 9)),
                                        (right, "MLO"): ((0, 0, 64, 48),)}),
                          ("reader02", {})):
        manifest = load_manifest(rois / f"{reader}.csv", str(rois / f"{reader}.csv"))
        exam = station.exam(reader, 1)
        assert sorted((r.case, r.view) for r in manifest) == sorted((c, v) for c in station.cases[exam]
                                                                    for v in ("CC", "MLO"))
        for record in manifest:
            original = source[(record.case, record.view, record.laterality)]
            assert record.file == original.file and record.pixel_spacing_mm == original.pixel_spacing_mm
            assert record.roi_boxes == drawn.get((record.case, record.view), ())


def test_export_during_a_live_session_sees_only_committed_answers_and_writes_nothing_to_the_database(
        probability_design, tmp_path):
    station = Station(probability_design)
    station.answer("reader01", 1, [10, 20])
    writer = sqlite3.connect(probability_design / "station.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a save in flight holds the write lock
    writer.execute("INSERT INTO submissions VALUES ('reader01', 2, ?, 'now')", (station.exam("reader01", 2),))
    try:
        assert main(["read-export", str(probability_design), "--out", str(tmp_path / "reads.csv")]) == 0
    finally:
        writer.execute("ROLLBACK")
    assert len(pd.read_csv(tmp_path / "reads.csv")) == 2
    from perceptcore.errors import PerceptcoreError
    from perceptcore_plugins.station.store import read_only

    with pytest.raises(PerceptcoreError, match="readonly"), read_only(probability_design) as db:
        db.execute("DELETE FROM answers")


def _fails(argv, capsys, *fragments, out=None):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    if out is not None:
        assert not Path(out).exists() and not list(Path(out).parent.glob(f".{Path(out).name}*"))


def test_bad_design_folders_are_located_errors_and_nothing_is_written(probability_design, tmp_path, capsys):
    out = tmp_path / "reads.csv"
    _fails(["read-export", str(tmp_path / "nowhere"), "--out", str(out)], capsys,
           f"{tmp_path / 'nowhere'}: is not a design folder", out=out)
    _fails(["read-export", str(probability_design), "--out", str(out)], capsys,
           f"{probability_design}: has no station.sqlite: no reader has saved anything yet", out=out)
    station = Station(probability_design)
    station.answer("reader01", 1, [10, 20])
    (probability_design / "design.json").write_text("{not json")
    _fails(["read-export", str(probability_design), "--out", str(out)], capsys,
           f"{probability_design / 'design.json'}: not readable JSON", out=out)


def test_inconsistent_answers_are_refused(probability_design, tmp_path, capsys):
    station = Station(probability_design)
    station.answer("reader01", 1, [10, 120])  # out of range for a probability
    out = tmp_path / "reads.csv"
    _fails(["read-export", str(probability_design), "--out", str(out)], capsys, "station.sqlite",
           "value 120.0 is not a valid probability call", out=out)
    station.answer("reader01", 1, [10, 20], submit=False)
    station.connection.execute("DELETE FROM answers WHERE case_id = ?", (station.cases[station.exam("reader01", 1)][1],))
    _fails(["read-export", str(probability_design), "--out", str(out)], capsys,
           "the exam was submitted without this case's call", out=out)


def test_rois_need_a_design_with_roi(tmp_path, capsys):
    design = make_design(tmp_path, readers=1, exams=1, roi=False)
    Station(design).answer("reader01", 1, [10, 20])
    out = tmp_path / "reads.csv"
    _fails(["read-export", str(design), "--out", str(out), "--rois", str(tmp_path / "rois")], capsys,
           "--rois: the design asks for no ROI boxes", out=out)
    assert not (tmp_path / "rois").exists()


def test_read_status_shows_progress_and_links(probability_design, capsys):
    assert main(["read-status", str(probability_design)]) == 0
    assert "reader01  0/3   0               not started" in capsys.readouterr().out
    assert not (probability_design / "station.sqlite").exists()  # read-status never creates the database
    station = Station(probability_design)
    station.answer("reader01", 1, [10, 20], saved_at="2024-05-01T10:00:00")
    station.answer("reader01", 2, [10], submit=False, saved_at="2024-05-01T11:30:00")
    assert main(["read-status", str(probability_design), "--links", "--base-url", "http://10.0.0.5:9000/"]) == 0
    printed = capsys.readouterr().out
    secret = tokens(probability_design)
    assert f"reader01  1/3   3               2024-05-01T11:30:00  http://10.0.0.5:9000/r/{secret['reader01']}" in printed
    assert f"reader02  0/3   0               not started          http://10.0.0.5:9000/r/{secret['reader02']}" in printed
    assert f"admin: http://10.0.0.5:9000/admin/{secret['admin']}" in printed
    assert "0 of 2 readers finished" in printed


def test_read_refuses_a_design_without_images(tmp_path, capsys):
    pd.DataFrame({"exam": ["a"], "case": ["a/left"]}).to_csv(tmp_path / "cases.csv", index=False)
    assert main(["design-reader-study", str(tmp_path / "cases.csv"), "--readers", "1", "--severities", "0", "1",
                 "--out", str(tmp_path / "d")]) == 0
    _fails(["read", str(tmp_path / "d")], capsys, f"{tmp_path / 'd'}: has no images.csv")
    _fails(["read", str(tmp_path / "d"), "--port", "70000"], capsys, "has no images.csv")


def test_a_spec_runs_on_the_export(probability_design, tmp_path, capsys):
    station = Station(probability_design)
    for reader in ("reader01", "reader02"):
        for position in (1, 2, 3):
            cases = station.cases[station.exam(reader, position)]
            station.answer(reader, position, [90 if "left" in case else 10 for case in cases])
    assert main(["read-export", str(probability_design), "--out", str(tmp_path / "reads.csv")]) == 0
    spec = write_reads_spec(tmp_path / "study", tmp_path / "reads.csv", probability_design.parent / "cases.csv")
    capsys.readouterr()
    # validate reads and checks everything run reads, without the fits (the browser test runs it in full)
    assert main(["validate", str(spec)]) == 0
    assert "6 cases, 3 severities, radiologists: 12 predictions" in capsys.readouterr().out


def test_the_demo_design_is_read_through_the_station_exported_and_analysed(tmp_path, capsys):
    import warnings

    with warnings.catch_warnings():  # starlette's notice about its httpx client, not ours
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient
    from perceptcore_plugins.station.app import create_app
    from perceptcore_plugins.station.design import load_design

    spec, design = demo_design(tmp_path / "demo", readers=2)
    data = Path(json.loads((design / "design.json").read_text())["manifest"]).parent
    labels = dict(pd.read_csv(data / "cases.csv", dtype=str)[["case", "label"]].to_numpy())
    given, drawn = {}, {}
    for reader, token in tokens(design).items():
        if reader == "admin":
            continue
        client = TestClient(create_app(load_design(design)))
        assert client.get(f"/r/{token}", follow_redirects=False).status_code == 303
        worklist = client.get("/api/worklist").json()
        for item in worklist["exams"]:
            exam = client.get(f"/api/exams/{item['position']}").json()
            for case in exam["cases"]:
                value = 80 if labels[case["case"]] == "malignant" else 20 + item["position"]
                assert client.put(f"/api/exams/{item['position']}/cases/{case['case']}",
                                  json={"value": value}).status_code == 200
                given[(reader, case["case"])] = value
            if item["position"] == 1:
                view = exam["views"][0]
                assert client.put(f"/api/exams/1/views/{view['id']}/boxes",
                                  json={"boxes": [[10, 20, 50, 60]]}).status_code == 200
                drawn[reader] = (view["case"], view["view"])
            assert client.post(f"/api/exams/{item['position']}/submit").status_code == 200
    reads, rois = tmp_path / "reads.csv", tmp_path / "rois"
    assert main(["read-export", str(design), "--out", str(reads), "--rois", str(rois)]) == 0
    assignment = pd.read_csv(design / "assignment.csv", dtype=str)
    severity = {(a.reader, a.exam): a.severity for a in assignment.itertuples()}  # exam = case in the demo
    expected = sorted((reader, severity[(reader, case)], case, value / 100) for (reader, case), value in given.items())
    assert sorted(read_export(reads)) == expected and len(expected) == 2 * len(labels)
    for reader, (case, view) in drawn.items():
        boxes = {(r.case, r.view): r.roi_boxes for r in load_manifest(rois / f"{reader}.csv", reader)}
        assert boxes.pop((case, view)) == ((10, 20, 50, 60),) and not any(boxes.values())
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(tmp_path / "run"), f"--set=observers[0].predictions={reads}"]) == 0
    confidence = pd.read_csv(tmp_path / "run" / "predictive_confidence.csv", dtype={"severity": str})
    assert set(confidence.observer) == {"radiologists"} and set(confidence.severity) == {"1"}


def test_read_serves_the_design_on_this_machine_and_says_so(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    import httpx

    design = make_design(tmp_path, readers=1, exams=1)
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "perceptcore.cli", "read", str(design), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.poll() else ""
            time.sleep(0.2)
        admin = tokens(design)["admin"]
        assert httpx.get(f"http://127.0.0.1:{port}/admin/{admin}", timeout=5).status_code == 303
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=20)
    assert f"serving {design} at http://127.0.0.1:{port} (this machine only; --host 0.0.0.0 serves the network)" in out
    assert f"admin: http://127.0.0.1:{port}/admin/{admin}" in out
