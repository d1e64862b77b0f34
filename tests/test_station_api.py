"""The reading station's HTTP API (FastAPI's TestClient, and a real uvicorn server where raw requests
or real concurrency matter): access, isolation between readers, no leak of the key, path traversal,
persistence, locking, bad input, rendered pixels and 10 readers at once.

Designs are made by the real `perceptcore design-reader-study` (tests/station_design.py) once per
kind and copied for each test."""

from __future__ import annotations

import io
import json
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from perceptcore.errors import PerceptcoreError
from perceptcore_plugins.station import app as station_app
from perceptcore_plugins.station.app import create_app
from perceptcore_plugins.station.design import load_design
from perceptcore_plugins.station.render import ByteBoundedLRU, Renderer, encode_png, read_pixels
from station_design import make_design, tokens

# Starlette prefers httpx2 for its test client; httpx is what is installed and works.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

# Severity labels no response could hold by chance (they are looked for as JSON strings).
SEVERITIES = ["0", "0.77", "1.9"]
LABEL_WORDS = ("malignant", "benign", "nonbiopsied", "microcalcifications", "soft_tissue_lesions")
SIZE = (256, 192)  # (height, width): big enough for max_side's lower bound of 64 to downscale


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Designs made once per kind; `design(kind)` in a test copies one."""
    made = {}

    def template(readers=2, calls="probability", roi=True):
        key = (readers, calls, roi)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"template_{readers}_{calls}_{roi}")
            made[key] = make_design(folder, readers=readers, calls=calls, roi=roi, size=SIZE, severities=SEVERITIES)
        return made[key]

    return template


@pytest.fixture
def design(templates, tmp_path):
    def copy(readers=2, calls="probability", roi=True) -> Path:
        target = tmp_path / f"design_{readers}_{calls}_{roi}"
        shutil.copytree(templates(readers, calls, roi), target)
        return target

    return copy


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def client_for(folder: Path):
    from fastapi.testclient import TestClient

    return TestClient(create_app(load_design(folder)))


def assignment(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "assignment.csv", dtype=str)


def images(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "images.csv", dtype=str, keep_default_na=False)


def database(folder: Path) -> dict:
    """Every row of the station's tables, for before/after comparisons."""
    path = folder / "station.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall())
                for table in ("answers", "boxes", "submissions")}


def answer_all(client, headers, position: int, value=50) -> list:
    cases = [c["case"] for c in client.get(f"/api/exams/{position}", headers=headers).json()["cases"]]
    for case in cases:
        assert client.put(f"/api/exams/{position}/cases/{case}", headers=headers, json={"value": value}).status_code \
            == 200
    return cases


# --------------------------------------------------------------------------- access

def test_requests_without_a_credential_are_401_and_with_a_wrong_one_403(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    reader_routes = [("GET", "/api/worklist", None), ("GET", "/api/exams/1", None),
                     ("GET", "/api/exams/1/views/0/image", None),
                     ("PUT", "/api/exams/1/cases/E1/left", {"value": 10}),
                     ("PUT", "/api/exams/1/views/0/boxes", {"boxes": []}), ("POST", "/api/exams/1/submit", None)]
    for method, url, body in reader_routes:
        assert client.request(method, url, json=body).status_code == 401, url
        assert client.request(method, url, json=body, headers=bearer("x" * 32)).status_code == 403, url
        # The admin's token is not a reader's.
        assert client.request(method, url, json=body, headers=bearer(keys["admin"])).status_code == 403, url
        assert client.request(method, url, json=body, headers={"Authorization": "Basic abc"}).status_code == 401, url
    # Tokens that are no text a token could be: refused, not a server error.
    assert client.get("/api/worklist", headers={"Authorization": b"Bearer \xe9\xff\x00"}).status_code == 403
    assert client.get("/r/%ED%A0%80%FF", follow_redirects=False).status_code == 403
    assert client.get("/api/admin/progress").status_code == 401
    assert client.get("/api/admin/progress", headers=bearer(keys["reader01"])).status_code == 403
    assert client.get("/api/admin/progress", headers=bearer("x" * 32)).status_code == 403
    progress = client.get("/api/admin/progress", headers=bearer(keys["admin"]))
    assert progress.status_code == 200
    assert [row["reader"] for row in progress.json()["readers"]] == ["reader01", "reader02"]
    assert client.get("/healthz").json() == {"ok": True}
    assert database(folder) == {"answers": [], "boxes": [], "submissions": []}


def test_links_set_http_only_cookies_and_the_pages_need_them(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    assert client.get("/").status_code == 401
    assert client.get("/admin").status_code == 401
    bad = client.get("/r/" + "y" * 32, follow_redirects=False)
    assert bad.status_code == 403 and "set-cookie" not in bad.headers
    assert client.get("/r/" + keys["admin"], follow_redirects=False).status_code == 403

    login = client.get("/r/" + keys["reader01"], follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"pc_reader={keys['reader01']};")
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
    page = client.get("/")  # the client keeps the cookie, as a browser does
    index = station_app.STATIC / "index.html"
    if index.is_file():
        assert page.status_code == 200 and page.text == index.read_text()
    assert client.get("/api/worklist").json()["reader"] == "reader01"
    assert client.get("/api/admin/progress").status_code == 401  # a reader cookie is no admin credential
    assert client.get("/admin").status_code == 401

    # A link clicked on another site: the browser withholds the SameSite=Strict cookie all along that
    # navigation, so "/" answers with a page that navigates again from this origin (checked in Chromium).
    client.cookies.clear()
    elsewhere = client.get("/", headers={"Sec-Fetch-Site": "cross-site"})
    assert elsewhere.status_code == 200 and '<meta http-equiv="refresh" content="0; url=/">' in elsewhere.text
    assert client.get("/", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 401
    assert client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Cookie": "pc_reader=" + "z" * 32}).status_code \
        == 403

    login = client.get("/admin/" + keys["admin"], follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/admin"
    assert "pc_admin=" in login.headers["set-cookie"] and "HttpOnly" in login.headers["set-cookie"]
    assert client.get("/api/admin/progress").status_code == 200
    admin_page = station_app.STATIC / "admin.html"
    if admin_page.is_file():
        assert client.get("/admin").text == admin_page.read_text()
    assert client.get("/api/worklist").status_code == 401
    assert client.get("/admin/" + keys["reader01"], follow_redirects=False).status_code == 403


def test_each_reader_sees_only_their_own_worklist_answers_and_views(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    key = assignment(folder)
    table = images(folder)
    for reader in ("reader01", "reader02"):
        worklist = client.get("/api/worklist", headers=bearer(keys[reader])).json()
        assert worklist["reader"] == reader
        expected = key[key.reader == reader].sort_values("order", key=lambda o: o.astype(int))
        assert [e["position"] for e in worklist["exams"]] == expected.order.astype(int).tolist()
        assert [e["exam"] for e in worklist["exams"]] == expected.exam.tolist()
        assert worklist["total"] == len(expected) and worklist["done"] == 0 and worklist["next"] == 1
        for position in expected.order.astype(int):
            views = client.get(f"/api/exams/{position}", headers=bearer(keys[reader])).json()["views"]
            mine = table[(table.reader == reader) & (table.order.astype(int) == position)]
            assert sorted(v["id"] for v in views) == sorted(mine.index.tolist())

    # reader01 answers their first exam; reader02 reads the same exam at some position and sees nothing of it.
    cases = answer_all(client, bearer(keys["reader01"]), 1, value=83)
    exam = key[(key.reader == "reader01") & (key.order == "1")].exam.iloc[0]
    other_position = int(key[(key.reader == "reader02") & (key.exam == exam)].order.iloc[0])
    seen = client.get(f"/api/exams/{other_position}", headers=bearer(keys["reader02"])).json()
    assert {c["case"] for c in seen["cases"]} == set(cases)
    assert all(c["value"] is None for c in seen["cases"])
    assert client.get("/api/worklist", headers=bearer(keys["reader02"])).json()["exams"][other_position - 1][
        "answered"] == 0
    # reader01's view ids are not reader02's, at any of reader02's positions.
    theirs = table[table.reader == "reader01"].index.tolist()
    for position in range(1, 4):
        for view_id in theirs:
            response = client.get(f"/api/exams/{position}/views/{view_id}/image", headers=bearer(keys["reader02"]))
            assert response.status_code == 404
            response = client.put(f"/api/exams/{position}/views/{view_id}/boxes", headers=bearer(keys["reader02"]),
                                  json={"boxes": [[0, 0, 4, 4]]})
            assert response.status_code == 404
    assert client.get("/api/exams/4", headers=bearer(keys["reader02"])).status_code == 404


def test_no_response_holds_a_severity_a_label_or_another_readers_name(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    texts = []
    for reader, other in (("reader01", "reader02"), ("reader02", "reader01")):
        headers = bearer(keys[reader])
        reader_texts = [client.get("/api/worklist", headers=headers).text]
        for position in (1, 2, 3):
            exam = client.get(f"/api/exams/{position}", headers=headers)
            reader_texts.append(exam.text)
            for case in exam.json()["cases"]:
                reader_texts.append(client.put(f"/api/exams/{position}/cases/{case['case']}", headers=headers,
                                               json={"value": 40}).text)
            view = exam.json()["views"][0]["id"]
            reader_texts.append(client.put(f"/api/exams/{position}/views/{view}/boxes", headers=headers,
                                           json={"boxes": [[1, 2, 30, 40]]}).text)
            reader_texts.append(client.post(f"/api/exams/{position}/submit", headers=headers).text)
            reader_texts.append(client.get(f"/api/exams/{position}", headers=headers).text)
        reader_texts.append(client.post("/api/exams/1/submit", headers=headers).text)  # a 409's message
        reader_texts.append(client.get("/api/worklist", headers=headers).text)
        assert (json.loads(reader_texts[-1])["done"], json.loads(reader_texts[-1])["next"]) == (3, None)
        for text in reader_texts:
            assert other not in text
            assert keys[other] not in text and keys["admin"] not in text
        texts += reader_texts
    everything = "\n".join(texts)
    for word in (*LABEL_WORDS, "severity", "severities", "assignment", "gaussian", "lowpass", "perturbation"):
        assert word not in everything.lower(), word
    for text in texts:
        keys_seen, strings = _json_keys_and_strings(json.loads(text))
        assert not strings & set(SEVERITIES)
        assert not {k for k in keys_seen if "sever" in k.lower() or ("label" in k.lower() and k != "label")}


def _json_keys_and_strings(value) -> tuple:
    """(every object key, every string value) in a decoded JSON document."""
    keys, strings, todo = set(), set(), [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            keys |= set(item)
            todo += item.values()
        elif isinstance(item, list):
            todo += item
        elif isinstance(item, str):
            strings.add(item)
    return keys, strings


# --------------------------------------------------------------------------- path traversal

TRAVERSALS = [
    "/static/../design.json", "/static/%2e%2e/design.json", "/static/..%2fdesign.json", "/static/%2e%2e%2fdesign.json",
    "/static/..%5cdesign.json", "/static/....//design.json", "/static/%252e%252e/design.json",
    "/static/../../../../etc/passwd", "/static/%2fetc%2fpasswd", "/static//etc/passwd",
    "/static/../tokens.csv", "/static/../assignment.csv", "/design.json", "/tokens.csv", "/assignment.csv",
    "/api/exams/1/views/../../assignment.csv", "/api/exams/1/views/..%2f..%2fassignment.csv/image",
    "/api/exams/1/views/0%2f..%2f..%2fdesign.json/image", "/api/exams/1/views/-1/image",
    "/api/exams/1/views/1e3/image", "/api/exams/1/views/images%2freader01%2f/image",
    "/api/exams/..%2f..%2ftokens.csv", "/api/exams/1/cases/..%2f..%2fassignment.csv",
    "/r/..%2f..%2ftokens.csv", "/admin/..%2ftokens.csv", "/station.sqlite", "/static/../station.sqlite",
]


def _leaks(body: bytes, folder: Path) -> list:
    """Which secret file's content a response body holds."""
    found = []
    for name in ("design.json", "tokens.csv", "assignment.csv"):
        for line in (folder / name).read_text().splitlines():
            if len(line.strip()) > 8 and line.strip().encode() in body:
                found.append(name)
                break
    if b"root:" in body:
        found.append("/etc/passwd")
    return found


def test_path_traversal_through_the_test_client_gets_4xx_and_no_file(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    for url in TRAVERSALS:
        for headers in ({}, bearer(keys["reader01"]), bearer(keys["admin"])):
            response = client.get(url, headers=headers)
            assert 400 <= response.status_code < 500, (url, response.status_code)
            assert not _leaks(response.content, folder), url


def test_raw_traversal_requests_to_the_real_server_get_4xx_and_no_file(design):
    """The test client normalises some URLs; a raw request line reaches uvicorn as written."""
    folder = design()
    keys = tokens(folder)
    with live_server(folder) as port:
        # Sent as written, "/static/.." is no longer the test client's "/" (the reader's page).
        for url in TRAVERSALS + ["/static/..", "/static/..\\design.json", "/static/./../design.json"]:
            for cookie in ("", f"Cookie: pc_reader={keys['reader01']}\r\n"):
                status, body = raw_get(port, url, cookie)
                assert 400 <= status < 500, (url, status)
                assert not _leaks(body, folder), url


def test_static_files_cannot_escape_their_folder_through_a_link(design, tmp_path, monkeypatch):
    folder = design()
    static = tmp_path / "static"
    static.mkdir()
    (static / "station.css").write_text("body {}")
    (static / "escape.json").symlink_to(folder / "design.json")
    monkeypatch.setattr(station_app, "STATIC", static)
    client = client_for(folder)
    assert client.get("/static/station.css").text == "body {}"
    response = client.get("/static/escape.json")
    assert response.status_code == 404 and not _leaks(response.content, folder)


def test_an_image_file_outside_the_design_folder_is_refused_when_the_design_is_loaded(design, tmp_path):
    folder = design()
    table = images(folder)
    outside = tmp_path / "outside.png"
    shutil.copy(folder / table.file.iloc[0], outside)
    for file in ("../outside.png", str(outside), "images/../../outside.png"):
        edited = table.copy()
        edited.loc[0, "file"] = file
        edited.to_csv(folder / "images.csv", index=False)
        with pytest.raises(PerceptcoreError, match=r"images\.csv: row 2: column 'file'"):
            load_design(folder)
    # A link inside the folder that points outside it: resolved and refused.
    (folder / "images" / "link.png").symlink_to(outside)
    edited = table.copy()
    edited.loc[0, "file"] = "images/link.png"
    edited.to_csv(folder / "images.csv", index=False)
    with pytest.raises(PerceptcoreError, match="outside the design folder"):
        load_design(folder)


# --------------------------------------------------------------------------- answers

def test_answers_are_saved_at_once_and_survive_a_restart(design):
    folder = design()
    keys = tokens(folder)
    headers = bearer(keys["reader02"])
    first = client_for(folder)
    cases = [c["case"] for c in first.get("/api/exams/2", headers=headers).json()["cases"]]
    saved = first.put(f"/api/exams/2/cases/{cases[0]}", headers=headers, json={"value": 12.5})
    assert saved.status_code == 200 and saved.json()["saved"] is True
    view = first.get("/api/exams/2", headers=headers).json()["views"][1]["id"]
    assert first.put(f"/api/exams/2/views/{view}/boxes", headers=headers,
                     json={"boxes": [[3, 4, 50, 60], [0, 0, 1, 1]]}).status_code == 200
    # On disk before the next request: read by another connection, with the app still running.
    rows = database(folder)
    assert [(r[0], r[1], r[3], r[4]) for r in rows["answers"]] == [("reader02", 2, cases[0], 12.5)]
    assert [(r[0], r[1], r[2], json.loads(r[3])) for r in rows["boxes"]] == [
        ("reader02", 2, view, [[3, 4, 50, 60], [0, 0, 1, 1]])]

    restarted = client_for(folder)  # a new app on the same folder, as after a killed server
    exam = restarted.get("/api/exams/2", headers=headers).json()
    assert {c["case"]: c["value"] for c in exam["cases"]} == {cases[0]: 12.5, cases[1]: None}
    assert exam["boxes"][str(view)] == [[3, 4, 50, 60], [0, 0, 1, 1]]
    worklist = restarted.get("/api/worklist", headers=headers).json()
    assert [e["answered"] for e in worklist["exams"]] == [0, 1, 0]
    # A later answer replaces the earlier one.
    restarted.put(f"/api/exams/2/cases/{cases[0]}", headers=headers, json={"value": 99})
    assert [r[4] for r in database(folder)["answers"]] == [99.0]


def test_submit_needs_every_case_then_locks_the_exam(design):
    folder = design()
    keys = tokens(folder)
    headers = bearer(keys["reader01"])
    client = client_for(folder)
    cases = [c["case"] for c in client.get("/api/exams/1", headers=headers).json()["cases"]]
    client.put(f"/api/exams/1/cases/{cases[0]}", headers=headers, json={"value": 70})
    incomplete = client.post("/api/exams/1/submit", headers=headers)
    assert incomplete.status_code == 409 and cases[1] in incomplete.json()["detail"]
    assert database(folder)["submissions"] == []

    client.put(f"/api/exams/1/cases/{cases[1]}", headers=headers, json={"value": 20})
    view = client.get("/api/exams/1", headers=headers).json()["views"][0]["id"]
    client.put(f"/api/exams/1/views/{view}/boxes", headers=headers, json={"boxes": [[1, 1, 9, 9]]})
    submitted = client.post("/api/exams/1/submit", headers=headers)
    assert submitted.status_code == 200 and submitted.json()["next"] == 2
    before = database(folder)
    assert len(before["submissions"]) == 1

    assert client.put(f"/api/exams/1/cases/{cases[0]}", headers=headers, json={"value": 5}).status_code == 409
    assert client.put(f"/api/exams/1/views/{view}/boxes", headers=headers, json={"boxes": []}).status_code == 409
    assert client.post("/api/exams/1/submit", headers=headers).status_code == 409  # replayed
    assert database(folder) == before
    exam = client.get("/api/exams/1", headers=headers).json()
    assert exam["submitted"] is True and [c["value"] for c in exam["cases"]] == [70, 20]
    worklist = client.get("/api/worklist", headers=headers).json()
    assert (worklist["done"], worklist["next"], worklist["exams"][0]["submitted"]) == (1, 2, True)
    progress = client.get("/api/admin/progress", headers=bearer(keys["admin"])).json()["readers"][0]
    last = max(row[-1] for rows in before.values() for row in rows)
    assert progress == {"reader": "reader01", "done": 1, "total": 3, "answered_cases": 2, "total_cases": 6,
                        "last_saved": last}
    # Another reader's same exam is untouched by this lock.
    other = bearer(keys["reader02"])
    assert client.put(f"/api/exams/1/cases/{client.get('/api/exams/1', headers=other).json()['cases'][0]['case']}",
                      headers=other, json={"value": 1}).status_code == 200


BAD_BODIES = {
    "probability": ['{"value": -0.5}', '{"value": 100.01}', '{"value": 1e309}', '{"value": NaN}',
                    '{"value": Infinity}', '{"value": "50"}', '{"value": true}', '{"value": null}', '{"value": [50]}',
                    '{}', '{"value": 50, "extra": 1}', '[50]', '50', '"value"', '{"value": 5', '', 'value=50'],
    "binary": ['{"value": 0.5}', '{"value": 2}', '{"value": -1}', '{"value": true}'],
    "birads": ['{"value": 0}', '{"value": 6}', '{"value": 3.5}', '{"value": "4"}'],
}
GOOD_VALUES = {"probability": [0, 100, 37.5], "binary": [0, 1], "birads": [1, 5, 4.0]}


@pytest.mark.parametrize("calls", ["probability", "binary", "birads"])
def test_out_of_range_and_malformed_answers_are_4xx_and_change_nothing(design, calls):
    folder = design(calls=calls, roi=False)
    keys = tokens(folder)
    headers = bearer(keys["reader01"])
    client = client_for(folder)
    cases = [c["case"] for c in client.get("/api/exams/1", headers=headers).json()["cases"]]
    client.put(f"/api/exams/1/cases/{cases[0]}", headers=headers, json={"value": GOOD_VALUES[calls][0]})
    before = database(folder)
    for body in BAD_BODIES[calls] + BAD_BODIES["probability"][5:]:
        response = client.put(f"/api/exams/1/cases/{cases[0]}", headers={**headers, "Content-Type": "application/json"},
                              content=body)
        assert response.status_code in (400, 422), (body, response.status_code)
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
    for url in ("/api/exams/0/cases/x", "/api/exams/99/cases/x", "/api/exams/-1/cases/x",
                f"/api/exams/1/cases/{cases[0]}x", "/api/exams/1/cases/E999/left"):
        response = client.put(url, headers=headers, json={"value": GOOD_VALUES[calls][0]})
        assert response.status_code == 404, url
    assert client.put("/api/exams/one/cases/x", headers=headers, json={"value": 1}).status_code == 422
    for url in ("/api/exams/0/submit", "/api/exams/99/submit"):
        assert client.post(url, headers=headers).status_code == 404
    assert database(folder) == before
    for value in GOOD_VALUES[calls]:
        response = client.put(f"/api/exams/1/cases/{cases[1]}", headers=headers, json={"value": value})
        assert response.status_code == 200 and response.json()["value"] == value
    assert client.get("/api/worklist", headers=headers).json()["calls"] == calls


def test_boxes_are_checked_against_the_view_and_the_design(design):
    folder = design()
    keys = tokens(folder)
    headers = bearer(keys["reader01"])
    client = client_for(folder)
    view = client.get("/api/exams/1", headers=headers).json()["views"][0]
    height, width = view["height"], view["width"]
    assert (height, width) == SIZE
    url = f"/api/exams/1/views/{view['id']}/boxes"
    good = [[0, 0, height, width], [10, 20, 11, 21], [5, 5, 100, 90]]  # the whole image is a valid box
    assert client.put(url, headers=headers, json={"boxes": good}).json()["boxes"] == good
    before = database(folder)
    bad = [good + [[1, 1, 2, 2]],  # more than max_boxes (3)
           [[0, 0, height + 1, 10]], [[0, 0, 10, width + 1]], [[-1, 0, 10, 10]], [[10, 0, 10, 10]],
           [[20, 0, 10, 10]], [[0, 10, 5, 3]], [[0, 0, 10.5, 10]], [[0, 0, "10", 10]], [[0, 0, 10]], [[0, 0, 1, 1, 1]],
           [[0, 0, True, 10]], [[0, 0, 2 ** 70, 10]], "0 0 10 10", [0, 0, 10, 10], None]
    for boxes in bad:
        response = client.put(url, headers=headers, json={"boxes": boxes})
        assert response.status_code == 422, (boxes, response.status_code)
    assert client.put(url, headers=headers, json={"boxes": [], "more": 1}).status_code == 422
    assert client.put("/api/exams/1/views/99999/boxes", headers=headers, json={"boxes": []}).status_code == 404
    assert database(folder) == before
    assert client.put(url, headers=headers, json={"boxes": []}).status_code == 200  # clearing is allowed
    assert client.get("/api/exams/1", headers=headers).json()["boxes"][str(view["id"])] == []

    plain = design(roi=False)
    plain_client = client_for(plain)
    plain_headers = bearer(tokens(plain)["reader01"])
    view_id = plain_client.get("/api/exams/1", headers=plain_headers).json()["views"][0]["id"]
    assert plain_client.get("/api/worklist", headers=plain_headers).json()["roi"] is False
    response = plain_client.put(f"/api/exams/1/views/{view_id}/boxes", headers=plain_headers,
                                json={"boxes": [[0, 0, 5, 5]]})
    assert response.status_code == 404 and database(plain)["boxes"] == []


# --------------------------------------------------------------------------- views and pixels

def test_views_hang_in_the_standard_order_then_the_others(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    for position in (1, 2, 3):
        views = client.get(f"/api/exams/{position}", headers=bearer(keys["reader01"])).json()["views"]
        assert [v["label"] for v in views] == ["R-CC", "L-CC", "R-MLO", "L-MLO"]
        assert [(v["laterality"], v["view"]) for v in views] == [("right", "CC"), ("left", "CC"), ("right", "MLO"),
                                                                 ("left", "MLO")]
        cases = client.get(f"/api/exams/{position}", headers=bearer(keys["reader01"])).json()["cases"]
        assert [c["label"] for c in cases] == ["Right breast", "Left breast"]
    # Shuffled rows, a lower-case name and a view outside the standard four.
    table = images(folder)
    first = table[(table.reader == "reader01") & (table.order == "1")].index
    table.loc[first[0], "view"] = "ML"  # a left CC becomes a left ML
    table.loc[first[1], "view"] = "mlo"
    table.iloc[::-1].to_csv(folder / "images.csv", index=False)  # ids are rows: now reversed
    views = client_for(folder).get("/api/exams/1", headers=bearer(keys["reader01"])).json()["views"]
    assert [v["label"] for v in views] == ["R-CC", "R-MLO", "L-MLO", "L-ML"]


def source_pixels(folder: Path, view_id: int) -> np.ndarray:
    """A view's stored grey levels, read independently of the station: images.csv row -> PNG."""
    with Image.open(folder / images(folder).file.iloc[view_id]) as image:
        return np.array(image).astype(np.int64)


def windowed(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((pixels - (center - width / 2)) / width * 255, 0, 255)


def decode(response) -> np.ndarray:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.mode == "L"
        return np.array(image).astype(np.float64)


def test_a_view_is_served_windowed_at_full_resolution(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    exam = client.get("/api/exams/2", headers=bearer(keys["reader02"])).json()
    view = exam["views"][2]
    assert view["bits"] == 12 and view["window"] == {"center": 2048, "width": 4096}
    pixels = source_pixels(folder, view["id"])
    url = f"/api/exams/2/views/{view['id']}/image"
    default = client.get(url, headers=bearer(keys["reader02"]))
    assert default.headers["cache-control"] == "private, max-age=3600"
    shown = decode(default)
    assert shown.shape == pixels.shape
    # The rule is rint of the window (render.py): within half a grey level of the unrounded value.
    assert np.abs(shown - windowed(pixels, 2048, 4096)).max() <= 0.5
    center, width = float(np.percentile(pixels, 50)), float(np.percentile(pixels, 90) - np.percentile(pixels, 10))
    narrow = decode(client.get(url, params={"center": center, "width": width}, headers=bearer(keys["reader02"])))
    reference = windowed(pixels, center, width)
    assert np.abs(narrow - reference).max() <= 0.5
    assert (narrow == 0).any() and (narrow == 255).any()  # the window clips at both ends


def test_a_view_is_downscaled_by_area_averaging(design):
    folder = design()
    keys = tokens(folder)
    client = client_for(folder)
    view = client.get("/api/exams/1", headers=bearer(keys["reader01"])).json()["views"][0]
    pixels = source_pixels(folder, view["id"])
    url = f"/api/exams/1/views/{view['id']}/image"
    center, width = 1500.0, 1800.0
    half = decode(client.get(url, params={"center": center, "width": width, "max_side": SIZE[0] // 2},
                             headers=bearer(keys["reader01"])))
    blocks = windowed(pixels, center, width).reshape(SIZE[0] // 2, 2, SIZE[1] // 2, 2).mean(axis=(1, 3))
    assert half.shape == blocks.shape
    assert np.abs(half - blocks).max() <= 0.5 + 1e-3  # one rounding of the mean (float32 sums)
    for max_side, shape in ((100, (100, 75)), (64, (64, 48)), (SIZE[0], SIZE), (4000, SIZE)):
        shown = decode(client.get(url, params={"max_side": max_side}, headers=bearer(keys["reader01"])))
        assert shown.shape == shape, max_side
    for params in ({"max_side": 63}, {"max_side": 16385}, {"max_side": "big"}, {"center": "nan"},
                   {"center": "inf"}, {"width": 0}, {"width": -10}, {"width": "nan"}, {"center": 1e9}):
        response = client.get(url, params=params, headers=bearer(keys["reader01"]))
        assert response.status_code == 422, params


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (37, 61), (300, 257)])
def test_the_png_encoder_round_trips_through_pillow(shape):
    rng = np.random.default_rng(sum(shape))
    for grey in (rng.integers(0, 256, size=shape, dtype=np.uint8), np.full(shape, 255, np.uint8),
                 np.zeros(shape, np.uint8)):
        with Image.open(io.BytesIO(encode_png(grey))) as image:
            image.load()
            assert image.mode == "L" and np.array_equal(np.asarray(image), grey)


def test_pixels_are_read_exactly_and_caches_are_bounded_by_bytes(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, size=(40, 30), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "full_range.png")
    assert np.array_equal(read_pixels(tmp_path / "full_range.png"), pixels)
    renderer = Renderer(decoded_bytes=pixels.nbytes * 2)
    first = renderer.pixels(tmp_path / "full_range.png", (40, 30))
    assert renderer.pixels(tmp_path / "full_range.png", (40, 30)) is first  # cached
    with pytest.raises(ValueError):
        first[0, 0] = 1  # shared between threads: read-only
    with pytest.raises(PerceptcoreError, match="design says 30x40"):
        Renderer().pixels(tmp_path / "full_range.png", (30, 40))

    cache = ByteBoundedLRU(100)
    for key in "abcd":
        cache.put(key, key, 30)
    assert len(cache) == 3 and cache.get("a") is None and cache.size_bytes == 90
    cache.get("b")  # now most recently used
    cache.put("e", "e", 30)
    assert cache.get("c") is None and cache.get("b") == "b"
    cache.put("huge", "x", 101)
    assert cache.get("huge") is None and cache.size_bytes <= 100


# --------------------------------------------------------------------------- ten readers at once

def test_ten_readers_saving_at_once_lose_nothing_and_never_cross(design):
    folder = design(readers=10)
    keys = tokens(folder)
    readers = [f"reader{i:02d}" for i in range(1, 11)]
    expected, errors = {}, []
    start = threading.Barrier(len(readers))

    def read(index: int, reader: str, port: int):
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=bearer(keys[reader]), timeout=30) as http:
                worklist = http.get("/api/worklist").json()
                start.wait()
                for exam in worklist["exams"]:
                    cases = [c["case"] for c in http.get(f"/api/exams/{exam['position']}").json()["cases"]]
                    for k, case in enumerate(cases):
                        for attempt in (1, 2):  # the second value replaces the first
                            value = index * 10 + k + attempt / 4
                            response = http.put(f"/api/exams/{exam['position']}/cases/{case}", json={"value": value})
                            assert response.status_code == 200, response.text
                        expected[(reader, exam["position"], case)] = value
                    assert http.post(f"/api/exams/{exam['position']}/submit").status_code == 200
        except Exception as exc:  # reported by the main thread
            errors.append(f"{reader}: {exc!r}")

    with live_server(folder) as port:
        threads = [threading.Thread(target=read, args=(i, r, port)) for i, r in enumerate(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        for reader in readers:
            for position in (1, 2, 3):
                exam = client.get(f"/api/exams/{position}", headers=bearer(keys[reader])).json()
                assert exam["submitted"] is True
                for case in exam["cases"]:
                    assert case["value"] == expected[(reader, position, case["case"])]
    rows = database(folder)
    assert len(rows["answers"]) == len(expected) == 10 * 3 * 2
    assert {(r[0], r[1], r[3]): r[4] for r in rows["answers"]} == expected
    assert len(rows["submissions"]) == 30


# --------------------------------------------------------------------------- the design folder

def test_a_broken_design_is_an_error_naming_the_file_and_row(design):
    folder = design()

    def expect(match, name, edit):
        original = (folder / name).read_text()
        (folder / name).write_text(edit(original))
        try:
            with pytest.raises(PerceptcoreError, match=match):
                load_design(folder)
        finally:
            (folder / name).write_text(original)

    expect(r"design\.json: calls 'maybe'", "design.json", lambda t: t.replace('"probability"', '"maybe"'))
    expect(r"design\.json: roi", "design.json", lambda t: t.replace('"roi": true', '"roi": "yes"'))
    expect(r"tokens\.csv: no admin row", "tokens.csv", lambda t: "\n".join(t.splitlines()[:-1]) + "\n")
    expect(r"tokens\.csv: row 3: the same token as row 2", "tokens.csv",
           lambda t: t.replace(t.splitlines()[2].split(",")[2], t.splitlines()[1].split(",")[2]))
    expect(r"assignment\.csv: row 2: exam 'E9' is not in exams\.csv", "assignment.csv",
           lambda t: t.replace(t.splitlines()[1].split(",")[2], "E9", 1))
    expect(r"assignment\.csv: reader 'reader01''s orders are not 1\.\.3", "assignment.csv",
           lambda t: t.replace("reader01,1,", "reader01,7,"))
    expect(r"images\.csv: row 2: column 'laterality'", "images.csv", lambda t: t.replace(",left,CC,", ",up,CC,", 1))
    expect(r"images\.csv: row 2: column 'exam'", "images.csv",
           lambda t: t.replace(t.splitlines()[1], _replace_field(t.splitlines()[1], 2, "E9")))
    expect(r"images\.csv: row 2: column 'file': .* the row says 255x192", "images.csv",
           lambda t: t.replace(t.splitlines()[1], _replace_field(t.splitlines()[1], 8, "255")))
    expect(r"images\.csv: row 2: column 'window_center'", "images.csv",
           lambda t: t.replace(t.splitlines()[1], t.splitlines()[1][:-2] + ",abc,100"))
    expect(r"images\.csv: no image of case", "images.csv", lambda t: "\n".join(
        line for line in t.splitlines() if not line.startswith("reader01,1,") or ",left," not in line) + "\n")
    (folder / "images.csv").rename(folder / "gone.csv")
    with pytest.raises(PerceptcoreError, match="no images.csv"):
        load_design(folder)
    (folder / "gone.csv").rename(folder / "images.csv")
    (folder / "station.sqlite").write_text("not a database")
    with pytest.raises(PerceptcoreError, match=r"station\.sqlite: cannot open the station's database"):
        create_app(load_design(folder))


def _replace_field(line: str, index: int, value: str) -> str:
    fields = line.split(",")
    fields[index] = value
    return ",".join(fields)


def test_dicom_window_tags_in_images_csv_are_the_default_window(design):
    folder = design()
    table = images(folder)
    table["window_center"] = ""
    table["window_width"] = ""
    view_id = int(table[(table.reader == "reader01") & (table.order == "1")].index[0])
    table.loc[view_id, ["window_center", "window_width"]] = ["1700", "900"]
    table.to_csv(folder / "images.csv", index=False)
    keys = tokens(folder)
    client = client_for(folder)
    views = {v["id"]: v for v in client.get("/api/exams/1", headers=bearer(keys["reader01"])).json()["views"]}
    assert views[view_id]["window"] == {"center": 1700, "width": 900}
    shown = decode(client.get(f"/api/exams/1/views/{view_id}/image", headers=bearer(keys["reader01"])))
    assert np.abs(shown - windowed(source_pixels(folder, view_id), 1700, 900)).max() <= 1


# --------------------------------------------------------------------------- a real server

class live_server:
    """uvicorn serving the station on a free localhost port, in a thread; `with live_server(f) as port`."""

    def __init__(self, folder: Path):
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(create_app(load_design(folder)), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self.socket.getsockname()[1]

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


def raw_get(port: int, target: str, extra_headers: str = "") -> tuple:
    """(status, body) of a GET whose request line is sent exactly as written."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra_headers}Connection: close\r\n\r\n"
                           .encode("latin-1"))
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
